"""The CTF on the rfft grid against RELION's formula written out pixel by pixel (ctf.h).

(relion_project's CTF images are compared in test_projection.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from relion_graphsplit.fourier.ctf import CTFParams, ctf_2d, wavelength


def _written_out(p: CTFParams, box: int, pixel_size: float) -> torch.Tensor:
    """-scale sin(gamma) exp(-B k^2 / 4), defocus = u cos^2(theta - alpha) + v sin^2(theta - alpha)."""
    ky = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=torch.float64)[None, :]
    k2, theta = kx**2 + ky**2, torch.atan2(ky, kx)
    out = []
    for i in range(len(p)):
        angle = theta - math.radians(float(p.defocus_angle[i]))
        defocus = p.defocus_u[i] * torch.cos(angle) ** 2 + p.defocus_v[i] * torch.sin(angle) ** 2
        lam = float(wavelength(p.voltage[i]))
        q0 = float(p.amplitude_contrast[i])
        gamma = (
            -math.pi * lam * defocus * k2
            + math.pi / 2 * float(p.cs[i]) * 1e7 * lam**3 * k2**2
            - math.radians(float(p.phase_shift[i]))
            - math.atan(q0 / math.sqrt(1 - q0 * q0))
        )
        out.append(-p.scale[i] * torch.sin(gamma) * torch.exp(-p.bfactor[i] * k2 / 4))
    return torch.stack(out)


@pytest.mark.parametrize(("box", "bfactor"), [(64, 0.0), (65, 0.0), (64, 80.0)])
def test_ctf_is_relions_formula(box, bfactor):
    gen = torch.Generator().manual_seed(3)
    n = 12

    def draw(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    params = CTFParams(
        defocus_u=draw(5000, 30000), defocus_v=draw(5000, 30000), defocus_angle=draw(-180, 180),
        voltage=draw(200, 300), cs=draw(0.01, 2.7), amplitude_contrast=draw(0.05, 0.1),
        phase_shift=draw(0, 90), bfactor=bfactor * draw(0.5, 1.5), scale=draw(0.8, 1.2),
    )  # fmt: skip
    expected = _written_out(params, box, 1.3)
    assert expected.abs().max() > 0.5
    assert torch.allclose(ctf_2d(params, box, 1.3).to(torch.float64), expected, rtol=0, atol=1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # the images split among threads: each CTF as one thread makes it
        split = ctf_2d(params, box, 1.3)
        torch.set_num_threads(1)
        assert torch.equal(split, ctf_2d(params, box, 1.3))
    finally:
        torch.set_num_threads(threads)
