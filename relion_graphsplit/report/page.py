"""The report page of a finished split: report.html, one file that opens offline.

plotly.js, the data and the images are inlined; the page's style and script are the package's
static/report.css and static/report.js. It opens with the run's verdict and K, then shows the tree
of the splits tested with their evidence, each class's map beside the consensus and their
difference (filtered, masked central sections), and the confidence of the particles. Then, for the
first split of the whole set into two, per cone what the thesis viewer showed (section 4.2): the
histogram of the first principal component rho with the fitted two-Gaussian mixture and the
log-likelihood ratio, the images the component moves between and the averages of the cone's two
sides; the graph of cones on the sphere and the coverage and balance of the directions.
"""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from relion_graphsplit.files import atomic_path
from relion_graphsplit.report.checks import run_warnings
from relion_graphsplit.report.colours import DIFFERENCE_CMAP, SIDE_COLOURS, class_colour
from relion_graphsplit.report.data import fixed, resolution_label
from relion_graphsplit.report.figures import (
    confidence_figure,
    directions_figure,
    fsc_figure,
    graph_figure,
    noise_figure,
)
from relion_graphsplit.report.panels import COMPONENT_CAPTIONS, K_SIGMA, cone_panels, png_uri
from relion_graphsplit.report.pngs import write_figures
from relion_graphsplit.report.read import Run, class_sizes, read_run
from relion_graphsplit.report.sections import PLANES, SECTION_RESOLUTION, WORKING_PIXELS, map_sections
from relion_graphsplit.report.tree import side_labels, tree_html

PLOT_CONFIG = {"displaylogo": False, "responsive": True}


def write_report(out_dir: Path, shown_as: Path | None = None) -> list[str]:
    """Write a finished run's report.html and PNG figures into its folder.

    Parameters
    ----------
    out_dir : Path
        The run's folder: its files are read (`read.read_run`) and the report is written there.
    shown_as : Path, optional
        The folder the page names: the run's output folder, when `out_dir` is its staging folder.

    Returns
    -------
    list[str]
        The warnings the page shows (`checks.run_warnings`), read from the same files.
    """
    run = read_run(out_dir)
    write_figures(run)
    with atomic_path(run.out / "report.html") as tmp:
        tmp.write_text(render_html(run, shown_as), encoding="utf-8")
    return run_warnings(run)


def render_html(run: Run, shown_as: Path | None = None) -> str:
    """The whole report page as one self-contained HTML document.

    Parameters
    ----------
    run : Run
        The finished run.
    shown_as : Path, optional
        The folder the page is titled with; default the folder the run was read from.

    Returns
    -------
    str
        The page: plotly.js, static/report.css, static/report.js, the data and the images inlined.
    """
    folder = Path(shown_as) if shown_as is not None else run.out
    warnings = run_warnings(run)
    sides = side_labels(run)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Graph split report: {html.escape(folder.resolve().name)}</title>",
        f"<style>\n{static_text('report.css')}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>Graph split report</h1><p class='caption'>{html.escape(str(folder.resolve()))}</p>",
        _verdict_html(run),
        _warnings_html(warnings, run.notes),
        "<h2>Summary</h2>", _summary_html(run),
        _tree_section(run),
        _maps_section(run),
    ]
    if run.particles is not None:
        parts += [
            "<h2>Particle confidence</h2>",
            f'<div class="figure" id="confidence-figure">{_figure_html(confidence_figure(run), "confidence")}</div>',
            '<p class="caption">' + ("Each particle's posterior probability of its class (and its log-odds, which "
                                     "spreads out the posteriors near 1), stacked by class. A confident assignment piles "
                                     "the posteriors near 1." if run.n_classes > 1 else
                                     "One class: every particle's posterior is 1.") + "</p>",
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
        "<h2>First split: cones</h2>",
        '<p class="caption">The cones, the graph and the directions below are those of the first split of the whole '
        f"set into two (tree node 1 into 1.1 and 1.2): side 1 is {html.escape(sides[1])}, side 2 is "
        f"{html.escape(sides[2])}.</p>",
        _cone_section(run),
        "<h2>Graph of cones</h2>",
        f'<div class="figure" id="graph-figure">{_figure_html(graph_figure(run), "cone-graph")}</div>',
        '<p class="caption">Each cone sits at its axis; black: sign +1, orange: sign −1 after synchronisation. '
        "Edges join cones that share particles, green where their ratios agree (positive weight), purple where "
        "they disagree. Marker symbols tell the graph's disconnected parts apart: the sides of different parts "
        "are synchronised separately.</p>",
        "<h2>Directions</h2>",
        f'<div class="figure" id="directions-figure">{_figure_html(directions_figure(run), "cone-directions")}</div>',
        "<p class=\"caption\">Left: share of each cone's particles on side 1 (red) or side 2 (blue) of the first split. "
        "A side confined to some directions suggests a split driven by orientation rather than structure. Right: "
        "particles per cone; dark spots are poorly covered directions.</p>",
        _json_script("cone-data", cone_panels(run)),
        _json_script("report-sides", {str(k): {"colour": SIDE_COLOURS[k], "label": sides[k]} for k in (1, 2)}),
        f"<script type='text/javascript'>\n{static_text('report.js')}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def static_text(name: str) -> str:
    """The text of one of the page's static files, read from the installed package.

    Parameters
    ----------
    name : str
        The file's name in the package's static/ folder: 'report.css' or 'report.js'.

    Returns
    -------
    str
        Its text, decoded as UTF-8.
    """
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


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
    sizes = class_sizes(run)
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
        ("classes", _classes_text(run)),
    ]
    if "noise" in s:  # runs of earlier versions did not record it
        rows.append(("noise", str(s["noise"])))
    rows += [(f"class {k}", f"{n} ({100 * n / total:.1f}%)") for k, n in sizes.items()]
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


def _cone_section(run: Run) -> str:
    options = "".join(
        f'<option value="{i}">cone {int(r.cone)}: {int(r.particles)} particles, separation {fixed(r.separation)}</option>'
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
Coloured: the two fitted Gaussians, in the colour of the side of the first split they go to after
synchronisation; dashed: their sum. Purple (right axis): the synchronised log-likelihood ratio (above zero:
side 1). Images: the cone's mean moved by ±{K_SIGMA:g} standard deviations of rho along the eigen-image shows
what the component changes; the averages of the two sides should differ in the same way.</p>"""


def _verdict_html(run: Run) -> str:
    verdict = run.summary.get("verdict") or f"{run.n_classes} class{'es' if run.n_classes != 1 else ''}"
    return (f'<div class="verdict" id="verdict"><span class="k">K = {run.n_classes}</span> '
            f"{html.escape(str(verdict))}</div>")


def _classes_text(run: Run) -> str:
    """K, and how it was chosen: given with --K, or found by the split tests up to max_K."""
    requested = run.summary.get("K_requested")
    if requested is None:  # runs of earlier versions
        return str(run.n_classes)
    if str(requested) == "auto":
        return f"{run.n_classes} (found by testing each split on independent halves; at most {run.summary.get('max_K', '?')})"
    return f"{run.n_classes} (asked for with --K {requested})"


def _tree_section(run: Run) -> str:
    tree = tree_html(run)
    requested = str(run.summary.get("K_requested", "auto"))
    given = f"K was given (--K {requested}), so no split was tested. " if requested != "auto" else ""
    if not tree:
        return f'<h2>Split tree</h2><p class="caption" id="split-tree">{given or "This run records no split tests."}</p>'
    return (
        f'<h2>Split tree</h2><div class="figure" id="tree-figure">{tree}</div>'
        f'<p class="caption">{given}Each split is tested on independent half sets: the split found on half 1 is '
        "scored on half 2 and, where it shows several modes there, the reverse. The gain is the held-out "
        "bimodality gain (nats per particle); a split is kept only where both gains exceed the threshold (✓) "
        "and the two halves agree. FSC: agreement of the two "
        "halves' class-difference maps (mean FSC over the low-resolution band). The children of node X are X.1 and "
        "X.2; each leaf of the kept tree is a class.</p>"
    )


def _maps_section(run: Run) -> str:
    shown = map_sections(run)
    if shown is None:
        return ""
    fsc = _figure_html(fsc_figure(run), "fsc") if run.fsc else "<p>No FSC curves (run_model.star missing).</p>"
    sizes = class_sizes(run)
    total = max(1, sum(sizes.values()))
    lo, hi = shown.grey
    blocks = []
    for c in shown.classes:
        k = c.k
        kinds = [(f"class {k}", c.class_map, lo, hi, None)]
        if c.difference is not None:
            kinds += [("consensus", c.consensus, lo, hi, None),
                      (f"class {k} − consensus", c.difference, -shown.limit, shown.limit, DIFFERENCE_CMAP)]
        cells = [
            f'<figure><img class="map-slice" src="{png_uri(images[i], vmin, vmax, cmap)}" alt="{html.escape(label)} {plane}">'
            f"<figcaption>{html.escape(label)}, {plane}</figcaption></figure>"
            for i, plane in enumerate(PLANES) for label, images, vmin, vmax, cmap in kinds
        ]
        resolution = resolution_label(run.fsc[k]) if k in run.fsc else ""
        n = sizes.get(k, 0)
        blocks.append(
            f'<div class="figure class-sections" id="class-sections-{k}">'
            f'<h3 style="color:{class_colour(k)}">class {k}: {n} particles ({100 * n / total:.1f}%)'
            + (f", {html.escape(resolution)}" if resolution else "") + "</h3>"
            f'<div class="slices" style="grid-template-columns: repeat({len(kinds)}, 170px)">{"".join(cells)}</div></div>'
        )
    filtering = (f"low-pass filtered to {shown.resolution:.1f} Å (the coarser of {SECTION_RESOLUTION:g} Å and "
                 f"{WORKING_PIXELS:g} working pixels)" + (", multiplied by run_mask.mrc" if shown.masked else ", unmasked"))
    if run.n_classes > 1:
        caption = (f"Central sections through the box centre (rows: xy, xz, yz), {filtering}. Each class beside the "
                   "consensus (the mean of the class maps weighted by their particle counts) and the class minus the "
                   "consensus: red where the class is denser than the consensus, blue where it is weaker. One grey scale "
                   "for all maps, one colour scale, symmetric about zero, for all differences.")
    else:
        caption = ("One class: its map is that of all particles (the consensus), so there is no class difference "
                   f"to show. Central sections through the box centre, {filtering}.")
    return (f'<h2>Classes</h2><div class="figure" id="fsc-figure">{fsc}</div>{"".join(blocks)}'
            f'<p class="caption">{caption}</p>')
