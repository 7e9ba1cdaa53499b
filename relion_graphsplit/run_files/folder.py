"""The output folder (--o): one run at a time, outputs that appear all together or not at all.

What the program promises about the folder (README, "What the program promises about your files"):

- A run holds a lock on the folder (`.relion_graphsplit.lock`, an flock that the kernel releases
  when the process ends, however it ends); a second run into the same folder is refused.
- A run writes every output into a hidden staging folder inside it, `.relion_graphsplit_staging/`,
  and its temporary working files there too (or under --scratch_dir). Only when everything is
  written does it mark the staging folder complete, remove the earlier run's outputs, and rename
  its own into place: renames within one file system, a few milliseconds.
- A run that dies before its commit leaves the folder as it was, with a staging folder that the
  next run removes (with the scratch folder it names). A run that dies during its commit leaves a
  complete staging folder, and the next run finishes that commit before it starts its own: the
  folder never mixes two runs.
- Only a run with --continue keeps a dead run's staging folder: it resumes after the stages finished
  there (run_files.stages) if its inputs and options are those of the dead run, whose fingerprint
  the staging folder holds, and is otherwise refused before it changes anything.
- Files whose names the program does not write (RELION's run.out and run.err, a Class3D job that
  continued from the split, the user's own files) are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

from relion_graphsplit.run_files.stages import FINGERPRINT_NAME, Fingerprint, Stages

LOCK_NAME = ".relion_graphsplit.lock"
STAGING_NAME = ".relion_graphsplit_staging"
_COMPLETE = "COMPLETE"  # in the staging folder: every output is written, the commit may start
_SCRATCH = "SCRATCH"  # in the staging folder: the path of the run's scratch folder, if elsewhere
WORK_NAME = "work"  # in the staging folder: the run's working files, unless under --scratch_dir

# The names of a run's outputs: files the program writes into --o, and so may replace or remove.
OUTPUT_NAMES = re.compile(
    r"run_data\.star|run_model\.star|run_mask\.mrc|run_cones\.star|run_memberships\.star"
    r"|run_cone_images\.mrcs|run_summary\.json|run_class\d{3}_data\.star|run_class\d{3}\.mrc"
    r"|run_half[12]_class\d{3}_unfil\.mrc|report\.html|report_[a-z]+\.png|RELION_OUTPUT_NODES\.star"
)


class FolderBusy(RuntimeError):
    """Another run holds the output folder's lock."""


class FolderError(ValueError):
    """An output folder that cannot be used as asked, in one line."""


def is_output_name(name: str) -> bool:
    """Whether a file name in --o is one of a run's outputs.

    Parameters
    ----------
    name : str
        A file name, without its folder.

    Returns
    -------
    bool
        True where the whole name matches OUTPUT_NAMES (run_data.star, run_class001.mrc, report.html...).
    """
    return OUTPUT_NAMES.fullmatch(name) is not None


def check_inputs_outside(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output folder where a run would replace or remove one of its own inputs.

    A run replaces the outputs of an earlier run as a whole, so an input that is one of them (the
    particles of an earlier split, its class map as --ref, its mask as --mask) would be lost.

    Parameters
    ----------
    out : Path
        The output folder (--o).
    inputs : iterable of Path
        The run's input files; compared after resolving links.

    Raises
    ------
    FolderError
        If an input lies directly in `out` under an output name, or anywhere in its staging folder.
    """
    folder = out.resolve()
    for path in inputs:
        resolved = Path(path).resolve()
        if resolved.parent == folder and is_output_name(resolved.name):
            raise FolderError(
                f"--o {out} would replace the input {path}: choose another output folder "
                "(a run replaces the outputs of an earlier run in its folder)"
            )
        if folder / STAGING_NAME in resolved.parents:
            raise FolderError(f"{path} lies in the staging folder of {out}: a run removes it")


class RunFolder:
    """The output folder of one run: lock, staging folder, commit.

    Use as a context manager: entering makes the folder, takes the lock (FolderBusy if another run
    holds it), clears what a dead run left and makes an empty staging folder (`staging`) holding the
    run's fingerprint; continuing (`resume`), it keeps the dead run's staging folder instead, and its
    finished stages (`stages`). Leaving removes the staging folder and releases the lock. `commit()`
    moves the staged outputs into place.

    Parameters
    ----------
    out : Path
        The output folder (--o); made on entering if missing, and removed on leaving if this run made
        it, did not commit and left it empty.
    fingerprint : Fingerprint or None
        What this run's result depends on (`stages.fingerprint`), saved in the staging folder so that a
        later run may continue this one; None: not saved, and a later run cannot.
    resume : bool
        Continue the run that died in `out` (--continue): keep its staging folder where its fingerprint
        is `fingerprint`. Entering raises FolderError, with the folder left as it was, where there is
        no such run or an input or option changed; a dead run that saved no fingerprint is started
        afresh.
    """

    def __init__(self, out: Path, fingerprint: Fingerprint | None = None, resume: bool = False):
        self.out = Path(out)
        self.staging = self.out / STAGING_NAME
        self.stages = Stages(self.staging)
        self.fingerprint = fingerprint
        self.resume = resume
        self._lock_fd: int | None = None
        self._made = False  # the folder did not exist before this run
        self._committed = False

    def __enter__(self) -> RunFolder:
        self._made = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if self.resume:
                self._keep_staging()
            else:
                self._new_staging()
        except BaseException:
            self._unlock()
            if self._made:  # a refused first run leaves no folder behind
                with contextlib.suppress(OSError):
                    self.out.rmdir()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and self.continuable():
                pass  # Ctrl-C or SIGTERM (a batch system's time limit): kept for --continue
            else:
                self._clear_staging()  # a commit interrupted here (Ctrl-C between two renames) is finished
        finally:
            self._unlock()
        if self._made and not self._committed:  # a failed first run leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def continuable(self) -> bool:
        """Whether the staging folder holds the run's fingerprint and a finished stage (in it, or in
        the scratch folder it records), and no finished run whose commit was under way."""
        if not (self.staging / FINGERPRINT_NAME).is_file() or (self.staging / _COMPLETE).exists():
            return False
        folders = [self.staging]
        record = self.staging / _SCRATCH
        if record.is_file():
            folders.append(Path(record.read_text().strip()))
        return any(any(folder.rglob("stage_*.pkl")) for folder in folders if folder.is_dir())

    def work_folder(self, scratch_dir: Path | None) -> Path:
        """The folder for the run's working files (the images at the working size).

        A continued run's is the dead run's where that is still there. Otherwise a new one: `work` in
        the staging folder, or a folder of its own in `scratch_dir`, recorded in the staging folder so
        that the next run removes it if this one dies.

        Parameters
        ----------
        scratch_dir : Path or None
            Existing folder (--scratch_dir) to make the new folder in; None: the staging folder.

        Returns
        -------
        Path
            The folder, which exists.
        """
        record = self.staging / _SCRATCH
        earlier = [Path(record.read_text().strip())] if record.is_file() else []
        for folder in [*earlier, self.staging / WORK_NAME]:
            if folder.is_dir():
                return folder
        if scratch_dir is None:
            record.unlink(missing_ok=True)  # the dead run's scratch folder is gone
            (self.staging / WORK_NAME).mkdir()
            return self.staging / WORK_NAME
        # Recorded before it is made: a run killed in between leaves a record of nothing, never a
        # folder that no record names.
        folder = (Path(scratch_dir) / f"graphsplit_{os.getpid()}_{secrets.token_hex(4)}").resolve()
        _durable_write(record, str(folder))
        folder.mkdir()
        return folder

    def commit(self) -> list[str]:
        """Replace the earlier run's outputs with the staged ones; returns the names moved in.

        The staging folder is first marked complete (on disk, with the list of names); then the
        outputs in --o that the staging folder does not hold are removed and the staged ones renamed
        into place. Staged files whose names are not output names are not moved.

        Returns
        -------
        list of str
            The names of the staged outputs, sorted.
        """
        names = sorted(p.name for p in self.staging.iterdir() if is_output_name(p.name))
        _durable_write(self.staging / _COMPLETE, "\n".join(names) + "\n")
        self._committed = True
        _finish_commit(self.out, self.staging)
        (self.staging / _COMPLETE).unlink()  # done: nothing for the way out to finish
        return names

    def _lock(self) -> None:
        path = self.out / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise FolderBusy(
                    f"another run (pid {holder}) is writing to {self.out}: wait for it to end, or choose another --o"
                ) from None
            # The holder we waited on may have removed the file on its way out: lock the file that
            # is there now, or another run could lock that one beside us.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            (self.out / LOCK_NAME).unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    def _new_staging(self) -> None:
        """Clear what a dead run left, then make an empty staging folder with this run's fingerprint."""
        self._clear_staging()
        self.staging.mkdir()
        if self.fingerprint is not None:
            self.fingerprint.write(self.staging / FINGERPRINT_NAME)

    def _keep_staging(self) -> None:
        """Keep the staging folder of the run that died in the folder, whose inputs and options were
        this run's; a run that died during its commit had finished, and its commit is completed."""
        if (self.staging / _COMPLETE).exists():
            self._clear_staging()
        if not self.staging.is_dir():
            raise FolderError(f"cannot continue: no interrupted run to continue in {self.out}")
        saved = self.staging / FINGERPRINT_NAME
        if self.fingerprint is None or not saved.is_file():  # nothing that could be kept
            self._new_staging()
            return
        change = self.fingerprint.change_from(Fingerprint.read(saved))
        if change:
            raise FolderError(f"cannot continue: {change} (run without --continue to start again)")

    def _clear_staging(self) -> None:
        """Finish a commit that was interrupted (its staging folder is complete); then remove the
        staging folder and the scratch folder it names. A run that stopped before its commit leaves
        nothing to finish, so its folder stays as the run before it left it."""
        if not self.staging.exists():
            return
        if (self.staging / _COMPLETE).exists():
            _finish_commit(self.out, self.staging)
        _remove_staging(self.staging)


def _finish_commit(out: Path, staging: Path) -> None:
    """Remove the outputs in `out` that the complete staging folder does not hold, then move its
    outputs in. Idempotent: a second call after an interrupted one completes the same commit."""
    staged = set((staging / _COMPLETE).read_text().split())
    for path in out.iterdir():
        if is_output_name(path.name) and path.name not in staged and path.is_file():
            path.unlink()
    for name in sorted(staged):
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    _fsync_dir(out)


def _remove_staging(staging: Path) -> None:
    """Remove a staging folder and the scratch folder it names."""
    record = staging / _SCRATCH
    if record.is_file():
        shutil.rmtree(record.read_text().strip(), ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _durable_write(path: Path, text: str) -> None:
    """Write a small file whole or not at all, on disk before returning."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
