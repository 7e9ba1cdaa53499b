"""The tree of splits on a stand-in for the images: particles as points in a plane of map space.

Each particle is its state's point plus Gaussian noise; a "map" is a point of the plane written as a
combination of two fixed volumes, so the split test's statistics run as in the program. The stand-in
splits a set in two along its widest direction and refines by nearest class mean: enough to check
which splits the tree keeps, that classes a split cut in two are merged, and the verdicts.
"""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from relion_graphsplit.method.hierarchy import NO_SPLIT_VERDICT, find_classes
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.method.refine import Refined
from relion_graphsplit.method.two_classes import TwoClasses

BOX = 8
NOISE = 1.0


def _basis() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.standard_normal((2, BOX, BOX, BOX))).to(torch.float64)


@dataclass
class PlaneSplitter:
    """The Splitter's interface over points x (n, 2) in the plane spanned by `basis` (2 volumes)."""

    x: np.ndarray
    options: SplitOptions
    basis: torch.Tensor
    refines: bool = True
    timings: dict | None = None
    pixel_size: float = 4.0
    local_refinements: list = field(default_factory=list)  # `local` of each refine from find_classes
    local_maps: list = field(default_factory=list)  # `local` of each class_maps call

    @property
    def mask(self) -> torch.Tensor:
        return torch.ones(BOX, BOX, BOX, dtype=torch.float64)

    def _volume(self, point: np.ndarray) -> torch.Tensor:
        return point[0] * self.basis[0] + point[1] * self.basis[1]

    def _point(self, volume: torch.Tensor) -> np.ndarray:
        gram = torch.einsum("aijk,bijk->ab", self.basis, self.basis)
        return torch.linalg.solve(gram, torch.einsum("aijk,ijk->a", self.basis, volume)).numpy()

    def refine(self, rows: np.ndarray, classes: np.ndarray, rounds: int | None = None, local: bool = False) -> Refined:
        self.local_refinements.append(local)
        return self._refine(rows, classes)

    def _refine(self, rows: np.ndarray, classes: np.ndarray) -> Refined:
        for _ in range(20):
            means = np.stack([self.x[rows][classes == k].mean(axis=0) for k in range(1, classes.max() + 1)])
            distance = ((self.x[rows][:, None, :] - means[None]) ** 2).sum(-1)
            log_posterior = -distance / (2 * NOISE**2)
            log_posterior -= np.logaddexp.reduce(log_posterior, axis=1, keepdims=True)
            classes = np.argmax(log_posterior, axis=1) + 1
        return Refined(log_posterior, [], self.mask)

    def held_out(self, rows: np.ndarray, probability: np.ndarray, mask: torch.Tensor) -> np.ndarray:
        log_posterior = np.empty_like(probability)
        for half in range(2):  # each half's points against the other half's class means
            other, own = rows % 2 != half, rows % 2 == half
            weights = probability[other] / probability[other].sum(axis=0)
            means = weights.T @ self.x[rows[other]]
            distance = ((self.x[rows[own]][:, None, :] - means[None]) ** 2).sum(-1)
            log_posterior[own] = -distance / (2 * NOISE**2) + np.log(probability.mean(axis=0))
        return log_posterior - np.logaddexp.reduce(log_posterior, axis=1, keepdims=True)

    def split(self, rows: np.ndarray, rounds: int | None = None, graph=None) -> TwoClasses:
        centred = self.x[rows] - self.x[rows].mean(axis=0)
        axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
        start = np.where(centred @ axis >= 0, 1, 2)
        return TwoClasses(rows, self._refine(rows, start).log_posterior, [], self.mask)  # a graph split's start

    def class_maps(
        self, rows: np.ndarray, probability: np.ndarray, mask: torch.Tensor, local: bool = False
    ) -> list[torch.Tensor]:
        self.local_maps.append(local)
        weights = probability / probability.sum(axis=0)
        return [self._volume(weights[:, k] @ self.x[rows]) for k in range(probability.shape[1])]

    def difference(self, split: TwoClasses) -> torch.Tensor:
        first, second = self.class_maps(split.rows, np.exp(split.log_posterior), self.mask)
        return first - second

    def scores(self, rows: np.ndarray, direction: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        d = self._point(direction)
        norm = float(d @ d)
        return self.x[rows] @ d / norm, np.full(len(rows), NOISE**2 / norm)


def _classes(states: list[tuple[float, float]], counts: list[int], seed: int = 0, **options):
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(states)), counts)
    x = np.asarray(states)[truth] + NOISE * rng.standard_normal((len(truth), 2))
    splitter = PlaneSplitter(x, SplitOptions(**options), _basis())
    halves = rng.integers(1, 3, len(truth))
    return find_classes(splitter, None, halves), truth


def _purity(classes: np.ndarray, truth: np.ndarray) -> float:
    return sum(np.bincount(truth[classes == k]).max() for k in np.unique(classes)) / len(truth)


def test_one_state_is_one_class():
    found, _ = _classes([(0.0, 0.0)], [4000])
    assert found.n_classes == 1 and found.verdict == NO_SPLIT_VERDICT
    assert [t.node for t in found.tests] == ["1"] and not found.tests[0].kept


def test_a_failed_first_direction_skips_the_second_half_split():
    """Both held-out gains must pass, so where half 1's split shows one mode in half 2 the test fails
    without learning half 2's split: one split learnt, the second gain and the FSC not measured."""
    rng = np.random.default_rng(0)
    splitter = PlaneSplitter(rng.standard_normal((4000, 2)), SplitOptions(), _basis())
    learnt = []
    split = splitter.split
    splitter.split = lambda rows, rounds=None, graph=None: learnt.append(len(rows)) or split(rows, rounds, graph)
    halves = rng.integers(1, 3, 4000)
    found = find_classes(splitter, None, halves)
    (test,) = found.tests
    assert learnt == [int((halves == 1).sum())]
    assert not test.kept and test.gain[0] <= test.threshold and np.isnan(test.gain[1]) and test.fsc is None
    assert test.reason == "one mode in held-out half 2" and test.as_dict()["gain"] == [test.gain[0], None]


def test_three_separated_states_are_three_classes():
    found, truth = _classes([(0.0, 0.0), (6.0, 0.0), (0.0, 6.0)], [2000, 1500, 1500])
    assert found.n_classes == 3
    assert _purity(found.classes, truth) > 0.97
    kept = [t.node for t in found.tests if t.kept]
    assert kept[0] == "1" and len([t for t in kept if "+" not in t]) == 2


def test_only_the_classes_found_are_refined_with_local_weights():
    """The local weighting of the class maps is for classes already found: every refinement
    find_classes starts itself (a kept split's, all classes') and the maps it compares for a merge
    use it; the directions of the tests, from the half-sets' own splits, do not."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), [2000, 1500, 1500])
    x = np.asarray([(0.0, 0.0), (6.0, 0.0), (0.0, 6.0)])[truth] + NOISE * rng.standard_normal((len(truth), 2))
    splitter = PlaneSplitter(x, SplitOptions(), _basis())
    found = find_classes(splitter, None, rng.integers(1, 3, len(truth)))
    assert found.n_classes == 3
    assert len(splitter.local_refinements) >= 3 and all(splitter.local_refinements)
    assert True in splitter.local_maps and False in splitter.local_maps
    measured = [t for t in found.tests if "the test of" not in t.reason]  # not a kept split's test again
    assert splitter.local_maps.count(False) == sum(len([g for g in t.gain if g == g]) for t in measured)


def test_a_state_cut_in_two_is_merged_back():
    """Three states on a line: the first split may cut the middle one; its two halves then form the
    closest pair, whose union shows one mode and is merged."""
    found, truth = _classes([(-6.0, 0.0), (0.0, 0.0), (6.0, 0.0)], [1500, 3000, 1500], seed=3)
    assert found.n_classes == 3
    assert _purity(found.classes, truth) > 0.97
    merges = [t for t in found.tests if "+" in t.node]
    assert not merges[0].kept and "merged" in found.verdict  # the middle state's two halves
    assert merges[-1].kept  # then the closest pair is two states


def test_a_kept_split_is_not_tested_again_as_a_union():
    """Four states on a rectangle's corners: the tree splits the long side, then each short side. The
    closest pair is then the two classes of one kept split: their union is that split's node again,
    and keeps its test instead of learning the half-sets' splits anew."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 1500)
    x = np.asarray([(0.0, 0.0), (4.0, 0.0), (0.0, 12.0), (4.0, 12.0)])[truth] + NOISE * rng.standard_normal((6000, 2))
    splitter = PlaneSplitter(x, SplitOptions(), _basis())
    learnt = []
    split = splitter.split
    splitter.split = lambda rows, rounds=None, graph=None: learnt.append(len(rows)) or split(rows, rounds, graph)
    found = find_classes(splitter, None, rng.integers(1, 3, 6000))
    assert found.n_classes == 4 and _purity(found.classes, truth) > 0.97
    *tree, union = found.tests
    assert sorted(t.node for t in tree) == ["1", "1.1", "1.2"] and all(t.kept for t in tree)
    earlier = next(t for t in tree if t.node == union.node.split("+")[0].rpartition(".")[0])
    assert union.kept and union.gain == earlier.gain and f"the test of {earlier.node}" in union.reason
    assert len(learnt) == 2 * len(tree)  # the tree's half-set splits only


@pytest.mark.parametrize("asked", [1, 2, 3])
def test_k_given_is_k_untested(asked):
    found, _ = _classes([(0.0, 0.0)], [3000], n_classes=asked)
    assert found.n_classes == asked and found.tests == []
    assert found.verdict.startswith("1 class," if asked == 1 else f"{asked} classes,") and "as asked" in found.verdict


def test_max_k_bounds_the_tree():
    found, _ = _classes([(0.0, 0.0), (6.0, 0.0), (0.0, 6.0)], [2000, 1500, 1500], max_classes=2)
    assert found.n_classes == 2
    found, _ = _classes([(0.0, 0.0), (6.0, 0.0)], [2000, 2000], max_classes=1)
    assert found.n_classes == 1 and found.tests == [] and "allows no split" in found.verdict


def test_without_the_refinement_two_classes_untested():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 2))
    splitter = PlaneSplitter(x, SplitOptions(), _basis(), refines=False)
    found = find_classes(splitter, None, rng.integers(1, 3, 2000))
    assert found.n_classes == 2 and found.tests == [] and "untested" in found.verdict and found.warnings


@pytest.mark.parametrize("states", [[(0.0, 0.0), (2.5, 0.0)], [(0.0, 0.0), (3.0, 0.0), (0.0, 3.0)]])
def test_classes_from_the_refinement_and_probabilities_held_out(states):
    """Overlapping states: the classes are the last refinement's, the posteriors the held-out pass's
    over the same probabilities (each half's points against the other half's means)."""
    found, _ = _classes(states, [2000] * len(states), n_classes=len(states))
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(len(states)), 2000)
    x = np.asarray(states)[truth] + NOISE * rng.standard_normal((len(truth), 2))
    splitter = PlaneSplitter(x, SplitOptions(n_classes=len(states)), _basis())
    everyone = np.arange(len(truth))
    if len(states) == 2:
        refined = splitter.split(everyone).log_posterior
    else:
        refined = splitter.refine(everyone, found.classes).log_posterior
    assert np.array_equal(found.classes, np.argmax(refined, axis=1) + 1)
    held_out = splitter.held_out(everyone, np.exp(refined), splitter.mask)
    np.testing.assert_allclose(found.log_posterior, held_out)
    assert 0 < np.mean(np.argmax(held_out, axis=1) + 1 != found.classes) < 0.1  # they can differ
