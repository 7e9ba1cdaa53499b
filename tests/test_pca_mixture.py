import math

import torch

from relion_graphsplit.method.mixture import fit_mixture, log_likelihood_ratio
from relion_graphsplit.method.pca import first_component


def planted_cones(seed=0, n=300, d=200, separation=6.0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    labels = torch.rand(n, generator=g) < 0.3
    offset = torch.where(labels, separation / 2, -separation / 2).to(torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5 + offset[:, None] * direction
    return x, labels, direction


def test_first_component_finds_planted_direction_with_padding():
    x1, labels1, dir1 = planted_cones(0)
    x2, labels2, dir2 = planted_cones(1, n=200)
    batch = torch.zeros(2, 300, 200, dtype=torch.float64)
    batch[0], batch[1, :200] = x1, x2
    valid = torch.zeros(2, 300, dtype=torch.bool)
    valid[0], valid[1, :200] = True, True
    for transpose in (False, True):
        data = batch if not transpose else batch[:, :, :150]  # P > D exercises the covariance path
        comp = first_component(data, valid)
        assert torch.all(comp.scores[1, 200:] == 0)
        if not transpose:
            assert abs(float(comp.eigenimage[0] @ dir1)) > 0.98
            assert abs(float(comp.eigenimage[1] @ dir2)) > 0.98
            assert comp.explained[0] > 20 / 200  # one noise direction holds about 1/200
        split = comp.scores[0] > comp.scores[0].mean()
        agreement = (split == labels1).double().mean()
        assert max(agreement, 1 - agreement) > 0.98
    assert torch.all(comp.eigenimage.sum(dim=1) >= 0)


def test_first_component_is_top_eigenvector_of_each_cones_covariance():
    # Padding rows anywhere (not only at the end), both the Gram (P <= D) and covariance (P > D) paths,
    # the last with Gram matrices large enough for Lanczos (pca.LANCZOS_MIN) on pure noise (small gaps).
    g = torch.Generator().manual_seed(5)
    for p, d in ((60, 80), (90, 40), (150, 200)):
        data = torch.randn(3, p, d, generator=g, dtype=torch.float64)
        valid = torch.rand(3, p, generator=g) < 0.7
        comp = first_component(data, valid)
        for c in range(3):
            rows = data[c][valid[c]]
            centred = rows - rows.mean(0)
            values, vectors = torch.linalg.eigh(centred.T @ centred)
            reference = vectors[:, -1] * (1 if vectors[:, -1].sum() >= 0 else -1)
            torch.testing.assert_close(comp.eigenimage[c], reference, atol=1e-9, rtol=0)
            torch.testing.assert_close(comp.explained[c], values[-1] / values.sum(), atol=1e-12, rtol=0)
            torch.testing.assert_close(comp.scores[c][valid[c]], centred @ reference, atol=1e-9, rtol=0)
            assert torch.all(comp.scores[c][~valid[c]] == 0)


def test_mixture_recovers_known_parameters():
    g = torch.Generator().manual_seed(2)
    n = 4000
    a = torch.randn(n, generator=g, dtype=torch.float64) * 1.5 + 4.0
    b = torch.randn(n, generator=g, dtype=torch.float64) * 1.5 - 2.0
    keep_a = torch.rand(n, generator=g) < 0.8
    x = torch.where(keep_a, a, b)[None]
    m = fit_mixture(-x, torch.ones_like(x, dtype=torch.bool))  # order of components must not matter
    assert abs(float(m.weights[0, 1]) - 0.8) < 0.03
    assert abs(float(m.means[0, 1]) + 4.0) < 0.15 and abs(float(m.means[0, 0]) - 2.0) < 0.15
    assert abs(float(m.sigma[0]) - 1.5) < 0.1
    assert float(m.separation[0]) > 3.5


def test_log_likelihood_ratio_matches_direct_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(1, 500, generator=g) + 2, torch.randn(1, 500, generator=g) - 2], dim=1).double()
    m = fit_mixture(x, torch.ones_like(x, dtype=torch.bool))
    llr = log_likelihood_ratio(x, m)

    def log_density(v, w, mu, s):
        return math.log(w) - 0.5 * ((v - mu) / s) ** 2 - math.log(s)

    w0, w1 = float(m.weights[0, 0]), float(m.weights[0, 1])
    mu0, mu1, s = float(m.means[0, 0]), float(m.means[0, 1]), float(m.sigma[0])
    for i in (0, 10, 600, 999):
        v = float(x[0, i])
        assert math.isclose(float(llr[0, i]), log_density(v, w0, mu0, s) - log_density(v, w1, mu1, s), rel_tol=1e-9, abs_tol=1e-9)
    # The sign of the ratio classifies the planted halves.
    assert (llr[0, :500] > 0).double().mean() > 0.95 and (llr[0, 500:] < 0).double().mean() > 0.95


def test_mixture_is_deterministic_and_ignores_padding():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 100, generator=g, dtype=torch.float64)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[2, 50:] = False
    x_padded = x.clone()
    x_padded[2, 50:] = 1e6
    m1, m2 = fit_mixture(x, valid), fit_mixture(x_padded, valid)
    torch.testing.assert_close(m1.means, m2.means)
    torch.testing.assert_close(m1.sigma, m2.sigma)
