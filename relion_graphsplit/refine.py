"""Refinement of the graph split with fixed poses: classify each particle against the two class maps.

The graph split sees each particle only through a few cones' first components. Once it has split the
set, the two classes can be reconstructed and every particle compared with both, with its own pose,
CTF and scale: the likelihood ratio under white noise, the statistic the ceiling classifier uses with
the true maps. A few such rounds (hard-assignment EM with fixed poses, started from the graph split
rather than from a random partition) take the split most of the remaining way to that ceiling;
docs/benchmarks.md has the measurements.

Everything happens at the working size on the scratch images, which hold the residual to the consensus
projection times the CTF, s = CTF (I - a CTF P): the maps reconstructed from them are the classes'
differences to the consensus, D_k, and with Q_k the projection of D_k,
    log p(I | k) = [2 a <s, Q_k> - a^2 <CTF^2 Q_k, Q_k>] / (2 sigma^2) + const.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from relion_graphsplit.projection import prepare_volume, project_rfft
from relion_graphsplit.reconstruct import FourierAccumulator

Filter = Callable[[np.ndarray], torch.Tensor]


def _half_plane_weights(n: int) -> torch.Tensor:
    """Weights of the rfft coefficients in a full-plane inner product (DC excluded)."""
    w = torch.full((n, n // 2 + 1), 2.0, dtype=torch.float64)
    w[:, 0] = 1.0
    w[:, -1] = 1.0
    w[0, 0] = 0.0
    return w


def difference_maps(
    scratch: np.ndarray,
    classes: np.ndarray,
    rotations: torch.Tensor,
    ctf_filter: Filter,
    batches: list[np.ndarray],
    symmetry: str,
    track: Callable[..., Iterable],
) -> list[torch.Tensor]:
    """Reconstruct each class's difference to the consensus from the CTF-multiplied residuals."""
    n = scratch.shape[-1]
    accumulators = [FourierAccumulator(n), FourierAccumulator(n)]
    for index in track(batches, description="Reconstructing class differences", total=len(batches)):
        images = torch.from_numpy(np.asarray(scratch[index]))
        ctf = ctf_filter(index)
        for k, acc in enumerate(accumulators):
            member = torch.from_numpy(classes[index] == k + 1)
            if member.any():
                acc.insert(images[member], rotations[index][member], ctf=ctf[member], ctf_premultiplied=True)
    return [acc.finalise(sym=symmetry) for acc in accumulators]


def class_log_odds(
    scratch: np.ndarray,
    maps: list[torch.Tensor],
    mask: torch.Tensor,
    rotations: torch.Tensor,
    scale: torch.Tensor,
    ctf_filter: Filter,
    prior: float,
    batches: list[np.ndarray],
    track: Callable[..., Iterable],
) -> np.ndarray:
    """log p(class 1 | image) - log p(class 2 | image) for every particle, given the difference maps.

    The maps are multiplied by the 3D mask first, so that only the masked region decides. The noise
    variance of each image is estimated from its residual, |s|^2 / sum CTF^2 per coefficient.
    """
    n = scratch.shape[-1]
    weights = _half_plane_weights(n)
    prepared = [prepare_volume((m * mask).to(torch.float64)) for m in maps]
    out = np.zeros(scratch.shape[0])
    for index in track(batches, description="Comparing particles with the classes", total=len(batches)):
        s = torch.fft.rfft2(torch.from_numpy(np.asarray(scratch[index])).to(torch.float64))
        ctf2 = ctf_filter(index).to(torch.float64) ** 2
        a = scale[index][:, None, None]
        sigma2 = (weights * s.abs() ** 2).sum((1, 2)) / (weights * ctf2).sum((1, 2)).clamp(min=1e-30)
        log_likelihood = []
        for volume in prepared:
            q = project_rfft(volume, rotations[index])
            cross = (weights * (s.conj() * q).real).sum((1, 2))
            power = (weights * ctf2 * q.abs() ** 2).sum((1, 2))
            log_likelihood.append((2 * a[:, 0, 0] * cross - a[:, 0, 0] ** 2 * power) / (2 * sigma2))
        out[index] = (log_likelihood[0] - log_likelihood[1]).numpy() + prior
    return out
