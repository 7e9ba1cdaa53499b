import math
import subprocess
import sys

import pytest
import torch

from relion_graphsplit.fourier.geometry import MIRROR, angular_distance, euler_to_matrix, fibonacci_sphere, projection_direction
from relion_graphsplit.fourier.symmetry import symmetry_matrices
from relion_graphsplit.method import cones as grouping
from relion_graphsplit.method.cones import assign_to_cones, asymmetric_unit_directions, default_sampling


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
    equivalent = cones.rotations(A, sym)
    d = projection_direction(equivalent)
    angle = angular_distance(d, axes[cones.cone])
    nearest_only = angle > 12.0
    # Only a particle's nearest cone may lie farther than the cone angle (holes between cones).
    assert nearest_only.float().mean() < 0.01
    # Each equivalent orientation is L A S with S in the group and L the identity or the mirror.
    original = A[cones.particle]
    for k in range(0, len(cones.cone), 97):
        L = MIRROR if cones.mirrored[k] else torch.eye(3, dtype=torch.float64)
        S = original[k].T @ L.T @ equivalent[k]  # A^T L^T (L A S) = S
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


def dense_unit_directions(sampling_deg: float, symmetry: torch.Tensor) -> torch.Tensor:
    """asymmetric_unit_directions as it was: exact distances from every probe to every axis."""
    spacing = math.radians(sampling_deg)
    n_sphere = max(8, round(4.0 * math.pi / (math.sqrt(3.0) / 2.0 * spacing**2)))
    directions = fibonacci_sphere(n_sphere)
    axes = directions[grouping._in_unit(directions, symmetry)]
    probe = fibonacci_sphere(16 * n_sphere)
    probe = probe[grouping._in_unit(probe, symmetry)]
    distance = grouping._distance_to_axes(probe, axes, symmetry)
    while distance.max() > 0.65 * spacing:
        farthest = probe[distance.argmax()]
        axes = torch.cat([axes, farthest[None]])
        distance = torch.minimum(distance, grouping._distance_to_axes(probe, farthest[None], symmetry))
    return axes


@pytest.mark.parametrize(
    ("name", "sampling"), [("C1", 9.0), ("C4", 5.0), ("D7", 7.3), ("T", 11.0), ("O", 6.5), ("I", 5.0)]
)
def test_kd_tree_preselection_keeps_the_axes_of_the_dense_search(name, sampling):
    sym = symmetry_matrices(name)
    assert torch.equal(asymmetric_unit_directions(sampling, sym), dense_unit_directions(sampling, sym))


def test_chunks_do_not_change_the_geometry():
    sym = symmetry_matrices("D3")
    probe = fibonacci_sphere(5000)
    axes = asymmetric_unit_directions(8.0, sym)
    assert torch.equal(grouping._in_unit(probe, sym, max_elements=100), grouping._in_unit(probe, sym))
    # The same cosines, up to the rounding of the matrix product, whose kernel changes with its size.
    chunked = grouping._distance_to_axes(probe, axes, sym, max_elements=1000)
    assert torch.allclose(chunked, grouping._distance_to_axes(probe, axes, sym), rtol=0.0, atol=1e-12)
    beyond = grouping._beyond(probe, axes, sym, 0.05, max_elements=100)
    assert torch.equal(beyond, grouping._beyond(probe, axes, sym, 0.05))
    assert torch.equal(beyond, chunked > 0.05 - 1e-9)


FINE_GEOMETRY = """
import resource, time, torch
from relion_graphsplit.method.cones import asymmetric_unit_directions, assign_to_cones
from relion_graphsplit.fourier.symmetry import symmetry_matrices
sym = symmetry_matrices("C1")
start = time.perf_counter()
axes = asymmetric_unit_directions(0.5, sym)
q = torch.linalg.qr(torch.randn(300, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
cones = assign_to_cones(q * torch.det(q)[:, None, None], axes, 0.5, sym)
per_particle = torch.bincount(cones.particle, minlength=300)
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(axes), int(per_particle.min()), time.perf_counter() - start, peak_kb)
"""


def test_finest_sampling_geometry_runs_in_bounded_memory():
    """0.5 degrees (the finest allowed): about 95000 cones in C1, whose dense distances to 1.5 million
    probes asked for 2.3 TB."""
    done = subprocess.run([sys.executable, "-c", FINE_GEOMETRY], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    n_axes, fewest, seconds, peak_kb = done.stdout.split()
    expected = 4 * math.pi / (math.sqrt(3) / 2 * math.radians(0.5) ** 2) / 2  # half the sphere's points
    assert expected <= int(n_axes) < 1.05 * expected
    assert int(fewest) >= 1  # every particle in a cone
    assert int(peak_kb) < 2_000_000  # kB: the interpreter and torch take about 0.35 GB of it
    assert float(seconds) < 120
