"""The tables a split leaves for the user to judge it by (run_cones.star, run_memberships.star): per
cone its sign and graph component, axis and share of class 1; per membership its values; the graph's
edges. Nothing here changes a particle's class."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from relion_graphsplit.method.cones import Cones
from relion_graphsplit.method.graph import shared_counts


def cone_diagnostics(
    cone_table: pd.DataFrame,
    cone_images: np.ndarray,
    cones: Cones,
    rho: torch.Tensor,
    llr: torch.Tensor,
    signs: np.ndarray,
    components: list[np.ndarray],
    ratios: sp.csr_matrix,
    weights: sp.csr_matrix,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The cone table completed after synchronisation, the memberships and the edges.

    Parameters
    ----------
    cone_table : pd.DataFrame
        One row per classified cone (`classify.classify_cones`), with its `cone` index; completed in
        place with the columns `sign`, `component` (1-based index of the cone's connected part of the
        graph), `axis_x`, `axis_y`, `axis_z` and `class1_fraction`: the share of the cone's
        memberships whose synchronised ratio (sign times lambda) is >= 0, the cone's own vote for
        class 1 (not the particles' final classes).
    cone_images : np.ndarray
        (M, 4, w, w) per cone: mean, eigen-image and the averages of the members with positive and
        with negative ratio (the two mixture components). The last two are swapped in place for
        cones of sign -1, so that they show class 1 then class 2.
    cones : Cones
        The memberships (M = cones.n_cones cones, K memberships) and the cone axes.
    rho : torch.Tensor
        (K,) per membership: its score on the cone's first principal component.
    llr : torch.Tensor
        (K,) per membership: its log-likelihood ratio lambda (positive: the mixture component of
        larger mean).
    signs : np.ndarray
        (M,) +1 or -1 per cone, from the synchronisation.
    components : list of np.ndarray
        The cone indices of each connected part of the graph, in order.
    ratios : scipy.sparse.csr_matrix
        (M, n) the ratio matrix L (`graph.ratio_matrix`).
    weights : scipy.sparse.csr_matrix
        (M, M) the edge weights (`graph.cone_weights`).

    Returns
    -------
    cone_table : pd.DataFrame
        The completed cone table (the same object as the argument).
    memberships : pd.DataFrame
        One row per membership: `cone`, `particle`, `rho`, `llr`.
    edges : pd.DataFrame
        One row per pair of cones i < j that share particles: `cone1`, `cone2`, `shared` (the
        number of shared particles) and `weight` (w_ij).
    """
    swapped = signs < 0  # after synchronisation, class 1 is the negative-ratio side of these cones
    cone_images[swapped, 2:] = cone_images[swapped][:, ::-1][:, :2]
    cone = cone_table["cone"].to_numpy()
    cone_table["sign"] = signs[cone]
    cone_table["component"] = _component_index(components, cones.n_cones)[cone]
    cone_table["axis_x"], cone_table["axis_y"], cone_table["axis_z"] = cones.axes.numpy()[cone].T
    synced = signs[cones.cone.numpy()] * llr.numpy()
    cone_table["class1_fraction"] = pd.Series(synced >= 0).groupby(cones.cone.numpy()).mean().reindex(cone).to_numpy()
    membership = pd.DataFrame(
        {"cone": cones.cone.numpy(), "particle": cones.particle.numpy(), "rho": rho.numpy(), "llr": llr.numpy()}
    )
    return cone_table, membership, _edges(weights, shared_counts(ratios))


def _component_index(components: list[np.ndarray], n: int) -> np.ndarray:
    """Per cone, the 1-based index of its graph component."""
    index = np.zeros(n, dtype=np.int64)
    for k, nodes in enumerate(components):
        index[np.asarray(nodes)] = k + 1
    return index


def _edges(weights: sp.csr_matrix, shared: sp.csr_matrix) -> pd.DataFrame:
    """One row per pair of cones that share particles: how many, and the pair's weight."""
    upper = shared.tocoo()
    keep = upper.row < upper.col
    i, j = upper.row[keep], upper.col[keep]
    w = np.asarray(weights[i, j]).ravel()
    return pd.DataFrame({"cone1": i, "cone2": j, "shared": upper.data[keep].astype(np.int64), "weight": w})
