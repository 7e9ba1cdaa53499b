"""The whole program on a small simulated data set: accuracy, outputs, determinism."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from relion_graphsplit.cli.graphsplit import app
from relion_graphsplit.method import pipeline
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.method.pipeline import split
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.mrc import read_mrc, write_mrc
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.run_files.write import image_names_from_workdir
from relion_graphsplit.simulate.metrics import accuracy

TEST_DATA = Path(__file__).resolve().parents[1] / "test_data"


@pytest.fixture(scope="module")
def simulated(simulated_set) -> Path:
    """1500 particles of the bundled adenylate kinase states, box 32 at 4 A, SNR 0.3, 60/40."""
    return simulated_set(1500, 0.3, [0.6, 0.4], seed=3, pose_error_deg=1.0, max_shift_A=6.0)


def run(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def run_console(args: list[str]) -> subprocess.CompletedProcess:
    """The program as the console command runs it: a process of its own, started by launch and left
    through cli.main."""
    command = [sys.executable, "-c", "from relion_graphsplit.cli.launch import graphsplit; graphsplit()", *args]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def split_runs(simulated: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The same split with --j 1 (in this process) and --j 2 (as the console command)."""
    first, second = tmp_path_factory.mktemp("split_j1"), tmp_path_factory.mktemp("split_j2")
    run(["--i", str(simulated / "particles.star"), "--o", str(first), "--j", "1"])
    done = run_console(["--i", str(simulated / "particles.star"), "--o", str(second), "--j", "2"])
    assert done.returncode == 0, done.stdout + done.stderr
    return first, second


def test_console_exit_codes(simulated: Path, tmp_path: Path):
    assert run_console(["--help"]).returncode == 0
    assert run_console(["--i", "particles.star"]).returncode == 2  # no --o: a usage error
    missing = run_console(["--i", str(tmp_path / "missing.star"), "--o", str(tmp_path / "out")])
    assert missing.returncode == 1
    assert "missing.star" in missing.stdout + missing.stderr
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    onto_file = run_console(["--i", str(tmp_path / "missing.star"), "--o", str(a_file)])
    assert onto_file.returncode == 2  # --o names a file: a usage error, before anything is read
    assert "not a directory" in onto_file.stdout + onto_file.stderr
    under_file = run_console(["--i", str(simulated / "particles.star"), "--o", str(a_file / "out")])
    assert under_file.returncode == 1  # --o cannot be made: one line, no traceback
    assert "Not a directory" in under_file.stderr and "Traceback" not in under_file.stdout + under_file.stderr


def test_scratch_dir_holds_the_working_images_and_is_left_empty(simulated: Path, tmp_path: Path, monkeypatch):
    """--scratch_dir takes the temporary images (a node's local disk on a cluster) and is left as it
    was found; one that does not exist is a usage error, before anything is written."""
    from relion_graphsplit.cli import job

    made = []

    def recorded(particles, stacks, options, folder, *args, **kwargs):
        made.append(Path(folder))
        return pipeline.prepare(particles, stacks, options, folder, *args, **kwargs)

    monkeypatch.setattr(job, "prepare", recorded)
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    run(["--i", str(simulated / "particles.star"), "--o", str(out), "--scratch_dir", str(scratch), "--refine_iter", "1"])
    assert [p.parent for p in made] == [scratch.resolve()]  # in the run's own folder there
    assert not list(scratch.iterdir())
    assert (out / "run_data.star").is_file() and not list(out.glob("graphsplit_*"))
    missing = CliRunner().invoke(app, ["--i", str(simulated / "particles.star"), "--o", str(tmp_path / "out2"),
                                       "--scratch_dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "--scratch_dir" in missing.output
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "option", [["--maxres", "0"], ["--angular_sampling", "-5"], ["--cone_angle", "0"], ["--batch_size", "0"],
               ["--particles_per_cone", "0"], ["--resize", "3"], ["--j", "0"], ["--refine_iter", "-1"]],
)
def test_option_values_out_of_range_are_usage_errors(tmp_path: Path, option: list[str]):
    result = CliRunner().invoke(app, ["--i", str(tmp_path / "p.star"), "--o", str(tmp_path / "out"), *option])
    assert result.exit_code == 2
    assert option[0] in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")
def test_bad_masks_and_maps_are_refused(simulated: Path, tmp_path: Path):
    box, apix = 32, 4.0
    cases = {
        "empty": ("--mask", np.zeros((box,) * 3, np.float32), "is empty"),
        "density": ("--mask", np.linspace(-0.5, 2.0, box**3, dtype=np.float32).reshape((box,) * 3), "runs from 0 to 1"),
        "nan_mask": ("--mask", np.full((box,) * 3, np.nan, np.float32), "not finite"),
        "nan_ref": ("--ref", np.full((box,) * 3, np.nan, np.float32), "not finite"),
    }
    for name, (option, volume, message) in cases.items():
        write_mrc(tmp_path / f"{name}.mrc", volume, apix)
        out = tmp_path / f"out_{name}"
        args = ["--i", str(simulated / "particles.star"), "--o", str(out), option, str(tmp_path / f"{name}.mrc")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, name
        text = " ".join(result.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())  # rich's error panel
        assert message in text, name
        assert not out.exists(), name


def test_accuracy_on_clear_data(simulated: Path, split_runs):
    truth_set = star_io.read_particles(simulated / "truth.star")
    truth = truth_set.particles.assign(rlnImageName=image_names_from_workdir(truth_set))
    result = star_io.read_particles(split_runs[0] / "run_data.star").particles
    # Match on rlnImageName (as named from the working directory), never on row order.
    merged = result.merge(truth[["rlnImageName", "rlnClassNumber"]], on="rlnImageName", suffixes=("", "_true"))
    assert len(merged) == len(truth)
    assert accuracy(merged["rlnClassNumber"].to_numpy(), merged["rlnClassNumber_true"].to_numpy()) >= 0.95


def test_outputs_keep_inputs_and_add_classes(simulated: Path, split_runs):
    out = split_runs[0]
    original = star_io.read_particles(simulated / "particles.star")
    data = star_io.read_particles(out / "run_data.star")
    assert set(original.particles.columns) < set(data.particles.columns)
    columns = {"rlnClassNumber", "rlnMaxValueProbDistribution", "rlnGraphSplitLogOdds1", "rlnGraphSplitLogOdds2"}
    assert columns <= set(data.particles.columns)
    for column in original.particles.columns.drop("rlnImageName"):
        assert (data.particles[column].to_numpy() == original.particles[column].to_numpy()).all(), column
    # The same images, named as found from the working directory (through the STAR file's folder).
    assert (data.particles["rlnImageName"] == image_names_from_workdir(original)).all()
    assert data.particles["rlnImageName"].iloc[0] == f"000001@{simulated / 'particles.mrcs'}"
    p = data.particles["rlnMaxValueProbDistribution"]
    assert p.between(0.5, 1.0).all()
    score = data.particles["rlnGraphSplitLogOdds1"]
    assert ((score >= 0) == (data.particles["rlnClassNumber"] == 1)).all()
    np.testing.assert_allclose(data.particles["rlnGraphSplitLogOdds2"], -score, atol=1e-9)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-score.abs())), rtol=1e-9)
    sizes = []
    for k in (1, 2):
        part = star_io.read_particles(out / f"run_class00{k}_data.star").particles
        assert (part["rlnClassNumber"] == k).all()
        sizes.append(len(part))
    assert sum(sizes) == len(original.particles)
    for name in ("run_cones.star", "run_memberships.star", "run_cone_images.mrcs", "run_summary.json"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob(".*partial*")) and not list(out.glob("graphsplit_*"))
    summary = json.loads((out / "run_summary.json").read_text())
    assert 1.0 <= summary["noise_contrast"] < 2.0  # white noise, so not whitened
    spectrum = summary["noise_spectrum"]  # one value per ring of the working box, Nyquist last
    assert len(spectrum["resolution"]) == len(spectrum["relative_power"]) == summary["working_box"] // 2
    assert spectrum["resolution"][-1] == pytest.approx(2 * summary["working_pixel_size"])
    power = np.asarray(spectrum["relative_power"])
    assert power.mean() == pytest.approx(1.0) and power.max() / power.min() == pytest.approx(summary["noise_contrast"])


def test_default_mask_is_drawn_around_the_particle(simulated: Path, split_runs):
    # The simulated particles are centred: the mask written holds the centre, not the box's corners,
    # and covers far less than the box (a sphere over 80% of it would cover 27%).
    mask, apix = read_mrc(split_runs[0] / "run_mask.mrc")
    assert mask.shape == (32, 32, 32) and apix == pytest.approx(4.0)
    assert mask[16, 16, 16] > 0.99 and mask[0, 0, 0] == 0 and mask[-1, -1, -1] == 0
    assert 0.02 < mask.mean() < 0.2
    small, _ = read_mrc(simulated / "class1.mrc")  # the open state, as simulated
    assert mask[small > 0.5 * small.max()].min() > 0.95  # the dense core is inside (trilinear resampling softens the edge)


def test_a_given_mask_is_used_and_written(simulated: Path, tmp_path: Path):
    box = np.zeros((32, 32, 32), dtype=np.float32)
    box[8:24, 8:24, 8:24] = 1.0
    write_mrc(tmp_path / "mask.mrc", box, 4.0)
    out = tmp_path / "o"
    run(["--i", str(simulated / "particles.star"), "--o", str(out), "--mask", str(tmp_path / "mask.mrc"), "--refine_iter", "1"])
    written, _ = read_mrc(out / "run_mask.mrc")
    np.testing.assert_allclose(written, box, atol=1e-6)


def test_threads_do_not_change_classes(split_runs):
    a, b = (star_io.read_particles(out / "run_data.star").particles for out in split_runs)
    np.testing.assert_array_equal(a["rlnClassNumber"].to_numpy(), b["rlnClassNumber"].to_numpy())
    odds = "rlnGraphSplitLogOdds1"
    np.testing.assert_allclose(a[odds].to_numpy(), b[odds].to_numpy(), rtol=1e-9, atol=1e-12)


def test_bad_input_gives_one_clear_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["--i", str(TEST_DATA / "star-samples" / "empiar_10076_7.star"), "--o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "rlnAngleRot" in result.output and "Traceback" not in result.output


def test_mask_of_wrong_size_is_refused(simulated: Path, tmp_path: Path):
    write_mrc(tmp_path / "mask.mrc", np.ones((16, 16, 16), dtype=np.float32), 4.0)
    result = CliRunner().invoke(
        app, ["--i", str(simulated / "particles.star"), "--o", str(tmp_path / "o"), "--mask", str(tmp_path / "mask.mrc")]
    )
    assert result.exit_code != 0
    assert "mask" in result.output


def test_a_collapsed_split_still_writes_the_particles(simulated: Path, tmp_path: Path, monkeypatch):
    from relion_graphsplit.cli import job

    real_split = job.split_prepared

    def one_class(*args, **kwargs):
        result = real_split(*args, **kwargs)
        result.classes[:] = 1
        return result

    monkeypatch.setattr(job, "split_prepared", one_class)
    out = tmp_path / "o"
    result = run(["--i", str(simulated / "particles.star"), "--o", str(out), "--refine_iter", "0"])
    assert "no class maps" in result.output
    assert (star_io.read_particles(out / "run_data.star").particles["rlnClassNumber"] == 1).all()
    assert not (out / "run_class001.mrc").exists() and not (out / "run_model.star").exists()


def test_whitening_helps_on_coloured_noise(simulated_set):
    """Noise with the low-frequency excess of real images (simulate.Conditions.noise_excess): whitening
    images and CTFs by the residuals' noise spectrum (the default) classifies better than without."""
    coloured = simulated_set(
        1500, 0.1, [0.5, 0.5], seed=3, pose_error_deg=1.0, max_shift_A=6.0, noise_excess=8.0, noise_bfactor=1000.0
    )
    ps = star_io.read_particles(coloured / "particles.star")
    truth = star_io.read_particles(coloured / "truth.star").particles["rlnClassNumber"].to_numpy()
    accuracies = {}
    for whiten in (True, False):
        with ImageStacks(ps) as stacks:
            accuracies[whiten] = accuracy(split(star_io.particles(ps), stacks, SplitOptions(whiten=whiten)).classes, truth)
    assert accuracies[True] > 0.93
    assert accuracies[True] > accuracies[False] + 0.02


def test_every_progress_bar_is_taken_to_its_end(simulated: Path):
    """A bar whose iterable is left suspended after its last item never takes its last step: it
    stays one short, its clock running, for the rest of the run."""
    bars = []

    def track(iterable, description: str = "", total: int | None = None):
        bar = [description, False]
        bars.append(bar)
        yield from iterable
        bar[1] = True

    ps = star_io.read_particles(simulated / "particles.star")
    with ImageStacks(ps) as stacks:
        split(star_io.particles(ps), stacks, SplitOptions(refine_iterations=2), track=track)
    assert "Correcting for the CTF" in [description for description, _ in bars]
    assert [description for description, ended in bars if not ended] == []


def test_no_whiten_leaves_the_noise_unestimated(simulated: Path, tmp_path: Path):
    """--no_whiten: no noise estimate (null in run_summary.json, said in the summary table); the
    classes are those of the default run, since the simulated noise is white and left alone anyway."""
    plain, default = tmp_path / "plain", tmp_path / "default"
    result = run(["--i", str(simulated / "particles.star"), "--o", str(plain), "--no_whiten", "--refine_iter", "1"])
    assert "not estimated" in result.output
    summary = json.loads((plain / "run_summary.json").read_text())
    assert summary["noise_contrast"] is None and summary["noise_spectrum"] is None
    run(["--i", str(simulated / "particles.star"), "--o", str(default), "--refine_iter", "1"])
    classes = [star_io.read_particles(d / "run_data.star").particles["rlnClassNumber"].to_numpy() for d in (plain, default)]
    assert np.array_equal(*classes)


def test_peak_memory_is_the_programs_own():
    """A run started from a large process (a benchmark, a notebook) reports its own peak memory, not
    the parent's: getrusage's ru_maxrss inherits the parent's across fork and exec, VmHWM does not."""
    held = np.ones(1_500_000_000 // 8)  # 1.5 GB resident in this process while the child runs
    code = "from relion_graphsplit.cli.job import peak_memory_mb; import resource; " \
           "print(peak_memory_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own, inherited = (float(v) for v in done.stdout.split())
    assert held.sum() > 0
    assert inherited > 1400  # what the summary reported before
    assert 50 < own < 1000  # the child's libraries (torch, pandas, ...), not the parent's array


_FRAGMENTED_HEAP = """
import ctypes, sys
from relion_graphsplit.cli.job import return_free_memory
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) // 1024
blocks = [bytearray(100_000) for _ in range(2000)]  # 200 MB below the mmap threshold: on the heap
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])
del blocks[::2]  # every other block freed: the heap cannot shrink from its top
before = anon()
trimmed = return_free_memory()
print(trimmed, before, anon())
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_free_heap_memory_is_returned_between_steps():
    """Freed blocks inside the C heap stay resident until malloc_trim returns them (glibc): 100 MB here."""
    done = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    trimmed, before, after = done.stdout.split()
    if trimmed == "False":
        pytest.skip("not glibc: nothing to return")
    assert int(before) - int(after) > 80  # MiB of the 100 MB freed


def test_working_batches_hold_the_pixels_of_full_size_batches():
    options = SplitOptions(batch_size=256)
    assert options.working_batch(128, 32) == 256 * 16
    assert options.working_batch(100, 64) == 256 * 2  # whole multiples of the full-size batch
    assert options.working_batch(64, 64) == 256


def test_the_run_lets_go_of_its_tables_before_the_report(simulated: Path, tmp_path: Path, monkeypatch):
    """The report reads the run back from its files: while it is written, the split's result (with the
    memberships), the class maps and the inputs (the particle table) are no longer held."""
    import gc

    from relion_graphsplit import report
    from relion_graphsplit.cli import job
    from relion_graphsplit.method.classmaps import ClassMaps
    from relion_graphsplit.method.pipeline import SplitResult

    kinds = (SplitResult, ClassMaps, job._Inputs)

    def alive() -> int:
        gc.collect()
        return sum(type(o) in kinds for o in gc.get_objects())  # type(), not isinstance: a dead weak proxy raises

    before, during = alive(), []
    write_report = report.write_report

    def watched(*args, **kwargs):
        during.append(alive())
        return write_report(*args, **kwargs)

    monkeypatch.setattr(report, "write_report", watched)
    run(["--i", str(simulated / "particles.star"), "--o", str(tmp_path / "run"), "--j", "1"])
    assert during == [before]
    assert (tmp_path / "run" / "report.html").is_file()
