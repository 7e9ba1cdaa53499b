"""Fourier shell correlation, resolution at a threshold, soft spherical mask."""

from __future__ import annotations

import pytest
import torch

from relion_graphsplit.fourier.fsc import fsc, resolution_at, shell_index

BOX = 32


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return torch.randn(BOX, BOX, BOX, generator=torch.Generator().manual_seed(0))


def test_identical_and_opposite_maps(volume):
    same = fsc(volume, 3.0 * volume)
    assert same.shape == (BOX // 2 + 1,) and same.dtype == torch.float64
    assert torch.allclose(same, torch.ones_like(same))
    assert torch.allclose(fsc(volume, -volume), -torch.ones_like(same))


def test_independent_noise_is_uncorrelated(volume):
    other = torch.randn(BOX, BOX, BOX, generator=torch.Generator().manual_seed(1))
    curve = fsc(volume, other)
    # Shells beyond the first few hold hundreds of independent points.
    assert curve[4:].abs().max() < 0.15
    assert abs(float(curve[4:].mean())) < 0.03


def test_fsc_falls_where_noise_takes_over(volume):
    # A map low-pass filtered to shell 8 plus noise: correlation is high below shell 8, low above.
    shells = shell_index(BOX)
    signal = torch.fft.irfftn(torch.fft.rfftn(volume) * (shells <= 8), s=volume.shape)
    gen = torch.Generator().manual_seed(2)
    noisy1 = signal + 0.02 * torch.randn(volume.shape, generator=gen)
    noisy2 = signal + 0.02 * torch.randn(volume.shape, generator=gen)
    curve = fsc(noisy1, noisy2)
    assert curve[1:8].min() > 0.9
    assert curve[10:].abs().max() < 0.3


def test_a_map_without_power_gives_zero():
    assert torch.equal(fsc(torch.zeros(BOX, BOX, BOX), torch.ones(BOX, BOX, BOX))[1:], torch.zeros(BOX // 2))


def test_resolution_interpolates_the_crossing():
    curve = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.1, 0.0])
    # Crossing 0.143 between shells 3 (0.5) and 4 (0.1): shell 3 + 0.357 / 0.4.
    shell = 3 + (0.5 - 0.143) / 0.4
    assert resolution_at(curve, box=10, pixel_size=2.0) == pytest.approx(10 * 2.0 / shell)
    assert resolution_at(curve, box=10, pixel_size=2.0, threshold=0.5) == pytest.approx(10 * 2.0 / 3)


def test_resolution_is_nyquist_when_never_crossing():
    assert resolution_at(torch.ones(17), box=32, pixel_size=1.5) == pytest.approx(3.0)


@pytest.mark.parametrize("box", [BOX, BOX + 1])
def test_fsc_is_the_shell_sums_of_the_transforms(volume, box):
    """The compiled shell sums against the same sums by bincount over the rounded radius, on even
    and odd boxes, and the same curve whatever the thread count."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, box, box, box, generator=gen, dtype=torch.float64).unbind(0)
    b = b + a  # correlated, so that every term matters
    f1, f2 = torch.fft.rfftn(a), torch.fft.rfftn(b)
    shells = shell_index(box).view(-1)
    n = box // 2 + 1

    def sums(values):
        return torch.bincount(shells, values.reshape(-1), minlength=n)[:n]

    expected = sums((f1 * f2.conj()).real) / torch.sqrt(sums(f1.abs().square()) * sums(f2.abs().square()))
    threads = torch.get_num_threads()
    try:
        curves = []
        for j in (1, 3):
            torch.set_num_threads(j)
            curves.append(fsc(a, b))
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(curves[0], expected, rtol=0, atol=1e-12)
    assert torch.equal(curves[0], curves[1])
