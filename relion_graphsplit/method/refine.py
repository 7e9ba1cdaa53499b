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
    frequency by the inverse noise power."""
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
    min_k |s - a CTF^2 Q_k|^2 / sum CTF^2 (s carries the noise times the CTF): the residual alone would
    count the class difference as noise, shrink the data term against the prior, and pull particles
    into the larger class. The sums over each image's pixels are taken by `_likelihood_kernel` on
    torch.get_num_threads() threads, each on its own run of images, in float64.
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
