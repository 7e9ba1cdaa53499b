"""Point-group symmetry operators in RELION's orientation.

RELION (symmetries.cpp, inherited from Xmipp) defines each point group by a few generating rotation
axes and closes the set under multiplication. The same generators are used here, so a map that RELION
calls D7 or I2 has the same symmetry axes here. Only the rotation groups (C, D, T, O, I) are supported:
mirror and inversion groups cannot describe a chiral particle.
"""

from __future__ import annotations

import math
import re

import torch

# (fold, axis) generators, as RELION writes them in SymList::fill_symmetry_class.
_FIXED_GENERATORS: dict[str, list[tuple[int, tuple[float, float, float]]]] = {
    "T": [(3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0.0, 0.0, 1.0))],
    "I": [(2, (0.0, 0.0, 1.0)), (5, (0.525731114, 0.0, 0.850650807)), (3, (0.0, 0.356822076, 0.934172364))],
    "I1": [(2, (1.0, 0.0, 0.0)), (5, (0.85065080702670, 0.0, -0.5257311142635)), (3, (0.9341723640, 0.3568220765, 0.0))],
    "I3": [
        (2, (-0.5257311143, 0.0, 0.8506508070)),
        (5, (0.0, 0.0, 1.0)),
        (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
    "I4": [
        (2, (0.5257311143, 0.0, 0.8506508070)),
        (5, (0.8944271932547096, 0.0, 0.4472135909903704)),
        (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
}
_FIXED_GENERATORS["I2"] = _FIXED_GENERATORS["I"]


def axis_rotation(axis: tuple[float, float, float], angle_deg: float) -> torch.Tensor:
    """Rotation matrix (3, 3) float64 by `angle_deg` about `axis` (normalised here), Rodrigues' formula.

    Parameters
    ----------
    axis : tuple of float
        (x, y, z) direction of the axis, any nonzero length.
    angle_deg : float
        Rotation angle (degrees), counterclockwise seen from the tip of `axis` (right-handed).

    Returns
    -------
    torch.Tensor
        (3, 3) float64 R = I + sin(t) K + (1 - cos(t)) K^2, K the cross-product matrix of the unit
        axis; R left-multiplies xyz column vectors.
    """
    u = torch.tensor(axis, dtype=torch.float64)
    u = u / u.norm()
    t = math.radians(angle_deg)
    K = torch.tensor([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(t) * K + (1.0 - math.cos(t)) * (K @ K)


def _generators(name: str) -> list[tuple[int, tuple[float, float, float]]]:
    key = name.strip().upper()
    if key in _FIXED_GENERATORS:
        return _FIXED_GENERATORS[key]
    match = re.fullmatch(r"([CD])(\d{1,2})", key)
    if match is None or int(match.group(2)) < 1:
        raise ValueError(
            f"unknown or unsupported symmetry group {name!r}: expected C<n>, D<n>, T, O, I or I1-I4"
        )
    n = int(match.group(2))
    gens = [(n, (0.0, 0.0, 1.0))]
    if match.group(1) == "D":
        gens.append((2, (1.0, 0.0, 0.0)))
    return gens


def _unique(candidates: torch.Tensor, known: torch.Tensor, tol: float) -> torch.Tensor:
    """Rows of `candidates` (M, 3, 3) that differ from every matrix in `known` and from each other."""
    fresh: list[torch.Tensor] = []
    pool = known.reshape(-1, 9)
    for m in candidates.reshape(-1, 9):
        if (pool - m).abs().amax(dim=1).min() >= tol:
            fresh.append(m)
            pool = torch.cat([pool, m[None]])
    return torch.stack(fresh).reshape(-1, 3, 3) if fresh else candidates[:0]


def symmetry_matrices(name: str, tol: float = 1e-4) -> torch.Tensor:
    """All rotations (G, 3, 3) float64 of RELION's point group `name`, identity first.

    Names are case-insensitive: C1, Cn, Dn (n up to 99), T, O, I (= I2), I1, I3, I4.
    The group is the closure of RELION's generators under multiplication; matrices closer than `tol`
    (max abs difference) are the same element.

    Parameters
    ----------
    name : str
        RELION's name of the point group (surrounding spaces ignored).
    tol : float
        Largest absolute difference of entries at which two matrices count as one element.

    Returns
    -------
    torch.Tensor
        (G, 3, 3) float64 rotations in the map frame (xyz), G the group's order (n for Cn, 2n for Dn,
        12 for T, 24 for O, 60 for I).

    Raises
    ------
    ValueError
        For an unknown or unsupported name (mirror and inversion groups included), or generators
        whose closure exceeds 200 elements.
    """
    group = torch.eye(3, dtype=torch.float64)[None]
    generators = [axis_rotation(axis, 360.0 / fold) for fold, axis in _generators(name) if fold > 1]
    if generators:
        group = torch.cat([group, _unique(torch.stack(generators), group, tol)])
    while True:
        products = (group[:, None] @ group[None, :]).reshape(-1, 3, 3)
        close = (products[:, None] - group[None]).abs().amax(dim=(2, 3)).min(dim=1).values < tol
        fresh = _unique(products[~close], group, tol)
        if len(fresh) == 0:
            return group
        group = torch.cat([group, fresh])
        if len(group) > 200:
            raise ValueError(f"symmetry group {name!r} does not close (generators inconsistent)")
