"""The report's PNG figures (matplotlib), for a look at a run without a browser: report_cones.png,
report_sphere.png, report_confidence.png and report_maps.png."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from relion_graphsplit.files import atomic_path
from relion_graphsplit.report.colours import BALANCE_SCALE, CLASS_COLOURS
from relion_graphsplit.report.data import (
    class_of_component,
    confidence_histograms,
    histogram,
    map_rows,
    mixture_curves,
    resolution_label,
    rho_by_cone,
)
from relion_graphsplit.report.read import FSC_THRESHOLD, Run


def write_figures(run: Run) -> list[Path]:
    """Write the PNG figures of a run into its folder.

    Parameters
    ----------
    run : Run
        The finished run; the figures go into run.out.

    Returns
    -------
    list[Path]
        report_cones.png, report_sphere.png, report_confidence.png (with run_data.star's particle
        confidence) and report_maps.png (with class maps), each written whole or not at all.
    """
    out = run.out
    paths = [cones_png(run, out / "report_cones.png"), sphere_png(run, out / "report_sphere.png")]
    if run.particles is not None:
        paths.append(confidence_png(run, out / "report_confidence.png"))
    if run.maps is not None:
        paths.append(maps_png(run, out / "report_maps.png"))
    return paths


def cones_png(run: Run, path: Path) -> Path:
    """A grid of up to 12 cones' rho histograms with the fitted mixture, from the best separated to
    the worst; returns `path`."""
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
        k1, k2 = class_of_component(int(row["sign"]))
        ax.plot(x, n1 + n2, color="#555555", linestyle="--", linewidth=1, label="mixture")
        ax.plot(x, n1, color=CLASS_COLOURS[k1], label=f"→ class {k1}")
        ax.plot(x, n2, color=CLASS_COLOURS[k2], label=f"→ class {k2}")
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
    """The cone axes (Mollweide: longitude rot, latitude 90 - tilt) coloured by class balance and by
    particle count; returns `path`."""
    cones = run.cones
    axes = cones[["axis_x", "axis_y", "axis_z"]].to_numpy(np.float64)
    lon, lat = np.arctan2(axes[:, 1], axes[:, 0]), np.arcsin(np.clip(axes[:, 2], -1, 1))
    fig = Figure(figsize=(12, 3.8))
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.08, top=0.9, wspace=0.1)
    balance = LinearSegmentedColormap.from_list("balance", [c for _, c in BALANCE_SCALE])
    fraction = cones["class1_fraction"].to_numpy(np.float64)
    for i, (values, title, cmap, norm) in enumerate((
        (fraction, "class-1 fraction per cone", balance, TwoSlopeNorm(0.5, 0.0, 1.0)),
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
    """Histograms of the particles' posterior and score, stacked by class; returns `path`."""
    fig = Figure(figsize=(10, 3.5))
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.1, top=0.91, wspace=0.2)
    for i, (title, hist) in enumerate(confidence_histograms(run)):
        ax = fig.add_subplot(1, 2, i + 1)
        base = 0
        for k, (edges, counts) in hist.items():
            ax.stairs(base + counts, edges, baseline=base, fill=True, color=CLASS_COLOURS[k], label=f"class {k}")
            base = base + counts
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("particles")
        ax.legend(frameon=False)
    return _save(fig, path)


def maps_png(run: Run, path: Path) -> Path:
    """The class maps' FSC curves (against spatial frequency, 1/A) and central sections of both maps
    and of their difference; returns `path`. Needs run.maps."""
    first = 1 if run.fsc else 0
    fig = Figure(figsize=(5.5 * first + 7.5, 7.5))
    grid = fig.add_gridspec(3, 3 + first, width_ratios=[1.6] * first + [1, 1, 1], left=0.06, right=0.99,
                            bottom=0.07, top=0.96, wspace=0.15, hspace=0.2)
    if run.fsc:
        ax = fig.add_subplot(grid[:, 0])
        for k, curve in run.fsc.items():
            label = resolution_label(curve)
            ax.plot(curve.frequency, curve.fsc, color=CLASS_COLOURS[k],
                    label=f"class {k}" + (f" ({label})" if label else ""))
        ax.axhline(FSC_THRESHOLD, color="#888888", linestyle="--", linewidth=1)
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("FSC")
        ax.set_title("gold-standard FSC", fontsize=10)
        ax.legend(frameon=False)
    for r, (label, slices, lo, hi, cmap) in enumerate(map_rows(run.maps)):
        for c, (plane, image) in enumerate(zip(("xy", "xz", "yz"), slices)):
            sub = fig.add_subplot(grid[r, c + first])
            sub.imshow(image, cmap=cmap or "gray", vmin=lo, vmax=hi, interpolation="nearest")
            sub.set_xticks([])
            sub.set_yticks([])
            sub.set_title(f"{label}, {plane}", fontsize=9)
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
