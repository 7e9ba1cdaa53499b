"""Whether a split is real: learnt on each half-set alone, it must find several modes in the other half.

RELION's gold standard for resolution, applied to classification. The particles of a class are
divided by their half-sets (rlnRandomSubset); the split is learnt on each half separately, and the
difference of its two class maps is a direction in map space. Every particle of the other half is
scored along that direction (`refine.projection_scores`: its amount z of the difference, with the
uncertainty its noise leaves), and models of those held-out scores are compared by likelihood: one
Gaussian spread of z, and two or three Gaussians of the same spread (states). Every model deconvolves
each particle's own noise.

The comparison asks for modes, not only for a reproducible difference. Pose errors leave a
continuous variability in a homogeneous set (the map's rotational and translational derivatives),
which a split on one half learns and the other half reproduces; but along that direction the other
half's scores spread as one Gaussian, which one mode explains as well as several.
docs/method.md ("How many classes") has the measurements behind the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from relion_graphsplit.fourier.fsc import fsc

GAIN_THRESHOLD = 0.005
"""Least held-out gain (nats per particle, both directions) of several modes over one for a split to be
kept; docs/method.md gives the gains measured on homogeneous and heterogeneous sets."""

MIN_TOTAL_GAIN = 10.0
"""Least held-out gain in nats over a whole half: a small half's gain per particle is noisy."""

MIN_HALF_PARTICLES = 300
"""Fewest particles in each half-set for a split to be tested (the graph needs populated cones)."""

TEST_ROUNDS = 8
"""Most refinement rounds of a split learnt on a half-set: enough to find the direction the held-out
half is scored along (a split of noise drifts on for all of options.refine_iterations)."""

MAX_FIT_SCORES = 20000
"""Most held-out scores the mixtures are fitted to (`bimodality_gain`)."""

FSC_BAND = (60.0, 20.0)
"""Resolution band (A) over which the halves' class-difference maps' FSC is averaged for the report."""


@dataclass
class SplitTest:
    """The evidence for or against one split, as written to run_summary.json.

    Attributes
    ----------
    node : str
        The tree node split: "1" for the whole set; the two classes of node X are X.1 and X.2.
    parent : str or None
        The node it came from (None for the whole set).
    particles : int
        Particles in the node.
    halves : tuple of int
        Particles in its half-sets 1 and 2.
    gain : tuple of float
        Held-out gain of several modes over one (nats per particle): half 1's split scored on half 2, and
        the reverse (`bimodality_gain`); nan where not measured (the second where the first failed).
    threshold : float
        The gain both directions had to exceed: the larger of GAIN_THRESHOLD and MIN_TOTAL_GAIN over
        the smaller half's size.
    fsc : float or None
        Mean FSC of the two halves' masked class-difference maps over FSC_BAND (or the lowest shells
        where the box has none in it): how far the halves agree on what differs; None where half 2's
        split was not learnt.
    kept : bool
        Whether the split was kept.
    reason : str
        Why, in a few words.
    """

    node: str
    parent: str | None
    particles: int
    halves: tuple[int, int]
    gain: tuple[float, float]
    threshold: float
    fsc: float | None
    kept: bool
    reason: str

    def as_dict(self) -> dict:
        """The fields as run_summary.json holds them: a gain not measured as None (JSON has no nan)."""
        fields = dict(vars(self))
        fields["gain"] = [float(g) if np.isfinite(g) else None for g in self.gain]
        return fields


def _gaussian_nll(z: np.ndarray, v: np.ndarray, mean: float, spread: float) -> float:
    total = spread + v
    return 0.5 * float(np.sum(np.log(2 * np.pi * total) + (z - mean) ** 2 / total))


def _modes_nll(params: np.ndarray, z: np.ndarray, v: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of k modes of one spread and its gradient: params = k means, k - 1
    weight logits (the last mode's logit 0), log spread."""
    k = (len(params)) // 2
    means, logits, log_spread = params[:k], np.append(params[k : 2 * k - 1], 0.0), params[-1]
    total = np.exp(log_spread) + v
    log_weights = logits - np.logaddexp.reduce(logits)
    offset = z[:, None] - means
    terms = log_weights - 0.5 * np.log(2 * np.pi * total)[:, None] - 0.5 * offset**2 / total[:, None]
    row = np.logaddexp.reduce(terms, axis=1)
    r = np.exp(terms - row[:, None])  # each score's responsibilities
    grad_means = -np.sum(r * offset / total[:, None], axis=0)
    grad_logits = -(r.sum(axis=0) - len(z) * np.exp(log_weights))[:-1]
    grad_spread = -np.exp(log_spread) * np.sum(r * (offset**2 / total[:, None] - 1) / (2 * total[:, None]))
    return -float(np.sum(row)), np.concatenate([grad_means, grad_logits, [grad_spread]])


def bimodality_gain(z: np.ndarray, variance: np.ndarray) -> float:
    """Log-likelihood gain per particle of several modes over one, for scores with known noise.

    Models, fitted by maximum likelihood: one mode, z_i ~ N(mu, tau^2 + v_i); k modes (k = 2 and 3),
    z_i ~ sum_j p_j N(mu_j, tau^2 + v_i). These contain the first, so the gain (of the better of two
    and three modes) is at least 0; for scores spread as one Gaussian it stays near 0 whatever their
    spread, and for two states or more it grows with their separation relative to the noise. Three
    modes catch a split whose held-out scores fall in three groups (two states and a third between
    them), which two modes fit poorly. The fits start from fixed points (quantiles of z), so the
    gain is deterministic.

    Parameters
    ----------
    z : np.ndarray
        (m,) float64 scores (`refine.projection_scores`).
    variance : np.ndarray
        (m,) float64 each score's noise variance v_i (finite, > 0).

    Returns
    -------
    float
        (NLL one mode - NLL best of two and three modes) / m, in nats per particle (0 for fewer than
        10 scores), fitted on at most MAX_FIT_SCORES of them (every k-th, in order): the gain per
        particle of a large set is known well before its fits would take long.
    """
    z, v = np.asarray(z, np.float64), np.asarray(variance, np.float64)
    if len(z) < 10:
        return 0.0
    stride = -(-len(z) // MAX_FIT_SCORES)
    z, v = z[::stride], v[::stride]
    unit = np.sqrt(np.median(v))
    z, v = (z - np.median(z)) / unit, v / unit**2
    mean = float(np.average(z, weights=1 / (1 + v)))
    spread = max(float(np.var(z) - np.mean(v)), 1e-6)
    for _ in range(200):  # one mode: fixed-point iterations of the weighted mean and the spread
        w = 1.0 / (spread + v)
        mean = float(np.sum(w * z) / np.sum(w))
        new = max(float(np.sum(w**2 * ((z - mean) ** 2 - v)) / np.sum(w**2)), 1e-6)
        if abs(new - spread) < 1e-9 * max(spread, 1.0):
            break
        spread = new
    one = _gaussian_nll(z, v, mean, spread)
    best = one
    q = np.quantile(z, [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
    starts = [  # (means, weights)
        ((q[2], q[6]), (0.5, 0.5)), ((q[0], q[4]), (0.2, 0.8)), ((q[4], q[8]), (0.8, 0.2)),
        ((q[1], q[4], q[7]), (0.3, 0.4, 0.3)), ((q[0], q[3], q[6]), (0.2, 0.4, 0.4)), ((q[2], q[5], q[8]), (0.4, 0.4, 0.2)),
    ]  # fmt: skip
    for means, weights in starts:
        logits = np.log(np.asarray(weights[:-1]) / weights[-1])
        x0 = np.concatenate([means, logits, [np.log(max(spread / 2, 1e-6))]])
        bounds = [(None, None)] * len(means) + [(-6, 6)] * len(logits) + [(-14, None)]
        fit = minimize(_modes_nll, x0, args=(z, v), jac=True, method="L-BFGS-B", bounds=bounds)
        best = min(best, float(fit.fun))
    return max(one - best, 0.0) / len(z)


def difference_fsc(first: torch.Tensor, second: torch.Tensor, mask: torch.Tensor, pixel_size: float) -> float:
    """Mean FSC of two masked maps over FSC_BAND.

    Parameters
    ----------
    first, second : torch.Tensor
        (w, w, w) [z, y, x] maps at the working box (the halves' class-difference maps).
    mask : torch.Tensor
        (w, w, w) the 3D mask both are multiplied by.
    pixel_size : float
        Their pixel size (A).

    Returns
    -------
    float
        Mean of `fourier.fsc.fsc` over the shells s whose resolution w * pixel_size / s lies in
        FSC_BAND; over shells 2 to 4 where none does.
    """
    curve = fsc(first * mask, second * mask).numpy()
    w = first.shape[0]
    shells = np.arange(len(curve))
    resolution = np.divide(w * pixel_size, shells, out=np.full(len(curve), np.inf), where=shells > 0)
    band = (resolution <= FSC_BAND[0]) & (resolution >= FSC_BAND[1])
    if not band.any():
        band = (shells >= 2) & (shells <= 4)
    return float(curve[band].mean())


def threshold_for(halves: tuple[int, int]) -> float:
    """The held-out gain per particle both directions must exceed, for half-sets of these sizes."""
    return max(GAIN_THRESHOLD, MIN_TOTAL_GAIN / max(min(halves), 1))
