"""Two-component Gaussian mixture with a shared variance, and the log-likelihood ratio (eqs. 4.6-4.7).

Fitted by EM from a deterministic start (the quartiles), batched over cones with padding. The shared
variance keeps the fit stable and makes the log-likelihood ratio linear in the score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mixture:
    """Per cone: weights, means (component 0 has the larger mean) and the shared sigma."""

    weights: torch.Tensor  # (C, 2)
    means: torch.Tensor  # (C, 2)
    sigma: torch.Tensor  # (C,)

    @property
    def separation(self) -> torch.Tensor:
        """Distance between the means in units of sigma: (C,) (mu0 - mu1) / sigma, non-negative."""
        return (self.means[:, 0] - self.means[:, 1]) / self.sigma


def _masked_quantile(x: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    filled = torch.where(valid, x, torch.full_like(x, float("inf")))
    ordered = filled.sort(dim=1).values
    idx = ((valid.sum(dim=1) - 1).clamp(min=0) * q).round().long()
    return ordered.gather(1, idx[:, None])[:, 0]


def fit_mixture(x: torch.Tensor, valid: torch.Tensor, max_iter: int = 500, tol: float = 1e-10) -> Mixture:
    """EM fit of w0 N(mu0, s^2) + w1 N(mu1, s^2) to each row of x (C, P) over its valid entries.

    EM starts from the upper and lower quartiles as the means, equal weights and the variance left
    after the means' spread; it stops when no mean of any row moves by more than `tol` times the
    smallest standard deviation of the rows, or after `max_iter` iterations. The variance is kept
    above 1e-6 times the row's variance and the weights within [1e-6, 1 - 1e-6].

    Parameters
    ----------
    x : torch.Tensor
        (C, P) per cone (row) its members' scores (the first principal component's rho), padded.
    valid : torch.Tensor
        (C, P) bool: the entries that are members rather than padding.
    max_iter : int
        Most EM iterations.
    tol : float
        Convergence tolerance on the means' change, relative to the standard deviation.

    Returns
    -------
    Mixture
        Per row, float64: weights (C, 2), means (C, 2) with component 0 the larger mean, and the
        shared sigma (C,).
    """
    x = x.to(torch.float64)
    v = valid.to(torch.float64)
    n = v.sum(dim=1).clamp(min=1)
    mean = (x * v).sum(1) / n
    var = (((x - mean[:, None]) ** 2) * v).sum(1) / n
    floor = (var * 1e-6).clamp(min=1e-300)
    mu0, mu1 = _masked_quantile(x, valid, 0.75), _masked_quantile(x, valid, 0.25)
    s2 = (var - ((mu0 - mu1) / 2) ** 2).clamp(min=floor)
    w0 = torch.full_like(mean, 0.5)
    for _ in range(max_iter):
        logit = (
            torch.log(w0 / (1 - w0))[:, None]
            - ((x - mu0[:, None]) ** 2 - (x - mu1[:, None]) ** 2) / (2 * s2[:, None])
        )
        r = torch.sigmoid(logit) * v
        r1 = (1 - torch.sigmoid(logit)) * v
        n0 = r.sum(1).clamp(min=1e-12)
        n1 = r1.sum(1).clamp(min=1e-12)
        new_mu0 = (r * x).sum(1) / n0
        new_mu1 = (r1 * x).sum(1) / n1
        new_s2 = ((r * (x - new_mu0[:, None]) ** 2 + r1 * (x - new_mu1[:, None]) ** 2).sum(1) / n).clamp(min=floor)
        new_w0 = (n0 / n).clamp(1e-6, 1 - 1e-6)
        change = torch.maximum((new_mu0 - mu0).abs(), (new_mu1 - mu1).abs()).max() / var.sqrt().clamp(min=1e-300).min()
        mu0, mu1, s2, w0 = new_mu0, new_mu1, new_s2, new_w0
        if change < tol:
            break
    swap = mu0 < mu1
    means = torch.stack([torch.where(swap, mu1, mu0), torch.where(swap, mu0, mu1)], dim=1)
    w = torch.where(swap, 1 - w0, w0)
    return Mixture(weights=torch.stack([w, 1 - w], dim=1), means=means, sigma=s2.sqrt())


def log_likelihood_ratio(x: torch.Tensor, mixture: Mixture) -> torch.Tensor:
    """log [w0 N(x; mu0, s^2) / w1 N(x; mu1, s^2)] for each entry of x (C, P): the posterior log-odds.

    Linear in x, because the variance is shared: log(w0 / w1) + (mu0 - mu1) / s^2 (x - (mu0 + mu1) / 2).

    Parameters
    ----------
    x : torch.Tensor
        (C, P) scores, row c under cone c's mixture.
    mixture : Mixture
        The fit per row (`fit_mixture`).

    Returns
    -------
    torch.Tensor
        (C, P) float64 ratios lambda, positive on the side of component 0 (the larger mean); padding
        entries get a value too.
    """
    mu0, mu1 = mixture.means[:, :1], mixture.means[:, 1:]
    s2 = mixture.sigma[:, None] ** 2
    prior = torch.log(mixture.weights[:, :1] / mixture.weights[:, 1:])
    return prior + (mu0 - mu1) / s2 * (x.to(torch.float64) - (mu0 + mu1) / 2)
