import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from relion_graphsplit.engine import StoredArray
from relion_graphsplit.fourier.projection import project
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.method.refine import (
    _half_plane_weights,
    class_log_likelihoods,
    class_sums,
    difference_maps,
    held_out_posterior,
    image_spectra,
    local_wiener,
    log_odds,
    projection_scores,
    residual_sums,
)
from relion_graphsplit.method.two_classes import TOTALS_KEPT, Splitter
from relion_graphsplit.scratch import ScratchArray
from relion_graphsplit.simulate.particles import uniform_rotations


def _smooth_map(rng: np.random.Generator, box: int) -> torch.Tensor:
    """A random map of a few Gaussian blobs (box^3)."""
    k = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    out = torch.zeros(box, box, box, dtype=torch.float64)
    for centre in rng.uniform(-box / 5, box / 5, (4, 3)):
        out += torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 4.0)
    return out


def _spectra(
    folder, images: np.ndarray, filters: np.ndarray, batches: list[np.ndarray], whitening=None
) -> tuple[ScratchArray, ScratchArray]:
    """The transforms of `images` (`image_spectra`) and the `filters` (times `whitening`, if given), in
    ScratchArray files of `folder`, opened after the tasks that wrote them closed theirs."""
    shape = (*images.shape[:2], images.shape[-1] // 2 + 1, 2)
    with (
        _stored(folder, "images", images) as a,
        _stored(folder, "filters", filters) as b,
        ScratchArray(folder / "spectra", shape) as c,
    ):
        stored_images, stored_filters, spectra = (StoredArray.of(array) for array in (a, b, c))
    image_spectra(stored_images, stored_filters, batches, spectra, whitening)
    return spectra.open(), stored_filters.open()


def _stored(folder, name: str, values: np.ndarray) -> ScratchArray:
    """`values` in a ScratchArray file of `folder` (the tasks of the refinement open their files by path)."""
    array = ScratchArray(folder / name, values.shape)
    array[np.arange(len(values))] = values
    return array


def test_image_spectra_are_the_centred_whitened_transforms(tmp_path):
    """`image_spectra` holds W times the transform of each image about its centre N // 2, and the
    filters become W CTF; without whitening the filters are left as they were."""
    rng = np.random.default_rng(2)
    n, box = 10, 15
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    filters = rng.uniform(0.2, 1.0, (n, box, box // 2 + 1)).astype(np.float32)
    whitening = torch.from_numpy(rng.uniform(0.5, 2.0, (box, box // 2 + 1)))
    batches = [np.arange(0, 4), np.arange(4, n)]
    rows = np.arange(n)
    (tmp_path / "plain").mkdir()
    (tmp_path / "whitened").mkdir()
    plain, plain_filters = (array[rows] for array in _spectra(tmp_path / "plain", images, filters, batches))
    assert np.array_equal(plain_filters, filters)
    whitened, whitened_filters = (array[rows] for array in _spectra(tmp_path / "whitened", images, filters, batches, whitening))
    centred = np.fft.rfft2(np.roll(images, (-(box // 2), -(box // 2)), axis=(1, 2)))
    np.testing.assert_allclose(plain[..., 0] + 1j * plain[..., 1], centred, atol=1e-4)
    np.testing.assert_allclose(whitened[..., 0] + 1j * whitened[..., 1], whitening.numpy() * centred, atol=1e-4)
    np.testing.assert_allclose(whitened_filters, whitening.numpy() * filters, rtol=1e-6)


@pytest.mark.parametrize("box", [16, 15])
def test_class_log_likelihoods_classify_and_match_the_float64_likelihood(box, tmp_path):
    """Residual images s = a' CTF^2 Q_k + noise of three classes: the log-likelihoods pick class k,
    equal the white-noise likelihood computed in float64 from real-space projections (the odd third
    map paired with zeros), and do not depend on the thread count."""
    rng = np.random.default_rng(1)
    n = 240
    maps = [_smooth_map(rng, box) for _ in range(3)]
    rotations = torch.from_numpy(uniform_rotations(n, rng))
    ctf = torch.from_numpy(rng.uniform(0.3, 1.0, (n, box, box // 2 + 1)))
    scale = torch.from_numpy(rng.uniform(0.8, 1.2, n))
    relative = (scale / scale.mean())[:, None, None]
    truth = rng.integers(0, 3, n)
    q = torch.stack([torch.fft.rfft2(project(m, rotations)) for m in maps])  # (3, n, N, N // 2 + 1)
    clean = relative * ctf**2 * q[torch.from_numpy(truth), torch.arange(n)]
    images = torch.fft.irfft2(clean, s=(box, box)) + 0.02 * torch.from_numpy(rng.standard_normal((n, box, box)))
    batches = [np.arange(0, 120), np.arange(120, n)]
    filters = ctf.numpy().astype(np.float32)
    spectra, filters = _spectra(tmp_path, images.numpy().astype(np.float32), filters, batches)
    maps32 = [m.to(torch.float32) for m in maps]
    arguments = (spectra, maps32, torch.ones(box, box, box), rotations, scale, filters, batches)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = class_log_likelihoods(*arguments)
        torch.set_num_threads(3)
        likelihoods = class_log_likelihoods(*arguments)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(one, likelihoods)
    assert np.mean(np.argmax(likelihoods, axis=1) == truth) > 0.95

    w = _half_plane_weights(box)
    s = torch.fft.rfft2(images)
    log_likelihood = [
        (w * (2 * (s.conj() * relative * q[k]).real - ctf**2 * (relative * q[k]).abs() ** 2)).sum((1, 2))
        for k in range(3)
    ]
    unexplained = torch.stack([(w * (s - ctf**2 * relative * q[k]).abs() ** 2).sum((1, 2)) for k in range(3)])
    sigma2 = unexplained.min(dim=0).values / (w * ctf**2).sum((1, 2))
    expected = torch.stack([ll / (2 * sigma2) for ll in log_likelihood], dim=1).numpy()
    np.testing.assert_allclose(likelihoods, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_projection_scores_recover_the_amount_of_a_map(tmp_path):
    """Images holding z times a map's projection plus noise that dominates each image (as in
    cryo-EM): the scores are z within their stated uncertainty, and that uncertainty matches their
    scatter."""
    rng = np.random.default_rng(5)
    n, box = 300, 16
    direction = _smooth_map(rng, box)
    rotations = torch.from_numpy(uniform_rotations(n, rng))
    ctf = torch.from_numpy(rng.uniform(0.3, 1.0, (n, box, box // 2 + 1)))
    scale = torch.ones(n, dtype=torch.float64)
    z = torch.from_numpy(rng.choice([-1.0, 0.5, 2.0], n))
    q = torch.fft.rfft2(project(direction, rotations))
    noise = torch.fft.rfft2(torch.from_numpy(rng.standard_normal((n, box, box))))
    images = torch.fft.irfft2(ctf**2 * z[:, None, None] * q + 3.0 * ctf * noise, s=(box, box))
    batches = [np.arange(0, 100), np.arange(100, n)]
    filters = ctf.numpy().astype(np.float32)
    spectra, filters = _spectra(tmp_path, images.numpy().astype(np.float32), filters, batches)
    found, variance = projection_scores(
        spectra, direction.to(torch.float32), torch.ones(box, box, box), rotations, scale, filters, batches
    )
    pulls = (found - z.numpy()) / np.sqrt(variance)
    assert abs(np.mean(pulls)) < 0.2
    assert 0.85 < np.std(pulls) < 1.15


def test_held_out_posteriors_do_not_follow_a_particles_own_label(tmp_path):
    """Two classes in heavy noise, maps made from labels of which a fifth are wrong. Scored against
    maps that hold their own noise, the mislabelled particles keep their wrong label far more often
    than particles are misclassified at all; held out (each half against the other half's maps),
    they keep it about as often as a correctly labelled particle is misclassified."""
    rng = np.random.default_rng(3)
    n, box = 1600, 16
    maps = [_smooth_map(rng, box) for _ in range(2)]
    rotations = torch.from_numpy(uniform_rotations(n, rng))
    ctf = torch.from_numpy(rng.uniform(0.3, 1.0, (n, box, box // 2 + 1)))
    scale = torch.ones(n, dtype=torch.float64)
    truth = rng.integers(0, 2, n)
    q = torch.stack([torch.fft.rfft2(project(m, rotations)) for m in maps])
    difference = q[torch.from_numpy(truth), torch.arange(n)] - (q[0] + q[1]) / 2  # the residual's signal
    noise = torch.fft.rfft2(torch.from_numpy(rng.standard_normal((n, box, box))))
    images = torch.fft.irfft2(ctf**2 * difference + 6.0 * ctf * noise, s=(box, box))
    batches = [np.arange(0, 800), np.arange(800, n)]
    filters = ctf.numpy().astype(np.float32)
    spectra, filters = _spectra(tmp_path, images.numpy().astype(np.float32), filters, batches)
    wrong = rng.uniform(size=n) < 0.2
    labels = np.where(wrong, 1 - truth, truth)
    probability = np.eye(2)[labels]
    mask = torch.ones(box, box, box)
    totals = residual_sums(spectra, rotations, filters, batches)
    maps = difference_maps(class_sums(spectra, probability, totals, rotations, filters, batches), "C1", mask)
    in_sample = class_log_likelihoods(spectra, maps, mask, rotations, scale, filters, batches)
    held_out = held_out_posterior(spectra, filters, np.arange(n), rotations, scale, probability, mask, SplitOptions())
    np.testing.assert_allclose(logsumexp(held_out, axis=1), 0.0, atol=1e-9)

    def kept(log_posterior):  # how often a wrong label is kept, and a right one lost
        found = np.argmax(log_posterior, axis=1)
        return np.mean(found[wrong] == labels[wrong]), np.mean(found[~wrong] != labels[~wrong])

    kept_in, lost_in = kept(in_sample)
    kept_out, lost_out = kept(held_out)
    assert kept_in - lost_in > 0.12  # 0.18: the effect is there to be removed
    assert abs(kept_out - lost_out) < 0.05  # 0.02


def test_local_wiener_keeps_a_small_difference_and_removes_the_noise_around_it():
    """A small blob (a bound peptide's difference) in two half maps of independent noise: the weight
    is near 1 on the blob and near 0 far from it, and the weighted map is much closer to the blob
    than the map itself, whose error is the noise of the whole box."""
    rng = np.random.default_rng(5)
    box = 32
    k = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    distance = torch.sqrt((x - 4) ** 2 + (y + 3) ** 2 + z**2)
    signal = 6.0 * torch.exp(-(distance**2) / (2 * 1.5**2))
    halves = [signal + torch.from_numpy(rng.standard_normal((box, box, box))) for _ in range(2)]
    estimate, noise = (halves[0] + halves[1]) / 2, (halves[0] - halves[1]) / 2
    weight = local_wiener(estimate.to(torch.float32), noise.to(torch.float32))
    assert weight.dtype == torch.float32 and float(weight.min()) >= 0.0 and float(weight.max()) <= 1.0
    assert float(weight[distance < 1.5].mean()) > 0.8  # 0.87
    assert float(weight[distance > 10].mean()) < 0.1  # 0.05
    error_weighted = float(((estimate * weight - signal) ** 2).sum())
    error = float(((estimate - signal) ** 2).sum())
    assert error_weighted < 0.05 * error  # 0.017


def test_class_two_from_the_totals_equals_its_own_insertion(tmp_path):
    """Class 2's sums are the totals minus class 1's: swapping the probabilities swaps the maps."""
    rng = np.random.default_rng(0)
    n, box = 64, 12
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    filters = rng.uniform(0.2, 1.0, (n, box, box // 2 + 1)).astype(np.float32)
    rotations = torch.from_numpy(uniform_rotations(n, rng))
    batches = [np.arange(0, 40), np.arange(40, n)]
    spectra, filters = _spectra(tmp_path, images, filters, batches)
    first = rng.uniform(0.0, 1.0, n)
    first[:5], first[5:10] = 0.0, 1.0  # hard members of either class
    probability = np.stack([first, 1.0 - first], axis=1)
    mask = torch.ones(box, box, box)
    totals = residual_sums(spectra, rotations, filters, batches)
    maps = difference_maps(class_sums(spectra, probability, totals, rotations, filters, batches), "C1", mask)
    swapped = difference_maps(class_sums(spectra, probability[:, ::-1], totals, rotations, filters, batches), "C1", mask)
    scale = float(maps[0].abs().max())
    assert scale > 0
    for a, b in zip(maps, swapped[::-1]):
        assert torch.allclose(a, b, atol=1e-4 * scale)
    assert not torch.allclose(maps[0], maps[1], atol=1e-2 * scale)


def test_log_odds_of_each_class():
    """log(P(k) / (1 - P(k))) from normalised log posteriors, for two and three classes."""
    p = np.array([[0.7, 0.3], [0.1, 0.9]])
    np.testing.assert_allclose(log_odds(np.log(p)), np.log(p / (1 - p)))
    p = np.array([[0.2, 0.5, 0.3]])
    np.testing.assert_allclose(log_odds(np.log(p)), np.log(p / (1 - p)))


def test_the_splitters_residual_sums_are_kept_per_set_of_rows(tmp_path):
    """`Splitter.residual_totals` gives `residual_sums` of the rows bit for bit, the same object when
    asked again for the same rows, and makes them anew once TOTALS_KEPT other sets came after."""
    rng = np.random.default_rng(3)
    n, box = 30, 12
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    filters = rng.uniform(0.2, 1.0, (n, box, box // 2 + 1)).astype(np.float32)
    rotations = torch.from_numpy(uniform_rotations(n, rng))
    spectra, filters = _spectra(tmp_path, images, filters, [np.arange(n)])
    splitter = Splitter(None, filters, spectra, rotations, None, None, None, None, 1.0, SplitOptions(batch_size=4), False)
    rows = np.array([0, 2, 3, 5, 7, 11])
    kept = splitter.residual_totals(rows)
    fresh = residual_sums(spectra, rotations, filters, [rows[:4], rows[4:]])
    assert all(torch.equal(a.sums, b.sums) for a, b in zip(kept, fresh))
    assert splitter.residual_totals(rows.copy()) is kept
    for k in range(TOTALS_KEPT):
        splitter.residual_totals(np.arange(k, n, 2 + k))
    again = splitter.residual_totals(rows)
    assert again is not kept and all(torch.equal(a.sums, b.sums) for a, b in zip(again, fresh))
