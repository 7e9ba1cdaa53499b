"""Group particles into overlapping cones of projection direction (thesis eqs. 4.1-4.2).

Cone axes are quasi-uniform directions reduced to the asymmetric unit of the point group together with
the mirror (a projection along -d is the y-mirror of the one along d). A particle joins every cone whose
axis lies within the cone angle of one of its equivalent directions; for each membership we keep the
equivalent orientation that brought it there, so alignment sees every member as a view near the axis.
"""

from __future__ import annotations

import math
import os
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

    Memberships are sorted by cone; `operator` names the symmetry operator and mirror that bring the
    particle's direction closest to the cone axis (`rotations` gives the orientation they make), and
    `mirrored` says whether its image has to be mirrored in y to match that orientation. M is the
    number of cones (n_cones), K the number of memberships. A million particles hold about 4 million
    memberships: 19 bytes each (a float64 matrix each would be 72 more).

    Attributes
    ----------
    axes : torch.Tensor
        (M, 3) float64 unit vectors: the cones' axes, projection directions in the map frame.
    cone : torch.Tensor
        (K,) int64 cone index of each membership, ascending (sorted by cone, then by particle).
    particle : torch.Tensor
        (K,) int64 particle index (row of the particle set) of each membership.
    operator : torch.Tensor
        (K,) int16 index g of the equivalent orientation (`equivalent_operators`): left[g] A right[g]
        of the particle's A.
    mirrored : torch.Tensor
        (K,) bool: the equivalent orientation includes MIRROR, so the image is mirrored in y.
    """

    axes: torch.Tensor  # (M, 3) unit vectors
    cone: torch.Tensor  # (K,) int64 cone index of each membership
    particle: torch.Tensor  # (K,) int64 particle index
    operator: torch.Tensor  # (K,) int16 equivalent operator
    mirrored: torch.Tensor  # (K,) bool

    @property
    def n_cones(self) -> int:
        return len(self.axes)

    def rotations(self, rotations: torch.Tensor, symmetry: torch.Tensor, span: slice = slice(None)) -> torch.Tensor:
        """The equivalent orientations of the memberships `span`.

        Parameters
        ----------
        rotations : torch.Tensor
            (n, 3, 3) float64 RELION matrices A of the particles (those the cones were made from).
        symmetry : torch.Tensor
            (G, 3, 3) float64 the point group's rotations (those the cones were made with).
        span : slice
            The memberships wanted.

        Returns
        -------
        torch.Tensor
            (k, 3, 3) float64 equivalent RELION matrices L A R (left-multiplying xyz column vectors of
            the map): each projection direction (third row) is the particle's equivalent direction
            closest to the cone axis.
        """
        left, right = equivalent_operators(symmetry)
        operator = self.operator[span].long()
        return left[operator] @ rotations[self.particle[span]] @ right[operator]

    def counts(self) -> torch.Tensor:
        """Number of particles in each cone."""
        return torch.bincount(self.cone, minlength=self.n_cones)


def equivalent_operators(symmetry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left factors L and right factors R such that L A R are the orientations equivalent to A.

    For each symmetry operator S, A S views the same map, along S^T d (d the projection direction of
    A, its third row); MIRROR A S views along -S^T d and gives the y-mirrored image.

    Parameters
    ----------
    symmetry : torch.Tensor
        (G, 3, 3) float64 the point group's rotations in the map frame (`symmetry.symmetry_matrices`).

    Returns
    -------
    left : torch.Tensor
        (2G, 3, 3) float64: the identity for operators 0..G-1, MIRROR (a half turn about x) for
        operators G..2G-1.
    right : torch.Tensor
        (2G, 3, 3) the symmetry matrices twice, in the same order: operator g is (left[g], right[g]),
        mirrored when g >= G.
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

    Parameters
    ----------
    sampling_deg : float
        Spacing of the directions (degrees), in (0, 90]: the whole sphere's Fibonacci points number
        max(8, round(4 pi / (sqrt(3) / 2 s^2))) at a spacing of s radians, the probes 16 times as many.
    symmetry : torch.Tensor
        (G, 3, 3) float64 the point group's rotations in the map frame (`symmetry.symmetry_matrices`).

    Returns
    -------
    torch.Tensor
        (M, 3) float64 unit vectors in the map frame: the Fibonacci points inside the unit, then the
        directions added to fill its gaps.

    Raises
    ------
    ValueError
        If `sampling_deg` is not in (0, 90].
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

    Parameters
    ----------
    rotations : torch.Tensor
        (n, 3, 3) float64 RELION matrices A of the particles, which left-multiply xyz column vectors of
        the map (the projection direction is the third row).
    axes : torch.Tensor
        (M, 3) float64 unit cone axes (`asymmetric_unit_directions`).
    cone_angle_deg : float
        Cone half-aperture (degrees), in (0, 90]: a particle is a member where one of its 2G equivalent
        directions has a cosine to the axis of at least cos(cone_angle_deg).
    symmetry : torch.Tensor
        (G, 3, 3) float64 the point group's rotations in the map frame.
    max_elements : int
        Most (particle, cone, equivalent direction) cosines per chunk of particles.

    Returns
    -------
    Cones
        The axes and the memberships, sorted by cone then particle, each with the equivalent orientation
        (`equivalent_operators`) closest to its cone's axis; every particle is in at least one cone.

    Raises
    ------
    ValueError
        If `cone_angle_deg` is not in (0, 90].
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
    return Cones(
        axes=axes, cone=cone, particle=particle, operator=op.to(torch.int16), mirrored=op >= len(symmetry)
    )


def default_sampling(n_particles: int, group_order: int, target_per_cone: int) -> float:
    """Cone angle (degrees) that puts about `target_per_cone` particles in each cone.

    With directions spread uniformly, a cone of half-angle t holds n * 2G * (1 - cos t) / 2 of n
    particles (each has 2G equivalent directions under a group of order G and the mirror). The angle
    is kept between 5 and 25 degrees: finer cones hold too few particles for the first component to
    see the heterogeneity, coarser ones mix views too different to align in plane. `split` uses it as
    the angular sampling between cone axes, and the cone angle defaults to the sampling.

    Parameters
    ----------
    n_particles : int
        Number of particles n.
    group_order : int
        Order G of the point group.
    target_per_cone : int
        Particles wanted per cone (the split's particles_per_cone, 600 by default).

    Returns
    -------
    float
        t = arccos(1 - target_per_cone / (n G)) in degrees, clipped to [5, 25].
    """
    fraction = target_per_cone / max(n_particles * group_order, 1)
    angle = math.degrees(math.acos(max(-1.0, 1.0 - fraction)))
    return float(min(25.0, max(5.0, angle)))


IMAGE_BYTES_PER_PIXEL = 37
"""Bytes per cone and working pixel of the per-cone images: the projected masks (bool, then float32),
the cone images (4 float32) and their reordered copy for the swapped cones (4 float32 more)."""


MAXCUT_BYTES_PER_CONE = 8 * 8 * 201
"""maxcut.synchronise holds about 8 float64 arrays of its 201 sign candidates (n_rounds + 1) per node
of a component (7.3 measured with tracemalloc on 2000 to 10000 nodes)."""


GRAPH_BYTES_PER_PAIR = 100
"""The graph's sparse matrices per pair of cones sharing a particle: weights and shared counts with
their products' work space (12 bytes a value), the max-cut's copies and the edge table."""


MEMBERSHIP_BYTES = 100
"""Per membership: the ratio matrix, rho and lambda, and the membership table."""


def cone_memory(cones: Cones, w: int) -> int:
    """Bytes that the per-cone steps (3-5 of `split`) hold at their peak, for `cones` at working box w.

    The per-cone images and the max-cut grow with the cones, the graph with the pairs of cones that
    share a particle (the sum over particles of their cone count squared) and the rest with the
    memberships. Work space that does not grow with these (a batch of images) is left out.

    Parameters
    ----------
    cones : Cones
        The cones (M) and their memberships (K).
    w : int
        The working box (pixels).

    Returns
    -------
    int
        Bytes: M (IMAGE_BYTES_PER_PIXEL w^2 + MAXCUT_BYTES_PER_CONE) + GRAPH_BYTES_PER_PAIR times the
        pairs + MEMBERSHIP_BYTES K.
    """
    per_particle = torch.bincount(cones.particle).to(torch.float64)
    pairs = int((per_particle * per_particle).sum())
    per_cone = IMAGE_BYTES_PER_PIXEL * w * w + MAXCUT_BYTES_PER_CONE
    return cones.n_cones * per_cone + GRAPH_BYTES_PER_PAIR * pairs + MEMBERSHIP_BYTES * len(cones.cone)


def available_memory() -> int:
    """Bytes of memory available: MemAvailable of /proc/meminfo where it exists, else the physical memory.

    Returns
    -------
    int
        Bytes: MemAvailable (given in kB) times 1024, or the page size times the number of physical
        pages where /proc/meminfo cannot be read or has no MemAvailable line.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(size: int) -> str:
    """Bytes as '180 GB', '2.5 GB' or '310 MB'."""
    if size >= 1e10:
        return f"{size / 1e9:.0f} GB"
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def _sampling_name(sampling: float, explicit: bool) -> str:
    return f"--angular_sampling {sampling:g}" if explicit else f"the default sampling ({sampling:.1f} deg)"


def check_cone_counts(counts: torch.Tensor, minimum: int, sampling: float, explicit: bool) -> None:
    """Refuse a sampling that leaves every cone with fewer than `minimum` particles.

    Dropping the sparse cones would leave none; keeping them, their mixtures on a few points
    degenerate, and with them the graph and its max-cut (2000 particles at 2 degrees, at most 8 a
    cone, gave weights up to 4e12; Clarabel failed on 65 of the components and never returned from
    the next).

    Parameters
    ----------
    counts : torch.Tensor
        (M,) int64 the cones' particle counts (`Cones.counts`).
    minimum : int
        Fewest particles a cone needs (the split's min_cone_particles).
    sampling : float
        The cones' angular sampling (degrees), named in the message.
    explicit : bool
        Whether the user chose the sampling (--angular_sampling) rather than the default.

    Raises
    ------
    ValueError
        With one line, if every cone has fewer than `minimum` particles or there is no cone.
    """
    if len(counts) and not (counts < minimum).all():
        return
    advice = "(the default chooses it from the particle count)" if explicit else "(--angular_sampling, up to 90)"
    most = int(counts.max()) if len(counts) else 0
    raise ValueError(
        f"{_sampling_name(sampling, explicit)} leaves every cone with fewer than {minimum} particles (at most "
        f"{most}): too few for the split; use a coarser sampling {advice}"
    )


def check_cone_memory(
    cones: Cones, w: int, sampling: float, explicit: bool, available: int | None = None
) -> None:
    """Refuse, before any image is read, cones whose per-cone steps need more than the memory available.

    Parameters
    ----------
    cones : Cones
        The cones and their memberships.
    w : int
        The working box (pixels).
    sampling : float
        The cones' angular sampling (degrees), named in the message.
    explicit : bool
        Whether the user chose the sampling (--angular_sampling) rather than the default.
    available : int or None
        Bytes available; None: `available_memory()`.

    Raises
    ------
    ValueError
        With one line that holds the estimate (`cone_memory`), if it exceeds `available`.
    """
    need = cone_memory(cones, w)
    available = available_memory() if available is None else available
    if need > available:
        advice = "(the default chooses it from the particle count)"
        if not explicit:
            advice = "or a smaller working box (--maxres, --resize)"
        raise ValueError(
            f"{_sampling_name(sampling, explicit)} gives {cones.n_cones} cones: about {_size(need)} for the "
            f"per-cone images and the graph at a {w}-pixel working box, {_size(available)} available; use a "
            f"coarser sampling {advice}"
        )
