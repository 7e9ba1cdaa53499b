"""Central sections of the class maps as the report shows them: each class low-pass filtered and
masked, beside the consensus and the class's difference from it, so that where the classes differ
shows without a map viewer.

The maps are filtered to `section_resolution`: SECTION_RESOLUTION (15 A) or WORKING_PIXELS (2.5)
pixels of the working box, whichever is coarser. The classification saw the images at the working
pixel size only, so finer detail in the class maps is noise the split did not use. The filter is a
low-pass in Fourier space with a raised-cosine edge EDGE_SHELLS Fourier shells wide (RELION's default
edge for its low-pass filters), centred on the resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft

from relion_graphsplit.report.read import Run, class_sizes

SECTION_RESOLUTION = 15.0
"""The coarsest resolution (A) the sections are filtered to."""
WORKING_PIXELS = 2.5
"""The sections are filtered to at least this many working pixels (run_summary.json's working_pixel_size)."""
EDGE_SHELLS = 2.0
"""Width of the filter's raised-cosine edge, in Fourier shells of the map's box."""
PLANES = ("xy", "xz", "yz")
"""The central sections, in the order `central_sections` gives them."""


@dataclass(frozen=True)
class ClassSections:
    """What the report shows of one class: three central sections (`PLANES`, each (h, w)) of its map,
    of the consensus and, where K >= 2, of the class minus the consensus (None where K = 1: the one
    class is the consensus). Filtered and masked as `map_sections` says."""

    k: int
    class_map: list[np.ndarray]
    consensus: list[np.ndarray]
    difference: list[np.ndarray] | None


@dataclass(frozen=True)
class MapSections:
    """The sections of every class, with what they share: the filter's resolution (A), whether they
    were multiplied by run_mask.mrc, one grey scale (lo, hi) for class maps and consensus, and one
    diverging scale (-limit, +limit) for all differences."""

    classes: list[ClassSections]
    resolution: float
    masked: bool
    grey: tuple[float, float]
    limit: float


def section_resolution(run: Run) -> float:
    """The resolution (A) the sections are filtered to.

    Parameters
    ----------
    run : Run
        A run with class maps.

    Returns
    -------
    float
        The coarsest of SECTION_RESOLUTION, WORKING_PIXELS working pixels (when run_summary.json
        gives the working pixel size) and the maps' Nyquist resolution (2 pixels).
    """
    working = float(run.summary.get("working_pixel_size") or math.nan)
    return max(SECTION_RESOLUTION, WORKING_PIXELS * working if math.isfinite(working) else 0.0, 2 * run.map_pixel_size)


def lowpass(volume: np.ndarray, pixel_size: float, resolution: float, edge_shells: float = EDGE_SHELLS) -> np.ndarray:
    """A map low-pass filtered in Fourier space with a raised-cosine edge.

    Parameters
    ----------
    volume : np.ndarray
        (nz, ny, nx) map [z, y, x].
    pixel_size : float
        Its pixel size (A), > 0.
    resolution : float
        The filter's resolution (A): gain 1/2 at spatial frequency 1 / resolution.
    edge_shells : float
        Width of the edge in Fourier shells of the box (1 / (n * pixel_size) each, n the box's x size):
        gain 1 below the edge, 0 above, 0.5 (1 + cos) across it.

    Returns
    -------
    np.ndarray
        (nz, ny, nx) float32, the filtered map.
    """
    nz, ny, nx = volume.shape
    cutoff, width = 1.0 / resolution, edge_shells / (nx * pixel_size)
    fz = fft.fftfreq(nz, pixel_size).astype(np.float32)[:, None, None]
    fy = fft.fftfreq(ny, pixel_size).astype(np.float32)[None, :, None]
    fx = fft.rfftfreq(nx, pixel_size).astype(np.float32)[None, None, :]
    frequency = np.sqrt(fz * fz + fy * fy + fx * fx)
    across = np.clip((frequency - (cutoff - width / 2)) / width, 0.0, 1.0)  # 0 below the edge, 1 above
    gain = 0.5 * (1.0 + np.cos(np.pi * across))
    return fft.irfftn(fft.rfftn(volume.astype(np.float32)) * gain, s=volume.shape).astype(np.float32)


def central_sections(volume: np.ndarray) -> list[np.ndarray]:
    """The xy, xz and yz sections of a [z, y, x] volume through its box centre (index n // 2)."""
    nz, ny, nx = volume.shape
    return [volume[nz // 2], volume[:, ny // 2, :], volume[:, :, nx // 2]]


def map_sections(run: Run) -> MapSections | None:
    """The central sections of every class map, of the consensus and of their differences.

    Parameters
    ----------
    run : Run
        The finished run.

    Returns
    -------
    MapSections or None
        Per class 1..K: its map filtered to `section_resolution` (`lowpass`) and multiplied by
        run_mask.mrc where the run has it; the consensus, the mean of the filtered class maps
        weighted by their particle counts (equal weights where no count is known; for K = 1 the map
        of all particles, run_class001.mrc); and the class minus the consensus (K >= 2). The grey
        scale spans the 0.5th to 99.5th percentile of all class and consensus sections; the
        difference scale is symmetric about zero, to the 99.5th percentile of their magnitudes
        (1 where all are zero). None without class maps.
    """
    if run.maps is None:
        return None
    resolution = section_resolution(run)
    mask = central_sections(run.mask) if run.mask is not None else None
    filtered = []
    for volume in run.maps:
        sections = central_sections(lowpass(volume, run.map_pixel_size, resolution))
        filtered.append([s * m for s, m in zip(sections, mask)] if mask is not None else sections)
    counts = np.array(list(class_sizes(run).values()), dtype=np.float64)
    weights = counts / counts.sum() if counts.sum() > 0 else np.full(len(filtered), 1 / len(filtered))
    consensus = [sum(w * s[p] for w, s in zip(weights, filtered)) for p in range(len(PLANES))]
    several = len(filtered) > 1
    classes = [
        ClassSections(k, sections, consensus, [s - c for s, c in zip(sections, consensus)] if several else None)
        for k, sections in enumerate(filtered, start=1)
    ]
    greys = np.concatenate([s.ravel() for c in classes for s in c.class_map + c.consensus])
    lo, hi = np.percentile(greys, [0.5, 99.5])
    differences = [s.ravel() for c in classes if c.difference is not None for s in c.difference]
    limit = float(np.percentile(np.abs(np.concatenate(differences)), 99.5)) if differences else 0.0
    return MapSections(classes, resolution, mask is not None, (float(lo), float(hi)), limit or 1.0)
