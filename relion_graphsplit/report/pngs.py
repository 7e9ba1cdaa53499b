"""The report's PNG figures (matplotlib), for a look at a run without a browser: report_tree.png,
report_cones.png, report_sphere.png, report_confidence.png and report_maps.png."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from relion_graphsplit.files import atomic_path
from relion_graphsplit.report.colours import BALANCE_SCALE, DIFFERENCE_CMAP, SIDE_COLOURS, class_colour
from relion_graphsplit.report.data import (
    confidence_histograms,
    histogram,
    mixture_curves,
    resolution_label,
    rho_by_cone,
    side_of_component,
)
from relion_graphsplit.report.read import FSC_THRESHOLD, Run
from relion_graphsplit.report.sections import PLANES, map_sections
from relion_graphsplit.report.tree import evidence_text, side_labels, split_tree


def write_figures(run: Run) -> list[Path]:
    """Write the PNG figures of a run into its folder.

    Parameters
    ----------
    run : Run
        The finished run; the figures go into run.out.

    Returns
    -------
    list[Path]
        report_tree.png (where the run records its split tree), report_cones.png, report_sphere.png,
        report_confidence.png (with run_data.star's particle confidence) and report_maps.png (with
        class maps), each written whole or not at all.
    """
    out = run.out
    paths = [tree_png(run, out / "report_tree.png")] if split_tree(run) else []
    paths += [cones_png(run, out / "report_cones.png"), sphere_png(run, out / "report_sphere.png")]
    if run.particles is not None:
        paths.append(confidence_png(run, out / "report_confidence.png"))
    if run.maps is not None:
        paths.append(maps_png(run, out / "report_maps.png"))
    return paths


def tree_png(run: Run, path: Path) -> Path:
    """The split tree (`tree.split_tree`): each node a box with its evidence (`tree.evidence_text`),
    green where the split was kept, red where it was rejected, grey where it was not tested, and
    its class for a leaf (box edge in the class's colour); returns `path`."""
    tree = split_tree(run)
    leaf_names = [n for n, t in tree.items() if not t.children]  # in the tree's order: left to right
    x = {n: float(i) for i, n in enumerate(leaf_names)}
    for name in reversed(tree):  # children before parents
        if tree[name].children:
            x[name] = float(np.mean([x[c] for c in tree[name].children]))
    depth = max(t.depth for t in tree.values())
    leaves = len(leaf_names)
    fig = Figure(figsize=(max(4.0, 3.3 * leaves), 2.0 * (depth + 1)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.5, leaves - 0.5)
    ax.set_ylim(-depth - 0.5, 0.5)
    ax.set_axis_off()
    for name, node in tree.items():
        for child in node.children:
            ax.plot([x[name], x[child]], [-node.depth, -node.depth - 1], color="#999999", zorder=1)
    fills = {"kept": "#e6f4ea", "rejected": "#fbe3e0", "untested": "#eeeeee"}
    for name, node in tree.items():
        test = node.test
        lines = [f"node {name}"]
        lines += ["not tested"] if test is None else [*evidence_text(test).split("; "), f"{node.state}: {test['reason']}"]
        if node.leaf_class is not None:
            lines.append(f"→ class {node.leaf_class}")
        edge = class_colour(node.leaf_class) if node.leaf_class is not None else "#777777"
        ax.text(x[name], -node.depth, "\n".join(lines), ha="center", va="center", fontsize=7, zorder=2,
                bbox=dict(boxstyle="round", facecolor=fills[node.state], edgecolor=edge, linewidth=2))
    return _save(fig, path)


def cones_png(run: Run, path: Path) -> Path:
    """A grid of up to 12 cones' rho histograms with the fitted mixture, from the best separated to
    the worst, each component labelled with the side of the first split it goes to; returns `path`."""
    sides = side_labels(run)
    rho = rho_by_cone(run)
    shown = _shown_cones(run.cones)
    cols = 4
    rows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(3.2 * cols, 2.5 * rows))
    spacing = dict(left=0.05, right=0.99, bottom=0.5 / (2.5 * rows), top=1 - 0.3 / (2.5 * rows), hspace=0.55, wspace=0.3)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=spacing).ravel()
    for ax, (_, row) in zip(axes, shown.iterrows()):
        values = rho.get(int(row["cone"]), np.zeros(0))
        edges, density = histogram(values)
        ax.stairs(density, edges, fill=True, color="#bbbbbb")
        x = np.linspace(edges[0], edges[-1], 200)
        n1, n2 = mixture_curves(row, x)
        s1, s2 = side_of_component(int(row["sign"]))
        ax.plot(x, n1 + n2, color="#555555", linestyle="--", linewidth=1, label="mixture")
        ax.plot(x, n1, color=SIDE_COLOURS[s1], label=f"→ {sides[s1]}")
        ax.plot(x, n2, color=SIDE_COLOURS[s2], label=f"→ {sides[s2]}")
        ax.set_title(f"cone {int(row['cone'])}: n={int(row['particles'])}, sep {row['separation']:.1f}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])  # a density: its scale says nothing the curves do not (and each tick costs a draw)
        ax.set_xlabel("rho", fontsize=8)
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    if len(shown):
        axes[0].legend(fontsize=7, frameon=False)
    return _save(fig, path)


def sphere_png(run: Run, path: Path) -> Path:
    """The cone axes (Mollweide: longitude rot, latitude 90 - tilt) coloured by their share on side 1
    of the first split and by particle count; returns `path`."""
    cones = run.cones
    axes = cones[["axis_x", "axis_y", "axis_z"]].to_numpy(np.float64)
    lon, lat = np.arctan2(axes[:, 1], axes[:, 0]), np.arcsin(np.clip(axes[:, 2], -1, 1))
    fig = Figure(figsize=(12, 3.8))
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.08, top=0.9, wspace=0.1)
    balance = LinearSegmentedColormap.from_list("balance", [c for _, c in BALANCE_SCALE])
    fraction = cones["class1_fraction"].to_numpy(np.float64)
    for i, (values, title, cmap, norm) in enumerate((
        (fraction, f"share on side {side_labels(run)[1]} per cone", balance, TwoSlopeNorm(0.5, 0.0, 1.0)),
        (cones["particles"].to_numpy(np.float64), "particles per cone", "viridis", None),
    )):
        ax = fig.add_subplot(1, 2, i + 1, projection="mollweide")
        known = np.isfinite(values)
        dots = ax.scatter(lon[known], lat[known], c=values[known], cmap=cmap, norm=norm,
                          vmin=None if norm else 0, s=40, edgecolors="#555555", linewidths=0.5)
        if not known.all():
            ax.scatter(lon[~known], lat[~known], marker="x", color="#999999", s=30, label="no particles")
            ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, color="#cccccc")
        ax.tick_params(labelsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rot (°)", fontsize=8)
        ax.set_ylabel("90° − tilt", fontsize=8)
        fig.colorbar(dots, ax=ax, shrink=0.7)
    return _save(fig, path)


def confidence_png(run: Run, path: Path) -> Path:
    """Histograms of the particles' confidence in their class (`data.confidence_histograms`), stacked
    by class; returns `path`."""
    panels = confidence_histograms(run)
    fig = Figure(figsize=(5 * len(panels), 3.5))
    fig.subplots_adjust(left=0.07 * 2 / len(panels), right=0.99, bottom=0.1, top=0.91, wspace=0.2)
    for i, (title, hist) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        base = 0
        for k, (edges, counts) in hist.items():
            ax.stairs(base + counts, edges, baseline=base, fill=True, color=class_colour(k), label=f"class {k}")
            base = base + counts
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("particles")
        ax.legend(frameon=False)
    return _save(fig, path)


def maps_png(run: Run, path: Path) -> Path:
    """The class maps' FSC curves (against spatial frequency, 1/A) and, one row per class, the central
    sections of its map, of the consensus and of the class minus the consensus
    (`sections.map_sections`; the class map alone when K = 1); returns `path`. Needs run.maps."""
    shown = map_sections(run)
    first = 1 if run.fsc else 0
    several = shown.classes[0].difference is not None
    cols = 3 * (3 if several else 1)
    rows = len(shown.classes)
    fig = Figure(figsize=(5.5 * first + 1.45 * cols, 1.6 * rows + 0.9))
    grid = fig.add_gridspec(rows, cols + first, width_ratios=[1.3 * cols / 3] * first + [1] * cols, left=0.04,
                            right=0.99, bottom=0.12 / rows, top=1 - 0.55 / (1.6 * rows + 0.9), wspace=0.08, hspace=0.25)
    if run.fsc:
        ax = fig.add_subplot(grid[:, 0])
        for k, curve in run.fsc.items():
            label = resolution_label(curve)
            ax.plot(curve.frequency, curve.fsc, color=class_colour(k), label=f"class {k}" + (f" ({label})" if label else ""))
        ax.axhline(FSC_THRESHOLD, color="#888888", linestyle="--", linewidth=1)
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("FSC")
        ax.set_title("gold-standard FSC", fontsize=10)
        ax.legend(frameon=False, fontsize=7)
    lo, hi = shown.grey
    for r, sections in enumerate(shown.classes):
        k = sections.k
        kinds = [(f"class {k}", sections.class_map, "gray", lo, hi)]
        if several:
            kinds += [("consensus", sections.consensus, "gray", lo, hi),
                      (f"{k} − consensus", sections.difference, DIFFERENCE_CMAP, -shown.limit, shown.limit)]
        for j, (label, images, cmap, vmin, vmax) in enumerate(kinds):
            for c, (plane, image) in enumerate(zip(PLANES, images)):
                sub = fig.add_subplot(grid[r, first + 3 * j + c])
                sub.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
                sub.set_xticks([])
                sub.set_yticks([])
                sub.set_title(f"{label}, {plane}", fontsize=8, color=class_colour(k) if j == 0 else "black")
    fig.suptitle(f"central sections low-pass filtered to {shown.resolution:.1f} Å"
                 + (", multiplied by run_mask.mrc" if shown.masked else "") + ("" if several else "; one class: no difference"),
                 fontsize=10)
    return _save(fig, path)


def _shown_cones(cones: pd.DataFrame, count: int = 12) -> pd.DataFrame:
    """Up to `count` cones spread over the range of separations, best first."""
    full = cones[cones["particles"] > 0].sort_values("separation", ascending=False, ignore_index=True)
    picks = np.unique(np.round(np.linspace(0, len(full) - 1, min(count, len(full)))).astype(int))
    return full.iloc[picks]


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path
