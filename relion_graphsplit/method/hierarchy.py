"""How many classes: the split in two applied again to each class, each split tested on half-sets.

With K chosen automatically, the largest class not yet tested is split on each of its half-sets alone
and the split kept only where it passes `gold_standard` (several modes in the held-out half, both
ways); a kept split divides the class by the halves' two splits, labels matched and refined together
on all its particles, and both new classes are tested in turn, up to max_classes. With K given, the
largest class is split, untested, until there are K. Then every particle is classified against all K
class maps at once (`refine.refine_classes`: soft assignments, class priors, the halves' maps kept
apart for the FSC weighting), started from the tree. With K chosen automatically and three classes or
more, the union of the two most similar classes is then tested as a split, after a few rounds
(TEST_ROUNDS) of that refinement; where it fails the test, the two are merged (node "X+Y") and the
test repeated on the new classes; a union that is a kept split's node again (but for SAME_PARTICLES)
keeps that split's test. The refinement's full rounds run once, on the classes that stand.
Last, the posteriors are held out: each half's particles scored against the class maps of the other
half (`refine.held_out_posterior`); the classes stay those of the refinement against the whole set's maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.special import logsumexp

from relion_graphsplit.method.gold_standard import (
    MIN_HALF_PARTICLES,
    TEST_ROUNDS,
    SplitTest,
    bimodality_gain,
    difference_fsc,
    threshold_for,
)
from relion_graphsplit.method.two_classes import Graph, Splitter, TwoClasses

SAME_PARTICLES = 0.01
"""A union of two classes whose particles are those of a split already kept, but for at most this
fraction of them, is not tested again: that split's test stands (the joint refinement moves few
particles, and the union of a kept split's two classes is then its node again)."""

NO_SPLIT_VERDICT = (
    "No reproducible heterogeneity at this mask and resolution: one class. A mask focused on the region of "
    "interest may reveal a small difference."
)


@dataclass
class Classes:
    """The classes found for n particles.

    Attributes
    ----------
    classes : np.ndarray
        (n,) int64 1..K: the most probable class of the last refinement (against the whole set's maps).
    log_posterior : np.ndarray
        (n, K) float64 log posterior probability of each class, held out (`refine.held_out_posterior`)
        where the refinement ran; all 0 for K = 1. Where the two disagree (about 2-4% of the particles
        on the noisiest benchmark sets), another class is more probable than the one given.
    nodes : list of str
        The tree leaf of each class 1..K ("1" the whole set; the classes of node X are X.1 and X.2).
    tests : list of SplitTest
        Every split tested, in order.
    verdict : str
        One sentence for the user.
    changed : list of int
        Particles that changed class in each round of the final refinement.
    warnings : list of str
        Warnings for the user.
    """

    classes: np.ndarray
    log_posterior: np.ndarray
    nodes: list[str]
    tests: list[SplitTest] = field(default_factory=list)
    verdict: str = ""
    changed: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return self.log_posterior.shape[1]


def test_split(
    splitter: Splitter, node: str, parent: str | None, rows: np.ndarray, halves: np.ndarray
) -> tuple[SplitTest, np.ndarray | None]:
    """The split of `rows` learnt on each half-set alone and scored on the other (`gold_standard`).

    Half 1's split is learnt and scored on half 2 first. Both gains must exceed the threshold, so
    where that one does not, the test has failed and half 2's split is not learnt: the verdict of the
    full test at half its cost, with the second gain and the FSC of the halves' difference maps left
    unmeasured (nan and None).

    Parameters
    ----------
    splitter : Splitter
        The shared state of the splits.
    node, parent : str, str or None
        The tree node tested and its parent.
    rows : np.ndarray
        (m,) int64 the node's particles, ascending.
    halves : np.ndarray
        (n,) int64 every particle's half-set, 1 or 2.

    Returns
    -------
    SplitTest
        The evidence and verdict.
    start : np.ndarray or None
        Where the split is kept, (m,) int64 1 or 2: each row's class in its own half's split, the
        second half's labels matched to the first's (by the sign of the product of their difference
        maps), from which the whole node is refined; None otherwise.
    """
    parts = [rows[halves[rows] == h] for h in (1, 2)]
    sizes = (len(parts[0]), len(parts[1]))
    threshold = threshold_for(sizes)

    def verdict(kept: bool, reason: str, gain=(float("nan"), float("nan")), agreement=None) -> SplitTest:
        return SplitTest(node, parent, len(rows), sizes, tuple(gain), threshold, agreement, kept, reason)

    if min(sizes) < MIN_HALF_PARTICLES:
        return verdict(False, f"too few particles in a half-set (fewer than {MIN_HALF_PARTICLES})"), None
    splits: list[TwoClasses] = []
    directions: list[torch.Tensor] = []
    gain: list[float] = []
    for h in (0, 1):
        try:
            split = splitter.split(parts[h], rounds=TEST_ROUNDS)
        except ValueError:  # every cone too sparse
            return verdict(False, "a half-set too sparse to split", _padded(gain)), None
        if np.bincount(split.classes, minlength=3)[1:].min() < 0.01 * len(split.rows):
            return verdict(False, "a half-set's split ended with one class", _padded(gain)), None
        splits.append(split)
        directions.append(splitter.difference(split))
        gain.append(bimodality_gain(*splitter.scores(parts[1 - h], directions[h])))
        if gain[h] <= threshold:  # both gains must pass: half 2's split is not learnt where half 1's fails
            break
    agreement = abs(difference_fsc(*directions, splitter.mask, splitter.pixel_size)) if len(directions) == 2 else None
    if min(gain) <= threshold:
        reason = "one mode in held-out half 2" if len(gain) == 1 else "several modes in held-out half 2 only"
        return verdict(False, reason, _padded(gain), agreement), None
    start = np.zeros(len(rows), dtype=np.int64)
    same = float((directions[0] * directions[1]).sum()) >= 0
    for part, split, first in zip(parts, splits, (True, False)):
        start[np.searchsorted(rows, part)] = split.classes if first or same else 3 - split.classes
    return verdict(True, "several modes in each held-out half", gain, agreement), start


def _kept_before(
    node: str, rows: np.ndarray, tests: list[SplitTest], members: dict[str, np.ndarray]
) -> SplitTest | None:
    """The test of a tree node's split kept earlier (`tests`, the nodes' particles in `members`) whose
    particles were `rows` but for at most SAME_PARTICLES of them, as the test of `node`; None if there
    is none."""
    for test in tests:
        if not test.kept or test.node not in members:  # a union's test: its particles are not kept
            continue
        differ = len(np.setxor1d(rows, members[test.node], assume_unique=True))
        if differ <= SAME_PARTICLES * len(rows):
            return replace(test, node=node, parent=None, reason=f"{test.reason}: the test of {test.node}, "
                           f"whose particles these are but {differ}")  # fmt: skip
    return None


def _padded(gain: list[float]) -> tuple[float, float]:
    """The held-out gains measured so far, nan for those not measured."""
    return tuple([*gain, float("nan"), float("nan")][:2])


def _drop_empty(log_posterior: np.ndarray, leaves: list[str], warnings: list[str]) -> tuple[np.ndarray, list[str]]:
    """Classes that no particle is most likely to be in, removed (posteriors renormalised)."""
    kept = np.flatnonzero(np.bincount(np.argmax(log_posterior, axis=1), minlength=len(leaves)))
    if len(kept) == len(leaves):
        return log_posterior, leaves
    warnings.append(f"{len(leaves) - len(kept)} class(es) lost every particle in the refinement of all classes")
    kept_log = log_posterior[:, kept]
    return kept_log - logsumexp(kept_log, axis=1, keepdims=True), [leaves[i] for i in kept]


def _closest_pair(maps: list[torch.Tensor], mask: torch.Tensor) -> tuple[int, int]:
    """The indices i < j of the two most similar maps (least squared difference within `mask`)."""
    pairs = [(i, j) for i in range(len(maps)) for j in range(i + 1, len(maps))]
    return min(pairs, key=lambda p: float((((maps[p[0]] - maps[p[1]]) * mask) ** 2).sum()))


def find_classes(splitter: Splitter, graph: Graph | None, halves: np.ndarray) -> Classes:
    """The classes of all particles: the tree of splits, then one refinement against every class map.

    Parameters
    ----------
    splitter : Splitter
        The shared state; its options give n_classes (None: automatic) and max_classes.
    graph : Graph or None
        The graph split of all particles (rows 0..n - 1), the start of the whole set's split with K
        given (a tested split starts from its halves' splits instead); None: made when needed.
    halves : np.ndarray
        (n,) int64 every particle's half-set, 1 or 2.

    Returns
    -------
    Classes
    """
    options = splitter.options
    n = len(halves)
    everyone = np.arange(n, dtype=np.int64)
    members = {"1": everyone}
    splits: dict[str, TwoClasses] = {}
    leaves = ["1"]
    tests: list[SplitTest] = []
    warnings: list[str] = []
    wanted = options.n_classes or options.max_classes
    automatic = options.n_classes is None
    if automatic and not splitter.refines:
        warnings.append("the split cannot be tested without the refinement (--ctf_correction subtract-multiply, "
                        "unpremultiplied particles): two classes, untested")  # fmt: skip
        automatic, wanted = False, 2
    untested = ["1"]
    while untested and len(leaves) < wanted:
        node = max(untested, key=lambda x: (len(members[x]), x))
        untested.remove(node)
        if automatic:
            parent = node.rpartition(".")[0] or None
            test, start = test_split(splitter, node, parent, members[node], halves)
            tests.append(test)
            if not test.kept:
                continue
            # The halves' splits, each learnt alone, are refined together: no graph of the whole node.
            refined = splitter.refine(members[node], start, local=True)
            splits[node] = TwoClasses(members[node], refined.log_posterior, refined.changed, refined.mask)
        else:
            try:
                splits[node] = splitter.split(members[node], graph=graph if node == "1" else None)
            except ValueError as err:
                warnings.append(f"class {node} could not be split: {err}")
                continue
        split = splits[node]
        children = [split.rows[split.classes == k] for k in (1, 2)]
        if min(len(c) for c in children) == 0:
            warnings.append(f"the split of node {node} left a class empty")
            continue
        leaves.remove(node)
        for k, child in enumerate(children, start=1):
            members[f"{node}.{k}"] = child
            leaves.append(f"{node}.{k}")
            untested.append(f"{node}.{k}")
    if options.n_classes and len(leaves) < options.n_classes:
        warnings.append(f"{options.n_classes} classes were asked for; {len(leaves)} were found")
    leaves.sort(key=lambda x: [int(part) for part in x.split(".")])
    classes = np.zeros(n, dtype=np.int64)
    for k, node in enumerate(leaves, start=1):
        classes[members[node]] = k
    changed: list[int] = []
    mask = splitter.mask
    if len(leaves) == 1:
        log_posterior = np.zeros((n, 1))
    elif len(leaves) == 2:
        log_posterior, changed, mask = splits["1"].log_posterior, splits["1"].changed, splits["1"].mask
    elif splitter.refines:
        merging = automatic  # whether the closest pair is still to be tested
        while True:
            # While pairs may still merge, a few rounds place the classes well enough to test them:
            # the full rounds are spent once, on the classes that stand.
            testing = merging and len(leaves) >= 3
            refined = splitter.refine(everyone, classes, rounds=TEST_ROUNDS if testing else None, local=True)
            log_posterior, changed, mask = refined.log_posterior, refined.changed, refined.mask
            log_posterior, leaves = _drop_empty(log_posterior, leaves, warnings)
            classes = np.argmax(log_posterior, axis=1) + 1
            if not testing:
                break
            # A state the tree cut in two (a continuum's middle, say) gives two classes whose union
            # is one mode: test the closest pair's union as a split, and merge it where it fails.
            maps = splitter.class_maps(everyone, np.exp(log_posterior), splitter.mask, local=True)
            i, j = _closest_pair(maps, splitter.mask)
            union = everyone[(classes == i + 1) | (classes == j + 1)]
            name = f"{leaves[i]}+{leaves[j]}"
            test = _kept_before(name, union, tests, members) or test_split(splitter, name, None, union, halves)[0]
            tests.append(test)
            if test.kept:
                merging = False
                continue
            classes = np.where(classes == j + 1, i + 1, classes)
            classes = np.where(classes > j + 1, classes - 1, classes)
            leaves = [f"{leaves[i]}+{leaves[j]}" if x == i else leaf for x, leaf in enumerate(leaves) if x != j]
    else:  # no refinement: the tree's classes, certain
        log_posterior = np.log(np.eye(len(leaves))[classes - 1].clip(1e-300))
    classes = np.argmax(log_posterior, axis=1) + 1
    if len(leaves) >= 2 and splitter.refines:
        log_posterior = splitter.held_out(everyone, np.exp(log_posterior), mask)
    verdict = _verdict(len(leaves), tests, asked=options.n_classes is not None, tested=automatic)
    return Classes(classes, log_posterior, leaves, tests, verdict, changed, warnings)


def _verdict(k: int, tests: list[SplitTest], asked: bool, tested: bool) -> str:
    """One sentence on the number of classes and how it was reached."""
    classes = "1 class" if k == 1 else f"{k} classes"
    if asked:
        return f"{classes}, as asked for with --K (splits not tested)."
    if not tested:
        return f"{classes}, untested: the test of splits needs the refinement against the class maps."
    if not tests:
        return f"{classes}: --max_K allows no split."
    if k == 1:
        return NO_SPLIT_VERDICT
    merged = sum(1 for test in tests if "+" in test.node and not test.kept)
    verdict = f"{classes}: each split kept shows several modes in both held-out half-sets."
    if merged:
        verdict += f" {merged} pair(s) of classes merged: their union showed one mode."
    return verdict
