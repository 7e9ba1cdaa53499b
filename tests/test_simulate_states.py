"""Particle sets of K >= 1 states: the simulator's command line (--map, --pdb with --chains, --fractions),
the truth it writes, the ceiling classifier for K classes, and models between two conformations."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from relion_graphsplit.cli.simulate import app
from relion_graphsplit.fourier.ctf import ctf_2d
from relion_graphsplit.fourier.projection import prepare_volume
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.relion.star import ctf_params, poses, read_particles
from relion_graphsplit.simulate import models
from relion_graphsplit.simulate.particles import Conditions, ceiling_accuracy, model_images, simulate
from tests.test_simulate_stream import without_time

REPO = Path(__file__).resolve().parents[1]
ADK = [str(REPO / "test_data" / f"adk_{state}.mrc") for state in ("open", "closed")]
BD2 = str(REPO / "test_data" / "structures" / "1BD2.pdb.gz")
STATES_1BD2 = ["--pdb", BD2, "--chains", "all", "--chains", "A,C,D,E", "--chains", "A,B,C", "--box", "32", "--angpix", "6"]
"""1BD2 whole, without chain B (beta-2 microglobulin) and without chains D and E (the T-cell receptor)."""


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def refusal(args: list[str], tmp_path: Path) -> str:
    """The one-line usage error of a command line that must be refused, before anything is written."""
    result = CliRunner().invoke(app, [*args, "--n", "4", "--no_ceiling", "--o", str(tmp_path / "sim")])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "sim").exists()
    return " ".join(result.output.replace("│", " ").split())


def correlations_with_each_state(folder: Path, states: int) -> np.ndarray:
    """(n, K) correlation of each image with the noiseless image of each state's map (classK.mrc) at
    the particle's true pose and CTF (truth.star)."""
    truth = read_particles(folder / "truth.star")
    rotations, origins = poses(truth)
    volumes = [read_mrc(folder / f"class{k}.mrc") for k in range(1, states + 1)]
    box, pixel_size = volumes[0][0].shape[-1], volumes[0][1]
    ctf = ctf_2d(ctf_params(truth), box, pixel_size)
    with mrcfile.open(folder / "particles.mrcs") as mrc:
        images = torch.from_numpy(mrc.data.astype(np.float64)).flatten(1)
    images = images - images.mean(1, keepdim=True)
    out = np.empty((len(images), states))
    for k, (volume, _) in enumerate(volumes):
        model = model_images(prepare_volume(torch.from_numpy(volume)), rotations, origins, ctf).double().flatten(1)
        model = model - model.mean(1, keepdim=True)
        out[:, k] = ((images * model).sum(1) / (images.norm(dim=1) * model.norm(dim=1))).numpy()
    return out


def test_three_states_of_1bd2_by_their_chains(tmp_path):
    """One --pdb with three --chains: three states in the asked shares, rlnClassNumber 1..3 in
    truth.star (and not in particles.star), and each state's images closest to its own map."""
    n, shares = 400, np.array([0.5, 0.3, 0.2])
    output = invoke([*STATES_1BD2, "--fractions", "0.5,0.3,0.2", "--n", str(n), "--snr", "2", "--seed", "4",
                     "--o", str(tmp_path)])  # fmt: skip
    assert {p.name for p in tmp_path.iterdir()} == {
        "particles.mrcs", "particles.star", "truth.star", "class1.mrc", "class2.mrc", "class3.mrc"
    }  # fmt: skip
    truth = read_particles(tmp_path / "truth.star").particles["rlnClassNumber"].to_numpy()
    assert "rlnClassNumber" not in read_particles(tmp_path / "particles.star").particles
    counts = np.bincount(truth, minlength=4)[1:]
    assert f"Wrote {n} particles ({counts[0]} of class 1, {counts[1]} of class 2, {counts[2]} of class 3)" in output
    # Each share within four binomial standard deviations.
    assert np.all(np.abs(counts / n - shares) < 4 * np.sqrt(shares * (1 - shares) / n)), counts
    masses = [read_mrc(tmp_path / f"class{k}.mrc")[0].sum() for k in (1, 2, 3)]
    assert masses[0] > masses[1] > masses[2]  # all, less beta-2 microglobulin (12 kDa), less the TCR (50 kDa)
    corr = correlations_with_each_state(tmp_path, 3)
    for k in range(3):
        own = corr[truth == k + 1]
        assert (own[:, k][:, None] >= own).all(1).mean() > 0.9, f"state {k + 1}"
        assert all(own[:, k].mean() > own[:, j].mean() for j in range(3) if j != k)
    ceiling = float(output.split("Ceiling accuracy (true maps, poses, CTF and noise level):")[1].split()[0])
    assert ceiling > 0.95


def test_repeated_map_is_map1_and_map2(tmp_path):
    """--map1/--map2 --fraction f and --map --map --fractions f,1-f make the same files."""
    common = ["--n", "12", "--snr", "0.5", "--seed", "2", "--max_shift", "2", "--pose_error", "1", "--no_ceiling"]
    invoke(["--map1", ADK[0], "--map2", ADK[1], "--fraction", "0.3", *common, "--o", str(tmp_path / "old")])
    invoke(["--map", ADK[0], "--map", ADK[1], "--fractions", "0.3,0.7", *common, "--o", str(tmp_path / "new")])
    for name in ("particles.star", "truth.star", "particles.mrcs", "class1.mrc", "class2.mrc"):
        assert without_time(tmp_path / "old" / name) == without_time(tmp_path / "new" / name), name
    # Without fractions the shares are equal: --fraction's old default of 0.5 for two states.
    invoke(["--map1", ADK[0], "--map2", ADK[1], *common, "--o", str(tmp_path / "even")])
    invoke(["--map", ADK[0], "--map", ADK[1], "--fractions", "0.5,0.5", *common, "--o", str(tmp_path / "halves")])
    assert (tmp_path / "even" / "truth.star").read_bytes() == (tmp_path / "halves" / "truth.star").read_bytes()


def test_one_map_is_a_homogeneous_set(tmp_path):
    output = invoke(["--map", ADK[0], "--n", "10", "--snr", "0.1", "--o", str(tmp_path)])
    assert "Wrote 10 particles (10 of class 1)" in output
    assert "Ceiling accuracy (true maps, poses, CTF and noise level): 1.000" in output
    assert set(read_particles(tmp_path / "truth.star").particles["rlnClassNumber"]) == {1}
    assert not (tmp_path / "class2.mrc").exists()


def test_superposes_every_model_onto_the_last(tmp_path):
    adk = [str(REPO / "test_data" / "structures" / f"adk_{state}.pdb") for state in ("open", "closed")]
    args = ["--pdb", adk[0], "--pdb", adk[0], "--pdb", adk[1], "--superpose_core", "--box", "32", "--angpix", "4"]
    output = invoke([*args, "--n", "3", "--no_ceiling", "--o", str(tmp_path)])
    assert "Superposed model 1 onto model 3" in output and "Superposed model 2 onto model 3" in output
    maps = [read_mrc(tmp_path / f"class{k}.mrc")[0] for k in (1, 2, 3)]
    np.testing.assert_array_equal(maps[0], maps[1])
    assert not np.allclose(maps[0], maps[2])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--map", ADK[0], "--map", ADK[1], "--map", ADK[0], "--fraction", "0.3"], "--fraction is for two states, got 3"),
        (["--map", ADK[0], "--map", ADK[1], "--fractions", "0.2,0.3,0.5"], "3 fraction(s) for 2 state(s)"),
        (["--map", ADK[0], "--map", ADK[1], "--fractions", "0.2,0.3"], "the fractions are non-negative and sum to 1"),
        (["--map", ADK[0], "--map", ADK[1], "--fractions", "1.2,-0.2"], "the fractions are non-negative and sum to 1"),
        (["--map", ADK[0], "--map", ADK[1], "--fractions", "a,b"], "not a comma-separated list of numbers"),
        (["--map1", ADK[0], "--map2", ADK[1], "--fraction", "0.5", "--fractions", "0.5,0.5"], "not both"),
        (["--map", ADK[0], "--map1", ADK[1]], "give the states as --map1 and --map2"),
        (["--map", ADK[0], "--pdb", BD2], "give the states as --map1 and --map2"),
        (["--map1", ADK[0]], "give --map1 and --map2"),
        (["--map", ADK[0], "--chains", "A"], "--chains goes with --pdb"),
        (["--pdb", BD2, "--pdb", BD2, "--chains", "A", "--box", "32", "--angpix", "6"], "2 --pdb and 1 --chains"),
        (["--pdb", BD2, "--chains", "A", "--chains", "Z", "--box", "32", "--angpix", "6"], "chains ['Z'] are not in"),
        (["--pdb", BD2, "--superpose_core", "--box", "32", "--angpix", "6"], "--superpose_core needs two models or more"),
        ([], "give the states as --map1 and --map2"),
    ],
)
def test_bad_state_options_are_usage_errors(tmp_path, args, message):
    assert message in refusal(args, tmp_path)


def test_ceiling_of_three_classes_from_certain_to_chance():
    """The ceiling classifier takes the argmax over K classes: near 1 at a high SNR, the largest share
    at an SNR of nothing (the log prior alone decides)."""
    (open_map, pixel_size), (closed_map, _) = (read_mrc(path) for path in ADK)
    volumes = [open_map, closed_map, 0.5 * (open_map + closed_map)]  # a third state between the two
    conditions = Conditions(max_shift_A=3.0)
    high = simulate(volumes, pixel_size, 90, 0.5, [0.4, 0.3, 0.3], conditions, seed=3)
    low = simulate(volumes, pixel_size, 300, 1e-6, [0.6, 0.2, 0.2], conditions, seed=4)
    assert ceiling_accuracy(high[0], volumes, high[3], high[2]) > 0.95
    share = np.mean(low[3]["rlnClassNumber"] == 1)
    assert ceiling_accuracy(low[0], volumes, low[3], low[2]) == pytest.approx(share, abs=0.05)


def test_interpolated_model_lies_between_the_two():
    structures = REPO / "test_data" / "structures"
    start, end = models.read_model(structures / "adk_open.pdb"), models.read_model(structures / "adk_closed.pdb")
    models.superpose(start, end)
    a, b = models.atom_positions(start)[0], models.atom_positions(end)[0]
    np.testing.assert_allclose(models.atom_positions(models.interpolate_models(start, end, 0.0))[0], a, atol=1e-3)
    np.testing.assert_allclose(models.atom_positions(models.interpolate_models(start, end, 1.0))[0], b, atol=1e-3)
    middle = models.atom_positions(models.interpolate_models(start, end, 0.5))[0]
    np.testing.assert_allclose(middle, (a + b) / 2, atol=1e-3)
    assert np.abs(a - b).max() > 10.0  # the LID domain moves by tens of A
    with pytest.raises(ValueError, match="different atoms"):
        models.interpolate_models(start, models.read_model(structures / "1BD2.pdb.gz"), 0.5)
