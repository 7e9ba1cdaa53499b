"""The graph of cones (thesis eqs. 4.8-4.9) and the synchronised per-particle score.

With L the sparse cones x particles matrix of log-likelihood ratios, the weight between two cones,
the sum of lambda_i * lambda_j over their shared particles, is the off-diagonal part of L L^T.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def ratio_matrix(cone: torch.Tensor, particle: torch.Tensor, llr: torch.Tensor, n_cones: int, n_particles: int) -> sp.csr_matrix:
    """Sparse (cones x particles) matrix L of each membership's log-likelihood ratio.

    Parameters
    ----------
    cone, particle : torch.Tensor
        (K,) int64 cone and particle index of each membership (CPU tensors); a (cone, particle) pair
        appears at most once (entries of a repeated pair would be summed).
    llr : torch.Tensor
        (K,) the memberships' log-likelihood ratios lambda.
    n_cones, n_particles : int
        The matrix's shape.

    Returns
    -------
    scipy.sparse.csr_matrix
        (n_cones, n_particles) float64, L[c, p] = lambda of particle p in cone c; no entry where the
        particle is not a member (a member whose lambda is exactly 0 keeps an explicit zero entry).
    """
    return sp.csr_matrix(
        (llr.double().numpy(), (cone.numpy(), particle.numpy())), shape=(n_cones, n_particles)
    )


def cone_weights(ratios: sp.csr_matrix) -> sp.csr_matrix:
    """Edge weights w_ij = sum over shared particles of lambda_i lambda_j; zero diagonal.

    Parameters
    ----------
    ratios : scipy.sparse.csr_matrix
        (M, n) the ratio matrix L (`ratio_matrix`).

    Returns
    -------
    scipy.sparse.csr_matrix
        (M, M) symmetric, the off-diagonal part of L L^T, explicit zeros removed: w_ij > 0 where cones
        i and j split their shared particles the same way, w_ij < 0 where their signs disagree.
    """
    w = (ratios @ ratios.T).tocsr()
    w.setdiag(0.0)
    w.eliminate_zeros()
    return w


def shared_counts(ratios: sp.csr_matrix) -> sp.csr_matrix:
    """Number of particles each pair of cones shares; zero diagonal.

    Parameters
    ----------
    ratios : scipy.sparse.csr_matrix
        (M, n) the ratio matrix L (`ratio_matrix`); its stored entries are the memberships.

    Returns
    -------
    scipy.sparse.csr_matrix
        (M, M) symmetric float64 counts of shared particles, diagonal and zeros not stored.
    """
    member = ratios.copy()
    member.data = np.ones_like(member.data)
    shared = (member @ member.T).tocsr()
    shared.setdiag(0.0)
    shared.eliminate_zeros()
    return shared


def particle_scores(ratios: sp.csr_matrix, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean synchronised ratio of each particle over its cones, and how many cones it is in.

    Parameters
    ----------
    ratios : scipy.sparse.csr_matrix
        (M, n) the ratio matrix L (`ratio_matrix`).
    signs : np.ndarray
        (M,) +1 or -1 per cone (the max-cut's signs).

    Returns
    -------
    score : np.ndarray
        (n,) float64, sum over the particle's cones c of signs[c] L[c, p], divided by their number:
        positive for class 1 (`classes_by_sign`); 0 for a particle in no cone.
    count : np.ndarray
        (n,) int64, the number of cones each particle belongs to.
    """
    synced = sp.diags(signs.astype(np.float64)) @ ratios
    total = np.asarray(synced.sum(axis=0)).ravel()
    member = ratios.copy()
    member.data = np.ones_like(member.data)
    count = np.asarray(member.sum(axis=0)).ravel()
    return total / np.maximum(count, 1), count.astype(np.int64)


def classes_by_sign(score: np.ndarray) -> np.ndarray:
    """The partition of a split: class 1 where a particle's score is at least 0, class 2 elsewhere.

    Parameters
    ----------
    score : np.ndarray
        (n,) float per particle: the log odds of class 1 (refinement), or its mean synchronised
        ratio (`particle_scores`).

    Returns
    -------
    np.ndarray
        (n,) int64, 1 where score >= 0 and 2 elsewhere (NaN included).
    """
    return np.where(score >= 0, 1, 2)
