"""The page's per-cone panel, as data: what the thesis viewer showed of each cone (section 4.2).

Per cone: its statistics, the histogram of rho with the fitted two-Gaussian mixture, the images the
first principal component moves between and the averages of the cone's particles on each side of
the first split (tree nodes 1.1 and 1.2; PNG data URIs). The
page's script (static/report.js) draws the panel of the cone chosen from this data.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from matplotlib import colormaps
from PIL import Image

from relion_graphsplit.report.data import histogram, rho_by_cone
from relion_graphsplit.report.read import Run

K_SIGMA = 2.0
"""The component images show the mean +/- K_SIGMA standard deviations of rho along the eigen-image."""
IMAGE_PIXEL_BUDGET = 12_000_000
"""Pixels of all cone images together; larger runs get their images shrunk to keep the page small."""
COMPONENT_CAPTIONS = (
    f"mean − {K_SIGMA:g}σ·eigen", "mean", f"mean + {K_SIGMA:g}σ·eigen",
    "eigen-image", "side 1.1 average", "side 1.2 average",
)


def cone_panels(run: Run) -> list[dict]:
    """Per cone, what the page's per-cone panel draws.

    Parameters
    ----------
    run : Run
        The finished run.

    Returns
    -------
    list[dict]
        One dict per cone, in the order of run.cones, ready for JSON: statistics (particles,
        explained variance, separation in sigma, mixture parameters, sign, graph part, share on
        side 1 of the first split, axis as rot and tilt in degrees), the histogram of all of the cone's rho values
        (edges, density), and six PNG data URIs (`COMPONENT_CAPTIONS`; none without cone images).
        The images are shrunk when the run has so many cones that they would exceed
        IMAGE_PIXEL_BUDGET. Numbers are rounded to 4 (mixture and edges 6) significant digits;
        non-finite ones are None.
    """
    rho = rho_by_cone(run)
    budget = int(math.sqrt(IMAGE_PIXEL_BUDGET / (len(COMPONENT_CAPTIONS) * max(1, len(run.cones)))))
    panels = []
    for _, row in run.cones.iterrows():
        c = int(row["cone"])
        values = rho.get(c, np.zeros(0))
        edges, density = histogram(values) if len(values) else (np.zeros(0), np.zeros(0))
        sd = float(values.std()) if len(values) else 0.0
        x, y, z = (float(row[a]) for a in ("axis_x", "axis_y", "axis_z"))
        panel = {
            "cone": c,
            "particles": int(row["particles"]),
            "explained": _num(row["explained_variance"]),
            "separation": _num(row["separation"]),
            "mean1": _num(row["mean1"], 6), "mean2": _num(row["mean2"], 6),
            "sigma": _num(row["sigma"], 6), "weight1": _num(row["weight1"], 6),
            "sign": int(row["sign"]), "component": int(row["component"]),
            "class1_fraction": _num(row["class1_fraction"]),
            "rot": _num(math.degrees(math.atan2(y, x))), "tilt": _num(math.degrees(math.acos(max(-1.0, min(1.0, z))))),
            "edges": [_num(e, 6) for e in edges], "density": [_num(d) for d in density],
            "images": [],
        }
        if c in run.images:
            shown = _component_images(run.images[c], sd)
            greys = np.stack([shown[i] for i in (0, 1, 2, 4, 5)])
            lo, hi = np.percentile(greys, [0.5, 99.5])
            eig_max = float(np.abs(shown[3]).max())
            size = min(shown[0].shape[-1], max(16, budget))
            panel["images"] = [
                png_uri(img, -eig_max, eig_max, size=size) if i == 3 else png_uri(img, lo, hi, size=size)
                for i, img in enumerate(shown)
            ]
        panels.append(panel)
    return panels


def png_uri(image: np.ndarray, lo: float, hi: float, cmap: str | None = None, size: int | None = None) -> str:
    """A small PNG of a 2D array, as a data URI.

    Parameters
    ----------
    image : np.ndarray
        (h, w) values.
    lo, hi : float
        The values shown black and white (or the colour map's ends); values outside are clipped.
    cmap : str, optional
        A matplotlib colour map name for an RGB image; greyscale without one.
    size : int, optional
        Resample (Lanczos) to `size` pixels square.

    Returns
    -------
    str
        "data:image/png;base64,..."
    """
    scaled = np.clip((np.asarray(image, np.float64) - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    if cmap is None:
        picture = Image.fromarray(np.round(255 * scaled).astype(np.uint8))
    else:
        picture = Image.fromarray(np.round(255 * colormaps[cmap](scaled)[..., :3]).astype(np.uint8))
    if size is not None and size != picture.width:
        picture = picture.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _num(value: float, digits: int = 4) -> float | None:
    """A float rounded to `digits` significant digits for JSON; None when not finite."""
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


def _component_images(images: np.ndarray, rho_sd: float) -> list[np.ndarray]:
    """Mean - k sd, mean, mean + k sd along the eigen-image, the eigen-image, the two sides' averages."""
    mean, eigen, side1, side2 = images
    step = K_SIGMA * rho_sd * eigen
    return [mean - step, mean, mean + step, eigen, side1, side2]
