"""What the report's figures draw, computed from a run: shared by the page, its plotly figures and
the PNG figures so that they show the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from relion_graphsplit.report.read import FSC_THRESHOLD, FscCurve, Run

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


def class_of_component(sign: int) -> tuple[int, int]:
    """The classes that mixture components 1 and 2 of a cone of this sign go to after synchronisation."""
    return (1, 2) if sign > 0 else (2, 1)


def confidence_histograms(run: Run) -> list[tuple[str, dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """Histograms of the particles' posterior and score, by class.

    Parameters
    ----------
    run : Run
        A run with its particle table (`run.particles` not None).

    Returns
    -------
    list of (title, {class: (edges, counts)})
        Two panels: the posterior of the assigned class (25 bins over [0.5, 1]) and the score (mean
        synchronised llr; 60 bins over +/- its 99.5th percentile of magnitude, clipped to it).
    """
    p = run.particles
    classes = p["rlnClassNumber"].to_numpy()
    prob = p["rlnMaxValueProbDistribution"].to_numpy(np.float64)
    score = p["rlnGraphSplitScore"].to_numpy(np.float64)
    prob_edges = np.linspace(0.5, 1.0, 26)
    limit = float(np.percentile(np.abs(score), 99.5)) or 1.0
    score_edges = np.linspace(-limit, limit, 61)
    panels = []
    for title, values, edges in (("posterior of the assigned class", prob, prob_edges),
                                 ("score (mean synchronised llr)", np.clip(score, -limit, limit), score_edges)):
        panels.append((title, {k: (edges, np.histogram(values[classes == k], bins=edges)[0]) for k in (1, 2)}))
    return panels


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


def central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The xy, xz and yz central sections of a [z, y, x] volume."""
    n = volume.shape[0] // 2
    return [volume[n], volume[:, volume.shape[1] // 2, :], volume[:, :, volume.shape[2] // 2]]


def map_rows(maps: tuple[np.ndarray, np.ndarray]) -> list[tuple[str, list[np.ndarray], float, float, str | None]]:
    """The rows of central sections the report shows of the class maps.

    Parameters
    ----------
    maps : tuple of np.ndarray
        The class 1 and class 2 maps [z, y, x].

    Returns
    -------
    list of (label, slices, lo, hi, colour map)
        Class 1, class 2 (one grey scale from lo to hi) and their difference (a diverging colour
        map, symmetric about zero).
    """
    one, two = (central_slices(v) for v in maps)
    lo, hi = np.percentile(np.concatenate([s.ravel() for s in one + two]), [0.5, 99.5])
    diff = [a - b for a, b in zip(one, two)]
    limit = float(np.percentile(np.abs(np.concatenate([d.ravel() for d in diff])), 99.5)) or 1.0
    return [("class 1", one, lo, hi, None), ("class 2", two, lo, hi, None),
            ("class 1 − class 2", diff, -limit, limit, "RdBu_r")]
