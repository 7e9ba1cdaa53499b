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

Each pass over the particles computes on a `Compute`'s device, a batch of options.batch_size images
at a time: the Fourier sums by `FourierAccumulator`, the likelihood terms by the compiled
`_likelihood_kernel` on the CPU and by its torch twin `likelihood_terms` elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.special import logsumexp

from relion_graphsplit.engine import CPU, LOCAL, Compute, Engine, StoredArray, ordered_sum, tasks_of
from relion_graphsplit.fourier.compiled import compiled, run_in_runs, runs_compiled
from relion_graphsplit.fourier.fsc import fsc, shell_index
from relion_graphsplit.fourier.projection import (
    PreparedVolume,
    central_slices,
    prepare_volume,
    rfft_frequencies,
    rfft_weights,
    slice_values,
)
from relion_graphsplit.fourier.reconstruct import FourierAccumulator, centred_rfft2
from relion_graphsplit.method.masks import class_maps_mask
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.scratch import ScratchArray, row_batches

LOCAL_SIGMA = 2.0
"""Width (standard deviation, working-box voxels) of the neighbourhood `local_wiener` averages the
powers over, about the working resolution (a working pixel is a third to a half of it)."""


def _half_plane_weights(n: int) -> torch.Tensor:
    """Weights of the rfft coefficients in a full-plane inner product (DC excluded)."""
    weights = rfft_weights(n)
    weights[0, 0] = 0.0
    return weights


def image_spectra(
    scratch: StoredArray,
    filters: StoredArray,
    batches: list[np.ndarray],
    spectra: StoredArray,
    whitening: torch.Tensor | None = None,
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> None:
    """Write the centred transform (`centred_rfft2`) of every scratch image into `spectra`
    (n, N, N // 2 + 1, 2: real and imaginary parts): every round reads them instead of transforming
    the images anew. With `whitening` (N, N // 2 + 1), the transforms and, in place, the CTF `filters`
    are multiplied by it: CTF (W r) and CTF' = W CTF, so that the white-noise likelihood weighs each
    frequency by the inverse noise power. Each task (`engine.tasks_of` the batches) writes its own rows
    where it runs.

    Parameters
    ----------
    scratch : StoredArray
        (n, N, N) float32 the preprocessed images at the working box N, centred at N // 2: residuals
        to the consensus projection (of the whitened images, where they were whitened) times the CTF
        (preprocess.correct, subtract-multiply).
    filters : StoredArray
        (n, N, N // 2 + 1) float32 each image's CTF on the unshifted rfft grid; overwritten with
        `whitening` times it when `whitening` is given.
    batches : list of np.ndarray
        Particle rows, one array per batch; every row to be used must be in one.
    spectra : StoredArray
        (n, N, N // 2 + 1, 2) float32, written: real and imaginary parts of the transforms (complex64).
    whitening : torch.Tensor or None
        (N, N // 2 + 1) the whitening filter on the unshifted rfft grid (preprocess.Whitening.filter),
        or None.
    engine : Engine
        Where the tasks run.
    compute : Compute
        The device the transforms are computed on, a batch at a time.
    """
    tasks = [(group,) for group in tasks_of(batches)]
    for _ in engine.map(_spectra_task, tasks, (scratch, filters, spectra, whitening, compute)):
        pass  # the tasks write their rows; nothing comes back


def _spectra_task(
    scratch: StoredArray,
    filters: StoredArray,
    spectra: StoredArray,
    whitening: torch.Tensor | None,
    compute: Compute,
    batches: list[np.ndarray],
) -> None:
    """One task of `image_spectra`: the rows of its batches (rows (B,) per batch), on `compute`'s device."""
    device = compute.device
    white = None if whitening is None else whitening.to(device)
    with scratch.open() as images, filters.open() as ctfs, spectra.open() as transforms, compute.kernels():
        for index in batches:
            f = centred_rfft2(torch.from_numpy(np.asarray(images[index])).to(device, torch.float64))
            if white is not None:
                f = white * f
                ctfs[index] = (white * torch.from_numpy(np.asarray(ctfs[index])).to(device)).cpu().numpy()
            transforms[index] = torch.view_as_real(f.to(torch.complex64)).cpu().numpy()


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
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> list[list[FourierAccumulator]]:
    """Sums of w s (data) and w CTF^2 (weight) over the particles of each half (even and odd numbers),
    [set][half], for C sets of per-particle weights w (n, C), each batch read once; particles of weight
    <= 1e-6 are left out of that set's sums. Each task (`engine.tasks_of`) sums its own batches on
    `compute`'s device; the tasks' sums are added in task order, on the CPU, and the accumulators
    returned are on the device."""
    tasks = [
        (group, [weights[index] for index in group], [rotations[index] for index in group]) for group in tasks_of(batches)
    ]
    common = (StoredArray.of(spectra), StoredArray.of(filters), weights.shape[1], compute)
    total = ordered_sum(engine.map(_halves_task, tasks, common))
    device = compute.device
    sums = [[FourierAccumulator(spectra.shape[1], device=device) for _ in range(2)] for _ in range(weights.shape[1])]
    for halves, grids in zip(sums, total):
        for accumulator, grid in zip(halves, grids):
            accumulator.sums = torch.from_numpy(grid).to(device)
    return sums


def _halves_task(
    spectra: StoredArray,
    filters: StoredArray,
    sets: int,
    compute: Compute,
    batches: list[np.ndarray],
    weights: list[np.ndarray],
    rotations: list[torch.Tensor],
) -> np.ndarray:
    """One task of `_weighted_halves`: the sums of its batches (rows (B,), weights (B, C) and RELION
    matrices (B, 3, 3) per batch), (C, 2, 3, 2c + 1, 2c + 1, c + 1) float32 [set][half] (the grids of
    `FourierAccumulator.sums`), inserted on `compute`'s device (2C grids there, and a batch's
    transforms, CTFs and insertion temporaries)."""
    device = compute.device
    with spectra.open() as stored, filters.open() as ctfs, compute.kernels():
        sums = [[FourierAccumulator(stored.shape[1], device=device) for _ in range(2)] for _ in range(sets)]
        for index, weight, rotation in zip(batches, weights, rotations):
            f = torch.from_numpy(_complex(stored, index)).to(device)
            ctf = torch.from_numpy(np.asarray(ctfs[index])).to(device)
            for halves, column in zip(sums, weight.T):
                p = np.where(column > 1e-6, column, 0.0)
                for half in range(2):
                    w = torch.from_numpy(np.where(index % 2 == half, p, 0.0))
                    halves[half].insert_rfft(f, rotation, ctf=ctf, ctf_premultiplied=True, weights=w)
        return np.stack([[accumulator.sums.cpu().numpy() for accumulator in halves] for halves in sums])


def residual_sums(
    spectra: ScratchArray,
    rotations: torch.Tensor,
    filters: ScratchArray,
    batches: list[np.ndarray],
    engine: Engine = LOCAL,
    compute: Compute = CPU,
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
    engine : Engine
        Where the tasks (`engine.tasks_of` the batches) run; their sums are added in task order.
    compute : Compute
        The device the insertions run on, and the accumulators returned live on.

    Returns
    -------
    list of FourierAccumulator
        Two accumulators at box N: the particles of even 0-based row index, then those of odd index.
    """
    return _weighted_halves(spectra, np.ones((spectra.shape[0], 1)), rotations, filters, batches, engine, compute)[0]


def class_sums(
    spectra: ScratchArray,
    probability: np.ndarray,
    totals: list[FourierAccumulator],
    rotations: torch.Tensor,
    filters: ScratchArray,
    batches: list[np.ndarray],
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> list[list[FourierAccumulator]]:
    """Each class's sums in its two halves (even and odd particle numbers), [class][half].

    `probability` (n, K) holds each particle's probability of each class: particles count towards
    every class in proportion (soft assignment, as in expectation-maximisation). `totals` are the
    halves' sums over all particles of `batches` (`residual_sums`); the last class's sums are their
    difference to the others', so a round costs K - 1 insertions per particle.

    Parameters
    ----------
    spectra : ScratchArray
        (n, N, N // 2 + 1, 2) the stored transforms (`image_spectra`).
    probability : np.ndarray
        (n, K) float64 in [0, 1], rows summing to 1 (only the rows in `batches` are read); a particle
        of probability <= 1e-6 is left out of that class's sums.
    totals : list of FourierAccumulator
        The two halves' sums over the particles of `batches` (`residual_sums`).
    rotations : torch.Tensor
        (n, 3, 3) RELION matrices.
    filters : ScratchArray
        (n, N, N // 2 + 1) the CTFs.
    batches : list of np.ndarray
        Particle rows, one array per batch.
    engine : Engine
        Where the tasks (`engine.tasks_of` the batches) run; their sums are added in task order.
    compute : Compute
        The device the insertions run on, and the accumulators returned live on (`totals`' too).

    Returns
    -------
    list of list of FourierAccumulator
        [class][half]: classes 1..K - 1 weighted by their probabilities, class K as the totals less
        the others; half 0 the even 0-based rows, half 1 the odd ones.
    """
    n = spectra.shape[1]
    sums = _weighted_halves(spectra, probability[:, :-1], rotations, filters, batches, engine, compute)
    last = [FourierAccumulator(n, device=compute.device), FourierAccumulator(n, device=compute.device)]
    for half in range(2):
        last[half].sums = totals[half].sums - sum(s[half].sums for s in sums)
    return [*sums, last]


def difference_maps(
    halves: list[list[FourierAccumulator]],
    symmetry: str,
    mask: torch.Tensor,
    compute: Compute = CPU,
    local: bool = False,
) -> list[torch.Tensor]:
    """Each class's difference to the consensus, from its halves' sums (`class_sums`), FSC-weighted
    and, if `local`, weighted voxel by voxel by its local signal-to-noise ratio (`local_wiener`).

    Each class is reconstructed from two halves (even and odd particle numbers); the sum is filtered
    shell by shell by sqrt(2 FSC / (1 + FSC)) of the halves. Unfiltered, the map of the smaller class
    is the noisier one, its noise power enters the likelihood as a penalty, and particles drift into
    the larger class. The FSC is taken between the halves multiplied by the 3D `mask` (the region the
    likelihood looks at): unmasked, the solvent's noise lowers it and the filter removes signal.
    The shell filter cannot tell where in the map the difference lies: a small part (a bound peptide)
    leaves the rest of the mask filled with noise, which every particle's likelihood then meets. With
    `local`, the filtered map is multiplied by the local Wiener weight of its power against that of
    the halves' half-difference filtered alike (its noise without its signal). That is for classes
    already found: from a graph split's rough start, it can remove a weak class's map before the
    class has formed (docs/method.md has both measurements).

    Parameters
    ----------
    halves : list of list of FourierAccumulator
        [class][half] sums (`class_sums`).
    symmetry : str
        RELION point group applied to every reconstruction.
    mask : torch.Tensor
        (N, N, N) [z, y, x] the 3D mask at the working box, for the FSC only (the maps returned are
        not masked).
    compute : Compute
        The device the maps are reconstructed and filtered on, that of the accumulators.
    local : bool
        Whether to weight each map voxel by voxel (`local_wiener`).

    Returns
    -------
    list of torch.Tensor
        Per class, (N, N, N) [z, y, x] float32 centred at N // 2 on the CPU: the reconstruction from
        both halves, each shell (rounded radius in Fourier pixels) multiplied by sqrt(2 FSC / (1 + FSC))
        with the FSC clipped at 0 and zero beyond shell N // 2; if `local`, times `local_wiener` of it
        against the halves' half-difference filtered alike.
    """
    n, device = halves[0][0].box, compute.device
    mask = mask.to(device)
    maps = []
    with compute.kernels():
        for first, second in halves:
            whole = FourierAccumulator(n, device=device)
            whole.sums = first.sums + second.sums
            pair = first.finalise(sym=symmetry), second.finalise(sym=symmetry)
            curve = fsc(pair[0] * mask, pair[1] * mask).clamp(min=0.0)
            weight = torch.sqrt(2 * curve / (1 + curve))
            estimate = _shell_filtered(whole.finalise(sym=symmetry), weight)
            if local:
                noise = _shell_filtered((pair[0] - pair[1]) / 2, weight)  # the noise of the halves' mean
                estimate = estimate * local_wiener(estimate, noise)
            maps.append(estimate)
    return maps


def half_maps(
    halves: list[list[FourierAccumulator]], symmetry: str, mask: torch.Tensor, compute: Compute = CPU
) -> list[list[torch.Tensor]]:
    """Each class's difference map to the consensus from each half alone, Wiener-filtered, [half][class].

    A half's map is filtered shell by shell by the FSC of the two halves (masked by `mask`, clipped at
    0), the fraction of a half map's power that is signal, and then voxel by voxel (`local_wiener`,
    with the noise from the halves' difference, as in `difference_maps` with `local`: these are the
    maps of classes already found). Scored against the other half's maps, a particle meets none of
    its own noise, so its posterior is not inflated by it (`held_out_posterior`).

    Parameters
    ----------
    halves : list of list of FourierAccumulator
        [class][half] sums (`class_sums`).
    symmetry : str
        RELION point group applied to every reconstruction.
    mask : torch.Tensor
        (N, N, N) [z, y, x] the 3D mask at the working box, for the FSC only.
    compute : Compute
        The device the maps are reconstructed and filtered on, that of the accumulators.

    Returns
    -------
    list of list of torch.Tensor
        [half][class] (N, N, N) [z, y, x] float32 centred at N // 2 on the CPU, zero beyond shell N // 2:
        each half's FSC-filtered map times its `local_wiener`.
    """
    mask = mask.to(compute.device)
    maps: list[list[torch.Tensor]] = [[], []]
    with compute.kernels():
        for first, second in halves:
            pair = (first.finalise(sym=symmetry), second.finalise(sym=symmetry))
            curve = fsc(pair[0] * mask, pair[1] * mask).clamp(min=0.0)
            noise = _shell_filtered((pair[0] - pair[1]) / math.sqrt(2), curve)  # a half map's noise
            for half, volume in enumerate(pair):
                estimate = _shell_filtered(volume, curve)
                maps[half].append(estimate * local_wiener(estimate, noise))
    return maps


def local_wiener(estimate: torch.Tensor, noise: torch.Tensor, sigma: float = LOCAL_SIGMA) -> torch.Tensor:
    """Voxel-wise Wiener weight of a map from its local power and that of its noise.

    With both powers averaged over a Gaussian neighbourhood, the weight is the estimated fraction of
    the local power that is signal, 1 - <noise^2> / <estimate^2>, clipped to [0, 1]: about 1 where the
    map holds a difference well above its noise, 0 where it holds noise alone.

    Parameters
    ----------
    estimate : torch.Tensor
        (N, N, N) the map, signal plus noise, on the CPU.
    noise : torch.Tensor
        (N, N, N) a map of its noise alone at the same level (such as half the difference of two
        half maps, filtered as the estimate), on the CPU.
    sigma : float
        Standard deviation (voxels) of the Gaussian the squares are averaged over.

    Returns
    -------
    torch.Tensor
        (N, N, N) float32 in [0, 1] on the CPU.
    """
    power = ndimage.gaussian_filter(estimate.to(torch.float64).numpy() ** 2, sigma)
    noise_power = ndimage.gaussian_filter(noise.to(torch.float64).numpy() ** 2, sigma)
    weight = 1.0 - noise_power / np.maximum(power, np.finfo(np.float64).tiny)
    return torch.from_numpy(np.clip(weight, 0.0, 1.0)).to(torch.float32)


def _shell_filtered(volume: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`volume` (N, N, N) with each Fourier shell (rounded radius in pixels) multiplied by `weight`
    (indexed by shell, at least N // 2 + 1 long) and zero beyond shell N // 2: float32 on the CPU."""
    n = volume.shape[0]
    radius = shell_index(n, volume.device)
    filtered = torch.fft.rfftn(volume.to(torch.float64)) * torch.where(radius > n // 2, 0.0, weight[radius.clamp(max=n // 2)])
    return torch.fft.irfftn(filtered, s=(n, n, n)).to(torch.float32).cpu()


def held_out_posterior(
    spectra: ScratchArray,
    filters: ScratchArray,
    rows: np.ndarray,
    rotations: torch.Tensor,
    scale: torch.Tensor,
    probability: np.ndarray,
    mask: torch.Tensor,
    options: SplitOptions,
    engine: Engine = LOCAL,
    compute: Compute = CPU,
    totals: list[FourierAccumulator] | None = None,
) -> np.ndarray:
    """Log posteriors of particles `rows` with each half's particles scored against the other half's
    class maps (`half_maps`), the classes reconstructed with the given probabilities.

    Against maps that hold its own noise a particle looks more like its class than it is: of the
    particles the refinement's rounds gave a posterior of 0.85-0.95 on two three- and four-state
    benchmark sets, 83-84% were right; held out, 89-90% (docs/benchmarks.md). A half's maps are noisier
    than the whole set's, so the classes held out are a little less accurate (by 0.004-0.006 there):
    the rounds, and the classes, keep the whole set's maps, and this pass gives the probabilities.

    Parameters
    ----------
    spectra, filters, rotations, scale
        As in `refine_classes`.
    rows : np.ndarray
        (m,) int64 the particles scored, ascending.
    probability : np.ndarray
        (m, K) float64 their class probabilities, rows summing to 1: the classes' maps and prior.
    mask : torch.Tensor
        (w, w, w) the 3D mask of the likelihood and the FSC.
    options : SplitOptions
        symmetry, batch_size.
    engine, compute
        As in `refine_classes`.
    totals : list of FourierAccumulator or None
        `residual_sums` of `rows` in batches of options.batch_size, where already made.

    Returns
    -------
    np.ndarray
        (m, K) float64 normalised log posteriors.
    """
    n, k = spectra.shape[0], probability.shape[1]
    batches = [rows[index] for index in row_batches(len(rows), options.batch_size)]
    everyone = np.zeros((n, k))
    everyone[rows] = probability
    if totals is None:
        totals = residual_sums(spectra, rotations, filters, batches, engine, compute)
    sums = class_sums(spectra, everyone, totals, rotations, filters, batches, engine, compute)
    maps = half_maps(sums, options.symmetry, mask, compute)
    likelihoods = np.zeros((n, k))
    for half in range(2):  # the particles of each half (even and odd rows) against the other's maps
        own = [b for b in (batch[batch % 2 == half] for batch in batches) if len(b)]
        likelihoods += class_log_likelihoods(
            spectra, maps[1 - half], mask, rotations, scale, filters, own, engine, compute
        )  # fmt: skip
    log_posterior = likelihoods[rows] + np.log(np.maximum(probability.mean(axis=0), 1e-6))
    return log_posterior - logsumexp(log_posterior, axis=1, keepdims=True)


def _kernel_terms(
    spectra: ScratchArray,
    maps: list[torch.Tensor],
    mask: torch.Tensor,
    rotations: torch.Tensor,
    scale: torch.Tensor,
    filters: ScratchArray,
    batches: list[np.ndarray],
    engine: Engine = LOCAL,
    compute: Compute = CPU,
):
    """Per task (`engine.tasks_of` the batches), in order, (index, L, U, wc): the task's rows (B,),
    `_likelihood_kernel`'s sums for every map, (B, K) each, and sum w CTF^2 (B,), computed on
    `compute`'s device. The maps are multiplied by the 3D mask first, and taken two at a time (an odd
    one out paired with zeros)."""
    masked = [m * mask for m in maps]
    if len(masked) % 2:
        masked.append(torch.zeros_like(masked[0]))
    prepared = [prepare_volume(torch.stack(masked[i : i + 2]).to(torch.float32)) for i in range(0, len(masked), 2)]
    # The maps were reconstructed from residuals that carry each image's scale a: relative to them an
    # image's difference is a' = a / mean(a) times their projection.
    relative = (scale / scale.mean()).to(torch.float64).numpy()
    matrices = rotations.to(torch.float64).numpy()
    groups = tasks_of(batches)
    tasks = [(group, [relative[index] for index in group], [matrices[index] for index in group]) for group in groups]
    common = (StoredArray.of(spectra), StoredArray.of(filters), prepared, len(maps), compute)
    for group, terms in zip(groups, engine.map(_terms_task, tasks, common)):
        yield (np.concatenate(group), *terms)


def _terms_task(
    spectra: StoredArray,
    filters: StoredArray,
    prepared: list[PreparedVolume],
    k: int,
    compute: Compute,
    batches: list[np.ndarray],
    relative: list[np.ndarray],
    matrices: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One task of `_kernel_terms`: for the rows of its batches (rows (B,), relative scales (B,) and
    RELION matrices (B, 3, 3) float64 per batch), all batches together, L (B, K), U (B, K) and
    sum w CTF^2 (B,), float64, against the `k` maps prepared two at a time, on `compute`'s device
    (`_pair_terms`)."""
    with spectra.open() as stored, filters.open() as ctfs, compute.kernels():
        prepared = [volume.to(compute.device) for volume in prepared]  # once per task
        likelihoods, unexplained, weights = [], [], []
        for index, scales, rotation in zip(batches, relative, matrices):
            s = _complex(stored, index)
            ctf = np.asarray(ctfs[index])
            # Per pair of maps: L_1, L_2, U_1, U_2, sum w CTF^2.
            terms = np.stack([_pair_terms(volume, s, ctf, scales, rotation) for volume in prepared])
            likelihoods.append(terms[:, :, 0:2].transpose(1, 0, 2).reshape(len(index), -1)[:, :k])
            unexplained.append(terms[:, :, 2:4].transpose(1, 0, 2).reshape(len(index), -1)[:, :k])
            weights.append(np.maximum(terms[0, :, 4], 1e-30))
    return np.concatenate(likelihoods), np.concatenate(unexplained), np.concatenate(weights)


def _pair_terms(
    volume: PreparedVolume, s: np.ndarray, ctf: np.ndarray, relative: np.ndarray, rotations: np.ndarray
) -> np.ndarray:
    """L_1, L_2, U_1, U_2 and sum w CTF^2 (B, 5) float64 of a batch against a pair of prepared maps:
    on the CPU by `_likelihood_kernel` on torch.get_num_threads() threads, each on its own run of
    images, elsewhere (and inside `compiled.torch_twins`) by its twin `likelihood_terms` on the
    volume's device. s (B, N, N // 2 + 1) complex64, the CTFs (B, N, N // 2 + 1) float32, a' (B,) and
    the matrices (B, 3, 3) float64, as numpy arrays."""
    n, device = s.shape[1], volume.data.device
    weights = _half_plane_weights(n)
    if not runs_compiled(device):
        tensors = (torch.from_numpy(a).to(device) for a in (s, ctf, relative, rotations))
        return likelihood_terms(volume, *tensors, weights.to(device)).cpu().numpy()
    terms = np.zeros((len(s), 5))
    kx, ky, inside = rfft_frequencies(n)
    args = (
        terms, s, ctf, relative, rotations, weights.numpy(), kx.numpy(), ky.numpy(), inside.numpy(),
        volume.data.numpy(), volume.pad, volume.padded_box // 2 + 1,
    )  # fmt: skip
    run_in_runs(_likelihood_kernel, args, len(s), torch.get_num_threads())
    return terms


def class_log_likelihoods(
    spectra: ScratchArray,
    maps: list[torch.Tensor],
    mask: torch.Tensor,
    rotations: torch.Tensor,
    scale: torch.Tensor,
    filters: ScratchArray,
    batches: list[np.ndarray],
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> np.ndarray:
    """log p(image | class k) up to a constant per image, for every particle and class, given the
    classes' difference maps to the consensus.

    The maps are multiplied by the 3D mask first, so that only the masked region decides. The noise
    variance of each image is estimated from what its best-fitting class leaves unexplained,
    min_k |s - a' CTF^2 Q_k|^2 / sum CTF^2 (s carries the noise times the CTF; a' = a / mean(a), the
    image's scale relative to the mean): the residual alone would count the class difference as
    noise, shrink the data term against the prior, and pull particles into the larger class. The sums
    over each image's pixels are taken in float64 by `_likelihood_kernel` on torch.get_num_threads()
    threads, each on its own run of images, or off the CPU by its twin `likelihood_terms`.

    Parameters
    ----------
    spectra : ScratchArray
        (n, N, N // 2 + 1, 2) the stored transforms s (`image_spectra`).
    maps : list of torch.Tensor
        The K classes' difference maps (N, N, N) [z, y, x] to the consensus (`difference_maps`).
    mask : torch.Tensor
        (N, N, N) the 3D mask at the working box.
    rotations : torch.Tensor
        (n, 3, 3) RELION matrices.
    scale : torch.Tensor
        (n,) each image's least-squares scale a relative to the consensus projection.
    filters : ScratchArray
        (n, N, N // 2 + 1) the CTFs.
    batches : list of np.ndarray
        Particle rows, one array per batch.
    engine : Engine
        Where the tasks (`engine.tasks_of` the batches) run.
    compute : Compute
        The device the sums are computed on.

    Returns
    -------
    np.ndarray
        (n, K) float64, L_k / (2 sigma^2) per particle and class (L_k, sigma^2 as in
        `_likelihood_kernel` and above); 0 for rows in no batch.
    """
    out = np.zeros((spectra.shape[0], len(maps)))
    for index, likelihood, unexplained, weight in _kernel_terms(
        spectra, maps, mask, rotations, scale, filters, batches, engine, compute
    ):
        sigma2 = unexplained.min(axis=1) / weight
        out[index] = likelihood / (2 * sigma2[:, None])
    return out


def projection_scores(
    spectra: ScratchArray,
    direction: torch.Tensor,
    mask: torch.Tensor,
    rotations: torch.Tensor,
    scale: torch.Tensor,
    filters: ScratchArray,
    batches: list[np.ndarray],
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's amount of a map `direction` (such as the difference of two class maps), and
    its uncertainty.

    Under the refinement's model with the image's residual s = CTF^2 z Q + CTF noise (Q the masked
    direction's projection at the particle's pose, times its relative scale), the likelihood of z is
    Gaussian with mean B / A and variance sigma^2 / A, where B = sum w Re(conj(s) Q) and
    A = sum w CTF^2 |Q|^2; sigma^2 is estimated as in `class_log_likelihoods` (from the better of z = 1
    and z = -1), which overstates it by the misfit of that z: little where noise dominates each image,
    as in cryo-EM, and on the safe side for `gold_standard` (wider modes are harder to tell apart).

    Parameters
    ----------
    spectra, mask, rotations, scale, filters, batches, engine, compute
        As in `class_log_likelihoods`.
    direction : torch.Tensor
        (N, N, N) [z, y, x] the map at the working box.

    Returns
    -------
    z : np.ndarray
        (n,) float64 B / A per particle (0 for rows in no batch).
    variance : np.ndarray
        (n,) float64 sigma^2 / A (inf for rows in no batch).
    """
    n = spectra.shape[0]
    z, variance = np.zeros(n), np.full(n, np.inf)
    for index, likelihood, unexplained, weight in _kernel_terms(
        spectra, [direction, -direction], mask, rotations, scale, filters, batches, engine, compute
    ):
        # L(+1) = 2B - A and L(-1) = -2B - A.
        b = (likelihood[:, 0] - likelihood[:, 1]) / 4
        a = np.maximum(-(likelihood[:, 0] + likelihood[:, 1]) / 2, 1e-30)
        z[index] = b / a
        variance[index] = unexplained.min(axis=1) / weight / a
    return z, variance


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


def likelihood_terms(
    volume: PreparedVolume,
    s: torch.Tensor,
    ctf: torch.Tensor,
    relative: torch.Tensor,
    rotations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """`_likelihood_kernel`'s terms in torch, on the volume's device (the GPU's way): L_1, L_2, U_1,
    U_2 and sum w CTF^2 per image, from `projection.central_slices`, in float64.

    The same sums as the compiled loop, each over the whole grid at once rather than pixel by pixel,
    so the two agree to rounding (about 1e-10 relative; tests/test_torch_paths.py). For B images at
    box N it holds float64 arrays of 2 x B x N x (N // 2 + 1) several times over (the slices,
    complex128, and the terms before their sums) and the slices' sampling temporaries, 4 x B x P
    float64 (P the pixels inside the Nyquist circle): about 0.1 GB for 256 images at box 64, so a
    batch of --batch_size images bounds the device memory.

    Parameters
    ----------
    volume : PreparedVolume
        A pair of maps prepared as a stack (`prepare_volume`, (2, N, N, N)), on the device to compute on.
    s : torch.Tensor
        (B, N, N // 2 + 1) complex, the images' stored transforms (`image_spectra`), centred.
    ctf : torch.Tensor
        (B, N, N // 2 + 1) real, their CTFs; squared in their dtype, as the compiled loop squares them
        (float32 from the scratch files).
    relative : torch.Tensor
        (B,) the images' relative scales a'.
    rotations : torch.Tensor
        (B, 3, 3) RELION matrices.
    weights : torch.Tensor
        (N, N // 2 + 1) float64 the grid's weights w (`_half_plane_weights`).

    Returns
    -------
    torch.Tensor
        (B, 5) float64 on the volume's device: L_1, L_2, U_1, U_2 and sum w CTF^2, with q_k = a' times
        the centred slice of map k (0 beyond the Nyquist circle).
    """
    device = volume.data.device
    q = relative.to(device, torch.float64)[:, None, None] * central_slices(volume, rotations)  # (2, B, N, H)
    s, c2 = s.to(device, torch.complex128), (ctf * ctf).to(device, torch.float64)
    weights = weights.to(device)
    fit = 2 * (s.real * q.real + s.imag * q.imag) - c2 * (q.real**2 + q.imag**2)
    residual = (s.real - c2 * q.real) ** 2 + (s.imag - c2 * q.imag) ** 2
    likelihood = (weights * fit).sum(dim=(-2, -1))
    unexplained = (weights * residual).sum(dim=(-2, -1))
    return torch.cat([likelihood.T, unexplained.T, (weights * c2).sum(dim=(-2, -1))[:, None]], dim=1)


@dataclass
class Refined:
    """The outcome of `refine_classes` for its m rows and K classes.

    Attributes
    ----------
    log_posterior : np.ndarray
        (m, K) float64 the last round's log posterior probability of each class (rows sum to 1 after
        exp), or the starting classes' (0 and -inf) when no round ran.
    changed : list of int
        The number of particles that changed class in each round.
    mask : torch.Tensor
        (w, w, w) the 3D mask the rounds used (redrawn around the class maps, or as given).
    """

    log_posterior: np.ndarray
    changed: list[int]
    mask: torch.Tensor


def refine_classes(
    spectra: ScratchArray,
    filters: ScratchArray,
    rows: np.ndarray,
    rotations: torch.Tensor,
    scale: torch.Tensor,
    classes: np.ndarray,
    mask: torch.Tensor,
    consensus: torch.Tensor | None,
    pixel_size: float,
    options: SplitOptions,
    redraw_mask: bool,
    track: Callable[..., Iterable] = lambda iterable, **_: iterable,
    engine: Engine = LOCAL,
    compute: Compute = CPU,
    totals: list[FourierAccumulator] | None = None,
    local: bool = False,
) -> Refined:
    """Rounds of fixed-pose classification of particles `rows` against K class maps, from given classes.

    At most options.refine_iterations rounds, stopping once at most options.refine_tolerance of the
    particles change class; each round's change of the probabilities is over-relaxed by
    options.refine_relaxation (from the second round on; probabilities clipped to [0, 1] and
    renormalised), which takes the slow drift of noisy sets in fewer rounds (the classes are each
    round's own). Each round's prior is the classes' mean probability.

    Parameters
    ----------
    spectra, filters : ScratchArray
        The images' stored transforms (n, w, w // 2 + 1, 2) (`image_spectra`) and data filters
        (n, w, w // 2 + 1) at the working box w, for all n particles.
    rows : np.ndarray
        (m,) int64 the particles refined, ascending.
    rotations : torch.Tensor
        (n, 3, 3) RELION matrices (left-multiplying xyz column vectors of the map).
    scale : torch.Tensor
        (n,) each image's grey scale: its least-squares scale relative to the consensus projection.
    classes : np.ndarray
        (m,) int64 the starting classes 1..K of `rows` (a hard start).
    mask : torch.Tensor
        (w, w, w) the graph split's 3D mask, redrawn around the first class maps when `redraw_mask`
        (a part the classes differ by is at full strength there, at its occupancy in the consensus).
    consensus : torch.Tensor or None
        (w, w, w) the consensus map at the working box; needed when `redraw_mask`.
    pixel_size : float
        Pixel size (A) at the working box.
    options : SplitOptions
        refine_iterations, refine_tolerance, refine_relaxation, symmetry, batch_size, and for the
        redrawn mask refine_mask_threshold and mask_extend.
    redraw_mask : bool
        Whether to draw the mask again around the class maps (`masks.class_maps_mask`) before the
        first round.
    track : callable
        Progress callback, called as track(iterable, description=..., total=...).
    engine : Engine
        Where the passes over the particles run (the same result wherever).
    compute : Compute
        The device they compute on (the same classes, to rounding); the mask is drawn on the CPU.
    totals : list of FourierAccumulator or None
        `residual_sums` of `rows` in batches of options.batch_size, where already made; None: made here.
    local : bool
        Whether the class maps are weighted voxel by voxel (`difference_maps`): for classes already
        found (a tested split's, the tree's), not for a graph split's rough start.

    Returns
    -------
    Refined
        The last round's log posteriors, the changes per round, and the mask used.
    """
    n, m, k = spectra.shape[0], len(rows), int(classes.max())
    batches = [rows[index] for index in row_batches(m, options.batch_size)]
    probability = np.zeros((n, k))
    probability[rows, classes - 1] = 1.0
    with np.errstate(divide="ignore"):
        log_posterior = np.log(probability[rows])
    changed: list[int] = []
    if totals is None:
        totals = residual_sums(spectra, rotations, filters, batches, engine, compute)

    def rounds():  # until fewer than refine_tolerance of the particles change class
        for _ in range(options.refine_iterations):
            if changed and changed[-1] <= options.refine_tolerance * m:
                return
            yield

    def sums():  # the classes' sums for the current probabilities
        return class_sums(spectra, probability, totals, rotations, filters, batches, engine, compute)

    halves = None  # class_sums of the current probabilities, once computed
    if redraw_mask:
        halves = sums()
        mask = class_maps_mask(
            consensus, difference_maps(halves, options.symmetry, mask, compute, local), float(scale[rows].mean()),
            pixel_size, threshold=options.refine_mask_threshold, extend=options.mask_extend,
        )  # fmt: skip
    for _ in track(rounds(), description="Refining against the class maps (rounds)", total=options.refine_iterations):
        differences = difference_maps(halves if halves is not None else sums(), options.symmetry, mask, compute, local)
        prior = np.log(np.maximum(probability[rows].mean(axis=0), 1e-6))
        likelihoods = class_log_likelihoods(
            spectra, differences, mask, rotations, scale, filters, batches, engine, compute
        )  # fmt: skip
        log_posterior = likelihoods[rows] + prior
        log_posterior -= logsumexp(log_posterior, axis=1, keepdims=True)
        relaxation = options.refine_relaxation if changed else 1.0
        step = np.clip(probability[rows] + relaxation * (np.exp(log_posterior) - probability[rows]), 0.0, 1.0)
        probability[rows] = step / step.sum(axis=1, keepdims=True)
        halves = None
        new_classes = np.argmax(log_posterior, axis=1) + 1
        changed.append(int((new_classes != classes).sum()))
        classes = new_classes
    return Refined(log_posterior, changed, mask)


def log_odds(log_posterior: np.ndarray) -> np.ndarray:
    """log(P(k) / (1 - P(k))) per particle and class, from normalised log posteriors (m, K), K >= 2."""
    k = log_posterior.shape[1]
    others = np.stack([logsumexp(np.delete(log_posterior, j, axis=1), axis=1) for j in range(k)], axis=1)
    return log_posterior - others
