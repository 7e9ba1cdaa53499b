import torch

from relion_graphsplit.fourier.ctf import CTFParams, ctf_2d
from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.fourier.projection import prepare_volume, project_rfft, shift_images
from relion_graphsplit.method.options import CtfCorrection
from relion_graphsplit.method.preprocess import (
    centre_downsampled,
    correct,
    fourier_crop,
    fourier_crop_volume,
    whitening_filter,
    working_box,
)
from relion_graphsplit.simulate.particles import Conditions
from tests.test_alignment import blob_volume


def ctf_params(b: int, seed: int = 0) -> CTFParams:
    g = torch.Generator().manual_seed(seed)
    one = torch.ones(b, dtype=torch.float64)
    return CTFParams(
        defocus_u=10000 + 20000 * torch.rand(b, generator=g, dtype=torch.float64),
        defocus_v=10000 + 20000 * torch.rand(b, generator=g, dtype=torch.float64),
        defocus_angle=360 * torch.rand(b, generator=g, dtype=torch.float64),
        voltage=300 * one, cs=2.7 * one, amplitude_contrast=0.1 * one, phase_shift=0 * one,
        bfactor=0 * one, scale=one,
    )


def test_working_box():
    assert working_box(96, 1.5, 8.0, None) == 36
    assert working_box(96, 1.5, None, 40) == 40
    assert working_box(64, 2.0, 2.0, None) == 64  # never above the box
    assert working_box(65, 2.0, None, None) == 64
    # maxres keeps at least 32 pixels (26 here at 10 A); an explicit box is taken as it is
    assert working_box(64, 2.0, 10.0, None) == 32
    assert working_box(64, 2.0, 10.0, 26) == 26
    assert working_box(24, 2.0, 10.0, None) == 24  # never above the box


def test_fourier_crop_keeps_low_frequencies_and_grey_levels():
    vol = blob_volume(48)
    small = fourier_crop_volume(vol, 24)
    assert small.shape == (24, 24, 24)
    # Same physical content: the sum over the box scales with the voxel volume.
    assert abs(float(small.sum()) * 8 - float(vol.sum())) < 1e-3 * float(vol.sum())
    image = vol.sum(0)
    f = fourier_crop(torch.fft.rfft2(image)[None], 24)
    assert abs(float(torch.fft.irfft2(f, s=(24, 24)).sum()) * 4 - float(image.sum())) < 1e-6 * float(image.sum())


def test_centring_after_downsampling_equals_centring_before():
    """The origins (pixels of the full box) shift the downsampled transform as they would the full one."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(5, 65, 65, generator=g, dtype=torch.float64)
    origins = (torch.rand(5, 2, generator=g, dtype=torch.float64) - 0.5) * 12
    f = torch.fft.rfft2(images)
    for n in (64, 24):
        expected = fourier_crop(shift_images(f, origins), n)
        assert torch.allclose(centre_downsampled(f, origins, n), expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    # The shift matters: without it the images differ.
    assert not torch.allclose(fourier_crop(f, 24), centre_downsampled(f, origins, 24), atol=1e-3)


def test_consensus_subtraction_leaves_only_the_difference():
    n, b = 32, 6
    base = fourier_crop_volume(blob_volume(48), n).double()
    extra = torch.zeros_like(base)
    extra[20:24, 10:14, 18:22] = 0.5  # a small domain moves: density gained here, lost beside it
    extra[20:24, 14:18, 18:22] = -0.5
    g = torch.Generator().manual_seed(5)
    A = euler_to_matrix(*(torch.rand(3, b, generator=g, dtype=torch.float64) * torch.tensor([[360.0], [180.0], [360.0]])))
    ctf = ctf_2d(ctf_params(b), n, 4.0).double()
    consensus = project_rfft(prepare_volume(base), A)
    state = project_rfft(prepare_volume(base + extra), A)
    difference = project_rfft(prepare_volume(extra), A)
    scale = torch.linspace(0.7, 1.3, b, dtype=torch.float64)[:, None, None]
    images = scale * ctf * state
    out, fitted = correct(images, ctf, CtfCorrection.subtract_multiply, consensus)
    # What is left is the CTF^2-weighted difference: the same up to the part of the difference that
    # the per-image least-squares scale absorbs.
    expected = ctf * ctf * scale * difference
    expected[..., 0, 0] = 0
    for k in range(b):
        corr = (out[k].conj() * expected[k]).real.sum() / (out[k].abs().norm() * expected[k].abs().norm())
        assert corr > 0.9, (k, float(corr))
    torch.testing.assert_close(out, ctf * (images - fitted[:, None, None] * ctf * consensus) * (expected != 0))
    assert torch.allclose(fitted, scale.flatten(), rtol=0.3)
    # Phase flipping alone keeps the consensus signal, which dwarfs the difference.
    flipped, ones = correct(images, ctf, CtfCorrection.flip)
    assert torch.all(ones == 1)
    residual, _ = correct(images, ctf, CtfCorrection.subtract_flip, consensus)
    assert flipped.abs().pow(2).sum() > 4 * residual.abs().pow(2).sum()
    # The subtracting modes refuse to run without the consensus projections.
    try:
        correct(images, ctf, CtfCorrection.subtract_flip)
    except ValueError as err:
        assert "consensus" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_whitening_filter_flattens_the_noise_spectrum():
    """Coloured noise (the simulator's 1 + E exp(-B s^2 / 2)) gives the inverse square root of its power
    spectrum, relative to the mean, so that filtered it is white; white noise, or noise whose power
    varies less than `min_contrast`-fold, gives exactly ones (the images are left alone)."""
    box, pixel_size = 32, 4.0
    g = torch.Generator().manual_seed(0)
    white = torch.fft.rfft2(torch.randn(3000, box, box, generator=g, dtype=torch.float64))
    ones = torch.ones(box, box // 2 + 1, dtype=torch.float64)
    white_noise = whitening_filter([white[:1000], white[1000:]])
    assert torch.equal(white_noise.filter, ones) and 1.0 <= white_noise.contrast < 1.2
    assert not white_noise.applied

    colour = Conditions(noise_excess=8.0, noise_bfactor=1000.0).noise_filter(box, pixel_size)
    coloured = whitening_filter([white * colour])
    filter_ = coloured.filter
    assert coloured.contrast > 5.0 and coloured.applied
    flattened = filter_ * colour
    assert flattened.std() / flattened.mean() < 0.03
    assert filter_[0, 1] < 0.5 * filter_[0, box // 2]  # low frequencies, the noisiest, are damped

    # The spectrum (rings 1..box // 2, relative to their mean) follows the simulated power, white or not.
    assert white_noise.spectrum.shape == (box // 2,) and (white_noise.spectrum - 1.0).abs().max() < 0.1
    k = torch.arange(1, box // 2 + 1, dtype=torch.float64) / (box * pixel_size)
    power = 1.0 + 8.0 * torch.exp(-1000.0 * k**2 / 2)
    assert torch.allclose(coloured.spectrum, power / power.mean(), rtol=0.1)

    slight = Conditions(noise_excess=0.5, noise_bfactor=1000.0).noise_filter(box, pixel_size)  # 1.5-fold
    assert torch.equal(whitening_filter([white * slight]).filter, ones)
    assert not torch.equal(whitening_filter([white * slight], min_contrast=1.2).filter, ones)
