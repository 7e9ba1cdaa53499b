"""How many classes: the held-out test of a split, and the number of classes it leads to."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import check_grad
from typer.testing import CliRunner

from relion_graphsplit.cli.graphsplit import app
from relion_graphsplit.method.gold_standard import GAIN_THRESHOLD, _modes_nll, bimodality_gain, threshold_for
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.method.pipeline import split
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.simulate.metrics import accuracy


def test_one_gaussian_spread_gains_nothing_two_modes_gain():
    """Scores spread as one Gaussian (whatever the spread, with noise of varying size) gain almost
    nothing from two modes; two states 3 noise units apart gain well above the threshold."""
    rng = np.random.default_rng(0)
    m = 3000
    variance = rng.uniform(0.5, 2.0, m)
    for spread in (0.0, 1.0, 4.0):
        z = rng.normal(0.3, np.sqrt(spread + variance))
        assert bimodality_gain(z, variance) < GAIN_THRESHOLD / 2
    states = rng.choice([-1.5, 1.5], m)
    z = states + rng.normal(0.0, np.sqrt(variance))
    gain = bimodality_gain(z, variance)
    assert gain > 3 * GAIN_THRESHOLD
    assert bimodality_gain(z, variance) == gain  # deterministic
    unequal = np.where(rng.uniform(size=m) < 0.2, 3.0, 0.0) + rng.normal(0.0, np.sqrt(variance))
    assert bimodality_gain(unequal, variance) > 3 * GAIN_THRESHOLD


@pytest.mark.parametrize("params", [[-1.0, 1.5, 0.3, -0.5], [-2.0, 0.1, 2.0, 0.4, -0.7, 0.2]])
def test_the_mixture_gradient_is_the_likelihood_s(params):
    rng = np.random.default_rng(4)
    z, v = rng.normal(size=300) * 2, rng.uniform(0.5, 2.0, 300)
    params = np.asarray(params)
    error = check_grad(lambda p: _modes_nll(p, z, v)[0], lambda p: _modes_nll(p, z, v)[1], params)
    assert error < 1e-4 * np.linalg.norm(_modes_nll(params, z, v)[1])


def test_small_halves_need_a_larger_gain_per_particle():
    assert threshold_for((5000, 6000)) == GAIN_THRESHOLD
    assert threshold_for((400, 6000)) > GAIN_THRESHOLD


def _split(folder: Path, **options):
    ps = star_io.read_particles(folder / "particles.star")
    with ImageStacks(ps) as stacks:
        return split(star_io.particles(ps), stacks, SplitOptions(**options))


def _truth(folder: Path) -> np.ndarray:
    return star_io.read_particles(folder / "truth.star").particles["rlnClassNumber"].to_numpy()


@pytest.fixture(scope="module")
def homogeneous(simulated_set) -> Path:
    """1400 particles of one adenylate kinase state, box 32 at 4 A, SNR 0.1, pose errors of 2 degrees and 1 A."""
    return simulated_set(1400, 0.1, [1.0, 0.0], seed=11, pose_error_deg=2.0, shift_error_A=1.0, max_shift_A=4.0)


@pytest.fixture(scope="module")
def two_states(simulated_set) -> Path:
    """1400 particles of the open and closed states, 50/50, otherwise as `homogeneous`."""
    return simulated_set(1400, 0.1, [0.5, 0.5], seed=12, pose_error_deg=2.0, shift_error_A=1.0, max_shift_A=4.0)


def test_a_homogeneous_set_with_pose_errors_is_one_class(homogeneous: Path):
    result = _split(homogeneous)
    assert result.n_classes == 1 and (result.classes == 1).all()
    assert np.all(result.probability == 1.0)
    (test,) = result.split_tests
    assert test.node == "1" and not test.kept and sum(test.halves) == 1400
    assert not min(test.gain) > test.threshold  # nan where a half-set already found one class
    assert "No reproducible heterogeneity" in result.verdict


def test_two_states_are_two_classes_and_the_classes_are_not_split_again(two_states: Path):
    result = _split(two_states)
    assert result.n_classes == 2
    assert accuracy(result.classes, _truth(two_states)) > 0.95
    root, *children = result.split_tests
    assert root.kept and min(root.gain) > root.threshold and root.fsc > 0.5
    assert [c.node for c in children] == ["1.1", "1.2"] or all(not c.kept for c in children)
    assert not any(c.kept for c in children)
    assert result.class_nodes == ["1.1", "1.2"]


def test_k_given_splits_untested_and_writes_every_class(two_states: Path, tmp_path: Path):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["--i", str(two_states / "particles.star"), "--o", str(out), "--K", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["K"] == 3 and summary["K_requested"] == 3 and summary["split_tests"] == []
    assert [c["node"] for c in summary["classes"]] == sorted(c["node"] for c in summary["classes"])
    data = star_io.read_particles(out / "run_data.star").particles
    assert sorted(data["rlnClassNumber"].unique()) == [1, 2, 3]
    odds = data[[f"rlnGraphSplitLogOdds{k}" for k in (1, 2, 3)]].to_numpy()
    given = data["rlnClassNumber"].to_numpy()
    # The probabilities are held out, the classes the refinement's: the probability written is the
    # held-out one of the class given, which is the most probable for nearly every particle.
    held_out = 1 / (1 + np.exp(-odds[np.arange(len(data)), given - 1]))
    np.testing.assert_allclose(data["rlnMaxValueProbDistribution"].to_numpy(), held_out, rtol=1e-5)
    assert np.mean(np.argmax(odds, axis=1) + 1 == given) > 0.9
    for k in (1, 2, 3):
        assert (out / f"run_class{k:03d}.mrc").exists() and (out / f"run_class{k:03d}_data.star").exists()
    assert "--K 3" in result.output


def test_k_must_be_auto_or_a_count(two_states: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["--i", str(two_states / "particles.star"), "--o", str(tmp_path / "o"), "--K", "two"])
    assert result.exit_code == 2 and "--K" in result.output
