"""An HTML report and PNG figures of a finished split, to judge a run without reading numbers.

Everything is read back from the files a run leaves (outputs.py), so the report can be rebuilt at any
time. report.html is one file that opens offline: plotly.js, the data and the images are inlined.
Per cone it shows what the thesis viewer showed (section 4.2): the histogram of the first principal
component rho with the fitted two-Gaussian mixture and the log-likelihood ratio, the images the
component moves between, and the cone's two class averages; then the graph of cones on the sphere,
the coverage and class balance of the directions, the confidence of the particles and, once they
exist, the class maps.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import starfile
from matplotlib import colormaps
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from PIL import Image
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from relion_graphsplit.files import atomic_path

CLASS_COLOURS = {1: "#d6604d", 2: "#4393c3"}
SIGN_COLOURS = {1: "#222222", -1: "#f28e2b"}
EDGE_SCALE = [[0.0, "#762a83"], [0.5, "#d9d9d9"], [1.0, "#1b7837"]]
BALANCE_SCALE = [[0.0, CLASS_COLOURS[2]], [0.5, "#f7f7f7"], [1.0, CLASS_COLOURS[1]]]
SYMBOLS = ("circle", "diamond", "square", "cross", "x", "circle-open", "diamond-open")
K_SIGMA = 2.0
"""The component images show the mean +/- K_SIGMA standard deviations of rho along the eigen-image."""
MIN_CONE_PARTICLES = 30
MIN_SEPARATION = 2.0
MIN_CLASS_SHARE = 0.1
MAX_HISTOGRAM_BINS = 60
IMAGE_PIXEL_BUDGET = 12_000_000
"""Pixels of all cone images together; larger runs get their images shrunk to keep the page small."""
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
CONFIDENCE_COLUMNS = ("rlnClassNumber", "rlnMaxValueProbDistribution", "rlnGraphSplitScore")


@dataclass
class Run:
    """The files of a finished run, read back."""

    out: Path
    summary: dict
    cones: pd.DataFrame  # one row per cone, sorted by cone id
    edges: pd.DataFrame  # cone1, cone2, shared, weight
    memberships: pd.DataFrame  # cone, particle, rho, llr
    particles: pd.DataFrame | None  # run_data.star's particle table
    images: dict[int, np.ndarray]  # cone id -> (4, w, w): mean, eigen-image, class-1 and class-2 averages
    maps: tuple[np.ndarray, np.ndarray] | None  # class 1 and class 2 maps [z, y, x]
    fsc: dict[int, pd.DataFrame] = field(default_factory=dict)  # class -> rlnResolution, rlnGoldStandardFsc
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why


def read_run(out_dir: Path) -> Run:
    """Read the files of a finished run in `out_dir`; optional ones may be missing."""
    out = Path(out_dir)
    summary = json.loads((out / "run_summary.json").read_text())
    blocks = starfile.read(out / "run_cones.star", always_dict=True)
    cones = blocks["cones"].sort_values("cone", ignore_index=True)
    edges = blocks.get("edges")
    if not isinstance(edges, pd.DataFrame) or edges.empty:
        edges = pd.DataFrame({"cone1": [], "cone2": [], "shared": [], "weight": []})
    memberships = starfile.read(out / "run_memberships.star", always_dict=True)["memberships"]
    notes: list[str] = []
    data = out / "run_data.star"
    particles = starfile.read(data, always_dict=True).get("particles") if data.is_file() else None
    if particles is not None and not set(CONFIDENCE_COLUMNS) <= set(particles.columns):
        notes.append(f"{data.name} lacks {', '.join(CONFIDENCE_COLUMNS)}: no particle confidence")
        particles = None
    images = _read_cone_images(out / "run_cone_images.mrcs", cones["cone"].to_numpy(), notes)
    maps = None
    class_maps = [out / f"run_class{k:03d}.mrc" for k in (1, 2)]
    if all(p.is_file() for p in class_maps):
        maps = tuple(_read_map(p) for p in class_maps)
    fsc = _read_fsc(out / "run_model.star")
    return Run(out, summary, cones, edges, memberships, particles, images, maps, fsc, notes)


def _read_cone_images(path: Path, cone_ids: np.ndarray, notes: list[str]) -> dict[int, np.ndarray]:
    if not path.is_file():
        notes.append(f"{path.name} is missing: no cone images")
        return {}
    with mrcfile.mmap(path, mode="r") as mrc:
        stack = np.array(mrc.data, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    n_cones = int(cone_ids.max()) + 1 if len(cone_ids) else 0
    if len(stack) != 4 * n_cones:
        notes.append(f"{path.name} holds {len(stack)} images for {n_cones} cones, not 4 per cone "
                     "(mean, eigen-image, class averages): no cone images")
        return {}
    return {int(c): stack[4 * c: 4 * c + 4] for c in cone_ids}


def _read_map(path: Path) -> np.ndarray:
    with mrcfile.open(path, mode="r", permissive=True) as mrc:
        return np.array(mrc.data, dtype=np.float32)


def _read_fsc(path: Path) -> dict[int, pd.DataFrame]:
    """Gold-standard FSC of each class from a RELION model.star (data_model_class_N blocks)."""
    if not path.is_file():
        return {}
    blocks = starfile.read(path, always_dict=True)
    curves = {}
    for k in (1, 2):
        block = blocks.get(f"model_class_{k}")
        if isinstance(block, pd.DataFrame) and {"rlnResolution", "rlnGoldStandardFsc"} <= set(block.columns):
            curves[k] = block[["rlnResolution", "rlnGoldStandardFsc"]].astype(float).reset_index(drop=True)
    return curves


# ---------------------------------------------------------------- warnings


def computed_warnings(run: Run) -> dict[str, str]:
    """Warnings found in the run's tables, keyed by a phrase that also names them in the summary's."""
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
    sizes = _class_sizes(run)
    total = sum(sizes.values())
    if total:
        share = sizes[1] / total
        if min(share, 1 - share) < MIN_CLASS_SHARE:
            out["unbalanced"] = f"very unbalanced classes: {100 * share:.1f}% / {100 * (1 - share):.1f}%"
    return out


def report_warnings(out_dir: Path) -> list[str]:
    """The run's own warnings, then those found in its tables that the run did not already give."""
    return _warnings(read_run(out_dir))


def _warnings(run: Run) -> list[str]:
    given = [str(w) for w in run.summary.get("warnings", [])]
    seen = " ".join(given).lower()
    return given + [text for key, text in computed_warnings(run).items() if key not in seen]


def _class_sizes(run: Run) -> dict[int, int]:
    sizes = run.summary.get("class_sizes")
    if sizes:
        return {k: int(sizes.get(str(k), 0)) for k in (1, 2)}
    if run.particles is not None:
        classes = run.particles["rlnClassNumber"].to_numpy()
        return {k: int((classes == k).sum()) for k in (1, 2)}
    return {1: 0, 2: 0}


# ---------------------------------------------------------------- per-cone data


def _num(value: float, digits: int = 4) -> float | None:
    """A float rounded to `digits` significant digits for JSON; None when not finite."""
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


def _rho_by_cone(run: Run) -> dict[int, np.ndarray]:
    m = run.memberships
    return {int(c): g["rho"].to_numpy(np.float64) for c, g in m.groupby("cone")}


def _histogram(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Density histogram of all of a cone's rho values (bin edges, densities)."""
    edges = np.histogram_bin_edges(rho, bins="auto")
    if len(edges) - 1 > MAX_HISTOGRAM_BINS:
        edges = np.linspace(rho.min(), rho.max(), MAX_HISTOGRAM_BINS + 1)
    density, edges = np.histogram(rho, bins=edges, density=True)
    return edges, density


def mixture_curves(row: pd.Series, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cone's two weighted mixture components w1 N(mean1, sigma^2) and w2 N(mean2, sigma^2) at x."""
    s, w1 = float(row["sigma"]), float(row["weight1"])
    w2 = 1.0 - w1
    z1, z2 = (x - row["mean1"]) / s, (x - row["mean2"]) / s
    n1 = w1 * np.exp(-0.5 * z1 * z1) / (s * math.sqrt(2 * math.pi))
    n2 = w2 * np.exp(-0.5 * z2 * z2) / (s * math.sqrt(2 * math.pi))
    return n1, n2


def _component_images(images: np.ndarray, rho_sd: float) -> list[np.ndarray]:
    """Mean - k sd, mean, mean + k sd along the eigen-image, the eigen-image, the two class averages."""
    mean, eigen, class1, class2 = images
    step = K_SIGMA * rho_sd * eigen
    return [mean - step, mean, mean + step, eigen, class1, class2]


COMPONENT_CAPTIONS = (
    f"mean − {K_SIGMA:g}σ·eigen", "mean", f"mean + {K_SIGMA:g}σ·eigen",
    "eigen-image", "class 1 average", "class 2 average",
)


def cone_panels(run: Run) -> list[dict]:
    """Per cone, what the page's per-cone panel draws: statistics, histogram, mixture, image URIs.

    The histograms bin all of a cone's rho values; the images are shrunk when the run has so many
    cones that they would exceed IMAGE_PIXEL_BUDGET.
    """
    rho = _rho_by_cone(run)
    budget = int(math.sqrt(IMAGE_PIXEL_BUDGET / (len(COMPONENT_CAPTIONS) * max(1, len(run.cones)))))
    panels = []
    for _, row in run.cones.iterrows():
        c = int(row["cone"])
        values = rho.get(c, np.zeros(0))
        edges, density = _histogram(values) if len(values) else (np.zeros(0), np.zeros(0))
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
    """A small PNG data URI of a 2D array scaled from [lo, hi] (greyscale, or RGB with a colour map),
    resampled to `size` pixels square when given."""
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


# ---------------------------------------------------------------- interactive figures


def _axes(cones: pd.DataFrame) -> np.ndarray:
    return cones[["axis_x", "axis_y", "axis_z"]].to_numpy(np.float64)


def _sphere_surface() -> go.Surface:
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 48), np.linspace(0, np.pi, 24))
    r = 0.97
    return go.Surface(
        x=r * np.cos(u) * np.sin(v), y=r * np.sin(u) * np.sin(v), z=r * np.cos(v),
        colorscale=[[0, "#eeeeee"], [1, "#eeeeee"]], showscale=False, opacity=0.35,
        hoverinfo="skip", showlegend=False,
    )


def _scene() -> dict:
    axis = dict(range=[-1.15, 1.15], showbackground=False, gridcolor="#dddddd", zerolinecolor="#bbbbbb")
    return dict(xaxis=dict(axis, title="x"), yaxis=dict(axis, title="y"), zaxis=dict(axis, title="z"),
                aspectmode="cube", camera=dict(eye=dict(x=1.4, y=1.4, z=0.9)))


def _cone_hover(cones: pd.DataFrame) -> list[str]:
    return [
        f"cone {int(r.cone)}<br>{int(r.particles)} particles<br>separation {_fixed(r.separation)}<br>"
        f"sign {int(r.sign):+d}, part {int(r.component)}<br>class 1: {_fixed(100 * r.class1_fraction, 0)}%"
        for r in cones.itertuples()
    ]


def graph_figure(run: Run) -> go.Figure:
    """Cones at their axes (colour: sign, symbol: graph part) joined by edges coloured by weight."""
    cones, edges = run.cones, run.edges
    axes = _axes(cones)
    index = {int(c): i for i, c in enumerate(cones["cone"])}
    fig = go.Figure([_sphere_surface()])
    edges = edges[edges["cone1"].isin(list(index)) & edges["cone2"].isin(list(index))]
    if len(edges):
        a = axes[[index[int(c)] for c in edges["cone1"]]]
        b = axes[[index[int(c)] for c in edges["cone2"]]]
        gap = np.full((len(edges), 1), np.nan)
        xyz = [np.hstack([a[:, [k]], b[:, [k]], gap]).ravel() for k in range(3)]
        weight = edges["weight"].to_numpy(np.float64)
        limit = float(np.percentile(np.abs(weight), 98)) or 1.0
        fig.add_trace(go.Scatter3d(
            x=xyz[0], y=xyz[1], z=xyz[2], mode="lines", name="edges", hoverinfo="skip", showlegend=False,
            line=dict(color=np.repeat(weight, 3), colorscale=EDGE_SCALE, cmin=-limit, cmax=limit, width=4,
                      showscale=True, colorbar=dict(title="edge weight", x=1.0, len=0.6)),
        ))
    parts = cones["component"].value_counts()  # largest first
    hover = np.array(_cone_hover(cones), dtype=object)
    for k, part in enumerate(parts.index):
        last = k == len(SYMBOLS) - 1 and len(parts) > len(SYMBOLS)
        chosen = ~cones["component"].isin(parts.index[:k]) if last else cones["component"] == part
        name = f"other parts ({int(chosen.sum())} cones)" if last else f"part {int(part)} ({int(chosen.sum())} cones)"
        sub = cones[chosen]
        fig.add_trace(go.Scatter3d(
            x=sub["axis_x"], y=sub["axis_y"], z=sub["axis_z"], mode="markers", name=name,
            marker=dict(size=6, symbol=SYMBOLS[k], color=[SIGN_COLOURS[1 if s >= 0 else -1] for s in sub["sign"]],
                        line=dict(color="#555555", width=1)),
            customdata=sub["cone"].to_numpy(), hovertext=hover[chosen.to_numpy()], hoverinfo="text",
        ))
        if last:
            break
    fig.update_layout(scene=_scene(), height=560, margin=dict(l=0, r=0, t=30, b=0),
                      legend=dict(x=0, y=1, bgcolor="rgba(255,255,255,0.7)"), template="plotly_white",
                      title=dict(text="Cone graph (click a cone to show it above)", x=0.5))
    return fig


def directions_figure(run: Run) -> go.Figure:
    """Cone axes on the sphere coloured by class-1 fraction (left) and by particle count (right)."""
    cones = run.cones
    hover = np.array(_cone_hover(cones), dtype=object)
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "scene"}, {"type": "scene"}]],
                        subplot_titles=("class-1 fraction per cone", "particles per cone"), horizontal_spacing=0.02)
    fraction = cones["class1_fraction"].to_numpy(np.float64)
    known = np.isfinite(fraction)
    for col in (1, 2):
        fig.add_trace(_sphere_surface(), row=1, col=col)
    fig.add_trace(go.Scatter3d(
        x=cones["axis_x"][known], y=cones["axis_y"][known], z=cones["axis_z"][known], mode="markers",
        marker=dict(size=6, color=fraction[known], colorscale=BALANCE_SCALE, cmin=0, cmax=1,
                    colorbar=dict(title="class 1", x=0.46, len=0.7), line=dict(color="#777777", width=1)),
        hovertext=hover[known], hoverinfo="text", customdata=cones["cone"][known], showlegend=False,
    ), row=1, col=1)
    if not known.all():
        fig.add_trace(go.Scatter3d(
            x=cones["axis_x"][~known], y=cones["axis_y"][~known], z=cones["axis_z"][~known], mode="markers",
            marker=dict(size=5, symbol="x", color="#999999"), name="no particles", hovertext=hover[~known],
            hoverinfo="text",
        ), row=1, col=1)
    counts = cones["particles"].to_numpy()
    fig.add_trace(go.Scatter3d(
        x=cones["axis_x"], y=cones["axis_y"], z=cones["axis_z"], mode="markers",
        marker=dict(size=6, color=counts, colorscale="Viridis", cmin=0, cmax=max(1, int(counts.max())),
                    colorbar=dict(title="particles", x=1.0, len=0.7), line=dict(color="#777777", width=1)),
        hovertext=hover, hoverinfo="text", customdata=cones["cone"], showlegend=False,
    ), row=1, col=2)
    fig.update_layout(scene=_scene(), scene2=_scene(), height=480, margin=dict(l=0, r=0, t=40, b=0),
                      template="plotly_white", showlegend=False)
    return fig


def _confidence_histograms(run: Run) -> list[tuple[str, dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """Per panel (title, class -> (bin edges, counts)) for the posterior and the score."""
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


def confidence_figure(run: Run) -> go.Figure:
    """Histograms of each particle's posterior and score, stacked by class."""
    panels = _confidence_histograms(run)
    fig = make_subplots(rows=1, cols=2, subplot_titles=[t for t, _ in panels], horizontal_spacing=0.08)
    for col, (_, hist) in enumerate(panels, start=1):
        for k, (edges, counts) in hist.items():
            fig.add_trace(go.Bar(
                x=0.5 * (edges[1:] + edges[:-1]), y=counts, width=np.diff(edges), name=f"class {k}",
                marker=dict(color=CLASS_COLOURS[k]), legendgroup=f"class {k}", showlegend=col == 1,
            ), row=1, col=col)
    fig.update_layout(barmode="stack", height=360, template="plotly_white", margin=dict(l=50, r=20, t=40, b=40),
                      bargap=0)
    fig.update_yaxes(title_text="particles", row=1, col=1)
    return fig


def fsc_resolution(curve: pd.DataFrame, threshold: float = 0.143) -> float | None:
    """Resolution (A) where the FSC first drops below `threshold`, interpolated; None if it never does."""
    s, f = curve["rlnResolution"].to_numpy(), curve["rlnGoldStandardFsc"].to_numpy()
    below = np.nonzero(f[1:] < threshold)[0]
    if not len(below):
        return None
    i = int(below[0]) + 1
    s0 = s[i - 1] + (s[i] - s[i - 1]) * (f[i - 1] - threshold) / (f[i - 1] - f[i]) if f[i - 1] != f[i] else s[i]
    return 1.0 / s0 if s0 > 0 else None


def fsc_figure(run: Run) -> go.Figure:
    """Gold-standard FSC of each class map against spatial frequency."""
    fig = go.Figure()
    for k, curve in run.fsc.items():
        res = fsc_resolution(curve)
        s = curve["rlnResolution"].to_numpy()
        angstrom = np.divide(1.0, s, out=np.full_like(s, np.inf), where=s > 0)
        fig.add_trace(go.Scatter(
            x=s, y=curve["rlnGoldStandardFsc"], mode="lines", line=dict(color=CLASS_COLOURS[k], width=2),
            name=f"class {k}" + (f" ({res:.1f} Å at 0.143)" if res else ""), customdata=angstrom,
            hovertemplate="%{customdata:.1f} Å<br>FSC %{y:.3f}<extra></extra>",
        ))
    fig.add_hline(y=0.143, line=dict(dash="dash", color="#888888"))
    fig.update_layout(height=340, template="plotly_white", margin=dict(l=50, r=20, t=30, b=40),
                      xaxis_title="spatial frequency (1/Å)", yaxis_title="FSC", yaxis_range=[-0.05, 1.05])
    return fig


def noise_figure(spectrum: dict) -> go.Figure:
    """The estimated noise power per ring (run_summary.json's noise_spectrum) against spatial frequency."""
    resolution = np.asarray(spectrum["resolution"], dtype=np.float64)
    fig = go.Figure(go.Scatter(
        x=1.0 / resolution, y=spectrum["relative_power"], mode="lines+markers", line=dict(color="#555555", width=2),
        customdata=resolution, hovertemplate="%{customdata:.1f} Å<br>power %{y:.2f}<extra></extra>", showlegend=False,
    ))
    fig.add_hline(y=1.0, line=dict(dash="dash", color="#888888"))
    fig.update_layout(height=300, template="plotly_white", margin=dict(l=50, r=20, t=20, b=40),
                      xaxis_title="spatial frequency (1/Å)", yaxis_title="noise power / mean", yaxis_type="log",
                      yaxis_tickvals=[0.1, 0.2, 0.5, 1, 2, 5, 10])
    return fig


def central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The xy, xz and yz central sections of a [z, y, x] volume."""
    n = volume.shape[0] // 2
    return [volume[n], volume[:, volume.shape[1] // 2, :], volume[:, :, volume.shape[2] // 2]]


def _map_rows(maps: tuple[np.ndarray, np.ndarray]) -> list[tuple[str, list[np.ndarray], float, float, str | None]]:
    """(label, slices, lo, hi, colour map) for class 1, class 2 and their difference."""
    one, two = (central_slices(v) for v in maps)
    lo, hi = np.percentile(np.concatenate([s.ravel() for s in one + two]), [0.5, 99.5])
    diff = [a - b for a, b in zip(one, two)]
    limit = float(np.percentile(np.abs(np.concatenate([d.ravel() for d in diff])), 99.5)) or 1.0
    return [("class 1", one, lo, hi, None), ("class 2", two, lo, hi, None),
            ("class 1 − class 2", diff, -limit, limit, "RdBu_r")]


# ---------------------------------------------------------------- PNG figures


def _class_of_component(sign: int) -> tuple[int, int]:
    """Classes that mixture components 1 and 2 of a cone go to after synchronisation."""
    return (1, 2) if sign > 0 else (2, 1)


def _shown_cones(cones: pd.DataFrame, count: int = 12) -> pd.DataFrame:
    """Up to `count` cones spread over the range of separations, best first."""
    full = cones[cones["particles"] > 0].sort_values("separation", ascending=False, ignore_index=True)
    picks = np.unique(np.round(np.linspace(0, len(full) - 1, min(count, len(full)))).astype(int))
    return full.iloc[picks]


def cones_png(run: Run, path: Path) -> Path:
    """A grid of cones' rho histograms with the fitted mixture, from the best separated to the worst."""
    rho = _rho_by_cone(run)
    shown = _shown_cones(run.cones)
    cols = 4
    rows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(3.2 * cols, 2.5 * rows))
    spacing = dict(left=0.05, right=0.99, bottom=0.5 / (2.5 * rows), top=1 - 0.3 / (2.5 * rows), hspace=0.55, wspace=0.3)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=spacing).ravel()
    for ax, (_, row) in zip(axes, shown.iterrows()):
        values = rho.get(int(row["cone"]), np.zeros(0))
        edges, density = _histogram(values)
        ax.stairs(density, edges, fill=True, color="#bbbbbb")
        x = np.linspace(edges[0], edges[-1], 200)
        n1, n2 = mixture_curves(row, x)
        k1, k2 = _class_of_component(int(row["sign"]))
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
    """Cone axes (Mollweide: longitude rot, latitude 90 - tilt) coloured by class balance and count."""
    cones = run.cones
    axes = _axes(cones)
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
    """Histograms of the particles' posterior and score, by class."""
    fig = Figure(figsize=(10, 3.5))
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.1, top=0.91, wspace=0.2)
    for i, (title, hist) in enumerate(_confidence_histograms(run)):
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
    """FSC curves of the class maps and central sections of both maps and their difference."""
    first = 1 if run.fsc else 0
    fig = Figure(figsize=(5.5 * first + 7.5, 7.5))
    grid = fig.add_gridspec(3, 3 + first, width_ratios=[1.6] * first + [1, 1, 1], left=0.06, right=0.99,
                            bottom=0.07, top=0.96, wspace=0.15, hspace=0.2)
    if run.fsc:
        ax = fig.add_subplot(grid[:, 0])
        for k, curve in run.fsc.items():
            res = fsc_resolution(curve)
            ax.plot(curve["rlnResolution"], curve["rlnGoldStandardFsc"], color=CLASS_COLOURS[k],
                    label=f"class {k}" + (f" ({res:.1f} Å)" if res else ""))
        ax.axhline(0.143, color="#888888", linestyle="--", linewidth=1)
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("FSC")
        ax.set_title("gold-standard FSC", fontsize=10)
        ax.legend(frameon=False)
    for r, (label, slices, lo, hi, cmap) in enumerate(_map_rows(run.maps)):
        for c, (plane, image) in enumerate(zip(("xy", "xz", "yz"), slices)):
            sub = fig.add_subplot(grid[r, c + first])
            sub.imshow(image, cmap=cmap or "gray", vmin=lo, vmax=hi, interpolation="nearest")
            sub.set_xticks([])
            sub.set_yticks([])
            sub.set_title(f"{label}, {plane}", fontsize=9)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def write_figures(run: Run) -> list[Path]:
    """report_cones.png, report_sphere.png, report_confidence.png and, with class maps, report_maps.png."""
    out = run.out
    paths = [cones_png(run, out / "report_cones.png"), sphere_png(run, out / "report_sphere.png")]
    if run.particles is not None:
        paths.append(confidence_png(run, out / "report_confidence.png"))
    if run.maps is not None:
        paths.append(maps_png(run, out / "report_maps.png"))
    return paths


# ---------------------------------------------------------------- HTML


def _figure_html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)


def _json_script(element_id: str, value) -> str:
    text = json.dumps(value, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="facts">{body}</table>'


def _summary_html(run: Run) -> str:
    s = run.summary
    sizes = _class_sizes(run)
    total = max(1, sum(sizes.values()))
    counts = run.cones["particles"]
    rows = [
        ("input", str(s.get("input", ""))),
        ("command", str(s.get("command", ""))),
        ("versions", f"relion_graphsplit {s.get('version', '?')}, Python {s.get('python', '?')}, torch {s.get('torch', '?')}"),
        ("particles", f"{s.get('particles', '?')}"),
        ("box", f"{s.get('box', '?')} px at {float(s.get('pixel_size', math.nan)):.3f} Å"),
        ("working box", f"{s.get('working_box', '?')} px at {float(s.get('working_pixel_size', math.nan)):.3f} Å"),
        ("cones", f"{len(run.cones)} ({float(s.get('sampling', math.nan)):.1f}° sampling, "
                  f"{float(s.get('cone_angle', math.nan)):.1f}° cones; median {int(np.median(counts))} particles)"),
        ("graph parts", f"{s.get('graph_components', run.cones['component'].nunique())}"),
    ]
    if "noise" in s:  # runs of earlier versions did not record it
        rows.append(("noise", str(s["noise"])))
    rows += [(f"class {k}", f"{sizes[k]} ({100 * sizes[k] / total:.1f}%)") for k in (1, 2)]
    timings = {str(k): float(v) for k, v in s.get("timings", {}).items()}
    longest = max(timings.values(), default=1.0) or 1.0
    time_rows = "".join(
        f'<tr><th>{html.escape(step)}</th><td>{sec:.1f} s</td>'
        f'<td><div class="bar" style="width:{100 * sec / longest:.0f}%"></div></td></tr>'
        for step, sec in timings.items()
    )
    time_rows += f"<tr><th>total</th><td>{sum(timings.values()):.1f} s</td><td></td></tr>"
    options = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                      for k, v in s.get("options", {}).items())
    return (
        f'<div class="columns"><div>{_table(rows)}</div>'
        f'<div><table class="facts times"><tr><th>step</th><th>time</th><th></th></tr>{time_rows}</table>'
        f'<details><summary>options</summary><table class="facts">{options}</table></details></div></div>'
    )


def _warnings_html(warnings: list[str], notes: list[str]) -> str:
    if not warnings:
        box = '<div class="ok">No warnings: every check on the cones, the graph and the classes passed.</div>'
    else:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        box = f'<div class="warnings" id="warnings"><h2>⚠ {len(warnings)} warning(s)</h2><ul>{items}</ul></div>'
    if notes:
        box += '<div class="note">' + "<br>".join(html.escape(n) for n in notes) + "</div>"
    return box


def _fixed(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _cone_section(run: Run) -> str:
    options = "".join(
        f'<option value="{i}">cone {int(r.cone)}: {int(r.particles)} particles, separation {_fixed(r.separation)}</option>'
        for i, r in enumerate(run.cones.itertuples())
    )
    images = "".join(
        f'<figure><img class="cone-image" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for c in COMPONENT_CAPTIONS
    )
    last = len(run.cones) - 1
    return f"""
<div class="selector">
  <button id="cone-prev" type="button">◀</button>
  <select id="cone-select">{options}</select>
  <button id="cone-next" type="button">▶</button>
  <input id="cone-slider" type="range" min="0" max="{last}" value="0" step="1">
</div>
<div id="cone-panel">
  <div class="figure" id="cone-figure"><div id="cone-histogram" style="height:380px"></div></div>
  <div id="cone-facts"></div>
  <div class="figure images" id="cone-images">{images}</div>
</div>
<p class="caption">Grey: histogram of rho, the cone's particles projected on its first principal component.
Coloured: the two fitted Gaussians, in the colour of the class they go to after synchronisation; dashed:
their sum. Purple (right axis): the synchronised log-likelihood ratio (above zero: class 1). Images: the
cone's mean moved by ±{K_SIGMA:g} standard deviations of rho along the eigen-image shows what the component
changes; the class averages should differ in the same way.</p>"""


def _maps_section(run: Run) -> str:
    if run.maps is None:
        return ""
    fsc = _figure_html(fsc_figure(run), "fsc") if run.fsc else "<p>No FSC curves (run_model.star missing).</p>"
    cells = []
    for label, slices, lo, hi, cmap in _map_rows(run.maps):
        for plane, image in zip(("xy", "xz", "yz"), slices):
            cells.append(f'<figure><img class="map-slice" src="{png_uri(image, lo, hi, cmap)}" '
                         f'alt="{html.escape(label)} {plane}"><figcaption>{html.escape(label)}, {plane}</figcaption></figure>')
    return (f'<h2>Class maps</h2><div class="figure" id="fsc-figure">{fsc}</div>'
            f'<div class="figure slices" id="map-slices">{"".join(cells)}</div>'
            '<p class="caption">Central sections of the two class maps (same grey scale) and of their difference '
            "(red: stronger in class 1, blue: stronger in class 2).</p>")


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 16px 40px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
.warnings { background: #fff3cd; border: 2px solid #e0a800; border-radius: 6px; padding: 8px 16px; }
.warnings h2 { margin: 4px 0; border: none; color: #8a5a00; }
.ok { background: #e6f4ea; border: 2px solid #5cb85c; border-radius: 6px; padding: 10px 16px; }
.note { color: #666; margin-top: 8px; font-size: 90%; }
.columns { display: flex; gap: 32px; flex-wrap: wrap; }
table.facts th { text-align: left; padding-right: 16px; font-weight: 600; vertical-align: top; }
table.facts td { font-family: ui-monospace, monospace; word-break: break-all; }
table.times td { min-width: 60px; } .bar { background: #4393c3; height: 10px; min-width: 1px; width: 150px; }
.selector { display: flex; gap: 8px; align-items: center; margin: 8px 0; }
#cone-slider { flex: 1; }
.images, .slices { display: flex; flex-wrap: wrap; gap: 12px; padding: 8px 0; background: #fff; }
.slices { display: grid; grid-template-columns: repeat(3, 170px); }
figure { margin: 0; text-align: center; font-size: 85%; }
img.cone-image, img.map-slice { width: 150px; height: 150px; image-rendering: pixelated; border: 1px solid #ccc; }
#cone-facts { font-family: ui-monospace, monospace; font-size: 90%; margin: 4px 0; }
.caption { color: #555; font-size: 90%; max-width: 900px; }
"""

PAGE_SCRIPT = """
(function () {
  const cones = JSON.parse(document.getElementById('cone-data').textContent);
  const colours = JSON.parse(document.getElementById('report-colours').textContent);
  const select = document.getElementById('cone-select');
  const slider = document.getElementById('cone-slider');
  const imgs = document.querySelectorAll('#cone-images img');
  function gauss(x, m, s, w) { const z = (x - m) / s; return w * Math.exp(-0.5 * z * z) / (s * Math.sqrt(2 * Math.PI)); }
  function draw(i) {
    const d = cones[i];
    const traces = [];
    const layout = {
      template: 'plotly_white', margin: {l: 55, r: 60, t: 40, b: 45}, bargap: 0,
      title: {text: 'cone ' + d.cone, x: 0.5},
      xaxis: {title: {text: 'rho (first principal component)'}},
      yaxis: {title: {text: 'density'}},
      yaxis2: {title: {text: 'synchronised llr'}, overlaying: 'y', side: 'right', tickmode: 'auto',
               zeroline: true, zerolinecolor: '#7b3294', showgrid: false},
      legend: {orientation: 'h', y: -0.18}, shapes: []
    };
    if (d.density.length) {
      const e = d.edges, x = [], w = [];
      for (let k = 0; k + 1 < e.length; k++) { x.push(0.5 * (e[k] + e[k + 1])); w.push(e[k + 1] - e[k]); }
      traces.push({type: 'bar', x: x, y: d.density, width: w, name: 'rho', marker: {color: '#bbbbbb'}});
      if (d.sigma > 0) {
        const lo = Math.min(e[0], d.mean2 - 3 * d.sigma), hi = Math.max(e[e.length - 1], d.mean1 + 3 * d.sigma);
        const xs = [], n1 = [], n2 = [], sum = [], llr = [];
        const w1 = d.weight1, w2 = 1 - d.weight1;
        for (let k = 0; k <= 200; k++) {
          const v = lo + (hi - lo) * k / 200;
          const a = gauss(v, d.mean1, d.sigma, w1), b = gauss(v, d.mean2, d.sigma, w2);
          xs.push(v); n1.push(a); n2.push(b); sum.push(a + b);
          const z1 = (v - d.mean1) / d.sigma, z2 = (v - d.mean2) / d.sigma;
          llr.push(d.sign * (Math.log(w1 / w2) - 0.5 * (z1 * z1 - z2 * z2)));
        }
        const k1 = d.sign > 0 ? 1 : 2, k2 = 3 - k1;
        traces.push({x: xs, y: sum, mode: 'lines', name: 'mixture', line: {color: '#555555', dash: 'dash', width: 1.5}});
        traces.push({x: xs, y: n1, mode: 'lines', name: 'component 1 → class ' + k1, line: {color: colours[k1], width: 2.5}});
        traces.push({x: xs, y: n2, mode: 'lines', name: 'component 2 → class ' + k2, line: {color: colours[k2], width: 2.5}});
        traces.push({x: xs, y: llr, mode: 'lines', name: 'synchronised llr', yaxis: 'y2', line: {color: '#7b3294', width: 1.5}});
      }
    } else {
      layout.annotations = [{text: 'no particles in this cone', showarrow: false, xref: 'paper', yref: 'paper', x: 0.5, y: 0.5}];
    }
    Plotly.react('cone-histogram', traces, layout, {displaylogo: false, responsive: true});
    const f = (v, n) => (v === null ? 'n/a' : Number(v).toFixed(n));
    document.getElementById('cone-facts').textContent =
      'cone ' + d.cone + ' | ' + d.particles + ' particles | rot ' + f(d.rot, 1) + '°, tilt ' + f(d.tilt, 1) +
      '° | explained variance ' + f(d.explained * 100, 1) + '% | separation ' + f(d.separation, 2) +
      ' σ | weight1 ' + f(d.weight1, 2) + ' | sign ' + (d.sign > 0 ? '+1' : '−1') + ' | graph part ' + d.component +
      ' | class 1: ' + (d.class1_fraction === null ? 'n/a' : f(d.class1_fraction * 100, 0) + '%');
    imgs.forEach((img, k) => { if (d.images.length) { img.src = d.images[k]; } else { img.removeAttribute('src'); } });
    select.value = String(i); slider.value = String(i);
  }
  select.addEventListener('change', () => draw(Number(select.value)));
  slider.addEventListener('input', () => draw(Number(slider.value)));
  document.getElementById('cone-prev').addEventListener('click', () => draw(Math.max(0, Number(select.value) - 1)));
  document.getElementById('cone-next').addEventListener('click', () => draw(Math.min(cones.length - 1, Number(select.value) + 1)));
  const byCone = {}; cones.forEach((d, i) => { byCone[d.cone] = i; });
  ['cone-graph', 'cone-directions'].forEach(id => {
    const gd = document.getElementById(id);
    if (gd && gd.on) {
      gd.on('plotly_click', ev => {
        const p = ev.points && ev.points[0];
        if (p && p.customdata !== undefined && byCone[p.customdata] !== undefined) {
          draw(byCone[p.customdata]);
          document.getElementById('cone-panel').scrollIntoView({behavior: 'smooth'});
        }
      });
    }
  });
  if (cones.length) { draw(0); }
})();
"""


def render_html(run: Run, shown_as: Path | None = None) -> str:
    """The whole report page as one self-contained HTML document, titled with the run's folder
    (`shown_as`, default the folder it was read from)."""
    folder = Path(shown_as) if shown_as is not None else run.out
    warnings = _warnings(run)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Graph split report: {html.escape(folder.resolve().name)}</title>",
        f"<style>{PAGE_STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>Graph split report</h1><p class='caption'>{html.escape(str(folder.resolve()))}</p>",
        _warnings_html(warnings, run.notes),
        "<h2>Summary</h2>", _summary_html(run),
    ]
    if run.summary.get("noise_spectrum"):  # None when not estimated; runs of earlier versions lack it
        parts += [
            "<h2>Noise</h2>",
            f'<div class="figure" id="noise-figure">{_figure_html(noise_figure(run.summary["noise_spectrum"]), "noise")}</div>',
            '<p class="caption">Noise power in each ring of the working box, relative to the mean, from the '
            "residuals of up to about 2000 particles to their consensus projections (these also hold the difference "
            "between the classes). Flat: white noise. When the noisiest ring holds at least twice the power of "
            "the least noisy one, images and CTFs are whitened by this spectrum before the analysis.</p>",
        ]
    parts += [
        "<h2>Cones</h2>", _cone_section(run),
        "<h2>Graph of cones</h2>",
        f'<div class="figure" id="graph-figure">{_figure_html(graph_figure(run), "cone-graph")}</div>',
        '<p class="caption">Each cone sits at its axis; black: sign +1, orange: sign −1 after synchronisation. '
        "Edges join cones that share particles, green where their ratios agree (positive weight), purple where "
        "they disagree. Marker symbols tell the graph's disconnected parts apart: classes of different parts "
        "are synchronised separately.</p>",
        "<h2>Directions</h2>",
        f'<div class="figure" id="directions-figure">{_figure_html(directions_figure(run), "cone-directions")}</div>',
        '<p class="caption">Left: share of each cone\'s particles in class 1 (red) or class 2 (blue). A class '
        "confined to some directions suggests a split driven by orientation rather than structure. Right: "
        "particles per cone; dark spots are poorly covered directions.</p>",
    ]
    if run.particles is not None:
        parts += [
            "<h2>Particle confidence</h2>",
            f'<div class="figure" id="confidence-figure">{_figure_html(confidence_figure(run), "confidence")}</div>',
            '<p class="caption">A good split piles posteriors near 1 and scores away from zero.</p>',
        ]
    parts += [
        _maps_section(run),
        _json_script("cone-data", cone_panels(run)),
        _json_script("report-colours", {str(k): v for k, v in CLASS_COLOURS.items()}),
        f"<script type='text/javascript'>{PAGE_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(out_dir: Path, shown_as: Path | None = None) -> list[str]:
    """Write OUT/report.html and the PNG figures from a finished run in `out_dir`; return the
    warnings the page shows (`report_warnings`), read from the same files. `shown_as`: the folder
    the page names (the run's output folder, when `out_dir` is its staging folder)."""
    run = read_run(out_dir)
    write_figures(run)
    with atomic_path(run.out / "report.html") as tmp:
        tmp.write_text(render_html(run, shown_as), encoding="utf-8")
    return _warnings(run)
