"""--continue: a run killed after each of its stages, continued, gives an uninterrupted run's outputs
without doing the finished stages again; a changed input or option is refused with one line.

The kills are real: the console command in a process of its own that sends itself SIGKILL as soon as
the stage named is saved (so nothing of the run's own clean-up runs). The continuations run in this
process through `cli.run_command`, with the steps counted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from relion_graphsplit.cli import job
from relion_graphsplit.cli.graphsplit import run_command
from relion_graphsplit.method.options import FLAGS, SplitOptions
from relion_graphsplit.run_files.folder import LOCK_NAME, STAGING_NAME
from relion_graphsplit.run_files.stages import Fingerprint
from relion_graphsplit.scratch import ScratchArray
from tests.test_catalogue import FAST, OUTPUTS, checksums, console, finished, one_line

ARGS = ["--i", "data/particles.star", "--o", "split", *FAST]
KILL_AFTER = """
import os, signal
from relion_graphsplit.run_files.stages import Stages
run = Stages.run
def run_then_die(self, name, compute, where=None):
    value = run(self, name, compute, where)
    if name == os.environ["KILL_AFTER"]:
        os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
    return value
Stages.run = run_then_die
from relion_graphsplit.cli.launch import graphsplit
graphsplit()
"""
# What a continued run does again, by the last stage the killed run saved.
REDONE = {"images": ["split_prepared", "reconstruct_classes"], "classes": ["reconstruct_classes"], "class_maps": []}
KEPT = {"images": "the images prepared", "classes": "the classification", "class_maps": "the class maps"}


def killed_after(stage: str, project: Path, args: list[str]) -> None:
    """Run the console command in `project`, killed (SIGKILL) once `stage` is saved."""
    command = [sys.executable, "-c", KILL_AFTER, *args]
    done = subprocess.run(command, cwd=project, capture_output=True, text=True, env={**os.environ, "KILL_AFTER": stage})
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr


@pytest.fixture(scope="module")
def reference(small_set: Path, tmp_path_factory) -> Path:
    """The outputs of an uninterrupted run: the folder `split` of a project holding the set in `data`."""
    project = tmp_path_factory.mktemp("reference")
    shutil.copytree(small_set, project / "data")
    code, out, err = finished(console(ARGS, project))
    assert code == 0, out + err
    return project / "split"


@pytest.fixture(scope="module")
def killed(small_set: Path, tmp_path_factory):
    """killed(stage): a project whose run into `split` was killed once `stage` was saved (made once
    per stage; copy it before running anything in it)."""
    made: dict[str, Path] = {}

    def make(stage: str) -> Path:
        if stage not in made:
            project = tmp_path_factory.mktemp(f"killed_after_{stage}")
            shutil.copytree(small_set, project / "data")
            killed_after(stage, project, ARGS)
            made[stage] = project
        return made[stage]

    return make


def copy_of(project: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of `project`, made the working directory."""
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    monkeypatch.chdir(copy)
    return copy


def count_steps(monkeypatch) -> list[str]:
    """The long steps a run does, by name, in order (each still done)."""
    calls: list[str] = []
    for name in ("prepare", "split_prepared", "reconstruct_classes"):
        real = getattr(job, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(job, name, counted)
    return calls


def _star_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("# Created by")]


def assert_same_outputs(folder: Path, reference: Path) -> None:
    """The outputs of `folder` are those of `reference`: every STAR file's lines (starfile's line
    "# Created by ... at <time>" aside), every map's voxels, the summary but for its timings, the
    command line and the memory used."""
    assert {p.name for p in folder.iterdir()} == OUTPUTS
    for path in reference.glob("*.star"):
        assert _star_lines(folder / path.name) == _star_lines(path), path.name
    for path in reference.glob("*.mrc*"):
        with mrcfile.open(path) as expected, mrcfile.open(folder / path.name) as got:
            np.testing.assert_array_equal(got.data, expected.data, err_msg=path.name)
    ignored = {"timings", "command", "peak_memory_mb"}
    summaries = [json.loads((f / "run_summary.json").read_text()) for f in (folder, reference)]
    assert [{k: v for k, v in s.items() if k not in ignored} for s in summaries][0] == {
        k: v for k, v in summaries[1].items() if k not in ignored
    }


@pytest.mark.parametrize("stage", list(REDONE))
def test_continue_after_each_stage_matches_an_uninterrupted_run(stage, killed, reference, tmp_path, monkeypatch, capsys):
    project = copy_of(killed(stage), tmp_path, monkeypatch)
    assert (project / "split" / STAGING_NAME).is_dir()
    steps = count_steps(monkeypatch)
    assert run_command([*ARGS, "--continue"]) == 0
    printed = capsys.readouterr().out
    assert steps == REDONE[stage]
    assert f"continuing the interrupted run in split: keeping {KEPT['images']}" in printed
    assert KEPT[stage] in printed
    assert_same_outputs(project / "split", reference)
    assert not (project / "split" / STAGING_NAME).exists()


def test_continue_keeps_the_images_on_another_scratch_disk_or_prepares_them_again(
    small_set, reference, tmp_path, monkeypatch, capsys
):
    """The images prepared under --scratch_dir are kept where they still are (--scratch_dir may
    differ), and prepared again where that disk was wiped; no scratch folder is left either way."""
    project = tmp_path / "project"
    shutil.copytree(small_set, project / "data")
    monkeypatch.chdir(project)
    first, second = project / "node1", project / "node2"
    first.mkdir(), second.mkdir()
    killed_after("images", project, [*ARGS, "--scratch_dir", "node1"])
    assert len(list(first.iterdir())) == 1
    steps = count_steps(monkeypatch)
    assert run_command([*ARGS, "--scratch_dir", "node2", "--continue"]) == 0
    assert steps == REDONE["images"]
    assert_same_outputs(project / "split", reference)
    assert list(first.iterdir()) == list(second.iterdir()) == []

    killed_after("images", project, [*ARGS, "--scratch_dir", "node1"])
    shutil.rmtree(next(first.iterdir()))  # the node's disk wiped after the job
    steps.clear()
    assert run_command([*ARGS, "--scratch_dir", "node2", "--continue"]) == 0
    assert steps == ["prepare", *REDONE["images"]]
    assert_same_outputs(project / "split", reference)
    assert list(first.iterdir()) == list(second.iterdir()) == []
    capsys.readouterr()


def _touch_stack(project: Path) -> None:
    stack = project / "data" / "particles.mrcs"
    os.utime(stack, ns=(stack.stat().st_atime_ns, stack.stat().st_mtime_ns + 10**9))


def _add_a_line(project: Path) -> None:
    star = project / "data" / "particles.star"
    star.write_bytes(star.read_bytes() + b"\n")


def _make_mask(project: Path) -> None:
    with mrcfile.new(project / "data" / "mask.mrc") as mrc:
        mrc.set_data(np.ones((32, 32, 32), dtype=np.float32))
        mrc.voxel_size = 4.0


# An option given (the last of a repeated one counts) or an input changed, and what the line says.
CHANGES = {
    "--maxres": (["--maxres", "8"], None, ["--maxres changed from 10.0 to 8.0"]),
    "--K": (["--K", "3"], None, ["--K changed from 2 to 3"]),
    "--mask": (["--mask", "data/mask.mrc"], _make_mask, ["the mask (--mask) changed"]),
    "particle file": ([], _add_a_line, ["the particle file (--i) changed"]),
    "stack": ([], _touch_stack, ["the image stack ", "particles.mrcs changed (its size or modification time)"]),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_changed_input_or_option_is_refused(case, killed, tmp_path, monkeypatch, capsys):
    """Refused with one line naming the change, exit 1, the folder as it was (the dead run's lock file
    aside: every run removes it), so that continuing as before still works."""
    extra, change, words = CHANGES[case]
    project = copy_of(killed("classes"), tmp_path, monkeypatch)
    if change:
        change(project)
    before = {path: digest for path, digest in checksums(project).items() if LOCK_NAME not in path}
    assert run_command([*ARGS, *extra, "--continue"]) == 1
    message = one_line(capsys.readouterr().err)
    assert message.startswith("error: cannot continue: ") and message.endswith("(run without --continue to start again)")
    assert all(word in message for word in words), message
    assert checksums(project) == before


def test_continue_with_nothing_to_continue_is_refused(reference, tmp_path, monkeypatch, capsys):
    """No folder, or a folder whose last run finished: refused, nothing made or changed."""
    project = copy_of(reference.parent, tmp_path, monkeypatch)
    before = checksums(project)
    for out in ("new", "split"):
        args = ["--i", "data/particles.star", "--o", out, *FAST, "--continue"]
        assert run_command(args) == 1
        assert one_line(capsys.readouterr().err) == f"error: cannot continue: no interrupted run to continue in {out}"
    assert checksums(project) == before
    assert not (project / "new").exists()


def test_without_continue_the_dead_runs_stages_are_not_kept(killed, reference, tmp_path, monkeypatch, capsys):
    project = copy_of(killed("class_maps"), tmp_path, monkeypatch)
    steps = count_steps(monkeypatch)
    assert run_command(ARGS) == 0
    assert "continuing" not in capsys.readouterr().out
    assert steps == ["prepare", "split_prepared", "reconstruct_classes"]
    assert_same_outputs(project / "split", reference)
    assert not (project / "split" / STAGING_NAME).exists()


def test_fingerprint_names_the_first_change_and_counts_the_others():
    earlier = Fingerprint({"--maxres": "10.0", "--K": "2"}, {"the particle file (--i)": "a", "the image stack /s": "1"})
    assert Fingerprint(dict(earlier.settings), dict(earlier.files)).change_from(earlier) is None
    changed = Fingerprint({"--maxres": "8.0", "--K": "3"}, {"the particle file (--i)": "b", "the image stack /t": "1"})
    assert changed.change_from(earlier) == "--maxres changed from 10.0 to 8.0 (and 4 more)"
    assert Fingerprint(earlier.settings, {"the image stack /t": "1"}).change_from(earlier) == (
        "the image stack /t was not read by the interrupted run (and 2 more)"
    )


def test_every_flag_names_an_option_of_the_split():
    assert set(FLAGS) <= {f.name for f in fields(SplitOptions)}


def test_scratch_array_reopens_an_existing_file(tmp_path: Path):
    path = tmp_path / "a.f32"
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    with ScratchArray(path, (4, 3)) as array:
        array[np.arange(4)] = rows
    with ScratchArray(path, (4, 3), existing=True) as array:
        np.testing.assert_array_equal(array[np.arange(4)], rows)
    with pytest.raises(ValueError, match="48 bytes"):
        ScratchArray(path, (5, 3), existing=True)
    with pytest.raises(FileNotFoundError):
        ScratchArray(tmp_path / "none.f32", (4, 3), existing=True)


def test_a_run_stopped_by_sigterm_keeps_its_stages_and_continues(small_set, reference, tmp_path, monkeypatch, capsys):
    """SIGTERM (a batch system's time limit) after the classification: exit 130 with a line saying
    how to continue, the stages kept; --continue then redoes only the class maps."""
    project = tmp_path / "project"
    shutil.copytree(small_set, project / "data")
    command = [sys.executable, "-c", KILL_AFTER, *ARGS]
    env = {**os.environ, "KILL_AFTER": "classes", "KILL_SIGNAL": "SIGTERM"}
    done = subprocess.run(command, cwd=project, capture_output=True, text=True, env=env)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "the same command with --continue resumes" in done.stderr
    assert (project / "split" / STAGING_NAME).is_dir()
    monkeypatch.chdir(project)
    steps = count_steps(monkeypatch)
    assert run_command([*ARGS, "--continue"]) == 0
    assert steps == REDONE["classes"]
    assert_same_outputs(project / "split", reference)
