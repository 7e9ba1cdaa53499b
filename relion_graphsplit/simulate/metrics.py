"""Agreement between a predicted and a true partition of particles into classes."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def contingency(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Counts (K_pred, K_true) of particles per (predicted, true) label pair, labels in order of value.

    Parameters
    ----------
    pred, truth : np.ndarray
        (n,) labels of any sortable kind (class numbers, say); the two arrays need not use the same
        labels.

    Returns
    -------
    np.ndarray
        (K_pred, K_true) int64: row i counts the particles with the i-th smallest predicted label,
        column j those with the j-th smallest true label.

    Raises
    ------
    ValueError
        If the labels are not two one-dimensional arrays of the same length.
    """
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
    of the two permutations). The numbers of predicted and true classes may differ: the particles of
    a predicted class left without a match (more predicted classes than true ones), or of a true class
    left without one (fewer), count as wrong.

    Parameters
    ----------
    pred, truth : np.ndarray
        (n,) predicted and true labels (`contingency`).

    Returns
    -------
    float
        The fraction in [0, 1] of particles on the matched diagonal of the contingency table (the
        matching that maximises it, by linear_sum_assignment).
    """
    return float(matched_correct(pred, truth).mean())


def matched_correct(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Which particles are labelled right under the best matching of predicted to true labels.

    The matching is one to one, by linear_sum_assignment on the contingency table; `accuracy` is the
    mean of this. With more predicted classes
    than true ones, the particles of a predicted class left without a match are all wrong; with
    fewer, the particles of an unmatched true class are.

    Parameters
    ----------
    pred, truth : np.ndarray
        (n,) predicted and true labels (`contingency`).

    Returns
    -------
    np.ndarray
        (n,) bool, True where the particle's predicted class is matched to its true class.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    table = contingency(pred, truth)
    rows, cols = linear_sum_assignment(table, maximize=True)
    pred_labels, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    match = np.full(len(pred_labels), -1, dtype=np.int64)
    match[rows] = cols
    return match[p.reshape(-1)] == t.reshape(-1)


def adjusted_rand_index(pred: np.ndarray, truth: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index: 1 for identical partitions, about 0 for random ones.

    Parameters
    ----------
    pred, truth : np.ndarray
        (n,) predicted and true labels (`contingency`).

    Returns
    -------
    float
        The index, at most 1 and negative for partitions that agree less than chance; 1.0 when both
        partitions are trivial in the same way (one class each, or all singletons each).
    """
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
