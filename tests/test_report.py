"""The run report: a self-contained page and PNG figures built from a synthetic finished run."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from pathlib import Path
from xml.etree import ElementTree

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from PIL import Image
from typer.testing import CliRunner

from relion_graphsplit.cli.report import app
from relion_graphsplit.fourier.fsc import resolution_at
from relion_graphsplit.fourier.geometry import fibonacci_sphere
from relion_graphsplit.relion.model_star import write_model_star
from relion_graphsplit.report import page, panels, read_run, render_html, report_warnings, write_report
from relion_graphsplit.report.checks import computed_warnings
from relion_graphsplit.report.colours import SIGN_COLOURS
from relion_graphsplit.report.data import confidence_histograms, resolution_label
from relion_graphsplit.report.figures import confidence_figure, fsc_figure, noise_figure
from relion_graphsplit.report.panels import cone_panels
from relion_graphsplit.report.sections import EDGE_SHELLS, central_sections, lowpass, map_sections, section_resolution
from relion_graphsplit.report.tree import side_labels
from relion_graphsplit.run_files.write import noise_description

BOX = 24
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PNGS = ("report_tree.png", "report_cones.png", "report_sphere.png", "report_confidence.png")
CLASS_BLOBS = {1: [(0, 0, 0)], 2: [(0, 0, 4), (0, 0, -4)], 3: [(0, 0, 4), (0, 4, -4), (0, -4, -4)]}
"""K -> where each class map has its extra density (voxels from the box centre, z y x)."""


def _blob(box: int, centre: tuple[float, ...], width: float) -> np.ndarray:
    grid = np.indices((box,) * len(centre), dtype=np.float64) - box // 2
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return np.exp(-r2 / (2 * width**2))


SPLIT_TESTS = {  # K -> the split tests of a run that found K classes, and each class's leaf
    1: ([("1", None, 0.004, -0.001, 0.21, False, "halves disagree")], ["1"]),
    2: ([("1", None, 0.12, 0.10, 0.83, True, "reproduced on both halves"),
         ("1.1", "1", 0.012, 0.003, None, False, "too few particles in a half"),
         ("1.2", "1", -0.002, 0.001, 0.12, False, "halves disagree")], ["1.1", "1.2"]),
    3: ([("1", None, 0.12, 0.10, 0.83, True, "reproduced on both halves"),
         ("1.1", "1", 0.002, 0.001, 0.08, False, "halves disagree"),
         ("1.2", "1", 0.045, 0.038, 0.64, True, "reproduced on both halves"),
         ("1.2.1", "1.2", 0.003, 0.009, None, False, "too few particles in a half"),
         ("1.2.2", "1.2", 0.001, -0.004, 0.05, False, "halves disagree")], ["1.1", "1.2.1", "1.2.2"]),
}
THRESHOLD = 0.01
"""The gain both halves must exceed in SPLIT_TESTS."""


MASK = np.clip((BOX // 2 - 1 - np.sqrt(sum((g - BOX // 2) ** 2 for g in np.indices((BOX,) * 3)))) / 3, 0, 1)
"""run_mask.mrc of make_run: a sphere of radius BOX / 2 - 4 voxels with a 3-voxel soft edge."""


def make_run(out: Path, *, n_classes: int = 2, n_cones: int = 30, n_particles: int = 600, separated: bool = True,
             class1_share: float = 0.5, split_graph: bool = False, sparse_cones: bool = False, maps: bool = True,
             mask: bool = True, images_per_cone: int = 4, summary_warnings: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Write the files of a finished run that found `n_classes` (1, 2 or 3) classes (SPLIT_TESTS): a
    two-state particle set seen through cones of directions (the first split), side 2 split again
    for three classes."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    axes = fibonacci_sphere(n_cones).numpy()
    truth = np.where(rng.random(n_particles) < class1_share, 1, 2)
    directions = rng.normal(size=(n_particles, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    nearest = np.argsort(-(directions @ axes.T), axis=1)[:, :3]  # each particle in its 3 nearest cones
    if sparse_cones:  # cone 0 empty, cone 1 keeps only a few members
        nearest = np.where(nearest == 0, 2, nearest)
        keep = ~((nearest == 1) & (np.arange(n_particles)[:, None] % 5 != 0))
        nearest = np.where(keep, nearest, 3)
    signs = rng.choice([-1, 1], n_cones)
    component = np.where(axes[:, 2] > 0, 1, 2) if split_graph else np.ones(n_cones, dtype=int)
    half = 1.5 if separated else 0.4
    membership = pd.DataFrame({"cone": nearest.ravel(), "particle": np.repeat(np.arange(n_particles), 3)})
    membership = membership.drop_duplicates(ignore_index=True)
    c, p = membership["cone"].to_numpy(), membership["particle"].to_numpy()
    rho = signs[c] * np.where(truth[p] == 1, half, -half) + rng.normal(0, 1, len(c))
    rows = []
    for cone in range(n_cones):
        values = rho[c == cone]
        w1 = float(np.mean(values > 0)) if len(values) else float("nan")
        m1, m2 = (half, -half) if len(values) else (float("nan"), float("nan"))
        rows.append({"cone": cone, "particles": len(values), "explained_variance": rng.uniform(0.05, 0.2),
                     "mean1": m1, "mean2": m2, "sigma": 1.0 if len(values) else float("nan"),
                     "weight1": min(max(w1, 0.05), 0.95) if len(values) else float("nan"),
                     "separation": 2 * half if len(values) else float("nan")})
    cones = pd.DataFrame(rows)
    w1, w2 = cones["weight1"].to_numpy()[c], 1 - cones["weight1"].to_numpy()[c]
    llr = np.log(w1 / w2) - 0.5 * ((rho - half) ** 2 - (rho + half) ** 2)
    synced = signs[c] * llr
    cones["sign"] = signs
    cones["component"] = component
    cones["axis_x"], cones["axis_y"], cones["axis_z"] = axes.T
    cones["class1_fraction"] = pd.Series(synced >= 0).groupby(c).mean().reindex(range(n_cones)).to_numpy()
    pairs: dict[tuple[int, int], list[float]] = {}
    for particle in range(n_particles):
        rows_of = np.nonzero(p == particle)[0]
        for a in rows_of:
            for b in rows_of:
                if c[a] < c[b] and component[c[a]] == component[c[b]]:
                    pairs.setdefault((int(c[a]), int(c[b])), []).append(llr[a] * llr[b])
    edges = pd.DataFrame([{"cone1": i, "cone2": j, "shared": len(v), "weight": float(np.sum(v))}
                          for (i, j), v in sorted(pairs.items())])
    starfile.write({"cones": cones, "edges": edges}, out / "run_cones.star")
    starfile.write({"memberships": membership.assign(rho=rho, llr=llr)}, out / "run_memberships.star")

    score = pd.Series(synced).groupby(p).mean().reindex(range(n_particles)).fillna(0).to_numpy()
    logits = {1: np.zeros((n_particles, 1)), 2: np.stack([score / 2, -score / 2], axis=1)}.get(n_classes)
    if logits is None:  # side 2 (score < 0) split in two by a second, independent state
        second = rng.choice([-2.0, 2.0], n_particles) + rng.normal(0, 1, n_particles)
        logits = np.stack([score / 2, -score / 2 + second, -score / 2 - second], axis=1)
    posterior = np.exp(logits - logits.max(axis=1, keepdims=True))
    posterior /= posterior.sum(axis=1, keepdims=True)
    classes = posterior.argmax(axis=1) + 1
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0],
                           "rlnImageSize": [2 * BOX], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1]})
    tilt = np.degrees(np.arccos(directions[:, 2]))
    rot = np.degrees(np.arctan2(directions[:, 1], directions[:, 0]))
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n_particles)],
                              "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": rng.uniform(-180, 180, n_particles),
                              "rlnOpticsGroup": 1, "rlnClassNumber": classes,
                              "rlnMaxValueProbDistribution": posterior.max(axis=1)})
    if n_classes >= 2:
        clipped = np.clip(posterior, 1e-12, 1 - 1e-12)
        for k in range(1, n_classes + 1):
            particles[f"rlnGraphSplitLogOdds{k}"] = np.log(clipped[:, k - 1] / (1 - clipped[:, k - 1]))
    starfile.write({"optics": optics, "particles": particles}, out / "run_data.star")

    stack = []
    for _ in range(n_cones):
        mean = _blob(BOX, (0, 0), 5) + 0.05 * rng.normal(size=(BOX, BOX))
        eigen = _blob(BOX, (0, 5), 2) - _blob(BOX, (0, -5), 2)
        eigen /= np.linalg.norm(eigen)
        stack += [mean, eigen, mean + 3 * eigen, mean - 3 * eigen][:images_per_cone]
    with mrcfile.new(out / "run_cone_images.mrcs") as mrc:
        mrc.set_data(np.stack(stack).astype(np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = 4.0

    if maps:
        for k in range(1, n_classes + 1):
            volume = _blob(BOX, (0, 0, 0), 5) + 0.5 * _blob(BOX, CLASS_BLOBS[n_classes][k - 1], 2)
            with mrcfile.new(out / f"run_class{k:03d}.mrc") as mrc:
                mrc.set_data(volume.astype(np.float32))
                mrc.voxel_size = 4.0
        s = np.arange(BOX // 2 + 1) / (BOX * 4.0)
        blocks = {"model_general": pd.DataFrame({"rlnReferenceDimensionality": [3], "rlnNrClasses": [n_classes]})}
        for k in range(1, n_classes + 1):
            fsc = 1 / (1 + np.exp((s - 0.09 + 0.02 * k) * 150))
            blocks[f"model_class_{k}"] = pd.DataFrame({"rlnSpectralIndex": np.arange(len(s)), "rlnResolution": s,
                                                       "rlnGoldStandardFsc": fsc})
        starfile.write(blocks, out / "run_model.star")
    if mask:
        with mrcfile.new(out / "run_mask.mrc") as mrc:
            mrc.set_data(MASK.astype(np.float32))
            mrc.voxel_size = 4.0

    tests, leaves = SPLIT_TESTS[n_classes]
    sizes = {k: int((classes == k).sum()) for k in range(1, n_classes + 1)}
    split_tests = []
    for node, parent, g1, g2, fsc, kept, reason in tests:
        n = sum(sizes[k] for k, leaf in enumerate(leaves, start=1) if leaf == node or leaf.startswith(node + "."))
        split_tests.append({"node": node, "parent": parent, "particles": n, "halves": [n - n // 2, n // 2],
                            "gain": [g1, g2], "threshold": THRESHOLD, "fsc": fsc, "kept": kept, "reason": reason})
    verdict = (f"{n_classes} classes: each split reproduced on independent halves" if n_classes > 1 else
               "No reproducible heterogeneity at this mask and resolution; a mask focused on the region of "
               "interest may reveal a small difference.")
    summary = {"version": "0.1.0", "python": "3.11", "torch": "2.13.0", "command": "relion_graphsplit --i in.star",
               "input": "in.star", "particles": n_particles, "box": 2 * BOX, "pixel_size": 2.0, "working_box": BOX,
               "working_pixel_size": 4.0, "sampling": 30.0, "cone_angle": 30.0, "cones": n_cones,
               "graph_components": int(len(set(component))),
               "K": n_classes, "K_requested": "auto", "max_K": 4, "verdict": verdict, "split_tests": split_tests,
               "classes": [{"class": k, "node": leaf, "particles": sizes[k]} for k, leaf in enumerate(leaves, start=1)],
               "class_sizes": {str(k): n for k, n in sizes.items()},
               "options": {"symmetry": "C1", "seed": 0}, "timings": {"read": 1.5, "classify": 3.2, "graph": 0.4},
               "warnings": list(summary_warnings)}
    (out / "run_summary.json").write_text(json.dumps(summary))
    return out


def _page(out: Path) -> str:
    """The report of the run in `out`, written anew."""
    write_report(out)
    return (out / "report.html").read_text()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    out = make_run(tmp_path_factory.mktemp("healthy") / "run")
    write_report(out)
    return out


@pytest.fixture(scope="module")
def troubled(tmp_path_factory) -> Path:
    out = make_run(tmp_path_factory.mktemp("troubled") / "run", separated=False, class1_share=0.03,
                   split_graph=True, sparse_cones=True, maps=False,
                   summary_warnings=("very unbalanced classes: 4.0% / 96.0%",))
    write_report(out)
    return out


def _has_colour(png: bytes, colour: str, tolerance: int = 40) -> bool:
    """Whether any pixel is within `tolerance` (per channel) of the hex `colour`."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(rgb - target).max(axis=-1) <= tolerance).any())


def _colours(png: bytes | Path) -> int:
    """Number of distinct colours in a PNG."""
    rgb = np.asarray(Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("RGB"), dtype=np.int32)
    return len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))


def test_report_is_self_contained(healthy):
    page = (healthy / "report.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert not re.search(r"<img[^>]*src\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert "Plotly.newPlot" in page and "data:image/png;base64," in page
    assert len(page) < 8_000_000


def test_page_holds_the_static_style_and_script(healthy):
    """report.css and report.js, package data read at render time, are inlined whole."""
    html = (healthy / "report.html").read_text()
    css, js = page.static_text("report.css"), page.static_text("report.js")
    assert "#cone-slider" in css and "Plotly.react('cone-histogram'" in js
    assert f"<style>\n{css}</style>" in html
    assert f"<script type='text/javascript'>\n{js}</script>" in html


def test_selector_lists_every_cone(healthy):
    page = (healthy / "report.html").read_text()
    listed = [int(c) for c in re.findall(r'<option value="\d+">cone (\d+):', page)]
    cones = read_run(healthy).cones["cone"].tolist()
    assert listed == cones
    data = json.loads(re.search(r'<script type="application/json" id="cone-data">(.*?)</script>', page, re.S)[1])
    assert [d["cone"] for d in data] == cones
    assert all(len(d["images"]) == 6 and len(d["density"]) > 0 for d in data)


def test_figures_are_written(healthy, troubled):
    for name in (*PNGS, "report_maps.png"):
        path = healthy / name
        assert path.stat().st_size > 5000, name
        assert _colours(path) > 10, name
    assert not (troubled / "report_maps.png").exists()
    assert 'id="class-sections-1"' in (healthy / "report.html").read_text()
    assert 'id="class-sections-1"' not in (troubled / "report.html").read_text()


def test_images_shrink_for_many_cones(healthy, monkeypatch):
    run = read_run(healthy)
    full = Image.open(io.BytesIO(base64.b64decode(cone_panels(run)[0]["images"][1].split(",")[1])))
    monkeypatch.setattr(panels, "IMAGE_PIXEL_BUDGET", 6 * len(run.cones) * 16 * 16)
    small = Image.open(io.BytesIO(base64.b64decode(cone_panels(run)[0]["images"][1].split(",")[1])))
    assert full.size == (BOX, BOX) and small.size == (16, 16)


def test_healthy_run_has_no_warnings(healthy):
    assert report_warnings(healthy) == []
    assert "No warnings" in (healthy / "report.html").read_text()


def test_troubled_run_warnings(troubled):
    warnings = report_warnings(troubled)
    assert write_report(troubled) == warnings  # what the programs print after writing the page
    for phrase in ("fewer than 30", "holes in the angular coverage", "disconnected", "separated populations"):
        assert sum(phrase in w for w in warnings) == 1, phrase
    assert sum("unbalanced" in w for w in warnings) == 1  # the run's own warning, not repeated
    page = (troubled / "report.html").read_text()
    box = re.search(r'<div class="warnings" id="warnings">(.*?)</div>', page, re.S)[1]
    assert box.count("<li>") == len(warnings)


def test_two_images_per_cone_are_refused_with_a_note(tmp_path):
    out = make_run(tmp_path / "run", n_cones=12, n_particles=200, maps=False, images_per_cone=2)
    run = read_run(out)
    assert run.images == {} and any("not 4 per cone" in note for note in run.notes)
    assert "not 4 per cone" in render_html(run)


def test_cli_rebuilds_the_report(tmp_path):
    out = make_run(tmp_path / "run", n_cones=12, n_particles=200, maps=False, class1_share=0.03)
    runner = CliRunner()
    assert "report.html" in runner.invoke(app, ["--help"]).output
    result = runner.invoke(app, [str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and "unbalanced" in result.output
    assert runner.invoke(app, [str(tmp_path)]).exit_code == 1


@pytest.mark.browser
def test_page_renders_in_headless_chromium(healthy):
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"{CHROMIUM} is not installed")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((healthy / "report.html").as_uri())
            page.wait_for_function("document.querySelectorAll('.figure .main-svg').length >= 4")
            page.wait_for_timeout(500)
            figures = page.query_selector_all(".figure")
            assert len(figures) >= 7
            shots = {}
            for figure in figures:
                figure.scroll_into_view_if_needed()
                shots[figure.get_attribute("id")] = figure.screenshot()
                assert _colours(shots[figure.get_attribute("id")]) > 1, figure.get_attribute("id")
            assert _has_colour(shots["graph-figure"], SIGN_COLOURS[-1])  # cones drawn by WebGL
            panel = page.query_selector("#cone-panel")
            panel.scroll_into_view_if_needed()
            before = panel.screenshot()
            page.select_option("#cone-select", "7")
            page.wait_for_function("document.querySelector('#cone-histogram .gtitle').textContent.trim() === 'cone 7'")
            page.wait_for_timeout(200)
            assert panel.screenshot() != before
            page.evaluate("document.getElementById('cone-graph').emit('plotly_click', {points: [{customdata: 12}]})")
            assert page.input_value("#cone-select") == "12"
        finally:
            browser.close()
    assert errors == []


@pytest.mark.parametrize(("contrast", "whitened", "expected"), [
    (8.56, True, "coloured (8.6-fold): whitened"),
    (1.12, False, "white (1.1-fold): not whitened"),
    (None, False, "not estimated (not whitened)"),
])
def test_summary_says_how_the_noise_was_treated(tmp_path, contrast, whitened, expected):
    """The summary names the noise's contrast and whether the images were whitened (the run's
    description of it); runs of earlier versions, which did not record it, get no such row."""
    out = make_run(tmp_path / "run", n_cones=12, n_particles=200, maps=False)
    summary_path = out / "run_summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "noise": noise_description(contrast, whitened)}))
    assert f"<th>noise</th><td>{expected}</td>" in _page(out)
    summary_path.write_text(json.dumps(summary))
    assert "<th>noise</th>" not in _page(out)


def test_noise_spectrum_is_plotted_when_estimated(tmp_path):
    """The report plots run_summary.json's noise spectrum against spatial frequency; no plot when the
    noise was not estimated (null) or the run predates the field."""
    out = make_run(tmp_path / "run", n_cones=12, n_particles=200, maps=False)
    summary_path = out / "run_summary.json"
    summary = json.loads(summary_path.read_text())
    spectrum = {"resolution": [80.0, 40.0, 26.7, 20.0], "relative_power": [2.5, 0.9, 0.35, 0.25]}
    summary_path.write_text(json.dumps({**summary, "noise_spectrum": spectrum}))
    page = _page(out)
    assert 'id="noise-figure"' in page
    figure = noise_figure(spectrum)
    assert np.allclose(figure.data[0].x, [1 / 80, 1 / 40, 1 / 26.7, 1 / 20])
    assert list(figure.data[0].y) == spectrum["relative_power"]
    assert "noise_spectrum" not in summary  # as written by earlier versions
    for unestimated in ({**summary, "noise_spectrum": None}, summary):
        summary_path.write_text(json.dumps(unestimated))
        assert 'id="noise-figure"' not in _page(out)


def test_fsc_resolution_is_resolution_at(tmp_path):
    """The report reads the class maps' resolution with fourier.fsc.resolution_at, from run_model.star
    as the run writes it: where the FSC drops below 0.143 and where it never does (then the
    Nyquist resolution, labelled as a bound: "Nyquist 4.0 Å or better")."""
    out = make_run(tmp_path / "run", n_cones=12, n_particles=200)
    box, apix = 2 * BOX, 2.0
    shells = np.arange(box // 2 + 1)
    drops = 1 / (1 + np.exp((shells - 9.3) * 0.8))
    never = np.clip(1 - shells / 40, 0.2, 1)
    assert drops[-1] < 0.143 < never.min()
    write_model_star(out / "run_model.star", ["run_class001.mrc", "run_class002.mrc"], [0.5, 0.5],
                     [resolution_at(c, box, apix) for c in (drops, never)], np.stack([drops, never]),
                     np.ones((2, len(shells))), box, apix)
    run = read_run(out)
    for k, curve in ((1, drops), (2, never)):
        fsc = run.fsc[k]
        assert (fsc.box, fsc.pixel_size) == (box, apix)
        assert fsc.resolution() == resolution_at(fsc.fsc.to_numpy(), box, apix)  # the curve as written
        assert fsc.resolution() == pytest.approx(resolution_at(torch.from_numpy(curve), box, apix), rel=1e-6)
    crossing = run.fsc[1].resolution()
    assert box * apix / 12 < crossing < box * apix / 11  # 0.143 at shell 9.3 + ln(1 / 0.143 - 1) / 0.8
    assert run.fsc[2].resolution() == run.fsc[2].nyquist == pytest.approx(2 * apix)
    assert [resolution_label(c) for c in run.fsc.values()] == [f"{crossing:.1f} Å", "Nyquist 4.0 Å or better"]
    names = [trace.name for trace in fsc_figure(run).data]
    assert names == [f"class 1 ({crossing:.1f} Å at 0.143)", "class 2 (Nyquist 4.0 Å or better at 0.143)"]
    assert "Nyquist 4.0 " in _page(out) and (out / "report_maps.png").is_file()


def test_fsc_sampling_from_the_frequencies(healthy):
    """A model.star without rlnOriginalImageSize and rlnPixelSize (make_run's) gets the box and pixel
    size from rlnResolution; the resolution is resolution_at's all the same."""
    run = read_run(healthy)
    assert set(run.fsc) == {1, 2}
    for curve in run.fsc.values():
        assert curve.box * curve.pixel_size == pytest.approx(BOX * 4.0)
        assert curve.drops()
        assert curve.resolution() == pytest.approx(resolution_at(curve.fsc.to_numpy(), BOX, 4.0), rel=1e-12)


@pytest.fixture(scope="module")
def runs_by_k(tmp_path_factory) -> dict[int, Path]:
    """Runs that found 1, 2 and 3 classes (SPLIT_TESTS), their reports written."""
    runs = {}
    for k in (1, 2, 3):
        runs[k] = make_run(tmp_path_factory.mktemp(f"k{k}") / "run", n_classes=k, n_cones=12, n_particles=300, seed=k)
        write_report(runs[k])
    return runs


def _tree(out: Path) -> dict[str, ElementTree.Element]:
    """Node name -> its li in the page's split tree (the list parses as XML)."""
    fragment = re.search(r'<ul class="tree" id="split-tree">.*?</ul>(?=</div>)', (out / "report.html").read_text())
    return {li.get("data-node"): li for li in ElementTree.fromstring(fragment[0]).iter("li")}


def _text(element: ElementTree.Element) -> str:
    return "".join(element.itertext())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_report_renders_for_any_number_of_classes(runs_by_k, k):
    """The verdict and K open the page; one block of sections per class: the class, the consensus and
    their difference for K >= 2, the class alone (with a word why) for K = 1; every PNG written."""
    out = runs_by_k[k]
    page_text = (out / "report.html").read_text()
    summary = json.loads((out / "run_summary.json").read_text())
    verdict = re.search(r'<div class="verdict" id="verdict">(.*?)</div>', page_text)[1]
    assert f"K = {k}" in verdict and html.escape(summary["verdict"]) in verdict
    assert page_text.index('id="verdict"') < page_text.index("<h2>Summary</h2>")
    for name in (*PNGS, "report_maps.png"):
        assert (out / name).stat().st_size > 3000, name
    blocks = re.findall(r'<div class="figure class-sections" id="class-sections-(\d+)">(.*?)</div></div>', page_text)
    assert [int(b) for b, _ in blocks] == list(range(1, k + 1))
    for b, block in blocks:
        captions = re.findall(r"<figcaption>(.*?)</figcaption>", block)
        if k == 1:
            assert captions == ["class 1, xy", "class 1, xz", "class 1, yz"]
        else:
            assert captions == [f"{label}, {plane}" for plane in ("xy", "xz", "yz")
                                for label in (f"class {b}", "consensus", f"class {b} − consensus")]
        assert f"class {b}: {summary['class_sizes'][b]} particles" in block
    assert ("no class difference to show" in page_text) == (k == 1)
    for c in range(1, k + 1):
        assert f"<th>class {c}</th><td>{summary['class_sizes'][str(c)]} (" in page_text


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tree_lists_every_node_with_its_evidence(runs_by_k, k):
    """Every node tested is in the tree under its parent, with its particles, halves, both gains
    against the threshold, FSC, decision and reason; each class under its leaf."""
    out = runs_by_k[k]
    summary = json.loads((out / "run_summary.json").read_text())
    items = _tree(out)
    assert set(items) == {t["node"] for t in summary["split_tests"]} and len(items) == len(SPLIT_TESTS[k][0])
    parents = {child.get("data-node"): li.get("data-node") for li in items.values() for child in li.iter("li") if child is not li
               and child.get("data-node").rpartition(".")[0] == li.get("data-node")}
    for test in summary["split_tests"]:
        li = items[test["node"]]
        text = _text(li.find("div"))
        assert parents.get(test["node"]) == test["parent"]
        h1, h2 = test["halves"]
        assert f"{test['particles']} particles ({h1} + {h2})" in text
        for gain in test["gain"]:
            assert f"{gain:.3f} {'✓' if gain > THRESHOLD else '✗'}" in text
        assert f"threshold {THRESHOLD:.3f}" in text
        assert ("FSC n/a" if test["fsc"] is None else f"FSC {test['fsc']:.2f}") in text
        assert f"split {'kept' if test['kept'] else 'rejected'}: {test['reason']}" in text
    for c in summary["classes"]:
        assert f"→ class {c['class']} ({c['particles']} particles)" in _text(items[c["node"]].find("div"))
    assert sum("→ class" in _text(li.find("div")) for li in items.values()) == k


def test_kept_and_rejected_splits_are_shown_as_such(runs_by_k):
    """A kept split and a rejected one are marked apart on the page (class, words) and in report_tree.png
    (green and red boxes): K = 2 keeps the root and rejects both sides; K = 1 keeps nothing."""
    items = _tree(runs_by_k[2])
    assert {n: li.get("class") for n, li in items.items()} == {"1": "kept", "1.1": "rejected", "1.2": "rejected"}
    assert "split kept: reproduced on both halves" in _text(items["1"].find("div"))
    assert "0.012 ✓ / 0.003 ✗" in _text(items["1.1"].find("div"))  # one half passes: not enough
    assert "split rejected: halves disagree" in _text(items["1.2"].find("div"))
    kept, rejected = "#e6f4ea", "#fbe3e0"
    two, one = ((runs_by_k[k] / "report_tree.png").read_bytes() for k in (2, 1))
    assert _has_colour(two, kept, 2) and _has_colour(two, rejected, 2)
    assert not _has_colour(one, kept, 2) and _has_colour(one, rejected, 2)
    css = page.static_text("report.css")
    assert "li.kept > .node" in css and "li.rejected > .node" in css


def test_sides_of_the_first_split_name_their_classes(runs_by_k):
    """The cone diagnostics are the first split's: its two sides are named with the classes they became."""
    assert side_labels(read_run(runs_by_k[3])) == {1: "1.1 (class 1)", 2: "1.2 (classes 2, 3)"}
    assert side_labels(read_run(runs_by_k[2])) == {1: "1.1 (class 1)", 2: "1.2 (class 2)"}
    assert side_labels(read_run(runs_by_k[1])) == {1: "1.1 (split not kept)", 2: "1.2 (split not kept)"}
    page_text = (runs_by_k[3] / "report.html").read_text()
    sides = json.loads(re.search(r'<script type="application/json" id="report-sides">(.*?)</script>', page_text)[1])
    assert sides["2"]["label"] == "1.2 (classes 2, 3)"
    assert "side 1.1 average" in page_text and "class 1 average" not in page_text


def test_lowpass_keeps_low_and_removes_high_frequencies():
    """The raised-cosine low-pass: gain 1 below the edge, 0 above it, 1/2 at the resolution."""
    n, apix, resolution = 32, 2.0, 10.0
    volume = np.random.default_rng(0).normal(size=(n, n, n)).astype(np.float32)
    gain = np.abs(np.fft.rfftn(lowpass(volume, apix, resolution))) / np.abs(np.fft.rfftn(volume))
    f = np.sqrt(sum(np.meshgrid(np.fft.fftfreq(n, apix) ** 2, np.fft.fftfreq(n, apix) ** 2,
                                np.fft.rfftfreq(n, apix) ** 2, indexing="ij")))
    edge = EDGE_SHELLS / (n * apix)
    assert np.allclose(gain[f < 1 / resolution - edge / 2], 1, atol=1e-4)
    assert np.allclose(gain[f > 1 / resolution + edge / 2], 0, atol=1e-4)
    assert np.allclose(gain[np.isclose(f, 1 / resolution)], 0.5, atol=1e-3)


def test_sections_are_filtered_masked_and_beside_the_consensus(runs_by_k):
    """Each class's sections are its filtered map times the mask; the consensus is the count-weighted
    mean, the difference the class minus it; for K = 1 the class is the consensus, with no difference."""
    run = read_run(runs_by_k[3])
    shown = map_sections(run)
    assert shown.resolution == section_resolution(run) == 15.0 and shown.masked
    sizes = np.array([run.summary["class_sizes"][str(k)] for k in (1, 2, 3)], dtype=np.float64)
    expected = [[s * m for s, m in zip(central_sections(lowpass(v, 4.0, 15.0)), central_sections(MASK))] for v in run.maps]
    for c, sections in zip(shown.classes, expected):
        for plane in range(3):
            consensus = sum(w * e[plane] for w, e in zip(sizes / sizes.sum(), expected))
            assert np.allclose(c.class_map[plane], sections[plane], atol=1e-5)
            assert np.allclose(c.consensus[plane], consensus, atol=1e-5)
            assert np.allclose(c.difference[plane], sections[plane] - consensus, atol=1e-5)
            assert np.all(c.class_map[plane][central_sections(MASK)[plane] == 0] == 0)
    weighted = sum(w * c.difference[0] for w, c in zip(sizes, shown.classes))
    assert np.abs(weighted).max() < 1e-4 * np.abs(shown.classes[0].difference[0]).max() * sizes.sum()
    single = map_sections(read_run(runs_by_k[1]))
    assert len(single.classes) == 1 and single.classes[0].difference is None
    assert all(np.array_equal(a, b) for a, b in zip(single.classes[0].class_map, single.classes[0].consensus))


def test_section_resolution_follows_the_working_pixel_size(runs_by_k):
    run = read_run(runs_by_k[2])
    for working, expected in ((4.0, 15.0), (8.0, 20.0), (None, 15.0)):
        run.summary["working_pixel_size"] = working
        assert section_resolution(run) == expected


def test_maps_without_a_mask_are_shown_unmasked(tmp_path):
    out = make_run(tmp_path / "run", n_classes=2, n_cones=12, n_particles=200, mask=False)
    run = read_run(out)
    assert run.mask is None and any("run_mask.mrc is missing" in n for n in run.notes)
    assert not map_sections(run).masked
    assert "unmasked" in render_html(run)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_confidence_for_any_number_of_classes(runs_by_k, k):
    """Per class, the histogram of the posterior of its particles (all 1 for K = 1) and, for K >= 2,
    of their log-odds; every particle counted once per panel."""
    run = read_run(runs_by_k[k])
    panels_ = confidence_histograms(run)
    assert [t for t, _ in panels_][:1] == ["posterior of the assigned class"] and len(panels_) == (1 if k == 1 else 2)
    sizes = run.summary["class_sizes"]
    for _, hist in panels_:
        assert sorted(hist) == list(range(1, k + 1))
        assert {c: int(counts.sum()) for c, (_, counts) in hist.items()} == {c: sizes[str(c)] for c in hist}
    if k == 1:
        assert panels_[0][1][1][1][-1] == run.summary["particles"]  # all in the last bin: posterior 1
    else:
        classes = run.particles["rlnClassNumber"].to_numpy()
        table = run.particles[[f"rlnGraphSplitLogOdds{c}" for c in range(1, k + 1)]].to_numpy()
        odds = table[np.arange(len(classes)), classes - 1]  # of each particle's own class
        for c, (edges, counts) in panels_[1][1].items():
            assert np.array_equal(counts, np.histogram(np.clip(odds[classes == c], edges[0], edges[-1]), edges)[0])
    assert len(confidence_figure(run).data) == k * len(panels_)


def test_unbalanced_classes_for_any_number_of_classes(runs_by_k, tmp_path):
    """The class-size check compares every class's share; one class cannot be unbalanced."""
    out = tmp_path / "run"
    shutil.copytree(runs_by_k[3], out)
    summary = json.loads((out / "run_summary.json").read_text())
    summary["class_sizes"] = {"1": 250, "2": 15, "3": 35}
    (out / "run_summary.json").write_text(json.dumps(summary))
    assert computed_warnings(read_run(out))["unbalanced"] == "very unbalanced classes: 83.3% / 5.0% / 11.7%"
    assert "unbalanced" not in computed_warnings(read_run(runs_by_k[3]))
    assert "unbalanced" not in computed_warnings(read_run(runs_by_k[1]))


def test_k_given_shows_the_tree_untested(tmp_path):
    """With --K the run tests no split: the page says so and shows the tree of its classes, every node
    untested (grey in report_tree.png)."""
    out = make_run(tmp_path / "run", n_classes=3, n_cones=12, n_particles=200, maps=False)
    summary = json.loads((out / "run_summary.json").read_text())
    summary.update(K_requested=3, split_tests=[], verdict="3 classes, as asked for with --K 3")
    (out / "run_summary.json").write_text(json.dumps(summary))
    page_text = _page(out)
    assert "K was given (--K 3), so no split was tested." in page_text
    assert "<th>classes</th><td>3 (asked for with --K 3)</td>" in page_text
    items = _tree(out)
    assert {n: li.get("class") for n, li in items.items()} == dict.fromkeys(("1", "1.1", "1.2", "1.2.1", "1.2.2"), "untested")
    assert "→ class 3" in _text(items["1.2.2"].find("div")) and "not tested" in _text(items["1"].find("div"))
    tree_png = (out / "report_tree.png").read_bytes()
    assert _has_colour(tree_png, "#eeeeee", 2) and not _has_colour(tree_png, "#e6f4ea", 2)


def test_runs_of_earlier_versions_still_render(tmp_path):
    """A run of an earlier version (two classes, rlnGraphSplitScore, no K, tree or verdict in its
    summary) still gets its report: K from its class sizes, the sides named by class."""
    out = make_run(tmp_path / "run", n_classes=2, n_cones=12, n_particles=200)
    summary = json.loads((out / "run_summary.json").read_text())
    for key in ("K", "K_requested", "max_K", "verdict", "split_tests", "classes"):
        del summary[key]
    (out / "run_summary.json").write_text(json.dumps(summary))
    data = starfile.read(out / "run_data.star", always_dict=True)
    particles = data["particles"].drop(columns=["rlnGraphSplitLogOdds1", "rlnGraphSplitLogOdds2"])
    prob = particles["rlnMaxValueProbDistribution"]
    particles["rlnGraphSplitScore"] = np.where(particles["rlnClassNumber"] == 1, 1, -1) * np.log(prob / (1 - prob))
    starfile.write({**data, "particles": particles}, out / "run_data.star", overwrite=True)
    run = read_run(out)
    assert run.n_classes == 2 and side_labels(run) == {1: "class 1", 2: "class 2"}
    page_text = _page(out)
    assert "This run records no split tests." in page_text and "K = 2" in page_text
    assert len(re.findall(r'id="class-sections-\d+"', page_text)) == 2


def test_a_merged_pair_is_shown_and_its_class_sits_at_both_leaves(tmp_path):
    """A run whose two most similar classes were merged ("1.2.1+1.2.2", union tested and one mode
    found): the merge check is listed with its evidence and decision, and the merged class is the
    leaf at both nodes of the tree."""
    out = make_run(tmp_path / "run", n_classes=2, n_cones=12, n_particles=300, seed=4)
    summary = json.loads((out / "run_summary.json").read_text())
    summary["split_tests"] = [
        {"node": "1", "parent": None, "particles": 300, "halves": [150, 150], "gain": [0.2, 0.3], "threshold": THRESHOLD,
         "fsc": 0.9, "kept": True, "reason": "two modes in each held-out half"},
        {"node": "1.2", "parent": "1", "particles": 150, "halves": [75, 75], "gain": [0.05, 0.04], "threshold": THRESHOLD,
         "fsc": 0.7, "kept": True, "reason": "two modes in each held-out half"},
        {"node": "1.2.1+1.2.2", "parent": None, "particles": 150, "halves": [75, 75], "gain": [0.001, 0.0],
         "threshold": THRESHOLD, "fsc": 0.1, "kept": False, "reason": "one mode in the held-out halves"},
    ]
    summary["classes"] = [{"class": 1, "node": "1.1", "particles": 150}, {"class": 2, "node": "1.2.1+1.2.2", "particles": 150}]
    (out / "run_summary.json").write_text(json.dumps(summary))
    page = _page(out)
    assert "merged: one mode in the held-out halves" in page
    assert 'data-node="1.2.1+1.2.2"' in page
    tree = re.search(r'<ul class="tree" id="split-tree">.*?</ul>(?=<p>)', page)
    items = {li.get("data-node"): li for li in ElementTree.fromstring(tree[0]).iter("li")}
    assert "1.2.1+1.2.2" not in items
    for node in ("1.2.1", "1.2.2"):
        assert "→ class 2" in _text(items[node].find("div"))
    assert "→ class 1" in _text(items["1.1"].find("div"))
