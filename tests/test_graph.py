import numpy as np
import torch

from relion_graphsplit.method.graph import cone_weights, particle_scores, ratio_matrix, shared_counts


def test_weights_and_scores_on_tiny_graph():
    # Three cones; particles 0-1 in cones 0 and 1, particle 2 in cones 1 and 2, particle 3 only in cone 2.
    cone = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    particle = torch.tensor([0, 1, 0, 1, 2, 2, 3])
    llr = torch.tensor([1.0, -2.0, -1.5, 2.5, 3.0, -0.5, 4.0])
    L = ratio_matrix(cone, particle, llr, 3, 4)
    W = cone_weights(L).toarray()
    assert W[0, 1] == W[1, 0] == 1.0 * -1.5 + -2.0 * 2.5
    assert W[1, 2] == 3.0 * -0.5 and W[0, 2] == 0.0
    assert np.all(np.diag(W) == 0)
    assert shared_counts(L).toarray()[0, 1] == 2
    signs = np.array([1, -1, 1])
    score, count = particle_scores(L, signs)
    np.testing.assert_allclose(score, [(1.0 + 1.5) / 2, (-2.0 - 2.5) / 2, (-3.0 - 0.5) / 2, 4.0])
    np.testing.assert_array_equal(count, [2, 2, 2, 1])
