"""Refinement of the graph split with fixed poses: classify each particle against the two class maps.

The graph split sees each particle only through a few cones' first components. Once it has split the
set, the two classes can be reconstructed and every particle compared with both, with its own pose,
CTF and scale: the likelihood ratio under white noise, the statistic the ceiling classifier uses with
the true maps. Rounds of this (expectation-maximisation with fixed poses and soft assignments, started
from the graph split rather than from a random partition) take the split much of the remaining way to
that ceiling; docs/benchmarks.md has the measurements.

Everything happens at the working size on the scratch images, which hold the residual to the consensus
projection times the CTF, s = CTF (I - a CTF P): the maps reconstructed from them are the classes'
differences to the consensus, D_k, and with Q_k the projection of D_k,
    log p(I | k) = -|I - a CTF P - a' CTF Q_k|^2 / (2 sigma^2) + const
                 = [2 a' <s, Q_k> - a'^2 <CTF^2 Q_k, Q_k>] / (2 sigma^2) + const,
with a' = a / mean(a), since the maps reconstructed from the residuals already carry the mean scale.
"""

from __future__ import annotations

import numpy as np
import torch

from relion_graphsplit.fsc import fsc, shell_index
from relion_graphsplit.projection import prepare_volume, project_rfft, rfft_weights
from relion_graphsplit.reconstruct import FourierAccumulator
from relion_graphsplit.scratch import ScratchArray


def _half_plane_weights(n: int) -> torch.Tensor:
    """Weights of the rfft coefficients in a full-plane inner product (DC excluded)."""
    weights = rfft_weights(n)
    weights[0, 0] = 0.0
    return weights


def _power(z: torch.Tensor) -> torch.Tensor:
    """|z|^2 of a complex tensor, without the square root of abs()."""
    return z.real**2 + z.imag**2


def _weighted_halves(
    scratch: ScratchArray,
    weights: np.ndarray,
    rotations: torch.Tensor,
    filters: ScratchArray,
    batches: list[np.ndarray],
) -> list[FourierAccumulator]:
    """Sums of w s (data) and w CTF^2 (weight) over the particles of each half (even and odd numbers),
    for per-particle weights w (n,); particles of weight <= 1e-6 are left out."""
    halves = [FourierAccumulator(scratch.shape[-1]) for _ in range(2)]
    for index in batches:
        images = torch.from_numpy(np.asarray(scratch[index]))
        ctf = torch.from_numpy(np.asarray(filters[index]))
        p = torch.from_numpy(weights[index]).to(torch.float32)
        for half in range(2):
            member = torch.from_numpy(index % 2 == half) & (p > 1e-6)
            if member.any():
                w = p[member][:, None, None]
                halves[half].insert(
                    images[member] * w, rotations[index][member], ctf=ctf[member] * w.sqrt(), ctf_premultiplied=True
                )
    return halves


def residual_sums(
    scratch: ScratchArray, rotations: torch.Tensor, filters: ScratchArray, batches: list[np.ndarray]
) -> list[FourierAccumulator]:
    """Sums of all particles' residuals and CTF^2 in the two halves (even and odd particle numbers).

    With fixed poses they are the same in every round, and the second class's sums are these minus
    the first class's: one insertion per particle and round instead of two.
    """
    return _weighted_halves(scratch, np.ones(scratch.shape[0]), rotations, filters, batches)


def class_sums(
    scratch: ScratchArray,
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
    n = scratch.shape[-1]
    first_class = _weighted_halves(scratch, probability, rotations, filters, batches)
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
    scratch: ScratchArray,
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
    into the larger class. The terms are float32 (a third faster than float64), their sums float64.
    """
    n = scratch.shape[-1]
    weights = _half_plane_weights(n).to(torch.float32)
    prepared = prepare_volume(torch.stack([m * mask for m in maps]).to(torch.float32))
    out = np.zeros(scratch.shape[0])
    for index in batches:
        s = torch.fft.rfft2(torch.from_numpy(np.asarray(scratch[index])))
        ctf2 = torch.from_numpy(np.asarray(filters[index])) ** 2
        w_ctf2 = weights * ctf2
        # The maps were reconstructed from residuals that carry each image's scale a: relative to them
        # an image's difference is a / mean(a) times their projection.
        a = (scale[index] / scale.mean()).to(torch.float32)[:, None, None]
        log_likelihood, unexplained = [], []
        for q in a * project_rfft(prepared, rotations[index]):
            overlap = s.real * q.real + s.imag * q.imag  # Re(conj(s) q)
            log_likelihood.append(2 * _sum(weights * overlap) - _sum(w_ctf2 * _power(q)))
            unexplained.append(_sum(weights * _power(s - ctf2 * q)))
        sigma2 = torch.minimum(*unexplained) / _sum(w_ctf2).clamp(min=1e-30)
        out[index] = ((log_likelihood[0] - log_likelihood[1]) / (2 * sigma2)).numpy() + prior
    return out


def _sum(x: torch.Tensor) -> torch.Tensor:
    """Per-image sums (B,) of float32 terms (B, N, M), accumulated in float64."""
    return x.sum((1, 2), dtype=torch.float64)
