"""RELION's contrast transfer function, evaluated on the rfft grid of an image.

Written out rather than taken from torch-ctf so that the wavelength, the astigmatism convention
(any order of DefocusU/V), the B-factor and the scale factor are exactly RELION's (ctf.h).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from relion_graphsplit.fourier.compiled import compiled, run_in_runs, runs_compiled


def wavelength(voltage_kv: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Angstrom.

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)) with V in volts, as RELION (ctf.cpp).

    Parameters
    ----------
    voltage_kv : torch.Tensor
        (...) acceleration voltage (kV); a float is taken too.

    Returns
    -------
    torch.Tensor
        (...) float64 wavelength (A).
    """
    v = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclass
class CTFParams:
    """Per-image CTF parameters, each a float64 tensor of shape (B,) (RELION's units).

    Attributes
    ----------
    defocus_u, defocus_v : torch.Tensor
        (B,) defocus along the two astigmatism axes (A), positive is underfocus; any order.
    defocus_angle : torch.Tensor
        (B,) astigmatism angle alpha (degrees): the direction of k, from the kx axis, whose
        defocus is defocus_u.
    voltage : torch.Tensor
        (B,) acceleration voltage (kV).
    cs : torch.Tensor
        (B,) spherical aberration (mm).
    amplitude_contrast : torch.Tensor
        (B,) amplitude contrast Q0 (fraction).
    phase_shift : torch.Tensor
        (B,) phase shift, e.g. of a phase plate (degrees).
    bfactor : torch.Tensor
        (B,) CTF B-factor (A^2).
    scale : torch.Tensor
        (B,) CTF scale factor (unitless).

    Indexing (`params[index]`) selects the same images of every field; len() is B; `to` moves them.
    """

    defocus_u: torch.Tensor  # A, positive = underfocus
    defocus_v: torch.Tensor  # A
    defocus_angle: torch.Tensor  # degrees
    voltage: torch.Tensor  # kV
    cs: torch.Tensor  # mm
    amplitude_contrast: torch.Tensor  # fraction Q0
    phase_shift: torch.Tensor  # degrees
    bfactor: torch.Tensor  # A^2
    scale: torch.Tensor  # unitless

    def __getitem__(self, index) -> CTFParams:
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return len(self.defocus_u)

    def to(self, device: torch.device | str) -> CTFParams:
        """The same parameters on `device` (where `ctf_2d` then computes)."""
        return CTFParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def ctf_2d(params: CTFParams, box: int, pixel_size: float) -> torch.Tensor:
    """CTF = scale * -sin(gamma) * exp(-B k^2 / 4) on the rfft grid, shape (B, box, box // 2 + 1), float32.

    gamma = -pi lam defocus k^2 + pi/2 Cs lam^3 k^4 - phase shift - atan(Q0 / sqrt(1 - Q0^2)), with
    defocus = u cos^2(theta - alpha) + v sin^2(theta - alpha) at the angle theta of k. Written out,
    defocus k^2 is the quadratic form Axx kx^2 + 2 Axy kx ky + Ayy ky^2 (the same function, with no
    trigonometry per pixel). The per-image terms are computed here, the per-pixel ones in float64: on
    the CPU by the compiled `_ctf_kernel`, images split among `torch.get_num_threads()` threads,
    elsewhere by torch on the parameters' device (`_ctf_torch`), to the same float32 values up to
    rounding.

    Parameters
    ----------
    params : CTFParams
        B images' parameters (RELION's units, see `CTFParams`), on any device.
    box : int
        Image size N (pixels).
    pixel_size : float
        Pixel size (A).

    Returns
    -------
    torch.Tensor
        (B, N, N // 2 + 1) float32 on the parameters' device: the unshifted rfft half grid, DC at
        [0, 0], rows ky and columns kx in 1/A as torch.fft.fftfreq / rfftfreq give them
        (kx = j / (N * pixel_size); the Nyquist row of an even box is taken as -N/2), so it multiplies
        torch.fft.rfft2 of an image directly.
    """
    terms = _ctf_terms(params)
    ky = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64, device=terms.device)  # 1/A, the rows of the rfft grid
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=torch.float64, device=terms.device)
    if not runs_compiled(terms.device):
        return _ctf_torch(terms, ky, kx)
    terms = terms.contiguous().numpy()
    out = np.empty((len(terms), box, box // 2 + 1), dtype=np.float32)
    run_in_runs(_ctf_kernel, (out, terms, ky.numpy(), kx.numpy()), len(terms), torch.get_num_threads(), least=4)
    return torch.from_numpy(out)


def _ctf_terms(params: CTFParams) -> torch.Tensor:
    """`ctf_2d`'s per-image terms (B, 8) float64 on the parameters' device: Axx, 2 Axy, Ayy (A), -pi lam
    (A), pi/2 Cs lam^3 (A^4), the constant phase (radians), the scale and -B / 4 (A^2)."""
    p = {f.name: getattr(params, f.name).to(torch.float64) for f in fields(params)}
    lam = wavelength(p["voltage"])
    alpha = torch.deg2rad(p["defocus_angle"])
    u, v, cos, sin = p["defocus_u"], p["defocus_v"], torch.cos(alpha), torch.sin(alpha)
    q0 = p["amplitude_contrast"]
    return torch.stack([
        u * cos * cos + v * sin * sin,  # Axx
        2 * (u - v) * cos * sin,  # 2 Axy
        u * sin * sin + v * cos * cos,  # Ayy
        -torch.pi * lam,
        0.5 * torch.pi * p["cs"] * 1e7 * lam**3,
        torch.deg2rad(p["phase_shift"]) + torch.atan(q0 / torch.sqrt(1.0 - q0 * q0)),
        p["scale"],
        -p["bfactor"] / 4.0,
    ], dim=1)  # fmt: skip


@compiled
def _ctf_kernel(out: np.ndarray, terms: np.ndarray, ky: np.ndarray, kx: np.ndarray, start: int, stop: int) -> None:
    """Images [start, stop) of `ctf_2d`; terms (B, 8): Axx, 2 Axy, Ayy, -pi lam, pi/2 Cs lam^3, the
    constant phase, the scale and -B / 4."""
    for b in range(start, stop):
        axx, axy2, ayy, focus, spherical, phase, scale, bfactor = terms[b]
        for i in range(ky.shape[0]):
            y = ky[i]
            for j in range(kx.shape[0]):
                x = kx[j]
                k2 = x * x + y * y
                gamma = focus * (axx * (x * x) + axy2 * (x * y) + ayy * (y * y)) + spherical * (k2 * k2) - phase
                value = -math.sin(gamma) * scale
                if bfactor != 0.0:
                    value *= math.exp(bfactor * k2)
                out[b, i, j] = value


def _ctf_torch(terms: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
    """`_ctf_kernel` in torch on the terms' device: (B, N, N // 2 + 1) float32 from terms (B, 8) and the
    frequencies ky (N,) and kx (N // 2 + 1,) (1/A), float64. The same operations in the same order,
    so the values agree with the compiled loop's to rounding (torch's sin and exp are not numba's)."""
    axx, axy2, ayy, focus, spherical, phase, scale, bfactor = (t[:, None, None] for t in terms.unbind(1))
    y, x = ky[:, None], kx[None, :]
    k2 = x * x + y * y
    gamma = focus * (axx * (x * x) + axy2 * (x * y) + ayy * (y * y)) + spherical * (k2 * k2) - phase
    return (-torch.sin(gamma) * scale * torch.exp(bfactor * k2)).to(torch.float32)
