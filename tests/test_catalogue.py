"""The catalogue of bad inputs and faults: what the program promises about your files (README).

Every case asserts the exit code, that the message is one line with no traceback, that the inputs'
checksums are unchanged, and what the output folder holds afterwards. Refusals run in this process
through `cli.run_command` (the console command's own code, without its start-up); the faults that
need a process of their own (kills, concurrent runs) run the console command.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from relion_graphsplit.cli.graphsplit import run_command
from relion_graphsplit.run_files.folder import LOCK_NAME, STAGING_NAME, RunFolder

OUTPUTS = {
    "run_data.star", "run_class001_data.star", "run_class002_data.star", "run_class001.mrc", "run_class002.mrc",
    "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_half1_class002_unfil.mrc",
    "run_half2_class002_unfil.mrc", "run_model.star", "run_mask.mrc", "run_cones.star", "run_memberships.star",
    "run_cone_images.mrcs", "run_summary.json", "report.html", "report_cones.png", "report_sphere.png",
    "report_confidence.png", "report_maps.png", "report_tree.png",
}  # fmt: skip
FAST = ["--refine_iter", "2", "--j", "2", "--K", "2"]  # two classes, untested: the same files every run


def checksums(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders, by path."""
    sums = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                sums[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def one_line(text: str) -> str:
    """The only non-empty line of `text` (a message), after checking there is exactly one."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def data(small_set: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the small simulated set, with the working directory in the test's folder."""
    copy = tmp_path / "data"
    shutil.copytree(small_set, copy)
    monkeypatch.chdir(tmp_path)
    return copy


def refuse(capsys, args: list[str], code: int, *words: str, inputs: Path, out: Path) -> str:
    """Run, expect exit `code` and a one-line message naming `words`, the inputs unchanged and no
    output folder made; return the message."""
    before = checksums(inputs)
    existed = out.exists()
    assert run_command(args) == code
    captured = capsys.readouterr()
    message = one_line(captured.err)
    assert message.startswith("error:"), message
    assert "Traceback" not in captured.out
    for word in words:
        assert word in message, message
    assert checksums(inputs) == before
    assert out.exists() == existed
    return message


# Particle tables: a change of the good set, the words its message must hold.
def _set(data: Path, particles=None, optics=None) -> Path:
    """particles.star of `data` with its tables changed by the functions given, as bad.star."""
    blocks = starfile.read(data / "particles.star", always_dict=True)
    if particles is not None:
        blocks["particles"] = particles(blocks["particles"])
    if optics is not None:
        blocks["optics"] = optics(blocks["optics"])
    starfile.write(blocks, data / "bad.star", overwrite=True)
    return data / "bad.star"


def _column(name, value):
    def change(table):
        table = table.copy()
        table[name] = value
        return table

    return change


def _first_row(name, value):
    def change(table):
        table = table.copy()
        table.loc[0, name] = value
        return table

    return change


TABLE_CASES = {
    "pixel size 0": (None, _column("rlnImagePixelSize", 0.0), ["rlnImagePixelSize"]),
    "negative pixel size": (None, _column("rlnImagePixelSize", -4.0), ["rlnImagePixelSize"]),
    "voltage 0": (None, _column("rlnVoltage", 0.0), ["rlnVoltage"]),
    "amplitude contrast 1.5": (None, _column("rlnAmplitudeContrast", 1.5), ["rlnAmplitudeContrast"]),
    "3D images": (None, _column("rlnImageDimensionality", 3), ["rlnImageDimensionality"]),
    "negative defocus": (_first_row("rlnDefocusU", -15000.0), None, ["rlnDefocusU", "row 1"]),
    "zero defocus": (_column("rlnDefocusV", 0.0), None, ["rlnDefocusV"]),
    "origins of 1e6 A": (_first_row("rlnOriginXAngst", 1e6), None, ["rlnOriginXAngst", "row 1"]),
    "every row the same image": (_column("rlnImageName", "000001@particles.mrcs"), None, ["000001@particles.mrcs"]),
    "every row twice": (lambda t: pd.concat([t, t], ignore_index=True), None, ["row"]),
    "an angle not a number": (_first_row("rlnAngleTilt", np.nan), None, ["rlnAngleTilt", "row 1"]),
    "an unknown optics group": (_first_row("rlnOpticsGroup", 7), None, ["optics group"]),
    "no angles": (lambda t: t.drop(columns=["rlnAngleRot"]), None, ["rlnAngleRot"]),
    "no defocus": (lambda t: t.drop(columns=["rlnDefocusU"]), None, ["rlnDefocusU"]),
    "no image names": (lambda t: t.drop(columns=["rlnImageName"]), None, ["rlnImageName"]),
    "an image number 0": (_first_row("rlnImageName", "000000@particles.mrcs"), None, ["000000@particles.mrcs"]),
    "an image beyond its stack": (_first_row("rlnImageName", "009999@particles.mrcs"), None, ["particles.mrcs"]),
    "a stack that is not there": (_first_row("rlnImageName", "000001@elsewhere.mrcs"), None, ["elsewhere.mrcs"]),
    "a box unlike the stack's": (None, _column("rlnImageSize", 48), ["rlnImageSize"]),
}


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_bad_particle_table_is_refused(case, data: Path, tmp_path: Path, capsys):
    particles, optics, words = TABLE_CASES[case]
    bad = _set(data, particles, optics)
    refuse(capsys, ["--i", str(bad), "--o", "out", *FAST], 1, "bad.star", *words, inputs=data, out=tmp_path / "out")


def _write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


STAR_FILE_CASES = {
    "missing": (lambda d: d / "missing.star", ["missing.star"]),
    "a folder": (lambda d: d, ["folder"]),
    "empty": (lambda d: _write_file(d / "bad.star", b""), ["bad.star"]),
    "binary": (lambda d: _write_file(d / "bad.star", bytes(range(256)) * 8), ["bad.star"]),
    "cut inside its first row": (
        lambda d: _write_file(d / "bad.star", (d / "particles.star").read_bytes()[:1200]), ["bad.star"]
    ),
    "optics only": (
        lambda d: _write_file(d / "bad.star", (d / "particles.star").read_bytes().split(b"data_particles")[0]),
        ["bad.star"],
    ),
}


@pytest.mark.parametrize("case", list(STAR_FILE_CASES))
def test_unreadable_star_file_is_refused(case, data: Path, tmp_path: Path, capsys):
    make, words = STAR_FILE_CASES[case]
    path = make(data)
    refuse(capsys, ["--i", str(path), "--o", "out", *FAST], 1, *words, inputs=data, out=tmp_path / "out")


def _stack_zero_bytes(d: Path) -> None:
    (d / "particles.mrcs").write_bytes(b"")


def _stack_truncated(d: Path) -> None:
    content = (d / "particles.mrcs").read_bytes()
    (d / "particles.mrcs").write_bytes(content[: len(content) // 2])


def _stack_with_nan(d: Path) -> None:
    with mrcfile.open(d / "particles.mrcs", "r+") as mrc:
        mrc.data[17, 3, 4] = np.nan


def _stack_with_inf(d: Path) -> None:
    with mrcfile.open(d / "particles.mrcs", "r+") as mrc:
        mrc.data[300, 0, 0] = np.inf


def _stack_not_mrc(d: Path) -> None:
    shutil.copy(d / "particles.star", d / "particles.mrcs")


STACK_CASES = {
    "zero bytes": (_stack_zero_bytes, ["particles.mrcs"]),
    "truncated": (_stack_truncated, ["particles.mrcs"]),
    "a NaN pixel": (_stack_with_nan, ["particles.mrcs", "image 18"]),
    "an Inf pixel": (_stack_with_inf, ["particles.mrcs", "image 301"]),
    "a STAR file": (_stack_not_mrc, ["particles.mrcs"]),
}


@pytest.mark.parametrize("case", list(STACK_CASES))
def test_bad_stack_is_refused(case, data: Path, tmp_path: Path, capsys):
    damage, words = STACK_CASES[case]
    damage(data)
    refuse(capsys, ["--i", str(data / "particles.star"), "--o", "out", *FAST], 1, *words, inputs=data, out=tmp_path / "out")


def _map(path: Path, volume: np.ndarray, apix: float = 4.0) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume.astype(np.float32))
        mrc.voxel_size = apix
    return path


def _with_nan(volume: np.ndarray) -> np.ndarray:
    volume[3, 4, 5] = np.nan
    return volume


MAP_CASES = {
    "--ref missing": ("--ref", lambda d: d / "none.mrc", ["none.mrc"]),
    "--ref a STAR file": ("--ref", lambda d: d / "particles.star", ["particles.star"]),
    "--ref all zero": ("--ref", lambda d: _map(d / "zero.mrc", np.zeros((32, 32, 32))), ["zero.mrc", "everywhere"]),
    "--ref of another box": ("--ref", lambda d: _map(d / "big.mrc", np.random.rand(40, 40, 40)), ["big.mrc", "40"]),
    "--ref of another pixel size": (
        "--ref", lambda d: _map(d / "apix.mrc", np.random.rand(32, 32, 32), 3.0), ["apix.mrc", "pixel size"]
    ),
    "--ref with a NaN voxel": ("--ref", lambda d: _map(d / "nan.mrc", _with_nan(np.ones((32, 32, 32)))), ["nan.mrc", "finite"]),
    "--mask above 1": ("--mask", lambda d: _map(d / "m.mrc", np.full((32, 32, 32), 2.0)), ["m.mrc", "0 to 1"]),
    "--mask empty": ("--mask", lambda d: _map(d / "m.mrc", np.zeros((32, 32, 32))), ["m.mrc"]),
}


@pytest.mark.parametrize("case", list(MAP_CASES))
def test_bad_map_is_refused(case, data: Path, tmp_path: Path, capsys):
    option, make, words = MAP_CASES[case]
    path = make(data)
    args = ["--i", str(data / "particles.star"), "--o", "out", option, str(path), *FAST]
    refuse(capsys, args, 2, *words, inputs=data, out=tmp_path / "out")


OPTION_CASES = {
    "no --i": ([], ["--i"]),
    "no --o": (["--o"], ["--o"]),
    "an empty --o": (["--o", ""], ["--o", "empty"]),
    "a negative --particle_diameter": (["--particle_diameter", "-50"], ["--particle_diameter"]),
    "--angular_sampling below 0.5": (["--angular_sampling", "0.4"], ["--angular_sampling"]),
    "--j 0": (["--j", "0"], ["--j"]),
    "--batch_size 0": (["--batch_size", "0"], ["--batch_size"]),
    "an unknown CTF correction": (["--ctf_correction", "magic"], ["--ctf_correction"]),
    "a missing --scratch_dir": (["--scratch_dir", "nowhere"], ["nowhere"]),
    "--mask_threshold 2": (["--mask_threshold", "2"], ["--mask_threshold"]),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option_is_refused(case, data: Path, tmp_path: Path, capsys):
    extra, words = OPTION_CASES[case]
    args = ["--i", str(data / "particles.star"), "--o", "out"]
    if case == "no --i":
        args = ["--o", "out"]
    elif case == "no --o":
        args = ["--i", str(data / "particles.star")]
        extra = []
    refuse(capsys, [*args, *extra], 2, *words, inputs=data, out=tmp_path / "out")


def test_bad_point_group_is_refused(data: Path, tmp_path: Path, capsys):
    args = ["--i", str(data / "particles.star"), "--o", "out", "--sym", "X7", *FAST]
    refuse(capsys, args, 2, "X7", inputs=data, out=tmp_path / "out")


def test_output_folder_that_is_a_file(data: Path, tmp_path: Path, capsys):
    (tmp_path / "a_file").write_text("")
    args = ["--i", str(data / "particles.star"), "--o", "a_file", *FAST]
    refuse(capsys, args, 2, "a_file", inputs=data, out=tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == ""


def test_output_folder_under_a_file(data: Path, tmp_path: Path, capsys):
    (tmp_path / "a_file").write_text("")
    args = ["--i", str(data / "particles.star"), "--o", "a_file/out", *FAST]
    refuse(capsys, args, 1, "a_file", inputs=data, out=tmp_path / "a_file")


def test_read_only_output_folder(data: Path, tmp_path: Path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "out").mkdir(mode=0o555)
    refuse(capsys, ["--i", str(data / "particles.star"), "--o", "out", *FAST], 1, "out", inputs=data, out=tmp_path / "out")


# Runs that finish: a fixture runs the set once; the cases below start from a copy of that folder.
def console(args: list[str], cwd: Path) -> subprocess.Popen:
    """The console command in a process of its own, as a user starts it from a terminal (Ctrl-C
    acts: a process started in the background of a shell would inherit SIGINT ignored)."""
    command = [sys.executable, "-c", "from relion_graphsplit.cli.launch import graphsplit; graphsplit()", *args]
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def finished(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def earlier_run(small_set: Path, tmp_path_factory) -> tuple[Path, Path, float]:
    """A project folder with a copy of the set and a finished run in `split/`: (project, split, seconds)."""
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(small_set, project / "data")
    start = time.perf_counter()
    code, out, err = finished(console(["--i", "data/particles.star", "--o", "split", *FAST], project))
    assert code == 0, out + err
    return project, project / "split", time.perf_counter() - start


@pytest.fixture
def project(earlier_run, tmp_path: Path) -> tuple[Path, float]:
    """A copy of the project with the earlier run: (project folder, that run's seconds)."""
    source, _, seconds = earlier_run
    copy = tmp_path / "project"
    shutil.copytree(source, copy)
    return copy, seconds


def test_finished_run_holds_every_output_and_nothing_else(earlier_run):
    _, split, _ = earlier_run
    assert {p.name for p in split.iterdir()} == OUTPUTS


def test_input_folder_as_output_keeps_the_inputs(project, capsys, monkeypatch):
    root, _ = project
    monkeypatch.chdir(root)
    for args in (
        ["--i", "split/run_data.star", "--o", "split"],
        ["--i", "data/particles.star", "--o", "split", "--ref", "split/run_class001.mrc"],
        ["--i", "data/particles.star", "--o", "split", "--mask", "split/run_mask.mrc"],
    ):
        before = checksums(root)
        assert run_command([*args, *FAST]) == 1
        message = one_line(capsys.readouterr().err)
        assert "would replace the input" in message and args[args.index("--o") + 1] in message
        assert checksums(root) == before


def test_stacks_inside_the_output_folder_are_kept(project, capsys, monkeypatch):
    """Stacks beside the particles are inputs too: a run into their folder writes around them."""
    root, _ = project
    monkeypatch.chdir(root)
    before = checksums(root / "data")
    assert run_command(["--i", "data/particles.star", "--o", "data", *FAST]) == 0
    capsys.readouterr()
    after = checksums(root / "data")
    assert {path: digest for path, digest in after.items() if path in before} == before
    assert OUTPUTS <= {p.name for p in (root / "data").iterdir()}


def test_failed_rerun_leaves_the_earlier_run_and_one_marker(project, capsys, monkeypatch):
    """In a RELION job folder a failed re-run leaves the earlier outputs as they were, and exactly
    one exit marker: RELION_JOB_EXIT_FAILURE."""
    root, _ = project
    monkeypatch.chdir(root)
    (root / "split" / "RELION_JOB_EXIT_SUCCESS").touch()  # the earlier run's marker
    outputs = checksums(root / "split")
    zero = root / "zero.mrc"
    _map(zero, np.zeros((32, 32, 32)))
    code = run_command(["--i", "data/particles.star", "--o", "split", "--ref", str(zero), "--pipeline_control", "split/", *FAST])
    assert code == 2
    one_line(capsys.readouterr().err)
    markers = {p.name for p in (root / "split").glob("RELION_JOB_EXIT_*")}
    assert markers == {"RELION_JOB_EXIT_FAILURE"}
    del outputs[str(root / "split" / "RELION_JOB_EXIT_SUCCESS")]
    assert {p: d for p, d in checksums(root / "split").items() if "RELION_JOB_EXIT" not in p} == outputs


def test_abort_before_the_commit_leaves_the_earlier_run(project, capsys, monkeypatch):
    """RELION's abort button, pressed while the outputs are being written: the run stops with its
    folder as it was, and RELION_JOB_EXIT_ABORTED is the one marker left."""
    root, _ = project
    monkeypatch.chdir(root)
    outputs = checksums(root / "split")
    from relion_graphsplit.run_files import write as outputs_module

    write_summary = outputs_module.write_summary

    def abort_while_writing(*args, **kwargs):
        (root / "split" / "RELION_JOB_ABORT_NOW").touch()
        write_summary(*args, **kwargs)

    monkeypatch.setattr("relion_graphsplit.cli.job.write_summary", abort_while_writing)
    code = run_command(["--i", "data/particles.star", "--o", "split", "--pipeline_control", "split/", *FAST])
    assert code == 1
    assert "abort" in capsys.readouterr().err
    assert {p.name for p in (root / "split").glob("RELION_JOB_*")} == {"RELION_JOB_EXIT_ABORTED"}
    assert {p: d for p, d in checksums(root / "split").items() if "RELION_JOB" not in p} == outputs
    assert not (root / "split" / STAGING_NAME).exists()


def test_warnings_reach_terminal_summary_and_report(data: Path, tmp_path: Path, capsys):
    """Usable but odd data: poses without origins. The run goes on and says so everywhere."""
    bad = _set(data, lambda t: t.drop(columns=["rlnOriginXAngst", "rlnOriginYAngst"]))
    assert run_command(["--i", str(bad), "--o", "out", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "no origins" in printed
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert any("no origins" in w for w in summary["warnings"])
    assert "no origins" in (tmp_path / "out" / "report.html").read_text()


def test_second_run_into_a_busy_folder_is_refused(project):
    root, _ = project
    first = console(["--i", "data/particles.star", "--o", "split", *FAST], root)
    deadline = time.time() + 120
    while not (root / "split" / LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.05)
    code, out, err = finished(console(["--i", "data/particles.star", "--o", "split", *FAST], root))
    assert code == 1
    assert f"pid {first.pid}" in one_line(err)
    code, out, err = finished(first)
    assert code == 0, out + err
    assert {p.name for p in (root / "split").iterdir()} == OUTPUTS


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_run_leaves_a_whole_folder_and_a_rerun_matches(signum, project, earlier_run):
    """A run killed at random points leaves the earlier run whole (or its own, if it had committed),
    no temporary file once the next run has started, and the next run writes the same particles."""
    root, seconds = project
    reference = (earlier_run[1] / "run_data.star").read_bytes()
    rng = random.Random(int(signum))
    for delay in sorted(rng.uniform(0.3, 0.8 * seconds) for _ in range(2)):
        before = checksums(root / "data")
        run = console(["--i", "data/particles.star", "--o", "split", *FAST], root)
        time.sleep(delay)
        run.send_signal(signum)
        code, out, err = finished(run)
        context = f"signal {signum} after {delay:.2f} s: exit {code}\n{out}\n{err}"
        if signum != signal.SIGKILL and "Report:" not in out:  # interrupted before it finished
            assert code == 130, context
            lines = [line for line in err.splitlines() if line.strip()]
            assert lines[-1].startswith("interrupted") and len(lines) <= 2, context
            # the steps it finished are kept for --continue, and it says so
            assert (root / "split" / STAGING_NAME).exists() == ("--continue" in err), context
        assert checksums(root / "data") == before
        names = {p.name for p in (root / "split").iterdir()}
        assert OUTPUTS <= names <= OUTPUTS | {LOCK_NAME, STAGING_NAME}, context
        assert (root / "split" / "run_data.star").read_bytes() == reference, context
    code, out, err = finished(console(["--i", "data/particles.star", "--o", "split", *FAST], root))
    assert code == 0, out + err
    assert {p.name for p in (root / "split").iterdir()} == OUTPUTS
    assert (root / "split" / "run_data.star").read_bytes() == reference


def test_killed_run_with_scratch_dir_leaves_no_scratch_after_the_next(project, tmp_path: Path):
    root, seconds = project
    scratch = tmp_path / "node_local"
    scratch.mkdir()
    args = ["--i", "data/particles.star", "--o", "split", "--scratch_dir", str(scratch), *FAST]
    run = console(args, root)
    deadline = time.time() + 120
    while not any(scratch.iterdir()) and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.kill()
    finished(run)
    code, out, err = finished(console(args, root))
    assert code == 0, out + err
    assert list(scratch.iterdir()) == []
    assert {p.name for p in (root / "split").iterdir()} == OUTPUTS


def test_interrupted_commit_is_finished_by_the_next_run(tmp_path: Path):
    """A run that died between its first and last rename: the next run completes that commit, so the
    folder never mixes two runs."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_data.star").write_text("old")
    (out / "run_class003.mrc").write_text("old, of a run with three classes")
    (out / "run.out").write_text("RELION's log")
    with RunFolder(out) as folder:
        (folder.staging / "run_data.star").write_text("new")
        (folder.staging / "run_model.star").write_text("new")
        names = sorted(p.name for p in folder.staging.iterdir())
        (folder.staging / "COMPLETE").write_text("\n".join(names) + "\n")
        os.replace(folder.staging / "run_data.star", out / "run_data.star")  # the first rename, then death
        folder._unlock()
        folder.staging = tmp_path / "elsewhere"  # keep the dead run's staging folder on the way out
    with RunFolder(out):
        pass
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "run_data.star": "new", "run_model.star": "new", "run.out": "RELION's log",
    }  # fmt: skip


def test_full_disk_leaves_nothing_half_written(small_set: Path, tmp_path: Path):
    """The output folder on a 2 MB file system: the run fails with one line, and leaves no output."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        shutil.copytree(small_set, tmp_path / "data")
        code, out, err = finished(console(["--i", "data/particles.star", "--o", "disk/out", *FAST], tmp_path))
        assert code == 1
        message = one_line(err)
        assert "full" in message
        assert list(disk.iterdir()) == []  # not even the folder the run made
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_interrupt_during_the_commit_finishes_it(tmp_path: Path, monkeypatch):
    """Ctrl-C between two renames of the commit: the run finishes the commit on its way out."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_data.star").write_text("old")
    (out / "run_class003.mrc").write_text("old")
    calls = []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        os.rename(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with RunFolder(out) as folder:
            for name in ("run_data.star", "run_model.star", "run_summary.json"):
                (folder.staging / name).write_text("new")
            monkeypatch.setattr("relion_graphsplit.run_files.folder.os.replace", replace_then_interrupt)
            folder.commit()
    staged = ("run_data.star", "run_model.star", "run_summary.json")
    assert {p.name: p.read_text() for p in out.iterdir()} == {name: "new" for name in staged}
