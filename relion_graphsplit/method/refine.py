"""Refinement of the graph split with fixed poses: classify each particle against the two class maps.

The graph split sees each particle only through a few cones' first components. Once it has split the
set, the two classes can be reconstructed and every particle compared with both, with its own pose,
CTF and scale: the likelihood ratio under white noise, the statistic the ceiling classifier uses with
the true maps. Rounds of this (expectation-maximisation with fixed poses and soft assignments, started
from the graph split rather than from a random partition) take the split much of the remaining way to
that ceiling; docs/benchmarks.md has the measurements.

Everything happens at the working size on the transforms of the scratch images (`image_spectra`,
computed once), which hold the residual to the consensus projection times the CTF,
s = CTF (I - a CTF P): the maps reconstructed from them are the classes' differences to the
consensus, D_k, and with Q_k the projection of D_k,
    log p(I | k) = -|I - a CTF P - a' CTF Q_k|^2 / (2 sigma^2) + const
                 = [2 a' <s, Q_k> - a'^2 <CTF^2 Q_k, Q_k>] / (2 sigma^2) + const,
with a' = a / mean(a), since the maps reconstructed from the residuals already carry the mean scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from relion_graphsplit.fourier.compiled import compiled, run_in_runs
from relion_graphsplit.fourier.fsc import fsc, shell_index
from relion_graphsplit.fourier.projection import (
    prepare_volume,
    rfft_frequencies,
    rfft_weights,
    slice_values,
)
from relion_graphsplit.fourier.reconstruct import FourierAccumulator, centred_rfft2
from relion_graphsplit.method.graph import classes_by_sign
from relion_graphsplit.method.masks import class_maps_mask
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.scratch import ScratchArray


def _half_plane_weights(n: int) -> torch.Tensor:
    """Weights of the rfft coefficients in a full-plane inner product (DC excluded)."""
    weights = rfft_weights(n)
    weights[0, 0] = 0.0
    return weights


def image_spectra(
    scratch: ScratchArray,
    filters: ScratchArray,
    batches: list[np.ndarray],
    spectra: ScratchArray,
    whitening: torch.Tensor | None = None,
) -> None:
    """Write the centred transform (`centred_rfft2`) of every scratch image into `spectra`
    (n, N, N // 2 + 1, 2: real and imaginary parts): every round reads them instead of transforming
    the images anew. With `whitening` (N, N // 2 + 1), the transforms and, in place, the CTF `filters`
    are multiplied by it: CTF (W r) and CTF' = W CTF, so that the white-noise likelihood weighs each
    frequency by the inverse noise power.

    Parameters
    ----------
    scratch : ScratchArray
        (n, N, N) float32 the preprocessed images at the working box N, centred at N // 2: residuals
        to the consensus projection (of the whitened images, where they were whitened) times the CTF
        (preprocess.correct, subtract-multiply).
    filters : ScratchArray
        (n, N, N // 2 + 1) float32 each image's CTF on the unshifted rfft grid; overwritten with
        `whitening` times it when `whitening` is given.
    batches : list of np.ndarray
        Particle rows, one array per batch; every row to be used must be in one.
    spectra : ScratchArray
        (n, N, N // 2 + 1, 2) float32, written: real and imaginary parts of the transforms (complex64).
    whitening : torch.Tensor or None
        (N, N // 2 + 1) the whitening filter on the unshifted rfft grid (preprocess.Whitening.filter),
        or None.
    """
    for index in batches:
        f = centred_rfft2(torch.from_numpy(np.asarray(scratch[index])).to(torch.float64))
        if whitening is not None:
            f = whitening * f
            filters[index] = (whitening * torch.from_numpy(np.asarray(filters[index]))).numpy()
        spectra[index] = torch.view_as_real(f.to(torch.complex64)).numpy()


def _complex(spectra: ScratchArray, index: np.ndarray) -> np.ndarray:
    """Rows `index` of `spectra` (`image_spectra`) as complex64 (B, N, N // 2 + 1)."""
    rows = np.asarray(spectra[index])
    return rows.view(np.complex64).reshape(rows.shape[:-1])


def _weighted_halves(
    spectra: ScratchArray,
    weights: np.ndarray,
    rotations: torch.Tensor,
    filters: ScratchArray,
    batches: list[np.ndarray],
) -> list[FourierAccumulator]:
    """Sums of w s (data) and w CTF^2 (weight) over the particles of each half (even and odd numbers),
    for per-particle weights w (n,); particles of weight <= 1e-6 are left out."""
    halves = [FourierAccumulator(spectra.shape[1]) for _ in range(2)]
    for index in batches:
        f = torch.from_numpy(_complex(spectra, index))
        ctf = torch.from_numpy(np.asarray(filters[index]))
        p = np.where(weights[index] > 1e-6, weights[index], 0.0)
        for half in range(2):
            w = torch.from_numpy(np.where(index % 2 == half, p, 0.0))
            halves[half].insert_rfft(f, rotations[index], ctf=ctf, ctf_premultiplied=True, weights=w)
    return halves


def residual_sums(
    spectra: ScratchArray, rotations: torch.Tensor, filters: ScratchArray, batches: list[np.ndarray]
) -> list[FourierAccumulator]:
    """Sums of all particles' residuals and CTF^2 in the two halves (even and odd particle numbers).

    With fixed poses they are the same in every round, and the second class's sums are these minus
    the first class's: one insertion per particle and round instead of two.

    Parameters
    ----------
    spectra : ScratchArray
        (n, N, N // 2 + 1, 2) the stored transforms s (`image_spectra`), which already carry one CTF
        factor: the data sum is of s, the weight of CTF^2.
    rotations : torch.Tensor
        (n, 3, 3) RELION matrices of the particles (left-multiplying xyz column vectors of the map).
    filters : ScratchArray
        (n, N, N // 2 + 1) the CTFs (whitened, if the spectra are).
    batches : list of np.ndarray
        Particle rows, one array per batch.

    Returns
    -------
    list of FourierAccumulator
        Two accumulators at box N: the particles of even 0-based row index, then those of odd index.
    """
    return _weighted_halves(spectra, np.ones(spectra.shape[0]), rotations, filters, batches)


def class_sums(
    spectra: ScratchArray,
    probability: np.ndarray,
    totals: list[FourierAccumulator],
    rotations: torch.Tensor,
    filters: ScratchArray,
    batches: list[np.ndarray],
) -> list[list[FourierAccumulator]]:
    """Each class's sums in its two halves (even and odd particle numbers), [class][half].

    `probability` (n,) is each particle's probability of class 1: particles count towards both
    classes in proportion (soft assignment, as in expectation-maximisation). `totals` are the halves'
    sums over all particles (`residual_sums`); class 2's sums are their difference to class 1's.

    Parameters
    ----------
    spectra : ScratchArray
        (n, N, N // 2 + 1, 2) the stored transforms (`image_spectra`).
    probability : np.ndarray
        (n,) float64 in [0, 1], each particle's probability of class 1; particles of probability
        <= 1e-6 are left out of class 1's sums.
    totals : list of FourierAccumulator
        The two halves' sums over all particles (`residual_sums`).
    rotations : torch.Tensor
        (n, 3, 3) RELION matrices.
    filters : ScratchArray
        (n, N, N // 2 + 1) the CTFs.
    batches : list of np.ndarray
        Particle rows, one array per batch.

    Returns
    -------
    list of list of FourierAccumulator
        [class][half]: class 1's sums weighted by the probability, class 2's as totals less class 1's;
        half 0 the even 0-based rows, half 1 the odd ones.
    """
    n = spectra.shape[1]
    first_class = _weighted_halves(spectra, probability, rotations, filters, batches)
    second_class = [FourierAccumulator(n), FourierAccumulator(n)]
    for total, first, second in zip(totals, first_class, second_class):
        second.sums = total.sums - first.sums
    return [first_class, second_class]


def difference_maps(halves: list[list[FourierAccumulator]], symmetry: str, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each class's difference to the consensus, from its halves' sums (`class_sums`), FSC-weighted.

    Each class is reconstructed from two halves (even and odd particle numbers); the sum is filtered
    shell by shell by sqrt(2 FSC / (1 + FSC)) of the halves. Unfiltered, the map of the smaller class
    is the noisier one, its noise power enters the likelihood as a penalty, and particles drift into
    the larger class. The FSC is taken between the halves multiplied by the 3D `mask` (the region the
    likelihood looks at): unmasked, the solvent's noise lowers it and the filter removes signal.

    Parameters
    ----------
    halves : list of list of FourierAccumulator
        [class][half] sums (`class_sums`).
    symmetry : str
        RELION point group applied to every reconstruction.
    mask : torch.Tensor
        (N, N, N) [z, y, x] the 3D mask at the working box, for the FSC only (the maps returned are
        not masked).

    Returns
    -------
    list of torch.Tensor
        Per class, (N, N, N) [z, y, x] float32 centred at N // 2: the reconstruction from both halves,
        each shell (rounded radius in Fourier pixels) multiplied by sqrt(2 FSC / (1 + FSC)) with the
        FSC clipped at 0, and zero beyond shell N // 2.
    """
    n = halves[0][0].box
    maps = []
    for first, second in halves:
        whole = FourierAccumulator(n)
        whole.sums = first.sums + second.sums
        curve = fsc(first.finalise(sym=symmetry) * mask, second.finalise(sym=symmetry) * mask).clamp(min=0.0)
        weight = torch.sqrt(2 * curve / (1 + curve))
        f = torch.fft.rfftn(whole.finalise(sym=symmetry).to(torch.float64))
        shells = shell_index(n).clamp(max=n // 2)
        beyond = shell_index(n) > n // 2
        f = f * torch.where(beyond, 0.0, weight[shells])
        maps.append(torch.fft.irfftn(f, s=(n, n, n)).to(torch.float32))
    return maps


def class_log_odds(
    spectra: ScratchArray,
    maps: list[torch.Tensor],
    mask: torch.Tensor,
    rotations: torch.Tensor,
    scale: torch.Tensor,
    filters: ScratchArray,
    prior: float,
    batches: list[np.ndarray],
) -> np.ndarray:
    """log p(class 1 | image) - log p(class 2 | image) for every particle, given the difference maps.

    The maps are multiplied by the 3D mask first, so that only the masked region decides. The noise
    variance of each image is estimated from what its better-fitting class leaves unexplained,
    min_k |s - a' CTF^2 Q_k|^2 / sum CTF^2 (s carries the noise times the CTF; a' = a / mean(a), the
    image's scale relative to the mean): the residual alone would count the class difference as
    noise, shrink the data term against the prior, and pull particles into the larger class. The sums
    over each image's pixels are taken by `_likelihood_kernel` on torch.get_num_threads() threads,
    each on its own run of images, in float64.

    Parameters
    ----------
    spectra : ScratchArray
        (n, N, N // 2 + 1, 2) the stored transforms s (`image_spectra`).
    maps : list of torch.Tensor
        The two classes' difference maps (N, N, N) [z, y, x] to the consensus (`difference_maps`).
    mask : torch.Tensor
        (N, N, N) the 3D mask at the working box.
    rotations : torch.Tensor
        (n, 3, 3) RELION matrices.
    scale : torch.Tensor
        (n,) each image's least-squares scale a relative to the consensus projection.
    filters : ScratchArray
        (n, N, N // 2 + 1) the CTFs.
    prior : float
        log(P(class 1) / P(class 2)), added to every particle's log odds.
    batches : list of np.ndarray
        Particle rows, one array per batch.

    Returns
    -------
    np.ndarray
        (n,) float64, (L_1 - L_2) / (2 sigma^2) + prior per particle (L_k, sigma^2 as in
        `_likelihood_kernel` and above): positive for class 1; 0 for rows in no batch.
    """
    n = spectra.shape[1]
    prepared = prepare_volume(torch.stack([m * mask for m in maps]).to(torch.float32))
    kx, ky, inside = rfft_frequencies(n)
    common = (
        _half_plane_weights(n).numpy(), kx.numpy(), ky.numpy(), inside.numpy(),
        prepared.data.numpy(), prepared.pad, prepared.padded_box // 2 + 1,
    )  # fmt: skip
    # The maps were reconstructed from residuals that carry each image's scale a: relative to them an
    # image's difference is a' = a / mean(a) times their projection.
    relative = (scale / scale.mean()).to(torch.float64).numpy()
    out = np.zeros(spectra.shape[0])
    for index in batches:
        s = _complex(spectra, index)
        terms = np.zeros((len(index), 5))  # per image: L_1, L_2, U_1, U_2, sum w CTF^2
        args = (terms, s, np.asarray(filters[index]), relative[index], rotations[index].to(torch.float64).numpy(), *common)
        run_in_runs(_likelihood_kernel, args, len(index), torch.get_num_threads())
        sigma2 = np.minimum(terms[:, 2], terms[:, 3]) / np.maximum(terms[:, 4], 1e-30)
        out[index] = (terms[:, 0] - terms[:, 1]) / (2 * sigma2) + prior
    return out


@compiled
def _likelihood_kernel(
    terms: np.ndarray, s: np.ndarray, ctf: np.ndarray, relative: np.ndarray, rotations: np.ndarray,
    weights: np.ndarray, kx: np.ndarray, ky: np.ndarray, inside: np.ndarray,
    data: np.ndarray, pad: int, c: int, start: int, stop: int,
) -> None:
    """For images b from start to stop, with q_k = a'_b times the centred projection of map k
    (`slice_values`; s is centred too) and the weights w of the rfft grid, into terms[b]:
    L_k = sum w (2 Re(conj(s) q_k) - CTF^2 |q_k|^2), U_k = sum w |s - CTF^2 q_k|^2 (k = 1, 2) and
    sum w CTF^2, over every pixel (q = 0 beyond the Nyquist circle), in float64."""
    values = np.empty(2, dtype=np.complex128)
    for b in range(start, stop):
        a0, a1 = rotations[b, 0], rotations[b, 1]
        l1 = l2 = u1 = u2 = wc = 0.0
        for i in range(s.shape[1]):
            for j in range(s.shape[2]):
                w = weights[i, j]
                c2 = ctf[b, i, j] * ctf[b, i, j]
                v = s[b, i, j]
                sr, si = v.real, v.imag
                wc += w * c2
                if inside[i, j]:
                    x = pad * (kx[j] * a0[0] + ky[i] * a1[0])
                    y = pad * (kx[j] * a0[1] + ky[i] * a1[1])
                    z = pad * (kx[j] * a0[2] + ky[i] * a1[2])
                    slice_values(data, x, y, z, c, values)
                    q1 = relative[b] * values[0]
                    q2 = relative[b] * values[1]
                    l1 += w * (2 * (sr * q1.real + si * q1.imag) - c2 * (q1.real**2 + q1.imag**2))
                    l2 += w * (2 * (sr * q2.real + si * q2.imag) - c2 * (q2.real**2 + q2.imag**2))
                    u1 += w * ((sr - c2 * q1.real) ** 2 + (si - c2 * q1.imag) ** 2)
                    u2 += w * ((sr - c2 * q2.real) ** 2 + (si - c2 * q2.imag) ** 2)
                else:
                    u1 += w * (sr * sr + si * si)
                    u2 += w * (sr * sr + si * si)
        terms[b, 0], terms[b, 1], terms[b, 2], terms[b, 3], terms[b, 4] = l1, l2, u1, u2, wc


def refine_classes(
    spectra: ScratchArray,
    filters: ScratchArray,
    batches: list[np.ndarray],
    rotations: torch.Tensor,
    scale: torch.Tensor,
    score: np.ndarray,
    mask: torch.Tensor,
    consensus: torch.Tensor | None,
    pixel_size: float,
    options: SplitOptions,
    redraw_mask: bool,
    track: Callable[..., Iterable] = lambda iterable, **_: iterable,
) -> tuple[np.ndarray, list[int]]:
    """Rounds of fixed-pose classification against the two class maps, from the graph split.

    At most options.refine_iterations rounds, stopping once at most options.refine_tolerance of the
    particles change class; each round's change of the probabilities is over-relaxed by
    options.refine_relaxation (from the second round on; probabilities clipped to [0, 1]), which
    takes the slow drift of noisy sets in fewer rounds (the classes are each round's own). Each
    round's prior is the log odds of the mean probability of class 1.

    Parameters
    ----------
    spectra, filters : ScratchArray
        The images' stored transforms (n, w, w // 2 + 1, 2) (`image_spectra`) and data filters
        (n, w, w // 2 + 1) at the working box w.
    batches : list of np.ndarray
        Particle rows, one array per batch.
    rotations : torch.Tensor
        (n, 3, 3) RELION matrices (left-multiplying xyz column vectors of the map).
    scale : torch.Tensor
        (n,) each image's grey scale: its least-squares scale relative to the consensus projection.
    score : np.ndarray
        (n,) the graph split's scores (log odds of class 1; their signs are the starting classes,
        class 1 where the score >= 0).
    mask : torch.Tensor
        (w, w, w) the graph split's 3D mask, redrawn around the first class maps when `redraw_mask`
        (a part the classes differ by is at full strength there, at its occupancy in the consensus).
    consensus : torch.Tensor or None
        (w, w, w) the consensus map at the working box; needed when `redraw_mask`.
    pixel_size : float
        Pixel size (A) at the working box.
    options : SplitOptions
        refine_iterations, refine_tolerance, refine_relaxation, symmetry, and for the redrawn mask
        refine_mask_threshold and mask_extend.
    redraw_mask : bool
        Whether to draw the mask again around the class maps (`masks.class_maps_mask`) before the
        first round.
    track : callable
        Progress callback, called as track(iterable, description=..., total=...).

    Returns
    -------
    score : np.ndarray
        (n,) float64 the last round's log odds of class 1 (the input `score` when no round ran).
    changed : list of int
        The number of particles that changed class in each round.
    """
    n = len(score)
    classes = classes_by_sign(score)
    probability = (classes == 1).astype(np.float64)  # the graph split, as a hard start
    changed: list[int] = []
    totals = residual_sums(spectra, rotations, filters, batches)

    def rounds():  # until fewer than refine_tolerance of the particles change class
        for _ in range(options.refine_iterations):
            if changed and changed[-1] <= options.refine_tolerance * n:
                return
            yield

    def sums():  # the classes' sums for the current probabilities
        return class_sums(spectra, probability, totals, rotations, filters, batches)

    halves = None  # class_sums of the current probabilities, once computed
    if redraw_mask:
        halves = sums()
        mask = class_maps_mask(
            consensus, difference_maps(halves, options.symmetry, mask), float(scale.mean()),
            pixel_size, threshold=options.refine_mask_threshold, extend=options.mask_extend,
        )  # fmt: skip
    for _ in track(rounds(), description="Refining against the class maps (rounds)", total=options.refine_iterations):
        differences = difference_maps(halves if halves is not None else sums(), options.symmetry, mask)
        share = float(np.mean(probability))
        prior = float(np.log(max(share, 1e-6) / max(1 - share, 1e-6)))
        score = class_log_odds(spectra, differences, mask, rotations, scale, filters, prior, batches)
        relaxation = options.refine_relaxation if changed else 1.0
        probability = np.clip(probability + relaxation * (1.0 / (1.0 + np.exp(-score)) - probability), 0.0, 1.0)
        halves = None
        new_classes = classes_by_sign(score)
        changed.append(int((new_classes != classes).sum()))
        classes = new_classes
    return score, changed
