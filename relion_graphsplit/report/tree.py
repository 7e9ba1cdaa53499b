"""The tree of the splits a run tested: its nodes with their evidence, and the tree as an HTML list.

A run splits the whole set (node "1") into two, then tests each side (nodes "1.1" and "1.2"), and so
on: the children of node X are X.1 and X.2. A split is kept when it is reproduced on independent
half sets (run_summary.json's split_tests); each leaf of the kept tree is a class (its "classes").
With three classes or more, the union of the two most similar classes X and Y is tested too (node
"X+Y"); where it fails, they are merged into one class, a leaf at both nodes.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from relion_graphsplit.report.colours import class_colour
from relion_graphsplit.report.data import fixed
from relion_graphsplit.report.read import Run


@dataclass(frozen=True)
class SplitNode:
    """One node of the split tree.

    node: its name ("1", "1.2", ...); depth: 0 for the root; test: its entry of run_summary.json's
    split_tests (particles, halves, gain, threshold, fsc, kept, reason), None where it was not
    tested; leaf_class: the class it became (1..K) where it is a leaf of the kept tree, else None;
    children: the names of its children in the tree, in order.
    """

    node: str
    depth: int
    test: dict | None
    leaf_class: int | None
    children: tuple[str, ...]

    @property
    def state(self) -> str:
        """The split test's outcome, "kept" or "rejected"; "untested" where the node was not tested."""
        return "untested" if self.test is None else "kept" if self.test["kept"] else "rejected"


def split_tree(run: Run) -> dict[str, SplitNode]:
    """The split tree of a run, from run_summary.json's split_tests and classes.

    Parameters
    ----------
    run : Run
        The finished run.

    Returns
    -------
    dict[str, SplitNode]
        Node name -> node, parents before children and siblings in order (1.1 before 1.2), holding
        every node tested, every class's leaf and their ancestors; empty for runs that record
        neither (runs of earlier versions).
    """
    tests = {str(t["node"]): t for t in run.summary.get("split_tests") or [] if "+" not in str(t["node"])}
    # A merged class ("X+Y") is a leaf at each of the nodes it joins.
    leaves = {node: int(c["class"]) for c in run.summary.get("classes") or [] for node in str(c["node"]).split("+")}
    names = set()
    for name in [*tests, *leaves]:
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    ordered = sorted(names, key=lambda n: [int(p) for p in n.split(".")])
    return {
        n: SplitNode(n, n.count("."), tests.get(n), leaves.get(n),
                     tuple(c for c in ordered if c.rpartition(".")[0] == n))
        for n in ordered
    }


def classes_under(tree: dict[str, SplitNode], node: str) -> list[int]:
    """The classes (sorted) of the leaves at or below `node`; empty when none is."""
    return sorted(t.leaf_class for n, t in tree.items() if (n == node or n.startswith(node + ".")) and t.leaf_class)


def side_labels(run: Run) -> dict[int, str]:
    """What sides 1 and 2 of the first split (the one run_cones.star and the cone images show) became.

    Parameters
    ----------
    run : Run
        The finished run.

    Returns
    -------
    dict[int, str]
        Side (1, 2) -> for example "1.1 (class 1)", "1.2 (classes 2, 3)", or "1.1 (split not kept)"
        when the first split was rejected (K = 1). Runs that record no tree and have two classes get
        "class 1" and "class 2".
    """
    tree = split_tree(run)
    if not tree and run.n_classes == 2:
        return {1: "class 1", 2: "class 2"}
    labels = {}
    for side in (1, 2):
        classes = classes_under(tree, f"1.{side}")
        if not classes:
            labels[side] = f"1.{side} (split not kept)"
        else:
            labels[side] = f"1.{side} (class{'es' if len(classes) > 1 else ''} {', '.join(map(str, classes))})"
    return labels


def _gain(value) -> float:
    """A held-out gain as written (None or nan where not measured) as a float, nan if not measured."""
    return float("nan") if value is None else float(value)


def _gain_passes(test: dict) -> list[bool]:
    """Whether each half's held-out gain exceeds the split's threshold (one not measured fails)."""
    threshold = float(test["threshold"])
    return [math.isfinite(_gain(g)) and _gain(g) > threshold for g in test["gain"]]


def evidence_text(test: dict) -> str:
    """One line of a tested node's evidence: particles, halves, both gains against the threshold, FSC.

    Parameters
    ----------
    test : dict
        The node's entry of split_tests.

    Returns
    -------
    str
        For example "6000 particles (3000 + 3000); gain 0.031 ✓ / 0.027 ✓ nats per particle (threshold
        0.010); FSC 0.62": gains and threshold to 3 decimals, ✓ above the threshold, ✗ not, "not
        measured" for a gain the test did not need; "FSC n/a" where it was not measured.
    """
    h1, h2 = (int(h) for h in test["halves"])
    gains = " / ".join(
        f"{fixed(_gain(g), 3)} {'✓' if ok else '✗'}" if math.isfinite(_gain(g)) else "not measured"
        for g, ok in zip(test["gain"], _gain_passes(test))
    )
    fsc = "n/a" if test.get("fsc") is None else fixed(float(test["fsc"]))
    return (f"{int(test['particles'])} particles ({h1} + {h2}); gain {gains} nats per particle "
            f"(threshold {fixed(float(test['threshold']), 3)}); FSC {fsc}")


def tree_html(run: Run) -> str:
    """The split tree as a nested HTML list (ul.tree), one li per node.

    Parameters
    ----------
    run : Run
        The finished run.

    Returns
    -------
    str
        Each li (class "kept", "rejected" or "untested", data-node its name) holds a div.node with the
        node's name, its evidence (`evidence_text`), whether the split was kept and why and, for a
        leaf, the class it became (in its colour) with its particle count; then its children's ul.
        "" when the run records no tree.
    """
    tree = split_tree(run)
    if not tree:
        return ""
    sizes = {int(c["class"]): int(c["particles"]) for c in run.summary.get("classes") or []}

    def item(name: str) -> str:
        node = tree[name]
        test = node.test
        parts = [f'<span class="node-name">{html.escape(name)}</span>']
        if test is None:
            parts.append('<span class="evidence">not tested</span>')
        else:
            parts.append(f'<span class="evidence">{html.escape(evidence_text(test))}</span>')
            verdict = "split kept" if test["kept"] else "split rejected"
            parts.append(f'<span class="decision">{verdict}: {html.escape(str(test["reason"]))}</span>')
        if node.leaf_class is not None:
            size = sizes.get(node.leaf_class)
            parts.append(f'<span class="leaf" style="color:{class_colour(node.leaf_class)}">→ class {node.leaf_class}'
                         + (f" ({size} particles)" if size is not None else "") + "</span>")
        children = "".join(item(c) for c in node.children)
        return (f'<li class="{node.state}" data-node="{html.escape(name)}"><div class="node">{" ".join(parts)}</div>'
                + (f"<ul>{children}</ul>" if children else "") + "</li>")

    roots = [n for n, node in tree.items() if node.depth == 0]
    merges = "".join(
        f'<li class="{"kept" if t["kept"] else "rejected"}" data-node="{html.escape(str(t["node"]))}"><div class="node">'
        f'<span class="node-name">{html.escape(str(t["node"]))}</span> '
        f'<span class="evidence">{html.escape(evidence_text(t))}</span> '
        f'<span class="decision">{"kept apart" if t["kept"] else "merged"}: {html.escape(str(t["reason"]))}</span></div></li>'
        for t in run.summary.get("split_tests") or [] if "+" in str(t["node"])
    )  # fmt: skip
    merge_list = ""
    if merges:
        merge_list = f'<p>The union of the two most similar classes, tested as a split:</p><ul class="tree">{merges}</ul>'
    return f'<ul class="tree" id="split-tree">{"".join(item(r) for r in roots)}</ul>{merge_list}'
