"""Masks: the 3D mask that focuses the split, and its 2D projections along each cone's axis."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from relion_graphsplit.fourier.fsc import shell_index


def consensus_mask(
    volume: torch.Tensor,
    pixel_size: float,
    *,
    threshold: float,
    extend: float,
    lowpass: float = 15.0,
    edge: float = 6.0,
) -> torch.Tensor:
    """Soft mask around the particle in a consensus map: the default 3D mask when none is given.

    The map is low-passed (Gaussian, 1/e^2 at `lowpass` A), thresholded at `threshold` times its
    maximum, reduced to its largest connected part (no noise blobs), extended by `extend` A and given a
    raised-cosine edge of `edge` A. Against a sphere around the whole box it removes the solvent from
    the principal components, the half-map FSC and the class likelihoods; docs/benchmarks.md has the
    measured gain.

    Parameters
    ----------
    volume : torch.Tensor
        (N, N, N) [z, y, x] the consensus map (CPU).
    pixel_size : float
        Its pixel size (A).
    threshold : float
        Fraction of the low-passed map's maximum above which a voxel is in the mask (the split's
        `mask_threshold`, 0.1 by default).
    extend : float
        Extension of the thresholded part (A).
    lowpass : float
        Resolution (A) of the Gaussian low-pass: its amplitude is 1/e^2 at spatial frequency 1 / lowpass.
    edge : float
        Width (A) of the raised-cosine edge beyond the extension.

    Returns
    -------
    torch.Tensor
        (N, N, N) float32 in [0, 1]: 1 within `extend` A of the largest connected part, falling to 0 at
        `extend` + `edge` A (distances in A from the part's nearest voxel). If no voxel exceeds the
        threshold, the mask is 1 everywhere.
    """
    box = volume.shape[-1]
    frequency = shell_index(box).to(torch.float64) / (box * pixel_size)  # 1/A
    f = torch.fft.rfftn(volume.to(torch.float64)) * torch.exp(-2.0 * (frequency * lowpass) ** 2)
    low = torch.fft.irfftn(f, s=volume.shape).numpy()
    labels, count = ndimage.label(low > threshold * low.max())
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1 if count else 0
    distance = ndimage.distance_transform_edt(labels != largest) * pixel_size
    ramp = np.clip((distance - extend) / max(edge, 1e-6), 0.0, 1.0)
    return torch.from_numpy(0.5 * (1.0 + np.cos(np.pi * ramp))).to(torch.float32)


def class_maps_mask(
    consensus: torch.Tensor,
    differences: list[torch.Tensor],
    scale: float,
    pixel_size: float,
    *,
    threshold: float,
    extend: float,
) -> torch.Tensor:
    """`consensus_mask` of the largest of the class maps at each voxel.

    The class maps are the consensus plus each class's difference to it (reconstructed from residuals
    that carry the images' mean grey `scale`). A part present in few particles is faint in the
    consensus but at full strength in its class's map, so a tighter threshold keeps it.

    Parameters
    ----------
    consensus : torch.Tensor
        (N, N, N) [z, y, x] the consensus map at the working size.
    differences : list of torch.Tensor
        The K classes' difference maps (N, N, N) to the consensus (`refine.difference_maps`).
    scale : float
        The images' mean scale relative to the consensus projection: each difference is divided by it.
    pixel_size : float
        Pixel size (A) of the maps.
    threshold, extend : float
        As in `consensus_mask` (the split's `refine_mask_threshold` and `mask_extend`); the low-pass
        and edge keep `consensus_mask`'s defaults (15 A, 6 A).

    Returns
    -------
    torch.Tensor
        (N, N, N) float32 soft mask in [0, 1].
    """
    largest = torch.stack([consensus + d / scale for d in differences]).amax(dim=0)
    return consensus_mask(largest, pixel_size, threshold=threshold, extend=extend)


def resample_volume(volume: torch.Tensor, box: int) -> torch.Tensor:
    """Resize a (smooth) volume to box^3 by trilinear interpolation over the same physical extent.

    Parameters
    ----------
    volume : torch.Tensor
        (N, N, N) [z, y, x] map, such as a 3D mask at the particles' box.
    box : int
        The new box (pixels); the pixel size becomes N / box times the old one.

    Returns
    -------
    torch.Tensor
        (box, box, box) float32; the volume itself (as float32) when N == box. Interpolated with
        align_corners=False: voxel centres are spread evenly over the same extent.
    """
    if volume.shape[-1] == box:
        return volume.to(torch.float32)
    out = torch.nn.functional.interpolate(
        volume[None, None].to(torch.float32), size=(box, box, box), mode="trilinear", align_corners=False
    )
    return out[0, 0]


def project_mask(mask: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Binary 2D masks (M, n, n): pixels whose ray along each reference (M, 3, 3) crosses the 3D mask.

    Each pixel sums the mask along its ray (RELION's projection geometry, real space); a pixel is kept
    when the ray holds at least half a voxel's worth of mask.

    Parameters
    ----------
    mask : torch.Tensor
        (n, n, n) [z, y, x] 3D mask at the working size, centred at index n // 2.
    references : torch.Tensor
        (M, 3, 3) float64 RELION matrices (left-multiplying xyz column vectors of the map), one per cone
        (`alignment.cone_reference`): the image point p = (x, y, z) sees the map point A^T p.

    Returns
    -------
    torch.Tensor
        (M, n, n) [y, x] bool, centred at n // 2: True where the ray's trilinearly sampled sum of the
        mask (zero outside the box) is >= 0.5.
    """
    n = mask.shape[-1]
    centre = n // 2
    coords = torch.arange(n, dtype=torch.float64) - centre
    z, y, x = torch.meshgrid(coords, coords, coords, indexing="ij")
    image_points = torch.stack([x, y, z], dim=-1).reshape(-1, 3)  # (x, y, z) in the image frame
    out = []
    for A in references:
        map_points = image_points @ A  # rows are (A^T p)^T: the map point seen at image point p
        grid = ((2.0 * (map_points + centre) + 1.0) / n - 1.0).reshape(1, n, n, n, 3).to(torch.float32)
        sampled = torch.nn.functional.grid_sample(
            mask[None, None].to(torch.float32), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        out.append(sampled[0, 0].sum(dim=0) >= 0.5)
    return torch.stack(out)
