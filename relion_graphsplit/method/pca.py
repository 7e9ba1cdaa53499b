"""First principal component of each cone's aligned, masked images (thesis eq. 4.5), batched."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from relion_graphsplit.fourier.compiled import runs_compiled

LANCZOS_MIN = 64
"""Fewest rows of a Gram or covariance matrix whose top eigenpair is found by Lanczos (`_top_eigenpair`)."""


@dataclass
class Components:
    """Per cone: scores rho of its members, eigen-image, mean image, share of variance explained."""

    scores: torch.Tensor  # (C, P) float64, zero at padding
    eigenimage: torch.Tensor  # (C, D) unit norm
    mean: torch.Tensor  # (C, D)
    explained: torch.Tensor  # (C,) first eigenvalue / total variance


def first_component(images: torch.Tensor, valid: torch.Tensor) -> Components:
    """First principal component of each cone's rows `images` (C, P, D); padding rows have valid False.

    Works on the smaller of the P x P Gram and the D x D covariance matrix, in float64, and on the CPU
    finds the top eigenpair alone (`_top_eigenpair`: Lanczos or LAPACK, exact to machine precision and
    deterministic, unlike randomised low-rank PCA); on other devices torch.linalg.eigh
    decomposes all cones' matrices there at once (`_top_eigenpairs_torch`), and the components agree
    to rounding. The sign is fixed so that the eigen-image sums to a non-negative value; which class
    is which is settled later by the graph.

    Parameters
    ----------
    images : torch.Tensor
        (C, P, D) per cone its members' aligned, masked images as rows of D pixels, padded to P rows,
        on any device.
    valid : torch.Tensor
        (C, P) bool on the images' device: rows that are members rather than padding.

    Returns
    -------
    Components
        float64 on the images' device, per cone: scores (C, P), the projections of the centred rows on the eigen-image, zero
        at padding; eigen-image (C, D) of unit norm; mean image (C, D) over the valid rows; explained
        (C,) the first eigenvalue over the total variance (sum of squares of the centred rows).
    """
    x = images.to(torch.float64) * valid[..., None]
    n = valid.sum(dim=1).clamp(min=1).to(torch.float64)
    mean = x.sum(dim=1) / n[:, None]
    centred = (x - mean[:, None]) * valid[..., None]
    if centred.shape[1] <= centred.shape[2]:
        # Padding rows are zero: each cone's Gram matrix is the block of its valid rows.
        top, v = _top_eigenpairs(centred @ centred.transpose(1, 2), valid)
        eigenimage = torch.einsum("cpd,cp->cd", centred, v) / top.sqrt()[:, None]
    else:
        every = torch.ones(centred.shape[0], centred.shape[2], dtype=torch.bool, device=centred.device)
        top, eigenimage = _top_eigenpairs(centred.transpose(1, 2) @ centred, every)
    sign = torch.where(eigenimage.sum(dim=1) < 0, -1.0, 1.0).to(torch.float64)
    eigenimage = eigenimage * sign[:, None]
    scores = torch.einsum("cpd,cd->cp", centred, eigenimage) * valid
    total = (centred * centred).sum(dim=(1, 2)).clamp(min=1e-300)
    return Components(scores=scores, eigenimage=eigenimage, mean=mean, explained=top / total)


def _top_eigenpairs(matrices: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue (C,) and its unit eigenvector (C, M), zero outside `used` (C, M), of each
    symmetric matrix (C, M, M) restricted to the rows and columns `used`: on the CPU by scipy's eigh,
    cone by cone, elsewhere by `_top_eigenpairs_torch`."""
    if not runs_compiled(matrices.device):
        return _top_eigenpairs_torch(matrices, used)
    values = torch.zeros(len(matrices), dtype=torch.float64)
    vectors = torch.zeros(matrices.shape[:2], dtype=torch.float64)
    for c in range(len(matrices)):
        rows = torch.nonzero(used[c]).squeeze(1)
        if len(rows) == 0:
            continue
        block = matrices[c][rows][:, rows].numpy()
        value, vector = _top_eigenpair(block)
        values[c] = max(value, 1e-300)
        vectors[c, rows] = torch.from_numpy(vector)
    return values, vectors


def _top_eigenpair(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """The largest eigenvalue and its unit eigenvector (k,) of a symmetric matrix (k, k): by Lanczos
    (ARPACK, from the all-ones vector, to machine precision) above LANCZOS_MIN rows, where a cone's
    first component stands out of the noise and it takes a few products where LAPACK reduces the
    whole matrix (2-8 ms against 15-65 ms at 600 rows); by LAPACK below, or where ARPACK does not
    converge."""
    k = len(matrix)
    if k >= LANCZOS_MIN:
        try:
            value, vector = eigsh(matrix, k=1, which="LA", v0=np.ones(k), tol=0.0)
            return float(value[0]), vector[:, 0]
        except ArpackNoConvergence:
            pass
    value, vector = scipy.linalg.eigh(matrix, subset_by_index=[k - 1, k - 1], driver="evr")
    return float(value[0]), vector[:, 0]


def _top_eigenpairs_torch(matrices: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_top_eigenpairs` by torch.linalg.eigh on the matrices' device, all cones in one batch.

    The rows and columns outside `used` are zeroed and given -1 on the diagonal: the matrices are Gram
    or covariance matrices (positive semi-definite), so those eigenvalues lie below the used block's
    and the last eigenpair is the block's top one. Its vector is set to 0 outside `used` (there it is
    0 up to rounding). The eigenvector's sign is arbitrary on both paths (`first_component` fixes
    it); the values agree with scipy's to rounding, the vectors to rounding over the eigenvalue gap.
    """
    used = used.to(matrices.device)
    outside = (~used).to(torch.float64)
    block = matrices.to(torch.float64) * (used[:, :, None] & used[:, None, :]) - torch.diag_embed(outside)
    values, vectors = torch.linalg.eigh(block)
    members = used.any(dim=1)
    top = torch.where(members, values[:, -1].clamp(min=1e-300), 0.0)
    return top, vectors[..., -1] * used
