"""RELION's contrast transfer function, evaluated on the rfft grid of an image.

Written out rather than taken from torch-ctf so that the wavelength, the astigmatism convention
(any order of DefocusU/V), the B-factor and the scale factor are exactly RELION's (ctf.h).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def wavelength(voltage_kv: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Angstrom."""
    v = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclass
class CTFParams:
    """Per-image CTF parameters, each a float64 tensor of shape (B,) (RELION's units)."""

    defocus_u: torch.Tensor  # A, positive = underfocus
    defocus_v: torch.Tensor  # A
    defocus_angle: torch.Tensor  # degrees
    voltage: torch.Tensor  # kV
    cs: torch.Tensor  # mm
    amplitude_contrast: torch.Tensor  # fraction Q0
    phase_shift: torch.Tensor  # degrees
    bfactor: torch.Tensor  # A^2
    scale: torch.Tensor  # unitless

    def __getitem__(self, index) -> "CTFParams":
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return len(self.defocus_u)


def rfft_frequencies(box: int, pixel_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ky, kx) in 1/A on the unshifted rfft grid of a box x box image, each (box, box // 2 + 1)."""
    ky = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=torch.float64)
    return torch.meshgrid(ky, kx, indexing="ij")


def ctf_2d(params: CTFParams, box: int, pixel_size: float) -> torch.Tensor:
    """CTF = scale * -sin(gamma) * exp(-B k^2 / 4) on the rfft grid, shape (B, box, box // 2 + 1)."""
    ky, kx = rfft_frequencies(box, pixel_size)
    k2 = kx * kx + ky * ky
    p = {f.name: getattr(params, f.name).to(torch.float64)[:, None, None] for f in fields(params)}
    lam = wavelength(p["voltage"])
    alpha = torch.deg2rad(p["defocus_angle"])
    u, v, cos, sin = p["defocus_u"], p["defocus_v"], torch.cos(alpha), torch.sin(alpha)
    q0 = p["amplitude_contrast"]
    # gamma = -pi lam defocus k^2 + pi/2 Cs lam^3 k^4 - phase shift - atan(Q0 / sqrt(1 - Q0^2)), with
    # defocus = u cos^2(theta - alpha) + v sin^2(theta - alpha) at the angle theta of k. Written out,
    # defocus k^2 is the quadratic form Axx kx^2 + 2 Axy kx ky + Ayy ky^2 (the same function, with no
    # trigonometry per pixel). The per-image, per-pixel terms are computed in place (large boxes: fewer
    # temporaries).
    axx, ayy, axy = u * cos * cos + v * sin * sin, u * sin * sin + v * cos * cos, (u - v) * cos * sin
    gamma = (axx * kx * kx).add_((2 * axy) * (kx * ky)).add_(ayy * (ky * ky))
    gamma.mul_(-torch.pi * lam)
    gamma.add_((0.5 * torch.pi * p["cs"] * 1e7 * lam**3) * (k2 * k2))
    gamma.sub_(torch.deg2rad(p["phase_shift"])).sub_(torch.atan(q0 / torch.sqrt(1.0 - q0 * q0)))
    ctf = gamma.sin_().neg_().mul_(p["scale"])
    if bool((p["bfactor"] != 0).any()):  # exp(0) = 1: most sets have no B-factor
        ctf.mul_((-p["bfactor"] * k2).div_(4.0).exp_())
    return ctf.to(torch.float32)
