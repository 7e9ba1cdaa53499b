"""Agreement between a predicted and a true partition of particles into classes."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def contingency(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Counts (K_pred, K_true) of particles per (predicted, true) label pair, labels in order of value."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 1:
        raise ValueError(f"labels must be two 1D arrays of one length, got {pred.shape} and {truth.shape}")
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    table = np.zeros((p.max(initial=-1) + 1, t.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table


def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of particles labelled right under the best matching of predicted to true labels.

    Class numbers are arbitrary, so the labels are matched one to one (for two classes: the better
    of the two permutations); a predicted class left without a match counts as wrong.
    """
    table = contingency(pred, truth)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def adjusted_rand_index(pred: np.ndarray, truth: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index: 1 for identical partitions, about 0 for random ones."""
    table = contingency(pred, truth)
    n = table.sum()

    def pairs(x):
        return (x * (x - 1) / 2.0).sum()

    index = pairs(table)
    a, b = pairs(table.sum(1)), pairs(table.sum(0))
    expected = a * b / (n * (n - 1) / 2.0)
    maximum = (a + b) / 2.0
    if maximum == expected:  # both partitions trivial (one class, or all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))
