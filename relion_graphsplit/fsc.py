"""Fourier shell correlation and the resolution where it crosses a threshold."""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=2)  # the working size and the particles' box
def shell_index(box: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Integer shell (rounded radius in Fourier pixels) of each point of a box^3 rfftn grid. The
    tensor is cached and shared: do not modify it."""
    k = torch.fft.fftfreq(box, 1.0 / box, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, 1.0 / box, device=device, dtype=torch.float64)
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return torch.round(r).long()


def fsc(vol1: torch.Tensor, vol2: torch.Tensor) -> torch.Tensor:
    """FSC (float64) of two cubic maps in shells 0..N//2 (rounded radius, half transform as RELION's
    getFSC). A shell where either map has no power gets 0."""
    box = vol1.shape[-1]
    f1 = torch.fft.rfftn(vol1.to(torch.float64))
    f2 = torch.fft.rfftn(vol2.to(torch.float64))
    shells = shell_index(box, vol1.device).view(-1)
    n = box // 2 + 1

    def shell_sums(values: torch.Tensor) -> torch.Tensor:  # shells beyond N // 2 are dropped
        return torch.bincount(shells, values.reshape(-1), minlength=n)[:n]

    num = shell_sums((f1 * f2.conj()).real)
    den1 = shell_sums(f1.abs().square())
    den2 = shell_sums(f2.abs().square())
    den = torch.sqrt(den1 * den2)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num))


def resolution_at(fsc_curve: torch.Tensor, box: int, pixel_size: float, threshold: float = 0.143) -> float:
    """Resolution (A) where the FSC first drops below `threshold`, interpolating linearly between shells.

    Shell s has resolution box * pixel_size / s. If the curve never drops below the threshold the
    Nyquist resolution of the last shell is returned.
    """
    curve = fsc_curve.detach().to("cpu", torch.float64)
    below = torch.nonzero(curve[1:] < threshold)
    if len(below) == 0:
        return box * pixel_size / (len(curve) - 1)
    i = int(below[0]) + 1
    hi, lo = float(curve[i - 1]), float(curve[i])
    shell = (i - 1) + (hi - threshold) / (hi - lo)
    return math.inf if shell <= 0 else box * pixel_size / shell
