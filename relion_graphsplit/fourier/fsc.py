"""Fourier shell correlation and the resolution where it crosses a threshold."""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
import torch

from relion_graphsplit.fourier.compiled import compiled, run_in_runs, runs_compiled


@functools.lru_cache(maxsize=4)  # the working size and the particles' box, on the CPU and on a GPU
def shell_index(box: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Integer shell (rounded radius in Fourier pixels) of each point of a box^3 rfftn grid.

    The tensor is cached and shared: do not modify it.

    Parameters
    ----------
    box : int
        Map size N (voxels).
    device : torch.device or str
        Where the tensor is made.

    Returns
    -------
    torch.Tensor
        (N, N, N // 2 + 1) int64: round(|k|) of each point of the unshifted rfftn half grid (DC at
        [0, 0, 0]), k in Fourier pixels (shell s is at s / (N * pixel size) 1/A). Shells run up to
        about sqrt(3) N / 2 in the corners.
    """
    k = torch.fft.fftfreq(box, 1.0 / box, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, 1.0 / box, device=device, dtype=torch.float64)
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return torch.round(r).long()


def fsc(vol1: torch.Tensor, vol2: torch.Tensor) -> torch.Tensor:
    """FSC (float64) of two cubic maps in shells 0..N//2 (rounded radius, half transform as RELION's
    getFSC). A shell where either map has no power gets 0.

    On the CPU the transforms (float64, scipy's, on `torch.get_num_threads()` threads) are reduced to
    the three shell sums by one compiled pass, plane by plane and then over the planes in order, so
    the curve does not depend on the thread count; on other devices torch does both there in float64
    (`_fsc_sums_torch`), and the curves agree to rounding.

    Parameters
    ----------
    vol1, vol2 : torch.Tensor
        (N, N, N) maps of the same shape, any real dtype and device.

    Returns
    -------
    torch.Tensor
        (N // 2 + 1,) float64 on vol1's device: sum Re(F1 conj F2) / sqrt(sum |F1|^2 sum |F2|^2) over
        the points of the rfftn half grid whose rounded radius (Fourier pixels) is the shell; shell s
        is at spatial frequency s / (N * pixel size) (1/A). Points whose rounded radius exceeds N // 2
        are left out.
    """
    box = vol1.shape[-1]
    if not runs_compiled(vol1.device):
        num, den1, den2 = _fsc_sums_torch(vol1, vol2)
    else:
        workers = torch.get_num_threads()
        f1, f2 = (scipy.fft.rfftn(v.detach().cpu().numpy().astype(np.float64), workers=workers) for v in (vol1, vol2))
        sums = np.zeros((box, box // 2 + 1, 3), dtype=np.float64)
        run_in_runs(_fsc_sums_kernel, (sums, f1, f2), box, workers, least=1)
        num, den1, den2 = torch.from_numpy(sums.sum(0)).unbind(1)
    den = torch.sqrt(den1 * den2)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num)).to(vol1.device)


@compiled
def _fsc_sums_kernel(sums: np.ndarray, f1: np.ndarray, f2: np.ndarray, start: int, stop: int) -> None:
    """For the z planes [start, stop) of two rfftn transforms (N, N, N // 2 + 1): per shell round(r)
    up to N // 2 (fftfreq's frequencies), the sums of Re(f1 conj f2), |f1|^2 and |f2|^2 into sums[z]."""
    n = f1.shape[0]
    last = sums.shape[1] - 1
    for z in range(start, stop):
        kz = z if z < (n + 1) // 2 else z - n
        for y in range(n):
            ky = y if y < (n + 1) // 2 else y - n
            for x in range(f1.shape[2]):
                shell = int(np.rint(math.sqrt(kz * kz + ky * ky + x * x)))
                if shell > last:
                    continue
                a, b = f1[z, y, x], f2[z, y, x]
                sums[z, shell, 0] += a.real * b.real + a.imag * b.imag
                sums[z, shell, 1] += a.real * a.real + a.imag * a.imag
                sums[z, shell, 2] += b.real * b.real + b.imag * b.imag


def _fsc_sums_torch(vol1: torch.Tensor, vol2: torch.Tensor) -> torch.Tensor:
    """`fsc`'s shell sums in torch on vol1's device: (3, N // 2 + 1) float64, per shell round(r) the sums
    of Re(F1 conj F2), |F1|^2 and |F2|^2 over the float64 rfftn half grid (`shell_index`), as
    `_fsc_sums_kernel`'s, to rounding (torch adds in its own order)."""
    box = vol1.shape[-1]
    f1, f2 = (torch.fft.rfftn(v.detach().to(vol1.device, torch.float64)) for v in (vol1, vol2))
    shells = shell_index(box, vol1.device)
    keep = shells <= box // 2
    terms = torch.stack([
        f1.real * f2.real + f1.imag * f2.imag,
        f1.real * f1.real + f1.imag * f1.imag,
        f2.real * f2.real + f2.imag * f2.imag,
    ])  # fmt: skip
    return torch.zeros((3, box // 2 + 1), dtype=torch.float64, device=vol1.device).index_add_(1, shells[keep], terms[:, keep])


def resolution_at(
    fsc_curve: torch.Tensor | np.ndarray, box: int, pixel_size: float, threshold: float = 0.143
) -> float:
    """Resolution where an FSC curve first drops below `threshold`, interpolated linearly between shells.

    Parameters
    ----------
    fsc_curve : torch.Tensor or np.ndarray
        (n,) FSC in shells 0..n-1 (n = box // 2 + 1 for `fsc`'s curves), n >= 2; any device or dtype
        (a list of floats is taken too).
    box : int
        The maps' box (pixels).
    pixel_size : float
        Their pixel size (A). Shell s is at spatial frequency s / (box * pixel_size) (1/A), that is
        resolution box * pixel_size / s (A); only the product box * pixel_size matters.
    threshold : float
        The FSC threshold (0.143: the gold-standard criterion for half maps).

    Returns
    -------
    float
        The resolution (A) at the first crossing after shell 0: the curve is interpolated linearly
        between the last shell at or above `threshold` and the first one below it.
        If the curve never drops below the threshold (shells 1..n-1): the Nyquist resolution of the
        last shell, box * pixel_size / (n - 1). The resolution is then limited by the sampling, not
        measured; the true one is at least that good, and callers that show it should say so (the
        report: "Nyquist 4.0 Å or better").
        math.inf if it crosses at shell 0 (not above the threshold at shell 0, below it at shell 1):
        no resolution measured.

    Raises
    ------
    ValueError
        If the curve is not one-dimensional with at least two shells.
    """
    if isinstance(fsc_curve, torch.Tensor):
        curve = fsc_curve.detach().to("cpu", torch.float64).numpy()
    else:
        curve = np.asarray(fsc_curve, dtype=np.float64)
    if curve.ndim != 1 or len(curve) < 2:
        raise ValueError(f"an FSC curve needs shells 0..n-1 with n >= 2, not shape {curve.shape}")
    below = np.flatnonzero(curve[1:] < threshold)
    if len(below) == 0:
        return box * pixel_size / (len(curve) - 1)
    i = int(below[0]) + 1
    hi, lo = float(curve[i - 1]), float(curve[i])
    if hi < threshold:  # only at i == 1: below the threshold from shell 0
        return math.inf
    shell = (i - 1) + (hi - threshold) / (hi - lo)
    return math.inf if shell <= 0 else box * pixel_size / shell
