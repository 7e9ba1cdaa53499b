"""Group particles into overlapping cones of projection direction (thesis eqs. 4.1-4.2).

Cone axes are quasi-uniform directions reduced to the asymmetric unit of the point group together with
the mirror (a projection along -d is the y-mirror of the one along d). A particle joins every cone whose
axis lies within the cone angle of one of its equivalent directions; for each membership we keep the
equivalent orientation that brought it there, so alignment sees every member as a view near the axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from relion_graphsplit.fourier.geometry import MIRROR, fibonacci_sphere, projection_direction

# A generic direction (on no symmetry axis or mirror plane) whose Voronoi cell among its symmetry
# copies defines the asymmetric unit; it lies close to +z so that C1 keeps the upper hemisphere.
_ASU_ANCHOR = torch.nn.functional.normalize(torch.tensor([0.0123, 0.0317, 1.0], dtype=torch.float64), dim=0)

MAX_ELEMENTS = 1 << 22
"""Largest temporary of the cone geometry, in float64 values (32 MiB): directions and particles are
taken in chunks whose largest array, such as their cosines to every axis, holds at most this many."""

_ROUNDING = 1e-9
"""Radians: more than the rounding of an angle from the arccosine of a cosine (about 1e-14 rad at
the finest sampling), so that the k-d tree's pre-selection misses no direction that the exact
distance would keep."""


@dataclass
class Cones:
    """Cone axes and the (overlapping) membership of particles.

    Memberships are sorted by cone; `rotation` is the particle's orientation after the symmetry
    operator and mirror that bring its direction closest to the cone axis, and `mirrored` says whether
    its image has to be mirrored in y to match that orientation.
    """

    axes: torch.Tensor  # (M, 3) unit vectors
    cone: torch.Tensor  # (K,) int64 cone index of each membership
    particle: torch.Tensor  # (K,) int64 particle index
    rotation: torch.Tensor  # (K, 3, 3) float64 equivalent RELION matrix
    mirrored: torch.Tensor  # (K,) bool

    @property
    def n_cones(self) -> int:
        return len(self.axes)

    def counts(self) -> torch.Tensor:
        """Number of particles in each cone."""
        return torch.bincount(self.cone, minlength=self.n_cones)


def equivalent_operators(symmetry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left factors L and right factors R such that L A R are the orientations equivalent to A.

    For each symmetry operator S, A S views the same map, along S^T d; MIRROR A S views along -S^T d
    and gives the y-mirrored image.
    """
    n = len(symmetry)
    left = torch.cat([torch.eye(3, dtype=torch.float64).expand(n, 3, 3), MIRROR.expand(n, 3, 3)])
    return left, torch.cat([symmetry, symmetry])


def _row_chunks(n_rows: int, row_elements: int, max_elements: int) -> list[slice]:
    """Slices of `n_rows` rows of `row_elements` values each, at most `max_elements` values a slice
    (but at least one row)."""
    size = max(1, max_elements // max(row_elements, 1))
    return [slice(start, start + size) for start in range(0, n_rows, size)]


def _in_unit(directions: torch.Tensor, symmetry: torch.Tensor, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Whether each direction (n, 3) lies in the asymmetric unit: no copy of it is closer to the anchor.

    `symmetry` (G, 3, 3) are the group's matrices. Returns (n,) bool. Directions are taken in chunks
    whose einsum intermediate, (2G, 3, n), holds at most `max_elements` values.
    """
    copies = torch.cat([symmetry, -symmetry]).transpose(-1, -2)  # S^T d and -S^T d
    inside = torch.empty(len(directions), dtype=torch.bool)
    for rows in _row_chunks(len(directions), 3 * len(copies), max_elements):
        d = directions[rows]
        scores = torch.einsum("gij,nj,i->ng", copies, d, _ASU_ANCHOR)
        inside[rows] = d @ _ASU_ANCHOR >= scores.max(dim=1).values - 1e-12
    return inside


def _distance_to_axes(
    directions: torch.Tensor, axes: torch.Tensor, symmetry: torch.Tensor, max_elements: int = MAX_ELEMENTS
) -> torch.Tensor:
    """Angle (radians) from each direction (n, 3) to the nearest axis (m, 3), over all its equivalent
    directions; shape (n,). The (n, 2G, m) cosines are taken in chunks of at most `max_elements`."""
    distance = torch.empty(len(directions), dtype=torch.float64)
    for rows in _row_chunks(len(directions), 2 * len(symmetry) * len(axes), max_elements):
        copies = torch.einsum("gji,nj->ngi", symmetry, directions[rows])
        cosines = torch.einsum("ngi,mi->ngm", torch.cat([copies, -copies], dim=1), axes)
        distance[rows] = torch.acos(cosines.amax(dim=(1, 2)).clamp(-1.0, 1.0))
    return distance


def _beyond(
    directions: torch.Tensor,
    axes: torch.Tensor,
    symmetry: torch.Tensor,
    angle: float,
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """Whether each direction (n, 3) may lie farther than `angle` (radians) from every axis (m, 3),
    over all its equivalent directions; shape (n,) bool.

    A k-d tree of the axes looks only near each equivalent direction, so that time and memory follow
    the number of directions rather than directions x axes. The tree measures chords, not the
    arccosine of `_distance_to_axes`: directions within `_ROUNDING` of `angle` count as beyond.
    Directions are taken in chunks of at most `max_elements` equivalent-direction coordinates.
    """
    tree = cKDTree(axes.numpy())
    chord = 2.0 * math.sin(max(angle - _ROUNDING, 0.0) / 2.0)
    copies = torch.cat([symmetry, -symmetry])  # d -> S^T d and -S^T d
    beyond = torch.empty(len(directions), dtype=torch.bool)
    for rows in _row_chunks(len(directions), 3 * len(copies), max_elements):
        equivalent = torch.einsum("gji,nj->ngi", copies, directions[rows])  # (n, 2G, 3)
        nearest, _ = tree.query(equivalent.reshape(-1, 3).numpy(), distance_upper_bound=chord)
        beyond[rows] = torch.from_numpy(np.isinf(nearest).reshape(len(equivalent), -1).all(axis=1))
    return beyond


def asymmetric_unit_directions(sampling_deg: float, symmetry: torch.Tensor) -> torch.Tensor:
    """Quasi-uniform directions about `sampling_deg` apart, kept to the asymmetric unit.

    The unit is the Voronoi cell of a generic anchor among its copies under the point group and the
    mirror: a direction belongs to it when no copy of it lies closer to the anchor. At the cell's
    boundary the sphere's points and their symmetry copies do not interleave, which can leave gaps;
    directions are added where a finer sample of the cell lies farther than 0.65 of the sampling from
    every axis (the interior's covering radius), so that cones as wide as the sampling cover it all.
    Only the few probes that a k-d tree finds in such gaps get exact distances to every axis, so
    memory stays bounded (MAX_ELEMENTS) down to the finest sampling.
    """
    if not 0.0 < sampling_deg <= 90.0:
        raise ValueError(f"the angular sampling must be in (0, 90] degrees, got {sampling_deg}")
    spacing = math.radians(sampling_deg)
    n_sphere = max(8, round(4.0 * math.pi / (math.sqrt(3.0) / 2.0 * spacing**2)))
    directions = fibonacci_sphere(n_sphere)
    axes = directions[_in_unit(directions, symmetry)]
    probe = fibonacci_sphere(16 * n_sphere)
    probe = probe[_in_unit(probe, symmetry)]
    # Probes nearer than 0.65 spacing to an axis stay so as axes are added: only the others matter.
    probe = probe[_beyond(probe, axes, symmetry, 0.65 * spacing)]
    distance = _distance_to_axes(probe, axes, symmetry)
    while len(probe) and distance.max() > 0.65 * spacing:
        farthest = probe[distance.argmax()]
        axes = torch.cat([axes, farthest[None]])
        distance = torch.minimum(distance, _distance_to_axes(probe, farthest[None], symmetry))
    return axes


def assign_to_cones(
    rotations: torch.Tensor,
    axes: torch.Tensor,
    cone_angle_deg: float,
    symmetry: torch.Tensor,
    max_elements: int = MAX_ELEMENTS,
) -> Cones:
    """Put each particle (RELION matrices (n, 3, 3)) into every cone within `cone_angle_deg`.

    A particle farther than that from every axis (a hole between cones) joins its nearest cone, so that
    every particle is classified. Particles are taken in chunks of at most `max_elements` (particle,
    cone, equivalent direction) cosines, so that the memory used does not grow with their number (one
    particle's are about 2e5 at the finest sampling, 0.5 degrees, whatever the group).
    """
    if not 0.0 < cone_angle_deg <= 90.0:
        raise ValueError(f"the cone angle must be in (0, 90] degrees, got {cone_angle_deg}")
    left, right = equivalent_operators(symmetry)
    cos_max = math.cos(math.radians(cone_angle_deg))
    chunk = max(1, max_elements // (len(axes) * len(left)))
    # Each chunk's results go to buffers made once, and its memberships to numpy: with new torch
    # tensors in every chunk, glibc's heap grew by about 0.6 MB a particle at 0.5 degrees (the threshold
    # above which it maps blocks apart rises to the chunks' size, and the small tensors kept from
    # chunk to chunk pin the freed blocks).
    shape = (min(chunk, len(rotations)), len(axes))
    buffers = [torch.empty(shape, dtype=dtype) for dtype in (torch.float64, torch.int64, torch.bool)]
    # Per chunk, (3, k): particle, cone and equivalent operator of each membership (none without particles).
    found = [np.empty((3, 0), dtype=np.int64)]
    for start in range(0, len(rotations), chunk):
        A = rotations[start : start + chunk]
        best_cos, best_op, member = (buffer[: len(A)] for buffer in buffers)
        # Direction of L A R is R^T A^T L^T e_z = +-R^T d.
        d = projection_direction(A)
        sign = left[:, 2, 2]  # +1 plain, -1 mirrored
        copies = torch.einsum("gji,nj->ngi", right, d) * sign[None, :, None]  # (n, G, 3)
        # The closest equivalent direction per (particle, cone).
        torch.max(torch.einsum("ngi,mi->nmg", copies, axes), dim=2, out=(best_cos, best_op))
        torch.ge(best_cos, cos_max, out=member)
        member[torch.arange(len(A)), best_cos.argmax(dim=1)] = True  # every particle joins its nearest cone
        p, c = torch.nonzero(member, as_tuple=True)
        found.append(np.stack([(p + start).numpy(), c.numpy(), best_op[p, c].numpy()]))
    particle, cone, op = torch.from_numpy(np.concatenate(found, axis=1))
    order = torch.argsort(cone * len(rotations) + particle)
    particle, cone, op = particle[order], cone[order], op[order]
    rotation = left[op] @ rotations[particle] @ right[op]
    return Cones(axes=axes, cone=cone, particle=particle, rotation=rotation, mirrored=op >= len(symmetry))


def default_sampling(n_particles: int, group_order: int, target_per_cone: int) -> float:
    """Cone angle (degrees) that puts about `target_per_cone` particles in each cone.

    With directions spread uniformly, a cone of half-angle t holds n * 2G * (1 - cos t) / 2 of n
    particles (each has 2G equivalent directions under a group of order G and the mirror). The angle
    is kept between 5 and 25 degrees: finer cones hold too few particles for the first component to
    see the heterogeneity, coarser ones mix views too different to align in plane.
    """
    fraction = target_per_cone / max(n_particles * group_order, 1)
    angle = math.degrees(math.acos(max(-1.0, 1.0 - fraction)))
    return float(min(25.0, max(5.0, angle)))
