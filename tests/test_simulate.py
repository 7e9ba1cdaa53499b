"""Maps from atomic models, the particle simulator, its ceiling accuracy and its command line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from relion_graphsplit.cli.simulate import app
from relion_graphsplit.fourier.ctf import ctf_2d
from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.fourier.projection import prepare_volume
from relion_graphsplit.relion.mrc import read_mrc, write_mrc
from relion_graphsplit.relion.star import ctf_params, make_particle_set, poses, read_particles
from relion_graphsplit.simulate import models as maps
from relion_graphsplit.simulate.particles import (
    Conditions,
    ceiling_accuracy,
    draw_particles,
    model_images,
    normalisation_mask,
    simulate,
    write_simulation,
)

REPO = Path(__file__).resolve().parents[1]
STRUCTURES = Path(__file__).resolve().parents[1] / "test_data" / "structures"
SHIFTED = Conditions(max_shift_A=4.0)
NMP_LID = ((30, 59), (122, 159))


@pytest.fixture(scope="module")
def adk_maps() -> tuple[list[np.ndarray], float]:
    (open_map, pixel_size), (closed_map, _) = (
        read_mrc(REPO / "test_data" / f"adk_{state}.mrc") for state in ("open", "closed")
    )
    return [open_map, closed_map], pixel_size


def _angles(table) -> torch.Tensor:
    return euler_to_matrix(*(torch.tensor(table[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))


# ---------------------------------------------------------------- maps and MRC files


def test_write_mrc_round_trip_with_relion_header(tmp_path):
    volume = np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float64)
    write_mrc(tmp_path / "v.mrc", volume, 1.5)
    back, pixel_size = read_mrc(tmp_path / "v.mrc")
    np.testing.assert_array_equal(back, volume.astype(np.float32))
    assert pixel_size == pytest.approx(1.5)
    with mrcfile.open(tmp_path / "v.mrc") as mrc:
        assert mrc.header.mode == 2
        assert tuple(mrc.header.origin.item()) == (0.0, 0.0, 0.0)
        assert (mrc.header.mapc, mrc.header.mapr, mrc.header.maps) == (1, 2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mrc"]


def test_bundled_adk_maps_are_small_and_alike(adk_maps):
    (open_map, closed_map), pixel_size = adk_maps
    assert open_map.shape == closed_map.shape == (64, 64, 64) and pixel_size == pytest.approx(2.0)
    assert all((REPO / "test_data" / f"adk_{s}.mrc").stat().st_size < 2_000_000 for s in ("open", "closed"))
    assert abs(open_map.sum() - closed_map.sum()) < 1e-3 * closed_map.sum()  # same atoms


def test_read_model_fixes_charmm_style_elements():
    model = maps.read_model(STRUCTURES / "adk_open.pdb")
    elements = {cra.atom.element.name for cra in model[0].all()}
    assert elements <= {"C", "N", "O", "S"} and {"C", "N", "O", "S"} <= elements
    cas = [cra.atom for cra in model[0].all() if cra.atom.name == "CA"]
    assert len(cas) == sum(len(chain) for chain in model[0]) and all(a.element.name == "C" for a in cas)


def test_read_model_keeps_the_chains_asked_for():
    full = maps.read_model(STRUCTURES / "1BD2.pdb.gz")
    without_b = maps.read_model(STRUCTURES / "1BD2.pdb.gz", chains=["A", "C", "D", "E"])
    assert [c.name for c in without_b[0]] == ["A", "C", "D", "E"]
    removed = full[0]["B"]
    assert without_b[0].count_atom_sites() == full[0].count_atom_sites() - sum(len(r) for r in removed)
    with pytest.raises(ValueError, match="chains"):
        maps.read_model(STRUCTURES / "1BD2.pdb.gz", chains=["Z"])


def test_superpose_undoes_a_known_motion():
    target = maps.read_model(STRUCTURES / "adk_closed.pdb")
    mobile = target.clone()
    R = Rotation.from_euler("zyz", [30, 50, -20], degrees=True).as_matrix()
    mobile[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(R.tolist()), gemmi.Vec3(5.0, -3.0, 12.0)))
    assert maps.superpose(mobile, target) < 1e-6
    before, _ = maps.atom_positions(mobile)
    after, _ = maps.atom_positions(target)
    np.testing.assert_allclose(before, after, atol=1e-3)


def test_density_is_centred_on_the_given_centre():
    model = maps.read_model(STRUCTURES / "adk_closed.pdb")
    box, pixel_size = 48, 2.5
    com = maps.center_of_mass(model)
    offset = np.array([6.0, -4.0, 2.0])  # (x, y, z) in A
    volume = maps.density_from_model(model, box, pixel_size, bfactor=150.0, center=com + offset)
    weights = np.clip(volume, 0, None)
    z, y, x = np.meshgrid(*(np.arange(box),) * 3, indexing="ij")
    centroid = np.array([(w * weights).sum() / weights.sum() for w in (x, y, z)])
    np.testing.assert_allclose(centroid, box // 2 - offset / pixel_size, atol=0.3)
    with pytest.raises(ValueError, match="box"):
        maps.density_from_model(model, 16, 2.0)


def test_adk_cores_agree_after_superposition():
    box, pixel_size = 64, 2.0
    closed = maps.read_model(STRUCTURES / "adk_closed.pdb")
    raw_open = maps.read_model(STRUCTURES / "adk_open.pdb")
    superposed_open = raw_open.clone()
    maps.superpose(superposed_open, closed, maps.ADK_CORE_RESIDUES)

    def masked_correlations(open_model):
        center = maps.center_of_mass(open_model, closed)
        a, b = (maps.density_from_model(m, box, pixel_size, center=center) for m in (open_model, closed))
        core = maps.residue_mask((open_model, closed), maps.ADK_CORE_RESIDUES, box, pixel_size, center)
        moving = maps.residue_mask((open_model, closed), NMP_LID, box, pixel_size, center)
        corr = [np.corrcoef(a[m], b[m])[0, 1] for m in (core & ~moving, moving & ~core)]
        return corr, ((a - b)[moving & ~core] ** 2).sum() / ((a - b)[core & ~moving] ** 2).sum()

    (core_corr, moving_corr), moving_over_core = masked_correlations(superposed_open)
    (raw_core_corr, _), _ = masked_correlations(raw_open)
    assert core_corr > 0.7 and moving_corr < 0.3
    assert core_corr > raw_core_corr + 0.2
    assert moving_over_core > 2.0  # the difference lies mostly where LID and NMP move


# ---------------------------------------------------------------- simulation


def test_same_seed_same_particles(adk_maps):
    volumes, pixel_size = adk_maps
    kwargs = dict(conditions=Conditions(max_shift_A=5.0, pose_error_deg=2.0, shift_error_A=1.0), seed=7, batch_size=16)
    a = simulate(volumes, pixel_size, 40, 0.1, [0.5, 0.5], **kwargs)
    b = simulate(volumes, pixel_size, 40, 0.1, [0.5, 0.5], **kwargs)
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        assert x.equals(y)
    # Another batch size draws the same particles and noise (FFT rounding aside).
    c = simulate(volumes, pixel_size, 40, 0.1, [0.5, 0.5], **{**kwargs, "batch_size": 40})
    np.testing.assert_allclose(a[0], c[0], atol=1e-5)
    columns = ["NormScale", "NormOffset", "NoiseStddev"]
    assert a[3].drop(columns=columns).equals(c[3].drop(columns=columns))
    d = simulate(volumes, pixel_size, 40, 0.1, [0.5, 0.5], **{**kwargs, "seed": 8})
    assert not np.allclose(a[0], d[0])


def test_images_are_normalised_like_relion_extraction(adk_maps):
    volumes, pixel_size = adk_maps
    images, *_ = simulate(volumes, pixel_size, 30, 0.5, [0.5, 0.5], SHIFTED, seed=1)
    background = images[:, ~normalisation_mask(64).numpy()]
    np.testing.assert_allclose(background.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(background.std(1), 1.0, atol=1e-5)


def test_snr_is_signal_variance_inside_the_circle_over_noise_variance(adk_maps):
    volumes, pixel_size = adk_maps
    snr = 0.3
    images, _, optics, truth = simulate(volumes, pixel_size, 150, snr, [0.5, 0.5], SHIFTED, seed=2)
    truth_set = make_particle_set(truth, optics)
    rotations, origins = poses(truth_set)
    ctf = ctf_2d(ctf_params(truth_set), 64, pixel_size)
    classes = truth["rlnClassNumber"].to_numpy() - 1
    inside = normalisation_mask(64).numpy()
    measured = []
    for k, volume in enumerate(volumes):
        rows = np.flatnonzero(classes == k)
        signal = model_images(prepare_volume(torch.from_numpy(volume)), rotations[rows], origins[rows], ctf[rows])
        for s, y in zip(signal.double().numpy(), images[rows].astype(np.float64)):
            # Regress the image on its noiseless signal; the residual is the (scaled) noise.
            design = np.stack([s.ravel(), np.ones(s.size)], axis=1)
            coef, *_ = np.linalg.lstsq(design, y.ravel(), rcond=None)
            residual = y.ravel() - design @ coef
            measured.append(coef[0] ** 2 * s[inside].var() / residual.var())
    assert np.mean(measured) == pytest.approx(snr, rel=0.05)


def test_class_fractions_and_pose_errors():
    particles, optics, truth = draw_particles(
        4000, 64, 2.0, [0.3, 0.7], Conditions(pose_error_deg=3.0, shift_error_A=2.0, max_shift_A=5.0), seed=3
    )
    assert np.mean(truth["rlnClassNumber"] == 1) == pytest.approx(0.3, abs=0.03)
    assert set(truth["rlnClassNumber"]) == {1, 2} and len(optics) == 1
    A_true, A_seen = _angles(truth), _angles(particles)
    cos = ((torch.einsum("nij,nij->n", A_true, A_seen) - 1) / 2).clamp(-1, 1)
    rms_angle = torch.rad2deg(torch.acos(cos)).pow(2).mean().sqrt().item()
    assert rms_angle == pytest.approx(3.0, rel=0.05)
    origins = ["rlnOriginXAngst", "rlnOriginYAngst"]
    shift = particles[origins].to_numpy() - truth[origins].to_numpy()
    assert np.sqrt((shift**2).sum(1).mean()) == pytest.approx(2.0, rel=0.05)
    assert np.abs(truth[origins].to_numpy()).max() <= 5.0
    # Uniform orientations: projection directions spread evenly, each axis with E[d_i^2] = 1/3.
    directions = A_true[:, 2, :].numpy()
    np.testing.assert_allclose(directions.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose((directions**2).mean(0), 1 / 3, atol=0.03)


def test_ceiling_accuracy_from_certain_to_chance(adk_maps):
    volumes, pixel_size = adk_maps
    high = simulate(volumes, pixel_size, 100, 0.1, [0.5, 0.5], SHIFTED, seed=4)
    low = simulate(volumes, pixel_size, 200, 1e-6, [0.5, 0.5], SHIFTED, seed=5)
    assert ceiling_accuracy(high[0], volumes, high[3], high[2]) >= 0.98
    assert ceiling_accuracy(low[0], volumes, low[3], low[2]) == pytest.approx(0.5, abs=0.1)


def test_coloured_noise_has_the_asked_spectrum(adk_maps):
    """Images of noise alone (SNR 1e-6): white noise has a flat power spectrum; coloured noise has the
    power 1 + E exp(-B s^2 / 2), and the per-pixel variance (hence the SNR's meaning) is kept."""
    volumes, pixel_size = adk_maps
    box = volumes[0].shape[-1]
    k = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64)
    s2 = (k[:, None] ** 2 + k[None, : box // 2 + 1] ** 2).reshape(-1)
    shells = [(s2 > lo**2) & (s2 <= hi**2) for lo, hi in ((0.0, 0.02), (0.02, 0.04), (0.1, 0.2))]
    for excess in (0.0, 8.0):
        conditions = Conditions(noise_excess=excess, noise_bfactor=1000.0)
        images = simulate(volumes, pixel_size, 300, 1e-6, [0.5, 0.5], conditions, seed=2)[0]
        power = torch.fft.rfft2(torch.from_numpy(images).to(torch.float64)).abs().square().mean(0).reshape(-1)
        expected = 1.0 + excess * torch.exp(-1000.0 * s2 / 2)
        measured = [power[shell].mean() / power[shells[-1]].mean() for shell in shells[:2]]
        for m, shell in zip(measured, shells):
            assert m.item() == pytest.approx((expected[shell].mean() / expected[shells[-1]].mean()).item(), rel=0.1)
    unit = Conditions(noise_excess=8.0).noise_filter(box, pixel_size)
    full = torch.cat([unit, unit[:, 1 : (box + 1) // 2]], dim=1)  # with the rfft grid's other half
    assert full.square().mean().item() == pytest.approx(1.0, rel=1e-9)
    assert torch.equal(Conditions().noise_filter(box, pixel_size), torch.ones(box, box // 2 + 1, dtype=torch.float64))


def test_ceiling_knows_the_noise_colour(adk_maps):
    """On coloured noise the Bayes classifier that knows the colour does better than one that takes
    the noise for white."""
    volumes, pixel_size = adk_maps
    conditions = Conditions(max_shift_A=4.0, noise_excess=8.0)
    images, _, optics, truth = simulate(volumes, pixel_size, 400, 0.01, [0.5, 0.5], conditions, seed=6)
    knowing = ceiling_accuracy(images, volumes, truth, optics, conditions=conditions)
    white = ceiling_accuracy(images, volumes, truth, optics)
    assert knowing > white + 0.02


def test_write_simulation_files_match_the_simulation(adk_maps, tmp_path):
    volumes, pixel_size = adk_maps
    kwargs = dict(conditions=Conditions(max_shift_A=3.0, pose_error_deg=1.0), seed=6, batch_size=10)
    particles, optics, truth = write_simulation(tmp_path, volumes, pixel_size, 24, 0.2, [0.5, 0.5], **kwargs)
    images, *_ = simulate(volumes, pixel_size, 24, 0.2, [0.5, 0.5], **kwargs)
    with mrcfile.open(tmp_path / "particles.mrcs") as mrc:
        np.testing.assert_array_equal(mrc.data, images)
        assert mrc.voxel_size.x == pytest.approx(pixel_size)
    written = read_particles(tmp_path / "particles.star")
    assert written.version == 30001 and len(written.particles) == 24
    np.testing.assert_allclose(written.particles["rlnAngleRot"], particles["rlnAngleRot"])
    assert written.particles["rlnImageName"].iloc[-1] == "000024@particles.mrcs"
    true_set = read_particles(tmp_path / "truth.star")
    np.testing.assert_array_equal(true_set.particles["rlnClassNumber"], truth["rlnClassNumber"])
    for k, volume in enumerate(volumes, start=1):
        np.testing.assert_array_equal(read_mrc(tmp_path / f"class{k}.mrc")[0], volume)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="relion_reconstruct not on PATH")
def test_relion_reconstructs_the_true_class_from_the_truth_file(adk_maps, tmp_path):
    """End to end with RELION's conventions: angles, origins and CTF as relion_reconstruct reads them."""
    volumes, pixel_size = adk_maps
    write_simulation(tmp_path, volumes, pixel_size, 400, 10.0, [0.5, 0.5], conditions=Conditions(max_shift_A=6.0), seed=9)
    command = ["relion_reconstruct", "--i", "truth.star", "--o", "rec.mrc", "--class", "1", "--ctf"]
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    reconstruction = mrcfile.read(tmp_path / "rec.mrc").ravel()
    corr = [np.corrcoef(reconstruction, v.ravel())[0, 1] for v in volumes]
    assert corr[0] > 0.8 and corr[0] > corr[1] + 0.2


# ---------------------------------------------------------------- command line


def test_cli_from_maps(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "--map1", str(REPO / "test_data/adk_open.mrc"), "--map2", str(REPO / "test_data/adk_closed.mrc"),
            "--n", "20", "--snr", "0.5", "--fraction", "0.3", "--max_shift", "3", "--pose_error", "2",
            "--seed", "1", "--o", str(tmp_path / "sim"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Ceiling accuracy" in result.output
    assert {p.name for p in (tmp_path / "sim").iterdir()} == {
        "particles.mrcs", "particles.star", "truth.star", "class1.mrc", "class2.mrc"
    }  # fmt: skip


def test_cli_takes_dashes_as_well_as_underscores(tmp_path):
    """Options are spelt as RELION's (--pose_error); the dashed forms (--pose-error) do the same."""
    maps = ["--map1", str(REPO / "test_data/adk_open.mrc"), "--map2", str(REPO / "test_data/adk_closed.mrc")]
    common = ["--n", "6", "--snr", "0.5", "--seed", "3"]
    spellings = {
        "underscores": ["--max_shift", "3", "--pose_error", "2", "--defocus_min", "15000", "--batch_size", "4", "--no_ceiling"],
        "dashes": ["--max-shift", "3", "--pose-error", "2", "--defocus-min", "15000", "--batch-size", "4", "--no_ceiling"],
    }
    for name, args in spellings.items():
        result = CliRunner().invoke(app, [*maps, *common, *args, "--o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert "Ceiling accuracy" not in result.output
    written = [(tmp_path / name / "particles.star").read_text() for name in spellings]
    assert written[0] == written[1]
    particles = starfile.read(tmp_path / "dashes" / "particles.star")["particles"]
    assert ((particles["rlnDefocusU"] + particles["rlnDefocusV"]) / 2 >= 15000).all()  # --defocus-min was taken


def test_cli_from_models_with_a_chain_left_out(tmp_path):
    model = str(STRUCTURES / "1BD2.pdb.gz")
    args = ["--pdb1", model, "--pdb2", model, "--chains2", "A,C,D,E", "--box", "54", "--angpix", "3"]
    result = CliRunner().invoke(app, args + ["--n", "8", "--no_ceiling", "--o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    full, partial = (read_mrc(tmp_path / f"class{k}.mrc")[0] for k in (1, 2))
    assert 0.8 < partial.sum() / full.sum() < 0.95  # chain B is ~12 kDa of ~95 kDa


def test_cli_superposes_adk_on_its_core(tmp_path):
    args = ["--pdb1", str(STRUCTURES / "adk_open.pdb"), "--pdb2", str(STRUCTURES / "adk_closed.pdb")]
    args += ["--superpose_core", "--box", "48", "--angpix", "2", "--n", "4", "--no_ceiling", "--o", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Superposed model 1 onto model 2 on 1-29,60-121,160-214" in result.output


def test_cli_help_and_bad_inputs(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(app, ["--help"]).output
    options = ("--map1", "--pdb1", "--chains1", "--superpose_core", "--snr", "--fraction", "--pose_error", "--seed")
    assert all(option in help_text for option in options)
    result = runner.invoke(app, ["--map1", str(REPO / "test_data/adk_open.mrc"), "--o", str(tmp_path)])
    assert result.exit_code != 0


@pytest.mark.parametrize(
    "option",
    [["--n", "0"], ["--snr", "0"], ["--fraction", "1.5"], ["--batch_size", "0"], ["--pose_error", "-1"],
     ["--max_shift", "-2"], ["--defocus_min", "30000", "--defocus_max", "10000"]],
)
def test_cli_option_values_out_of_range_are_usage_errors(tmp_path, option):
    maps = ["--map1", str(REPO / "test_data/adk_open.mrc"), "--map2", str(REPO / "test_data/adk_closed.mrc")]
    result = CliRunner().invoke(app, [*maps, "--no_ceiling", "--o", str(tmp_path / "sim"), *option])
    assert result.exit_code == 2
    assert "defocus" in result.output if "--defocus_min" in option else option[0] in result.output
    assert not (tmp_path / "sim").exists()


def test_read_mrc_names_a_file_that_is_not_a_map(tmp_path):
    (tmp_path / "empty.mrc").write_bytes(b"")
    (tmp_path / "particles.star").write_text("data_particles\n\nloop_\n_rlnImageName #1\n" + "1@a.mrcs\n" * 200)
    for name, why in (("empty.mrc", "an empty file"), ("particles.star", "no MRC header")):
        with pytest.raises(ValueError) as info:
            read_mrc(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: not an MRC map ({why})"
    write_mrc(tmp_path / "cut.mrc", np.zeros((8, 8, 8), np.float32), 2.0)
    with open(tmp_path / "cut.mrc", "r+b") as f:
        f.truncate(1024 + 100)
    with pytest.raises(ValueError, match=r"cut.mrc: not an MRC map \(the file is shorter than its header announces"):
        read_mrc(tmp_path / "cut.mrc")


def cli_refusal(args: list[str]) -> str:
    """The error of a command line that must be refused as a usage error, without a traceback, with the
    lines that the 80-column error panel wraps it into joined again."""
    result = CliRunner().invoke(app, [*args, "--n", "4", "--no_ceiling", "--o", "sim"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.replace("│", " ").split())


def test_cli_names_missing_and_unreadable_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative names: the error panel does not wrap them
    closed = str(REPO / "test_data/adk_closed.mrc")
    output = cli_refusal(["--map1", "missing.mrc", "--map2", closed])
    assert "'--map1'" in output and "missing.mrc" in output and "does not exist" in output
    output = cli_refusal(["--pdb1", "gone.pdb", "--pdb2", "gone.pdb", "--box", "32", "--angpix", "2"])
    assert "'--pdb1'" in output and "gone.pdb" in output and "does not exist" in output
    Path("text.mrc").write_text("data_\n" * 300)
    output = cli_refusal(["--map1", closed, "--map2", "text.mrc"])
    assert "--map2" in output and "text.mrc: not an MRC map (no MRC header)" in output
    output = cli_refusal(["--pdb1", "text.mrc", "--pdb2", "text.mrc", "--box", "32", "--angpix", "2"])
    assert "--pdb1" in output and "text.mrc: not a readable atomic model" in output
    assert not Path("sim").exists()


def test_cli_refuses_a_map_with_nan_or_inf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mrc("bad.mrc", np.zeros((8, 8, 8), np.float32), 2.0)
    with mrcfile.open("bad.mrc", "r+") as mrc:
        mrc.data[1, 2, 3], mrc.data[5, 5, 5] = np.nan, np.inf
    output = cli_refusal(["--map1", "bad.mrc", "--map2", str(REPO / "test_data/adk_closed.mrc")])
    assert "--map1" in output
    assert "bad.mrc: 2 voxel(s) are not finite numbers (NaN or Inf), the first at (z, y, x) = (1, 2, 3)" in output


def test_cli_without_gemmi_says_how_to_get_it(tmp_path, monkeypatch):
    """gemmi is the optional [models] extra: without it, models are refused with one line that says how
    to install it (before any other complaint about the model options), and maps still work."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "gemmi", None)  # `import gemmi` now raises ImportError
    Path("a.pdb").write_text("END\n")
    needs = "reading atomic models needs gemmi: pip install 'relion-graphsplit[models]'"
    assert needs in cli_refusal(["--pdb1", "a.pdb", "--pdb2", "a.pdb", "--box", "32", "--angpix", "2"])
    assert needs in cli_refusal(["--pdb1", "a.pdb", "--pdb2", "a.pdb"])
    adk = [str(REPO / f"test_data/adk_{state}.mrc") for state in ("open", "closed")]
    result = CliRunner().invoke(app, ["--map1", adk[0], "--map2", adk[1], "--n", "4", "--no_ceiling", "--o", "sim"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sim" / "particles.star").exists()


def test_the_programs_load_without_gemmi():
    """Only reading a model needs gemmi: every console command's module loads without it."""
    code = (
        "import sys; sys.modules['gemmi'] = None\n"
        "import relion_graphsplit.cli.graphsplit, relion_graphsplit.cli.report, relion_graphsplit.cli.simulate\n"
        "assert 'relion_graphsplit.simulate.models' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
