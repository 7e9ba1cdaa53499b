"""In-plane alignment of a cone's particles onto the view along its axis (thesis eqs. 4.3-4.4).

Images reach this step centred (the origin is undone exactly, in Fourier space, by the preprocessing),
so alignment is one interpolation: an in-plane rotation by the swing-twist angle of the particle's
orientation relative to the cone's reference orientation, after a y-mirror for mirrored members.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from relion_graphsplit.fourier.compiled import compiled, run_in_runs, runs_compiled
from relion_graphsplit.fourier.geometry import direction_to_matrix, inplane_angle


def cone_reference(axis: torch.Tensor) -> torch.Tensor:
    """Reference orientation (psi = 0) of a cone: the RELION matrix viewing along its axis.

    Parameters
    ----------
    axis : torch.Tensor
        (..., 3) cone axes (projection directions), normalised here; one axis (3,) or a stack (M, 3).

    Returns
    -------
    torch.Tensor
        (..., 3, 3) float64 RELION matrices A = Rz(0) Ry(tilt) Rz(rot), which left-multiply xyz column
        vectors of the map; the third row of each is its axis.
    """
    return direction_to_matrix(axis)


def align_to_reference(
    images: torch.Tensor,
    rotations: torch.Tensor,
    reference: torch.Tensor,
    mirrored: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate centred images (B, n, n) so that each looks as seen from `reference` (3, 3) or (B, 3, 3),
    and multiply them by a 2D `mask`.

    `rotations` are the members' (equivalent) orientations and `mirrored` tells which images must be
    mirrored in y first. With M the in-plane rotation of the twist phi (`inplane_angle` of the
    rotation relative to the reference: the swing-twist angle), the aligned image is I(F M u) at every
    pixel u (F the y-mirror, or identity), u in pixels (x, y) from the centre n // 2. One bicubic
    interpolation (grid_sample's, a = -0.75; pixels that fall outside the image count as 0) in
    float64: on the CPU by a compiled loop, elsewhere by torch's grid_sample; they agree to rounding.
    The compiled loop samples only the pixels where the mask is not 0 (a cone's mask covers about a
    fifth of the image, and the sampling is most of the per-cone classification's time).

    Parameters
    ----------
    images : torch.Tensor
        (B, n, n) real images [y, x], centred at index n // 2 (their origins already undone).
    rotations : torch.Tensor
        (B, 3, 3) RELION matrices of the members' equivalent orientations (left-multiplying xyz
        column vectors of the map).
    reference : torch.Tensor
        (3, 3) or (B, 3, 3) the cone's reference orientation (`cone_reference`).
    mirrored : torch.Tensor
        (B,) bool: images to mirror in y before the rotation (members that joined by a mirrored copy).
    mask : torch.Tensor or None
        (n, n) [y, x] weights multiplied into the aligned images, in their dtype; None: all 1.

    Returns
    -------
    torch.Tensor
        (B, n, n) the aligned images times the mask, in the dtype and on the device of `images`.
    """
    phi = inplane_angle(rotations, reference)
    c, s = torch.cos(phi), torch.sin(phi)
    flip = torch.where(mirrored, -1.0, 1.0).to(torch.float64)
    # Rows of F M: x' = c x - s y;  y' = flip * (s x + c y).
    matrix = torch.stack(
        [torch.stack([c, -s], dim=-1), torch.stack([flip * s, flip * c], dim=-1)], dim=-2
    )
    return _sample(images, matrix, mask)


def _sample(images: torch.Tensor, matrix: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """out[u] = mask[u] images[matrix @ u] with u in pixels from the centre N // 2 (bicubic, zero
    outside): on the CPU by the compiled `_rotate_kernel` on torch.get_num_threads() threads, each on
    its own run of images, elsewhere by grid_sample."""
    if mask is None:
        mask = torch.ones(images.shape[-2:], dtype=images.dtype, device=images.device)
    mask = mask.to(images.device, images.dtype)
    if not runs_compiled(images.device):
        return _grid_sample(images, matrix) * mask
    out = torch.empty_like(images)
    args = (images.contiguous().numpy(), matrix.to(torch.float64).contiguous().numpy(), mask.contiguous().numpy(), out.numpy())
    run_in_runs(_rotate_kernel, args, len(images), torch.get_num_threads())
    return out


@compiled
def _rotate_kernel(
    images: np.ndarray, matrix: np.ndarray, mask: np.ndarray, out: np.ndarray, start: int, stop: int
) -> None:
    """out[b, u] = mask[u] times images[b] at matrix[b] @ u for images b from start to stop: grid_sample's
    bicubic (Keys' cubic convolution, a = -0.75; taps outside the image count as 0), coordinates,
    weights and sums in float64, rounded to the images' dtype before the product with the mask (as
    sampling and then multiplying in that dtype); pixels where the mask is 0 are not sampled."""
    n = images.shape[1]
    centre = n // 2
    wx = np.empty(4)
    wy = np.empty(4)
    for b in range(start, stop):
        m00, m01, m10, m11 = matrix[b, 0, 0], matrix[b, 0, 1], matrix[b, 1, 0], matrix[b, 1, 1]
        for py in range(n):
            uy = py - centre
            for px in range(n):
                if mask[py, px] == 0:
                    out[b, py, px] = 0.0
                    continue
                ux = px - centre
                x = m00 * ux + m01 * uy + centre
                y = m10 * ux + m11 * uy + centre
                x0, y0 = math.floor(x), math.floor(y)
                _cubic_weights(x - x0, wx)
                _cubic_weights(y - y0, wy)
                ix, iy = int(x0) - 1, int(y0) - 1
                total = 0.0
                for j in range(4):
                    row = iy + j
                    if row < 0 or row >= n:
                        continue
                    line = 0.0
                    for i in range(4):
                        col = ix + i
                        if 0 <= col < n:
                            line += wx[i] * images[b, row, col]
                    total += wy[j] * line
                out[b, py, px] = total
                out[b, py, px] *= mask[py, px]


@compiled
def _cubic_weights(t: float, w: np.ndarray) -> None:
    """Weights of the taps at -1, 0, 1, 2 for the fraction t in [0, 1) (grid_sample's, a = -0.75)."""
    a = -0.75
    w[0] = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w[1] = ((a + 2) * t - (a + 3)) * t * t + 1
    w[2] = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    w[3] = ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a


def _grid_sample(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """As `_sample`, by torch's grid_sample on any device (the GPU's way).

    grid_sample's bicubic is `_rotate_kernel`'s: the weights of `_cubic_weights`, taps outside the image
    counted as 0, each row's four taps summed and then the rows. It computes in its input's dtype, so
    coordinates and images go in as float64, as the compiled loop takes them, and the two agree to
    rounding (the coordinates pass through grid_sample's [-1, 1] normalisation, which the compiled
    loop skips).
    """
    b, n, _ = images.shape
    centre = n // 2
    coords = torch.arange(n, dtype=torch.float64, device=images.device) - centre
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    u = torch.stack([xx, yy], dim=-1).reshape(1, n * n, 2)  # (x, y)
    src = u @ matrix.to(images.device, torch.float64).transpose(-1, -2)  # (B, n*n, 2)
    grid = ((2.0 * (src + centre) + 1.0) / n - 1.0).reshape(b, n, n, 2)
    out = torch.nn.functional.grid_sample(
        images[:, None].to(torch.float64), grid, mode="bicubic", padding_mode="zeros", align_corners=False
    )
    return out[:, 0].to(images.dtype)
