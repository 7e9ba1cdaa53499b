"""Accuracy and adjusted Rand index on partitions with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from relion_graphsplit.simulate.metrics import accuracy, adjusted_rand_index, contingency, matched_correct


def test_accuracy_is_invariant_to_label_swap():
    truth = np.array([1, 1, 1, 2, 2, 2, 2, 2])
    pred = np.array([2, 2, 1, 1, 1, 1, 1, 2])  # swapped labels, two particles wrong
    assert accuracy(pred, truth) == pytest.approx(6 / 8)
    assert accuracy(3 - pred, truth) == pytest.approx(6 / 8)
    assert accuracy(truth, truth) == 1.0


def test_accuracy_of_a_single_predicted_class_is_the_majority_share():
    truth = np.array([0] * 7 + [1] * 3)
    assert accuracy(np.zeros(10, dtype=int), truth) == pytest.approx(0.7)


def test_accuracy_of_random_labels_is_near_one_half():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 2, 20000), rng.integers(0, 2, 20000)
    assert 0.5 <= accuracy(pred, truth) < 0.52


def test_adjusted_rand_index_known_values():
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    # Hubert & Arabie's formula by hand: sum C(n_ij, 2) = 1, a = 2, b = 1, expected = 1/3, max = 3/2.
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx((1 - 1 / 3) / (1.5 - 1 / 3))
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)
    assert adjusted_rand_index([0, 0, 0], [1, 1, 1]) == 1.0


def test_adjusted_rand_index_of_random_labels_is_near_zero():
    rng = np.random.default_rng(1)
    assert abs(adjusted_rand_index(rng.integers(0, 2, 20000), rng.integers(0, 2, 20000))) < 0.01


def test_contingency_counts_pairs_and_rejects_mismatched_lengths():
    np.testing.assert_array_equal(contingency(["a", "b", "b"], [5, 5, 7]), [[1, 0], [1, 1]])
    with pytest.raises(ValueError):
        contingency([0, 1], [0, 1, 1])


def test_accuracy_matches_different_numbers_of_predicted_and_true_classes():
    """Hungarian matching over a rectangular table: unmatched classes' particles count as wrong."""
    truth = np.array([1] * 5 + [2] * 3 + [3] * 2)
    # Four predicted classes, the true class 1 split in two (4 + 1): the smaller part has no match.
    over = np.array([7, 7, 7, 7, 9, 4, 4, 4, 5, 5])
    assert accuracy(over, truth) == pytest.approx(9 / 10)
    np.testing.assert_array_equal(matched_correct(over, truth), [1, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    # Two predicted classes for three true ones: classes 2 and 3 merged, the smaller (3) left unmatched.
    under = np.array([1] * 5 + [2] * 5)
    assert accuracy(under, truth) == pytest.approx(8 / 10)
    np.testing.assert_array_equal(matched_correct(under, truth), [1] * 8 + [0] * 2)
    # The matching is the best one, not the greedy one: the table [[5, 4], [4, 0]] gives 8 (4 + 4), where
    # taking its largest count first would give 5 (5 + 0).
    pred = np.array([1] * 9 + [2] * 4)
    assert accuracy(pred, np.array([1] * 5 + [2] * 4 + [1] * 4)) == pytest.approx(8 / 13)
    truth = np.array([1, 1, 1, 2, 2, 2, 2, 3, 3])
    # One predicted class against K true ones: the largest true class; one true class: the largest predicted one.
    assert accuracy(np.zeros(9, dtype=int), truth) == pytest.approx(4 / 9)
    assert accuracy(truth, np.zeros(9, dtype=int)) == pytest.approx(4 / 9)


def test_matched_correct_agrees_with_accuracy_on_random_labels():
    rng = np.random.default_rng(2)
    for k_pred, k_true in ((2, 4), (4, 2), (3, 3), (1, 3)):
        pred, truth = rng.integers(0, k_pred, 500), rng.integers(0, k_true, 500)
        assert matched_correct(pred, truth).mean() == pytest.approx(accuracy(pred, truth))
