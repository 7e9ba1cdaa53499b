"""The report's warnings: the run's own, then those found in its tables."""

from __future__ import annotations

from pathlib import Path

from relion_graphsplit.report.read import Run, class_sizes, read_run

MIN_CONE_PARTICLES = 30
"""Cones holding fewer particles (but some) are warned about: their split is unreliable."""
MIN_SEPARATION = 2.0
"""Mixture separation (sigma) that at least one cone must exceed to show two populations."""
MIN_CLASS_SHARE = 0.1
"""Smallest share of the particles any class may hold (K >= 2) before the classes are called unbalanced."""


def computed_warnings(run: Run) -> dict[str, str]:
    """Warnings found in the run's tables.

    Parameters
    ----------
    run : Run
        The finished run (`read.read_run`).

    Returns
    -------
    dict[str, str]
        Key -> warning. Each key is a phrase that also names the warning in the summary's own
        warnings (run_summary.json), so that one already given by the run is not repeated.
    """
    cones, out = run.cones, {}
    counts = cones["particles"].to_numpy()
    few = int(((counts > 0) & (counts < MIN_CONE_PARTICLES)).sum())
    if few:
        out["fewer than"] = (f"{few} of {len(cones)} cones hold fewer than {MIN_CONE_PARTICLES} particles: "
                             "their split is unreliable")
    empty = int((counts == 0).sum())
    if empty:
        out["holes in the angular coverage"] = (f"{empty} of {len(cones)} cone directions hold no particle: "
                                                "holes in the angular coverage")
    parts = int(run.summary.get("graph_components") or cones["component"].nunique())
    if parts > 1:
        out["disconnected"] = (f"the cone graph has {parts} disconnected parts: their classes are synchronised "
                               "separately and may be swapped between parts")
    if not (cones["separation"] > MIN_SEPARATION).any():
        out["separated populations"] = (f"no cone shows two separated populations (mixture separation > "
                                        f"{MIN_SEPARATION:g} sigma): there may be no heterogeneity inside the mask")
    sizes = class_sizes(run)
    total = sum(sizes.values())
    if total and len(sizes) > 1:
        shares = [n / total for n in sizes.values()]
        if min(shares) < MIN_CLASS_SHARE:
            out["unbalanced"] = "very unbalanced classes: " + " / ".join(f"{100 * s:.1f}%" for s in shares)
    return out


def run_warnings(run: Run) -> list[str]:
    """The warnings the report shows.

    Parameters
    ----------
    run : Run
        The finished run.

    Returns
    -------
    list[str]
        The run's own warnings (run_summary.json), then those of `computed_warnings` that the run
        did not already give.
    """
    given = [str(w) for w in run.summary.get("warnings", [])]
    seen = " ".join(given).lower()
    return given + [text for key, text in computed_warnings(run).items() if key not in seen]


def report_warnings(out_dir: Path) -> list[str]:
    """`run_warnings` of the finished run in the folder `out_dir` (read anew from its files)."""
    return run_warnings(read_run(out_dir))
