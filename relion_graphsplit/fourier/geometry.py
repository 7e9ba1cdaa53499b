"""RELION's Euler-angle geometry.

RELION rotates a map into the image frame with A = Rz(psi) Ry(tilt) Rz(rot): a 3D point r (from the
box centre) lands in the projection at (A r)_xy and the projection direction in the map frame is the
third row of A. Images are arrays [y, x] with the centre at index N // 2.
"""

from __future__ import annotations

import math

import torch


def euler_to_matrix(rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """RELION's rotation matrix A (..., 3, 3) from ZYZ Euler angles in degrees.

    A = Rz(psi) Ry(tilt) Rz(rot), RELION's Euler_angles2matrix: A00 = cos psi cos tilt cos rot -
    sin psi sin rot, ..., A22 = cos tilt (the conventions file writes out all nine).

    Parameters
    ----------
    rot, tilt, psi : torch.Tensor
        (...) Euler angles (degrees), all of one shape; floats are taken too.

    Returns
    -------
    torch.Tensor
        (..., 3, 3) float64 on the angles' device. The matrices left-multiply xyz column vectors of the
        map frame: a point r from the box centre lands in the image at (A r)_xy, and the projection
        direction is the third row (`projection_direction`).
    """
    a, b, g = (torch.deg2rad(torch.as_tensor(t, dtype=torch.float64)) for t in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_euler(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZYZ Euler angles (rot, tilt, psi) in degrees of RELION matrices A (..., 3, 3).

    The inverse of `euler_to_matrix` for rotation matrices. Where sin(tilt) <= 1e-6 (tilt 0 or 180)
    only rot + psi (or psi - rot) is defined: rot is set to 0 and psi carries the in-plane angle.

    Parameters
    ----------
    A : torch.Tensor
        (..., 3, 3) rotation matrices, any float dtype.

    Returns
    -------
    tuple of torch.Tensor
        rot, tilt, psi, each (...) float64 in degrees: tilt in [0, 180], rot and psi in [-180, 180].
    """
    A = A.to(torch.float64)
    tilt = torch.atan2(torch.hypot(A[..., 2, 0], A[..., 2, 1]), A[..., 2, 2])
    regular = torch.sin(tilt).abs() > 1e-6
    rot = torch.where(regular, torch.atan2(A[..., 2, 1], A[..., 2, 0]), torch.zeros_like(tilt))
    psi = torch.where(
        regular,
        torch.atan2(A[..., 1, 2], -A[..., 0, 2]),
        # tilt 0 or 180: only rot + psi (or rot - psi) is defined; put it all in psi.
        torch.atan2(-A[..., 1, 0] * A[..., 2, 2], A[..., 0, 0] * A[..., 2, 2]),
    )
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def projection_direction(A: torch.Tensor) -> torch.Tensor:
    """Unit projection direction in the map frame (the third row of A), shape (..., 3).

    Parameters
    ----------
    A : torch.Tensor
        (..., 3, 3) RELION rotation matrices.

    Returns
    -------
    torch.Tensor
        (..., 3) view of A's third row, (sin tilt cos rot, sin tilt sin rot, cos tilt): the direction,
        in the map frame, along which the map is projected.
    """
    return A[..., 2, :]


def direction_to_matrix(direction: torch.Tensor) -> torch.Tensor:
    """A reference rotation (psi = 0) whose projection direction is `direction` (..., 3).

    Parameters
    ----------
    direction : torch.Tensor
        (..., 3) directions in the map frame, any nonzero length (normalised here).

    Returns
    -------
    torch.Tensor
        (..., 3, 3) float64 RELION matrices A with rot = atan2(y, x), tilt = acos(z) and psi = 0.
    """
    d = torch.nn.functional.normalize(direction.to(torch.float64), dim=-1)
    tilt = torch.rad2deg(torch.acos(d[..., 2].clamp(-1.0, 1.0)))
    rot = torch.rad2deg(torch.atan2(d[..., 1], d[..., 0]))
    return euler_to_matrix(rot, tilt, torch.zeros_like(rot))


def inplane_angle(A: torch.Tensor, A_ref: torch.Tensor) -> torch.Tensor:
    """Twist (radians) about the viewing axis of A relative to A_ref (swing-twist, thesis eq. 4.3).

    With D = A A_ref^T, the twist of D about z is 2 atan2(q_z, q_w) = atan2(D10 - D01, D00 + D11).
    The projection along A is then, to first order in the swing, the projection along A_ref turned
    in plane by this angle.

    Parameters
    ----------
    A, A_ref : torch.Tensor
        (..., 3, 3) RELION rotation matrices; the leading dimensions broadcast.

    Returns
    -------
    torch.Tensor
        (...) twist angle in radians, in [-pi, pi].
    """
    D = A @ A_ref.transpose(-1, -2)
    return torch.atan2(D[..., 1, 0] - D[..., 0, 1], D[..., 0, 0] + D[..., 1, 1])


MIRROR = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
"""Half turn about x: MIRROR @ A views along the antipode, and its image is the y-mirror of A's."""


def angular_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between unit vectors (broadcasting over leading dimensions).

    Parameters
    ----------
    u, v : torch.Tensor
        (..., 3) unit vectors.

    Returns
    -------
    torch.Tensor
        (...) angle in degrees, in [0, 180] (the cosine is clamped to [-1, 1]).
    """
    return torch.rad2deg(torch.acos((u * v).sum(-1).clamp(-1.0, 1.0)))


def fibonacci_sphere(n: int) -> torch.Tensor:
    """n quasi-uniform unit vectors on the whole sphere (golden-angle spiral), shape (n, 3).

    Parameters
    ----------
    n : int
        Number of points.

    Returns
    -------
    torch.Tensor
        (n, 3) float64 unit vectors (x, y, z), z = 1 - 2 (i + 0.5) / n for i = 0..n-1 (from the north
        to the south pole), each turned by the golden angle from the one before.
    """
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = torch.sqrt(1.0 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)
