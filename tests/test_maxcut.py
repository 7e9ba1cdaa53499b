import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

from relion_graphsplit.fourier.geometry import fibonacci_sphere
from relion_graphsplit.method.maxcut import local_search, sign_objective, synchronise

GW_RATIO = 0.878


def planted(
    n: int, flip: float, seed: int, degree: float = 10.0
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sphere-like graph on Fibonacci points, neighbours within a cap holding ~degree points, with
    w_ij = s_i s_j |w_ij| for hidden signs s and a fraction `flip` of the edges' signs flipped."""
    rng = np.random.default_rng(seed)
    points = fibonacci_sphere(n).numpy()
    i, j = np.nonzero(np.triu(points @ points.T > 1.0 - 2.0 * degree / n, 1))
    s = rng.choice(np.array([-1, 1], dtype=np.int8), n)
    w = rng.uniform(0.2, 1.0, i.size) * s[i] * s[j]
    w[rng.random(i.size) < flip] *= -1.0
    W = sp.csr_matrix((np.r_[w, w], (np.r_[i, j], np.r_[j, i])), shape=(n, n))
    assert connected_components(W, directed=False)[0] == 1
    return W, s


def exhaustive_optimum(W: np.ndarray) -> float:
    """max s^T W s over all signs with s_0 = +1."""
    n = W.shape[0]
    S = np.array(list(itertools.product([1.0, -1.0], repeat=n - 1))).reshape(-1, n - 1)
    S = np.hstack([np.ones((S.shape[0], 1)), S])
    return float(np.einsum("ki,ij,kj->k", S, W, S).max())


def same_up_to_sign(a: np.ndarray, b: np.ndarray) -> bool:
    return abs(int(np.dot(a.astype(np.int64), b.astype(np.int64)))) == a.size


@pytest.mark.parametrize("method", ["sdp", "bm", "spectral"])
@pytest.mark.parametrize("flip", [0.0, 0.05])
def test_recovers_planted_labelling(method, flip):
    W, s = planted(80, flip, seed=1)
    result = synchronise(W, method=method)
    assert result.method == method
    assert result.signs.dtype == np.int8 and set(np.unique(result.signs)) <= {-1, 1}
    assert same_up_to_sign(result.signs, s)
    assert result.signs[0] == 1  # the documented global sign: the lowest node of a component is +1
    assert result.objective == pytest.approx(sign_objective(W, s))
    assert result.upper_bound >= result.objective - 1e-9 * abs(result.objective)


@pytest.mark.parametrize("method", ["sdp", "bm"])
def test_relaxation_is_tight_without_flips(method):
    # Planted signs with no wrong edge are the SDP's rank-one optimum: the bound certifies them.
    W, _ = planted(80, 0.0, seed=2)
    result = synchronise(W, method=method)
    assert result.upper_bound == pytest.approx(result.objective, rel=1e-6)


@pytest.mark.parametrize(("flip", "seed"), [(0.05, 1), (0.1, 3)])
def test_sdp_and_burer_monteiro_agree(flip, seed):
    W, s = planted(100, flip, seed=seed, degree=6.0)
    by_sdp = synchronise(W, method="sdp")
    by_bm = synchronise(W, method="bm")
    assert by_bm.objective == pytest.approx(by_sdp.objective, rel=1e-6)
    assert np.array_equal(by_sdp.signs, by_bm.signs)
    assert by_sdp.objective >= sign_objective(W, s) - 1e-9
    # Both bounds approximate the same SDP value (Burer-Monteiro reaches the SDP optimum).
    assert by_bm.upper_bound == pytest.approx(by_sdp.upper_bound, rel=1e-4)


@pytest.mark.parametrize("method", ["sdp", "bm", "spectral"])
def test_never_below_greedy_baseline(method):
    W, _ = planted(100, 0.1, seed=4)
    result = synchronise(W, method=method)
    from_ones = local_search(W, np.ones(100))
    assert result.objective >= sign_objective(W, from_ones) - 1e-9
    assert result.upper_bound >= result.objective
    if method != "spectral":  # the spectral start has no such guarantee against lucky restarts
        starts = np.random.default_rng(0).choice([-1, 1], size=(100, 50))
        greedy = local_search(W, starts)
        assert greedy.shape == (100, 50)
        assert result.objective >= max(sign_objective(W, g) for g in greedy.T) - 1e-9


def test_relaxation_beats_random_restarts():
    # On a larger sparse graph greedy restarts stay in local optima (domain walls); the rounded
    # relaxation does not. (The SDP is compared with Burer-Monteiro above, on smaller graphs.)
    W, s = planted(300, 0.05, seed=1, degree=6.0)
    starts = np.random.default_rng(0).choice([-1, 1], size=(300, 200))
    restarts = max(sign_objective(W, g) for g in local_search(W, starts).T)
    result = synchronise(W, method="bm")
    assert same_up_to_sign(result.signs, s)
    assert result.objective > restarts + 1.0


def test_local_search_reaches_a_local_optimum():
    W, _ = planted(60, 0.2, seed=5)
    start = np.random.default_rng(1).choice(np.array([-1, 1]), size=60)
    s = local_search(W, start)
    assert sign_objective(W, s) >= sign_objective(W, start)
    assert np.all(s.astype(float) * (W @ s.astype(float)) >= -1e-9)  # no single flip gains
    # Columns are searched independently and the same way as a single vector.
    both = local_search(W.toarray(), np.stack([start, -start], axis=1))
    assert np.array_equal(both[:, 0], s)
    assert np.array_equal(both[:, 1], local_search(W, -start))


@pytest.mark.parametrize("method", ["sdp", "bm", "spectral"])
def test_disconnected_graph_is_solved_per_component(method):
    Wa, sa = planted(50, 0.05, seed=6)
    Wb, sb = planted(40, 0.05, seed=7)
    n = 50 + 40 + 1  # and one isolated node
    order = np.random.default_rng(2).permutation(n)  # interleave the components' node indices
    W_block = sp.block_diag([Wa, Wb, sp.csr_matrix((1, 1))]).tocsr()
    W = W_block[order][:, order]
    result = synchronise(W, method=method)

    blocks = (range(50), range(50, 90), [90])
    nodes_a, nodes_b, lone = (np.flatnonzero(np.isin(order, list(b))) for b in blocks)
    assert len(result.components) == 3
    expected = sorted([nodes_a, nodes_b, lone], key=lambda c: c[0])
    for component, nodes in zip(result.components, expected):
        assert np.array_equal(component.nodes, nodes)
        assert result.signs[nodes[0]] == 1
    assert next(c for c in result.components if c.nodes.size == 1).method == "trivial"
    s = np.r_[sa, sb, 1][order]
    for nodes in (nodes_a, nodes_b):
        assert same_up_to_sign(result.signs[nodes], s[nodes])
    assert result.objective == pytest.approx(sum(c.objective for c in result.components))
    assert result.objective == pytest.approx(sign_objective(W, s))
    assert result.upper_bound == pytest.approx(sum(c.upper_bound for c in result.components))
    assert result.method == method


def test_burer_monteiro_is_the_default():
    W, s = planted(60, 0.05, seed=9)
    result = synchronise(W)
    assert result.method == "bm" and same_up_to_sign(result.signs, s)


@pytest.mark.parametrize("method", ["sdp", "bm", "spectral"])
def test_deterministic(method):
    W, _ = planted(100, 0.1, seed=10)
    first = synchronise(W, method=method, seed=3)
    again = synchronise(W.toarray(), method=method, seed=3)  # dense input, same answer
    with threadpool_limits(1):
        single_thread = synchronise(W, method=method, seed=3)
    for other in (again, single_thread):
        assert np.array_equal(first.signs, other.signs)
        assert first.objective == other.objective


@pytest.mark.parametrize("method", ["sdp", "bm"])
def test_exhaustive_optimum_on_tiny_graphs(method):
    rng = np.random.default_rng(11)
    exact = 0
    trials = 25
    for _ in range(trials):
        n = int(rng.integers(3, 13))
        A = rng.standard_normal((n, n)) * (rng.random((n, n)) < 0.6)
        W = np.triu(A, 1) + np.triu(A, 1).T
        optimum = exhaustive_optimum(W)
        result = synchronise(W, method=method)
        assert result.objective <= optimum + 1e-9
        assert result.objective >= GW_RATIO * optimum
        assert result.upper_bound >= optimum - 1e-7 * abs(optimum)
        exact += result.objective >= optimum - 1e-9 * abs(optimum)
    assert exact >= 0.9 * trials


@pytest.mark.parametrize("method", ["sdp", "bm", "spectral"])
def test_exhaustive_optimum_on_tiny_planted_graphs(method):
    for seed in range(4):
        W, s = planted(12, 0.0, seed=seed, degree=4.0)
        result = synchronise(W, method=method)
        assert result.objective == pytest.approx(exhaustive_optimum(W.toarray()), rel=1e-12)
        assert same_up_to_sign(result.signs, s)


def test_trivial_graphs():
    empty = synchronise(np.zeros((0, 0)))
    assert empty.signs.shape == (0,) and empty.components == [] and empty.objective == 0.0

    single = synchronise(np.zeros((1, 1)))
    assert single.signs.tolist() == [1] and single.method == "trivial"

    stored_zeros = sp.csr_matrix((np.zeros(2), ([0, 1], [1, 0])), shape=(4, 4))
    for W in (np.zeros((4, 4)), stored_zeros):
        result = synchronise(W)
        assert result.signs.tolist() == [1, 1, 1, 1]
        assert len(result.components) == 4 and result.method == "trivial"
        assert result.objective == 0.0 and result.upper_bound == 0.0

    pair = synchronise(np.array([[0.0, -2.0], [-2.0, 0.0]]))
    assert pair.signs.tolist() == [1, -1]
    assert pair.objective == pytest.approx(4.0) and pair.upper_bound == pytest.approx(4.0)


def test_diagonal_adds_a_constant():
    W, s = planted(40, 0.05, seed=12)
    with_diagonal = W + sp.diags(np.linspace(-1.0, 2.0, 40))
    plain = synchronise(W, method="bm")
    shifted = synchronise(with_diagonal, method="bm")
    trace = float(with_diagonal.diagonal().sum())
    assert np.array_equal(plain.signs, shifted.signs)
    assert shifted.objective == pytest.approx(plain.objective + trace)
    assert shifted.objective == pytest.approx(sign_objective(with_diagonal, shifted.signs))
    assert shifted.upper_bound == pytest.approx(plain.upper_bound + trace)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="symmetric"):
        synchronise(np.array([[0.0, 1.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match="square"):
        synchronise(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        synchronise(np.array([[0.0, np.nan], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match="method"):
        synchronise(np.zeros((2, 2)), method="annealing")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_sdp_is_the_same_whatever_the_cores():
    """Clarabel's thread pool (rayon) takes one thread per core the process may use, and the SDP's
    solution changes in its last bits with that number. The package pins the pool to one thread, so
    that a graph gets the same solution on any machine: here, in a process allowed one core and in
    one allowed two (without the pin, two different solutions)."""
    code = (
        "import os, sys, hashlib; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
        "import numpy as np, scipy.sparse as sp; from relion_graphsplit.method import maxcut; "
        "rng = np.random.default_rng(0); W = rng.standard_normal((41, 41)); "
        "W = (W + W.T) * (rng.random((41, 41)) < 0.3); W = (W + W.T) / 2; np.fill_diagonal(W, 0); "
        "V, y = maxcut._sdp(sp.csr_matrix(W)); print(hashlib.sha1(V.tobytes() + y.tobytes()).hexdigest())"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    cores = [str(c) for c in sorted(os.sched_getaffinity(0))[:2]]
    digests = [
        subprocess.run([sys.executable, "-c", code, ",".join(cores[:k])], env=env, capture_output=True, text=True,
                       check=True).stdout
        for k in (1, 2)
    ]
    assert digests[0] == digests[1] != ""
