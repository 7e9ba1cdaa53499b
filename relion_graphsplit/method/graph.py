"""The graph of cones (thesis eqs. 4.8-4.9) and the synchronised per-particle score.

With L the sparse cones x particles matrix of log-likelihood ratios, the weight between two cones,
the sum of lambda_i * lambda_j over their shared particles, is the off-diagonal part of L L^T.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def ratio_matrix(cone: torch.Tensor, particle: torch.Tensor, llr: torch.Tensor, n_cones: int, n_particles: int) -> sp.csr_matrix:
    """Sparse (cones x particles) matrix L of each membership's log-likelihood ratio."""
    return sp.csr_matrix(
        (llr.double().numpy(), (cone.numpy(), particle.numpy())), shape=(n_cones, n_particles)
    )


def cone_weights(ratios: sp.csr_matrix) -> sp.csr_matrix:
    """Edge weights w_ij = sum over shared particles of lambda_i lambda_j; zero diagonal."""
    w = (ratios @ ratios.T).tocsr()
    w.setdiag(0.0)
    w.eliminate_zeros()
    return w


def shared_counts(ratios: sp.csr_matrix) -> sp.csr_matrix:
    """Number of particles each pair of cones shares; zero diagonal."""
    member = ratios.copy()
    member.data = np.ones_like(member.data)
    shared = (member @ member.T).tocsr()
    shared.setdiag(0.0)
    shared.eliminate_zeros()
    return shared


def particle_scores(ratios: sp.csr_matrix, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean synchronised ratio of each particle over its cones, and how many cones it is in."""
    synced = sp.diags(signs.astype(np.float64)) @ ratios
    total = np.asarray(synced.sum(axis=0)).ravel()
    member = ratios.copy()
    member.data = np.ones_like(member.data)
    count = np.asarray(member.sum(axis=0)).ravel()
    return total / np.maximum(count, 1), count.astype(np.int64)
