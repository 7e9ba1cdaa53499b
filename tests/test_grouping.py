import math

import pytest
import torch

from relion_graphsplit.geometry import MIRROR, angular_distance, euler_to_matrix, fibonacci_sphere, projection_direction
from relion_graphsplit.symmetry import symmetry_matrices
from relion_graphsplit.grouping import assign_to_cones, asymmetric_unit_directions, default_sampling


def random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    rot = torch.rad2deg(torch.atan2(d[:, 1], d[:, 0]))
    tilt = torch.rad2deg(torch.acos(d[:, 2]))
    psi = torch.rand(n, generator=g, dtype=torch.float64) * 360
    return euler_to_matrix(rot, tilt, psi)


@pytest.mark.parametrize("name", ["C1", "C2", "C4", "D3", "T", "O", "I"])
def test_asymmetric_unit_size_and_cover(name):
    sym = symmetry_matrices(name)
    sampling = 6.0
    axes = asymmetric_unit_directions(sampling, sym)
    whole = len(fibonacci_sphere(round(4 * math.pi / (math.sqrt(3) / 2 * math.radians(sampling) ** 2))))
    expected = whole / (2 * len(sym))
    assert expected <= len(axes) < 1.35 * expected + 4
    # Every direction on the sphere has an equivalent direction (symmetry and mirror) within the
    # sampling of some axis, so cones as wide as the sampling cover everything.
    probe = fibonacci_sphere(2000)
    copies = torch.einsum("gji,nj->ngi", sym, probe)
    copies = torch.cat([copies, -copies], dim=1)
    nearest = angular_distance(copies[:, :, None, :], axes[None, None]).amin(dim=(1, 2))
    assert nearest.max() < sampling


def test_c1_axes_on_upper_hemisphere():
    axes = asymmetric_unit_directions(7.5, torch.eye(3, dtype=torch.float64)[None])
    assert axes[:, 2].min() > -0.05


def test_members_lie_within_cone_through_equivalent_orientation():
    sym = symmetry_matrices("C2")
    A = random_rotations(3000)
    axes = asymmetric_unit_directions(12.0, sym)
    cones = assign_to_cones(A, axes, 12.0, sym)
    d = projection_direction(cones.rotation)
    angle = angular_distance(d, axes[cones.cone])
    nearest_only = angle > 12.0
    # Only a particle's nearest cone may lie farther than the cone angle (holes between cones).
    assert nearest_only.float().mean() < 0.01
    # Each equivalent orientation is L A S with S in the group and L the identity or the mirror.
    original = A[cones.particle]
    for k in range(0, len(cones.cone), 97):
        L = MIRROR if cones.mirrored[k] else torch.eye(3, dtype=torch.float64)
        S = original[k].T @ L.T @ cones.rotation[k]  # A^T L^T (L A S) = S
        assert min(float((S - s).abs().max()) for s in sym) < 1e-9
    # Every particle is in at least one cone, and on average in several (the cones overlap).
    per_particle = torch.bincount(cones.particle, minlength=len(A))
    assert per_particle.min() >= 1
    assert 2.0 < per_particle.double().mean() < 6.0


def test_default_sampling_targets_particles_per_cone():
    angle = default_sampling(20000, 1, 300)
    A = random_rotations(20000, seed=3)
    eye = torch.eye(3, dtype=torch.float64)[None]
    cones = assign_to_cones(A, asymmetric_unit_directions(angle, eye), angle, eye)
    median = cones.counts().double().median()
    assert 200 < median < 400
    assert default_sampling(100, 1, 300) == 25.0
    assert default_sampling(10**7, 1, 300) == 5.0


@pytest.mark.parametrize("angle", [0.0, -5.0, 120.0])
def test_sampling_and_cone_angle_out_of_range_are_refused(angle):
    c1 = symmetry_matrices("C1")
    with pytest.raises(ValueError, match="degrees"):
        asymmetric_unit_directions(angle, c1)
    with pytest.raises(ValueError, match="degrees"):
        assign_to_cones(torch.eye(3)[None], torch.tensor([[0.0, 0.0, 1.0]]), angle, c1)
