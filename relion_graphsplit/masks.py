"""2D masks for the per-cone principal component: the 3D mask projected along each cone's axis."""

from __future__ import annotations

import torch


def soft_sphere(box: int, radius: float, edge: float = 3.0) -> torch.Tensor:
    """Soft-edged sphere (box^3, [z, y, x]) of `radius` pixels with a raised-cosine edge."""
    coords = torch.arange(box, dtype=torch.float32) - box // 2
    r = torch.sqrt(coords[:, None, None] ** 2 + coords[None, :, None] ** 2 + coords[None, None, :] ** 2)
    ramp = ((r - radius) / max(edge, 1e-6)).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(torch.pi * ramp))


def resample_volume(volume: torch.Tensor, box: int) -> torch.Tensor:
    """Resize a (smooth) volume to box^3 by trilinear interpolation over the same physical extent."""
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
