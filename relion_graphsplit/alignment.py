"""In-plane alignment of a cone's particles onto the view along its axis (thesis eqs. 4.3-4.4).

Images reach this step centred (the origin is undone exactly, in Fourier space, by the preprocessing),
so alignment is one interpolation: an in-plane rotation by the swing-twist angle of the particle's
orientation relative to the cone's reference orientation, after a y-mirror for mirrored members.
"""

from __future__ import annotations

import torch

from relion_graphsplit.geometry import direction_to_matrix, inplane_angle


def cone_reference(axis: torch.Tensor) -> torch.Tensor:
    """Reference orientation (psi = 0) of a cone: the RELION matrix viewing along its axis."""
    return direction_to_matrix(axis)


def align_to_reference(
    images: torch.Tensor, rotations: torch.Tensor, reference: torch.Tensor, mirrored: torch.Tensor
) -> torch.Tensor:
    """Rotate centred images (B, n, n) so that each looks as seen from `reference` (3, 3) or (B, 3, 3).

    `rotations` are the members' (equivalent) orientations and `mirrored` tells which images must be
    mirrored in y first. With M the in-plane rotation of the twist phi, the aligned image is
    I(F M u) at every pixel u (F the y-mirror, or identity).
    """
    phi = inplane_angle(rotations, reference)
    c, s = torch.cos(phi), torch.sin(phi)
    flip = torch.where(mirrored, -1.0, 1.0).to(torch.float64)
    # Rows of F M: x' = c x - s y;  y' = flip * (s x + c y).
    matrix = torch.stack(
        [torch.stack([c, -s], dim=-1), torch.stack([flip * s, flip * c], dim=-1)], dim=-2
    )
    return _sample(images, matrix)


def _sample(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """out[u] = images[matrix @ u] with u in pixels from the centre N // 2 (bicubic, zero outside)."""
    b, n, _ = images.shape
    centre = n // 2
    coords = torch.arange(n, dtype=torch.float64) - centre
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    u = torch.stack([xx, yy], dim=-1).reshape(1, n * n, 2)  # (x, y)
    src = u @ matrix.transpose(-1, -2)  # (B, n*n, 2)
    grid = (2.0 * (src + centre) + 1.0) / n - 1.0
    grid = grid.reshape(b, n, n, 2).to(images.dtype)
    out = torch.nn.functional.grid_sample(
        images[:, None], grid, mode="bicubic", padding_mode="zeros", align_corners=False
    )
    return out[:, 0]
