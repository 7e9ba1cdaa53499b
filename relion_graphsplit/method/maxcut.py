"""Sign synchronisation: s in {-1, +1}^n maximising s^T W s, a max-cut of the graph weighted -W.

Nodes are cones; w_ij > 0 says that cones i and j split their shared particles the same way,
w_ij < 0 that their two classes are swapped. The Goemans-Williamson relaxation replaces the signs
by unit vectors v_i and maximises sum_ij w_ij v_i.v_j. It is solved by Burer-Monteiro block
coordinate ascent on a low-rank V (the default) or as a semidefinite program (cvxpy with Clarabel,
on the dual form), then rounded by random hyperplanes and polished by greedy single flips.

Every method also returns a certified upper bound: for any y,
s^T W s = sum(y) - s^T (Diag(y) - W) s, so sum(y) bounds every s^T W s once Diag(y) - W is PSD.
The y of the SDP, the Lagrange multipliers of the Burer-Monteiro point, or y = 0 for the spectral
method (giving n lambda_max(W)) is shifted by the most negative eigenvalue of Diag(y) - W, so the
bound holds, to the eigensolver's precision, whatever the relaxation solver's accuracy. Where it
equals the objective, the signs are optimal.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

logger = logging.getLogger(__name__)

METHODS = ("bm", "sdp", "spectral")
DENSE_EIG_MAX = 100
"""Components up to this size get dense (LAPACK) eigenvalues, larger ones Lanczos (ARPACK): at 1000
nodes LAPACK took 2-13 s on 2 busy cores where ARPACK took 0.02-0.2 s for the same value."""


@dataclass(frozen=True)
class Component:
    """A connected component, solved on its own; its global sign gives nodes[0] the sign +1."""

    nodes: np.ndarray  # ascending node indices (int64)
    method: str  # 'trivial' (a single node), 'sdp', 'bm' or 'spectral'
    objective: float  # s^T W s over the component (diagonal excluded)
    upper_bound: float  # certified bound on the component's s^T W s


@dataclass(frozen=True)
class SyncResult:
    """Signs maximising s^T W s and the per-component solutions they were assembled from."""

    signs: np.ndarray  # int8, +1 or -1 per node
    objective: float  # s^T W s, diagonal included
    upper_bound: float  # certified upper bound on max_s s^T W s, diagonal included
    method: str  # methods used on the non-trivial components joined by '+', or 'trivial'
    components: list[Component]  # ordered by lowest node; more than one: the graph is disconnected


def sign_objective(W: sp.spmatrix | np.ndarray, signs: np.ndarray) -> float:
    """s^T W s for signs of shape (n,), diagonal included.

    Parameters
    ----------
    W : scipy.sparse matrix or np.ndarray
        (n, n) weight matrix.
    signs : np.ndarray
        (n,) the signs s (any numeric dtype, taken as float64).

    Returns
    -------
    float
        s^T W s.
    """
    s = np.asarray(signs, dtype=np.float64)
    return float(s @ (sp.csr_matrix(W) @ s))


def local_search(W: sp.spmatrix | np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Greedy single flips from `signs`, (n,) or (n, k) columns, until no flip raises s^T W s.

    Each step flips, in every column that can still improve, the node with the largest gain
    -4 s_i (W s)_i (the lowest index on ties). W's diagonal is ignored (it adds a constant). A node is
    flipped only where s_i (W s)_i < -1e-10 times the largest absolute row sum of W's off-diagonal
    part.

    Parameters
    ----------
    W : scipy.sparse matrix or np.ndarray
        (n, n) symmetric weight matrix.
    signs : np.ndarray
        (n,) or (n, k) starting signs, one labelling per column; negative values count as -1,
        zero and positive ones as +1.

    Returns
    -------
    np.ndarray
        int8 signs (+1 or -1) shaped like the input, each column a local maximum of s^T W s under
        single flips.
    """
    W = _off_diagonal(sp.csr_matrix(W, dtype=np.float64))
    S = np.where(np.asarray(signs) < 0, -1.0, 1.0)
    single = S.ndim == 1
    if single:
        S = S[:, None]
    if W.nnz:
        tol = 1e-10 * float(abs(W).sum(axis=1).max())
        F = W @ S  # local fields (W S)_ik
        active = np.arange(S.shape[1])
        while active.size:
            gains = S[:, active] * F[:, active]  # flipping i changes s^T W s by -4 gains_i
            rows = np.argmin(gains, axis=0)
            improving = gains[rows, np.arange(active.size)] < -tol
            active, rows = active[improving], rows[improving]
            F[:, active] -= 2.0 * S[rows, active] * W[rows].toarray().T
            S[rows, active] *= -1.0
    S = S.astype(np.int8)
    return S[:, 0] if single else S


def synchronise(
    W: sp.spmatrix | np.ndarray,
    method: str = "bm",
    seed: int = 0,
    n_rounds: int = 200,
    bm_rank: int = 10,
) -> SyncResult:
    """Signs s maximising s^T W s for a symmetric weight matrix W (n, n), dense or scipy.sparse.

    Each connected component of the graph |W| > 0 is solved on its own with `method`: 'bm'
    (Burer-Monteiro at rank max(`bm_rank`, ceil(sqrt(2 m))) for m nodes, above which the relaxation
    has no spurious local optimum, generically), 'sdp' (the Goemans-Williamson SDP) or 'spectral'
    (leading eigenvector). On 22 cone graphs of 41 nodes from the benchmark's three- and four-state
    sets Burer-Monteiro gave the SDP's signs in 0.005-0.13 s where the SDP took 0.16-0.74 s; on 2
    cores the SDP took 10 s on a cone graph of 150 nodes and 3 CPU minutes and 6.6 GB at 1000 nodes,
    where Burer-Monteiro takes under a second and reached the same optimum. A relaxation is rounded by
    `n_rounds` random hyperplanes; each rounding and the all-+1 labelling are polished by
    `local_search`, and the first of the best (within a relative 1e-9) is kept, so near-ties do not
    hang on floating-point noise. An SDP that fails falls back to Burer-Monteiro (logged, and named
    in the component's method). The same W and seed give the same signs; each component draws from
    its own generator, seeded by (seed, its lowest node). The diagonal adds trace(W) whatever the
    signs: it is left out of the search and counted in `objective` and `upper_bound`.

    Parameters
    ----------
    W : scipy.sparse matrix or np.ndarray
        (n, n) symmetric, finite weights (symmetric to 1e-10 of the largest |w_ij|; symmetrised here).
        For the split: the cone graph's w_ij (`graph.cone_weights`).
    method : str
        'bm', 'sdp' or 'spectral'.
    seed : int
        Seed of the roundings and of the Burer-Monteiro start.
    n_rounds : int
        Random hyperplanes per relaxation.
    bm_rank : int
        Least rank of the Burer-Monteiro factor (at most the component's size).

    Returns
    -------
    SyncResult
        int8 signs (n,), +1 or -1 with each component's lowest node at +1 (isolated nodes +1); the
        objective and its certified upper bound, diagonal included; the methods used; and the
        per-component solutions, ordered by lowest node.

    Raises
    ------
    ValueError
        If `method` is unknown, or W is not square, not finite or not symmetric.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    W = _validated(W)
    trace = float(W.diagonal().sum())
    W = _off_diagonal(W)

    signs = np.ones(W.shape[0], dtype=np.int8)
    components = []
    for nodes in _components(W):
        if nodes.size == 1:
            components.append(Component(nodes, "trivial", 0.0, 0.0))
            continue
        Wc = W[nodes][:, nodes].tocsr()
        rng = np.random.default_rng([seed, int(nodes[0])])
        rank = max(bm_rank, math.ceil(math.sqrt(2 * nodes.size)))
        s, bound, chosen = _solve_component(Wc, method, rng, n_rounds, rank)
        s = s if s[0] > 0 else -s
        signs[nodes] = s
        components.append(Component(nodes, chosen, sign_objective(Wc, s), bound))

    used = sorted({c.method for c in components} - {"trivial"})
    return SyncResult(
        signs=signs,
        objective=sign_objective(W, signs) + trace,
        upper_bound=sum(c.upper_bound for c in components) + trace,
        method="+".join(used) if used else "trivial",
        components=components,
    )


def _validated(W: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """W as an exactly symmetric float64 CSR; refuses non-square, non-finite or asymmetric input."""
    W = sp.csr_matrix(W, dtype=np.float64)
    if W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be square, got shape {W.shape}")
    if not np.all(np.isfinite(W.data)):
        raise ValueError("W has non-finite entries")
    if W.nnz and abs(W - W.T).max() > 1e-10 * abs(W).max():
        raise ValueError("W must be symmetric")
    W = ((W + W.T) * 0.5).tocsr()
    W.eliminate_zeros()
    W.sort_indices()
    return W


def _off_diagonal(W: sp.csr_matrix) -> sp.csr_matrix:
    W = (W - sp.diags(W.diagonal())).tocsr()
    W.eliminate_zeros()
    return W


def _components(W: sp.csr_matrix) -> list[np.ndarray]:
    """Node index arrays of the connected components of |W| > 0, ordered by their lowest node."""
    if W.shape[0] == 0:
        return []
    n_comp, labels = connected_components(W != 0, directed=False)
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(n_comp, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(n_comp)
    order = np.argsort(rank[labels], kind="stable")
    return np.split(order, np.cumsum(np.bincount(rank[labels], minlength=n_comp))[:-1])


def _solve_component(
    W: sp.csr_matrix, method: str, rng: np.random.Generator, n_rounds: int, bm_rank: int
) -> tuple[np.ndarray, float, str]:
    """Signs, certified upper bound and the method actually used, for one connected component."""
    n = W.shape[0]
    if method == "spectral":
        candidates = np.where(_leading_eigenvector(W, rng) < 0, -1.0, 1.0)[:, None]
        y = np.zeros(n)
    else:
        V = y = None
        if method == "sdp":
            V, y = _sdp(W)
            if V is None:
                logger.warning("SDP failed on a %d-node component; using Burer-Monteiro", n)
                method = "bm"
        if method == "bm":
            V, y = _burer_monteiro(W, bm_rank, rng)
        candidates = _hyperplane_roundings(V, n_rounds, rng)
    candidates = np.hstack([candidates, np.ones((n, 1))])
    return _best(W, local_search(W, candidates)), _certified_bound(W, y, rng), method


def _hyperplane_roundings(V: np.ndarray, n_rounds: int, rng: np.random.Generator) -> np.ndarray:
    """sign(V g) for n_rounds Gaussian g as columns (n, n_rounds), zeros to +1.

    V g is summed column by column in a fixed order rather than by BLAS, whose summation order may
    change with the thread count.
    """
    G = rng.standard_normal((V.shape[1], n_rounds))
    P = np.zeros((V.shape[0], n_rounds))
    for j in range(V.shape[1]):
        P += np.multiply.outer(V[:, j], G[j])
    return np.where(P < 0, -1.0, 1.0)


def _best(W: sp.csr_matrix, S: np.ndarray) -> np.ndarray:
    """The first column of S whose s^T W s is within 1e-9 sum|w_ij| of the largest."""
    S = S.astype(np.float64)
    values = np.einsum("ik,ik->k", S, W @ S)
    k = int(np.flatnonzero(values >= values.max() - 1e-9 * float(abs(W).sum()))[0])
    return S[:, k].astype(np.int8)


def _sdp(W: sp.csr_matrix) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Gram factor V (X ~ V V^T) and dual y of max tr(W X) s.t. diag(X) = 1, X PSD; None on failure.

    Solved as the dual, min sum(y) s.t. Diag(y) - W PSD, by Clarabel: an interior point method that
    takes 7-14 iterations whatever the graph, where SCS at eps 1e-3 to 1e-4 took from 2 s to 100 s
    on the same 300-node graphs. X is the dual variable of the PSD constraint. Never hand Clarabel
    the primal form: it asks for tens of GB at a few hundred nodes and aborts the process.

    Clarabel's thread pool (rayon) takes one thread per core, and its solution changes in the last
    bits with the pool's size: one graph gave three different solutions with 1, 2 and 4 threads. The
    pool reads RAYON_NUM_THREADS when it first starts, so it is set to 1 here, before the first solve,
    unless the environment says otherwise: every machine then finds the same max-cut. The SDPs are
    small (cone graphs of tens to hundreds of nodes) and took as long on one thread.
    """
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import cvxpy as cp

    y = cp.Variable(W.shape[0])
    psd = cp.diag(y) - W >> 0
    problem = cp.Problem(cp.Minimize(cp.sum(y)), [psd])
    tolerances = dict(tol_gap_abs=1e-6, tol_gap_rel=1e-6, tol_feas=1e-6, tol_ktratio=1e-6)
    try:
        problem.solve(solver=cp.CLARABEL, **tolerances)
    except cp.error.SolverError:
        return None, None
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or psd.dual_value is None:
        return None, None
    X = np.asarray(psd.dual_value, dtype=np.float64)
    lam, U = np.linalg.eigh((X + X.T) * 0.5)
    keep = lam > 1e-6 * lam[-1]
    return U[:, keep] * np.sqrt(lam[keep]), np.asarray(y.value, dtype=np.float64)


def _burer_monteiro(
    W: sp.csr_matrix,
    rank: int,
    rng: np.random.Generator,
    rtol: float = 1e-9,
    max_sweeps: int = 20000,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows V (n, rank) locally maximising tr(V^T W V), and their multipliers y_i = |(W V)_i|.

    Block coordinate ascent v_i <- (W V)_i / |(W V)_i| from seeded Gaussian rows. The nodes of one
    colour of a greedy colouring share no edge, so a colour class is updated at once: this is the
    node-by-node ascent in colour-class order, and never lowers the objective. It stops when a sweep
    raises the objective by less than rtol sum|w_ij|. Sparse products only, so no BLAS threading.
    """
    n = W.shape[0]
    V = rng.standard_normal((n, min(rank, n)))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    classes = [(nodes, W[nodes]) for nodes in _greedy_colouring(W)]
    tol = rtol * float(abs(W).sum())
    value = float(np.sum(V * (W @ V)))
    for _ in range(max_sweeps):
        for nodes, rows in classes:
            G = rows @ V
            norm = np.linalg.norm(G, axis=1)
            moved = norm > 0.0
            V[nodes[moved]] = G[moved] / norm[moved, None]
        previous, value = value, float(np.sum(V * (W @ V)))
        if value - previous <= tol:
            break
    else:
        logger.warning("Burer-Monteiro stopped after %d sweeps before converging", max_sweeps)
    return V, np.linalg.norm(W @ V, axis=1)


def _greedy_colouring(W: sp.csr_matrix) -> list[np.ndarray]:
    """Colour classes of the greedy colouring in node order (smallest colour no neighbour has)."""
    colour = np.full(W.shape[0], -1, dtype=np.int64)
    for i in range(W.shape[0]):
        taken = set(colour[W.indices[W.indptr[i] : W.indptr[i + 1]]].tolist())
        c = 0
        while c in taken:
            c += 1
        colour[i] = c
    return [np.flatnonzero(colour == c) for c in range(int(colour.max()) + 1)]


def _leading_eigenvector(W: sp.csr_matrix, rng: np.random.Generator) -> np.ndarray:
    """Eigenvector of W's largest eigenvalue; ARPACK starts from a seeded vector."""
    n = W.shape[0]
    if n > DENSE_EIG_MAX:
        try:
            return eigsh(W, k=1, which="LA", v0=rng.standard_normal(n), tol=1e-10)[1][:, 0]
        except ArpackNoConvergence:
            logger.warning("ARPACK did not converge; using a dense eigendecomposition")
    return scipy.linalg.eigh(W.toarray(), subset_by_index=[n - 1, n - 1])[1][:, 0]


def _certified_bound(W: sp.csr_matrix, y: np.ndarray, rng: np.random.Generator) -> float:
    """sum(y) + n max(0, -lambda_min(Diag(y) - W)): an upper bound on s^T W s for every s.

    If ARPACK does not converge, Gershgorin's min_i (y_i - sum_j |w_ij|) stands in for lambda_min:
    a looser bound, but still a bound.
    """
    n = W.shape[0]
    M = (sp.diags(y) - W).tocsr()
    if n <= DENSE_EIG_MAX:
        lam_min = float(scipy.linalg.eigvalsh(M.toarray(), subset_by_index=[0, 0])[0])
    else:
        v0 = rng.standard_normal(n)
        try:
            lam = eigsh(M, k=1, which="SA", v0=v0, tol=1e-10, return_eigenvectors=False)
            lam_min = float(lam[0])
        except ArpackNoConvergence:
            logger.warning("ARPACK did not converge; bounding with Gershgorin's discs")
            lam_min = float(np.min(y - np.asarray(abs(W).sum(axis=1)).ravel()))
    return float(y.sum()) + n * max(0.0, -lam_min)
