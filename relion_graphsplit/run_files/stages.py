"""The finished stages of a run, kept in its staging folder so that `--continue` resumes after them.

A run's long steps are three stages: the images prepared at the working size (method.pipeline.prepare),
the classification (method.pipeline.split_prepared) and the class maps (method.classmaps). Each is
saved whole (files.atomic_path), as a pickle, once it is finished: a file that is there is a finished
stage. The pickles are the program's own, read back only by the version that wrote them.

Beside them the staging folder holds the run's fingerprint: what its result depends on (the package
version, every option of the split, the particle, mask and map files' bytes, the image stacks' sizes
and modification times: hashing them would take too long). A continued run keeps the stages only if
its own fingerprint is the same; otherwise it is refused with one line naming the first difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from relion_graphsplit import __version__
from relion_graphsplit.files import atomic_path

FINGERPRINT_NAME = "FINGERPRINT.json"
T = TypeVar("T")


@dataclass(frozen=True)
class Fingerprint:
    """What a run's result depends on, as compared between an interrupted run and its continuation.

    Attributes
    ----------
    settings : dict of str to str
        The package version ("relion_graphsplit's version") and each option of the split, by the name a
        line shows it under (its flag), as shown (for example "--maxres": "10.0").
    files : dict of str to str
        Each input file by what a line calls it ("the particle file (--i)", "the image stack
        Extract/job007/Movies/a.mrcs") to its digest: the sha256 of its bytes ("none" for a map not given), or for
        an image stack its size and modification time.
    """

    settings: dict[str, str]
    files: dict[str, str]

    def change_from(self, earlier: Fingerprint) -> str | None:
        """What differs from `earlier`, in one line: the first difference, and how many more.

        Parameters
        ----------
        earlier : Fingerprint
            The interrupted run's.

        Returns
        -------
        str or None
            "--maxres changed from 10.0 to 8.0", "the particle file (--i) changed", "the image stack X
            changed (its size or modification time)" and so on; None when the two are the same.
        """
        changes = [
            f"{name} changed from {earlier.settings.get(name, 'none')} to {value}"
            for name, value in self.settings.items()
            if earlier.settings.get(name) != value
        ]
        changes += [_file_change(name, earlier.files.get(name), self.files.get(name)) for name in self.files]
        changes += [_file_change(name, digest, None) for name, digest in earlier.files.items() if name not in self.files]
        changes = [change for change in changes if change]
        if not changes:
            return None
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        return changes[0] + more

    def write(self, path: Path) -> None:
        """Save as JSON, whole or not at all."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"settings": self.settings, "files": self.files}, indent=1))

    @classmethod
    def read(cls, path: Path) -> Fingerprint:
        """The fingerprint `write` saved in `path`."""
        saved = json.loads(path.read_text())
        return cls(saved["settings"], saved["files"])


def _file_change(name: str, before: str | None, now: str | None) -> str | None:
    if before == now:
        return None
    if before is None:
        return f"{name} was not read by the interrupted run"
    if now is None:
        return f"{name} is no longer read"
    return f"{name} changed" + (" (its size or modification time)" if name.startswith("the image stack") else "")


def fingerprint(
    options: dict[str, str], particles: Path, mask: Path | None, ref: Path | None, stacks: list[Path]
) -> Fingerprint:
    """The fingerprint of a run on these inputs with these options.

    Parameters
    ----------
    options : dict of str to str
        Every option that can change the result, by its flag, as shown (--j, --scratch_dir and
        --pipeline_control cannot, and are left out).
    particles : Path
        The particle STAR file (--i): its bytes are hashed.
    mask, ref : Path or None
        The --mask and --ref maps, or None: their bytes are hashed.
    stacks : list of Path
        The image stacks the particles name, as found (relion.stacks.ImageStacks.paths: a project
        moved elsewhere keeps them): their paths, sizes and modification times (ns).

    Returns
    -------
    Fingerprint
    """
    files = {
        "the particle file (--i)": _sha256(particles),
        "the mask (--mask)": _sha256(mask) if mask else "none",
        "the consensus map (--ref)": _sha256(ref) if ref else "none",
    }
    for path in stacks:
        stat = path.stat()
        files[f"the image stack {path}"] = f"{stat.st_size} bytes, modified {stat.st_mtime_ns} ns"
    return Fingerprint({"relion_graphsplit's version": __version__, **options}, files)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Stages:
    """The finished stages of a run, each a pickle in the staging folder (`stage_{name}.pkl`).

    Parameters
    ----------
    staging : Path
        The run's staging folder (run_files.folder.RunFolder.staging).
    """

    def __init__(self, staging: Path):
        self.staging = Path(staging)

    def _path(self, name: str, where: Path | None) -> Path:
        return (where or self.staging) / f"stage_{name}.pkl"

    def finished(self, name: str, where: Path | None = None) -> bool:
        """Whether stage `name` was finished and saved (in `where`, as `run` saves it)."""
        return self._path(name, where).is_file()

    def run(self, name: str, compute: Callable[[], T], where: Path | None = None) -> T:
        """The saved result of stage `name` where it was finished; else compute() saved, then returned.

        Parameters
        ----------
        name : str
            The stage's name.
        compute : callable
            Makes the stage's result (any value pickle can save, None included).
        where : Path or None
            The folder of the stage's own files, where its result is saved beside them so that a stage
            whose files are lost (a node's scratch disk wiped) is not taken as finished; None: the
            staging folder.

        Returns
        -------
        object
            The stage's result.
        """
        path = self._path(name, where)
        if path.is_file():
            with open(path, "rb") as f:
                return pickle.load(f)
        value = compute()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())  # on disk before its name says it is finished: a node may crash
        return value
