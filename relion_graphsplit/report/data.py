"""What the report's figures draw, computed from a run: shared by the page, its plotly figures and
the PNG figures so that they show the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from relion_graphsplit.report.read import FSC_THRESHOLD, LOG_ODDS_LABEL, FscCurve, Run

MAX_HISTOGRAM_BINS = 60


def fixed(value: float, digits: int = 2) -> str:
    """`value` with `digits` decimals, or "n/a" when it is not finite."""
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def rho_by_cone(run: Run) -> dict[int, np.ndarray]:
    """Cone id -> the rho values (first principal component) of its particles, float64."""
    m = run.memberships
    return {int(c): g["rho"].to_numpy(np.float64) for c, g in m.groupby("cone")}


def histogram(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Density histogram of all of a cone's rho values.

    Parameters
    ----------
    rho : np.ndarray
        (n,) a cone's rho values, n > 0.

    Returns
    -------
    edges, density : np.ndarray
        (b + 1,) bin edges (numpy's "auto" bins, at most MAX_HISTOGRAM_BINS) and (b,) densities.
    """
    edges = np.histogram_bin_edges(rho, bins="auto")
    if len(edges) - 1 > MAX_HISTOGRAM_BINS:
        edges = np.linspace(rho.min(), rho.max(), MAX_HISTOGRAM_BINS + 1)
    density, edges = np.histogram(rho, bins=edges, density=True)
    return edges, density


def mixture_curves(row: pd.Series, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cone's two weighted mixture components at `x`.

    Parameters
    ----------
    row : pd.Series
        The cone's row of run_cones.star (mean1, mean2, sigma, weight1).
    x : np.ndarray
        Values of rho.

    Returns
    -------
    n1, n2 : np.ndarray
        w1 N(x; mean1, sigma^2) and w2 N(x; mean2, sigma^2), w2 = 1 - w1, shaped like `x`.
    """
    s, w1 = float(row["sigma"]), float(row["weight1"])
    w2 = 1.0 - w1
    z1, z2 = (x - row["mean1"]) / s, (x - row["mean2"]) / s
    n1 = w1 * np.exp(-0.5 * z1 * z1) / (s * math.sqrt(2 * math.pi))
    n2 = w2 * np.exp(-0.5 * z2 * z2) / (s * math.sqrt(2 * math.pi))
    return n1, n2


def side_of_component(sign: int) -> tuple[int, int]:
    """The sides of the first split (1: node 1.1, 2: node 1.2) that mixture components 1 and 2 of a
    cone of this synchronisation sign go to."""
    return (1, 2) if sign > 0 else (2, 1)


def confidence_histograms(run: Run) -> list[tuple[str, dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """Histograms of each particle's confidence in its class, by class.

    Parameters
    ----------
    run : Run
        A run with its particle table (`run.particles` not None), K >= 1 classes.

    Returns
    -------
    list of (title, {class: (edges, counts)})
        The posterior of the assigned class, rlnMaxValueProbDistribution (25 bins over
        [1 / max(K, 2), 1]; 1 for every particle when K = 1); then, where run_data.star has the
        rlnGraphSplitLogOdds1..K columns (K >= 2), the log-odds of the assigned class, which spreads
        out the posteriors near 1 (60 bins from min(0, its 0.5th percentile) to its 99.5th). Values
        are clipped into the bins, so each particle of classes 1..K is counted once per panel; every
        class has the panel's edges.
    """
    p = run.particles
    classes = p["rlnClassNumber"].to_numpy()
    numbers = range(1, run.n_classes + 1)
    prob = p["rlnMaxValueProbDistribution"].to_numpy(np.float64)
    prob_edges = np.linspace(1 / max(run.n_classes, 2), 1.0, 26)
    panels = [("posterior of the assigned class", np.clip(prob, prob_edges[0], 1.0), prob_edges)]
    columns = [f"{LOG_ODDS_LABEL}{k}" for k in numbers]
    if run.n_classes >= 2 and set(columns) <= set(p.columns):
        odds = p[columns].to_numpy(np.float64)[np.arange(len(p)), np.clip(classes, 1, run.n_classes) - 1]
        lo, hi = np.percentile(odds, [0.5, 99.5]) if len(odds) else (0.0, 1.0)
        lo = min(0.0, float(lo))
        edges = np.linspace(lo, max(float(hi), lo + 1.0), 61)
        panels.append(("log-odds of the assigned class, ln(P / (1 − P))", np.clip(odds, edges[0], edges[-1]), edges))
    return [(title, {k: (edges, np.histogram(values[classes == k], bins=edges)[0]) for k in numbers})
            for title, values, edges in panels]


def resolution_label(curve: FscCurve, threshold: float = FSC_THRESHOLD) -> str:
    """The class map's resolution at `threshold` as the figures' legends give it.

    Parameters
    ----------
    curve : FscCurve
        A class's gold-standard FSC.
    threshold : float
        The FSC threshold.

    Returns
    -------
    str
        "6.5 Å" where the curve drops below the threshold (`fourier.fsc.resolution_at`, in A);
        "Nyquist 4.0 Å or better" where it never does (the resolution is then limited by the
        sampling, not measured); "" where it is below the threshold from the first shell.
    """
    resolution = curve.resolution(threshold)
    if not math.isfinite(resolution):
        return ""
    if not curve.drops(threshold):
        return f"Nyquist {resolution:.1f} Å or better"
    return f"{resolution:.1f} Å"
