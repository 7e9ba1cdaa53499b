"""The run report: a self-contained page and PNG figures built from a synthetic finished run."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

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
from relion_graphsplit.report.colours import SIGN_COLOURS
from relion_graphsplit.report.data import resolution_label
from relion_graphsplit.report.figures import fsc_figure, noise_figure
from relion_graphsplit.report.panels import cone_panels
from relion_graphsplit.run_files.write import noise_description

BOX = 24
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PNGS = ("report_cones.png", "report_sphere.png", "report_confidence.png")


def _blob(box: int, centre: tuple[float, ...], width: float) -> np.ndarray:
    grid = np.indices((box,) * len(centre), dtype=np.float64) - box // 2
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return np.exp(-r2 / (2 * width**2))


def make_run(out: Path, *, n_cones: int = 30, n_particles: int = 600, separated: bool = True,
             class1_share: float = 0.5, split_graph: bool = False, sparse_cones: bool = False,
             maps: bool = True, images_per_cone: int = 4, summary_warnings: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Write the files of a finished run: a two-state particle set seen through cones of directions."""
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
    classes = np.where(score >= 0, 1, 2)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0],
                           "rlnImageSize": [2 * BOX], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1]})
    tilt = np.degrees(np.arccos(directions[:, 2]))
    rot = np.degrees(np.arctan2(directions[:, 1], directions[:, 0]))
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n_particles)],
                              "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": rng.uniform(-180, 180, n_particles),
                              "rlnOpticsGroup": 1, "rlnClassNumber": classes,
                              "rlnMaxValueProbDistribution": 1 / (1 + np.exp(-np.abs(score))),
                              "rlnGraphSplitScore": score})
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
        for k, centre in ((1, (0, 0, 4)), (2, (0, 0, -4))):
            volume = _blob(BOX, (0, 0, 0), 5) + 0.5 * _blob(BOX, centre, 2)
            with mrcfile.new(out / f"run_class{k:03d}.mrc") as mrc:
                mrc.set_data(volume.astype(np.float32))
                mrc.voxel_size = 4.0
        s = np.arange(BOX // 2 + 1) / (BOX * 4.0)
        blocks = {"model_general": pd.DataFrame({"rlnReferenceDimensionality": [3], "rlnNrClasses": [2]})}
        for k, s0 in ((1, 0.07), (2, 0.05)):
            fsc = 1 / (1 + np.exp((s - s0) * 150))
            blocks[f"model_class_{k}"] = pd.DataFrame({"rlnSpectralIndex": np.arange(len(s)), "rlnResolution": s,
                                                       "rlnGoldStandardFsc": fsc})
        starfile.write(blocks, out / "run_model.star")

    summary = {"version": "0.1.0", "python": "3.11", "torch": "2.13.0", "command": "relion_graphsplit --i in.star",
               "input": "in.star", "particles": n_particles, "box": 2 * BOX, "pixel_size": 2.0, "working_box": BOX,
               "working_pixel_size": 4.0, "sampling": 30.0, "cone_angle": 30.0, "cones": n_cones,
               "graph_components": int(len(set(component))),
               "class_sizes": {str(k): int((classes == k).sum()) for k in (1, 2)},
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
    assert "Class maps" in (healthy / "report.html").read_text()
    assert "Class maps" not in (troubled / "report.html").read_text()


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
