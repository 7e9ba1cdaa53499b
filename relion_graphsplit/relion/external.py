"""RELION External-job protocol: exit markers, abort requests and the declared output nodes.

Active when the program runs inside a RELION project (default_pipeline.star in the working directory)
or when RELION passed --pipeline_control.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd
import starfile

from relion_graphsplit.files import atomic_path

# RELION 3.1 reads integer node types, 4.0/5.0 the string labels (relion-conventions.md).
NODE_TYPES = {"particles": 3, "map": 6, "mask": 7, "halfmap": 10}
NODE_LABELS = {"map": "DensityMap.mrc", "mask": "Mask3D.mrc", "halfmap": "DensityMap.mrc.halfmap"}
EXIT_MARKERS = ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE", "RELION_JOB_EXIT_ABORTED")
ABORT_NOW = "RELION_JOB_ABORT_NOW"


def project_version(project_dir: Path = Path(".")) -> int:
    """RELION version of the project (the `# version` line of default_pipeline.star; 30001 if none).

    Parameters
    ----------
    project_dir : Path
        The RELION project directory (default: the current directory).

    Returns
    -------
    int
        The number on a line starting `# version` among the first 5 lines of default_pipeline.star
        (50001 for RELION 5); 30001 when the file or the line is missing.
    """
    pipeline = project_dir / "default_pipeline.star"
    if pipeline.exists():
        for line in pipeline.read_text().splitlines()[:5]:
            if line.startswith("# version"):
                return int(line.split()[2])
    return 30001


def particle_label(version: int) -> str:
    """The node type label RELION 4.0/5.0 read for a particle STAR file.

    Parameters
    ----------
    version : int
        The project's version (`project_version`).

    Returns
    -------
    str
        'ParticleGroupMetadata.star.relion' from 50000 on (RELION 5), else 'ParticlesData.star.relion'.
    """
    return "ParticleGroupMetadata.star.relion" if version >= 50000 else "ParticlesData.star.relion"


class ExternalJob:
    """The job directory's RELION markers (no-ops outside a RELION project).

    Parameters
    ----------
    out : Path
        The job directory (RELION's --o), where the markers go.
    active : bool or None
        Whether to write markers; None: when default_pipeline.star is in the current directory.
    """

    def __init__(self, out: Path, active: bool | None = None):
        self.out = Path(out)
        self.active = Path("default_pipeline.star").exists() if active is None else active

    def abort_requested(self) -> bool:
        """Whether RELION asked the job to stop (RELION_JOB_ABORT_NOW in the job directory); False
        when inactive."""
        return self.active and (self.out / ABORT_NOW).exists()

    def started(self) -> None:
        """A run is under way: the exit marker of an earlier run in the folder no longer holds."""
        if self.active:
            for name in EXIT_MARKERS:
                (self.out / name).unlink(missing_ok=True)

    def _mark(self, name: str) -> None:
        """Leave exactly one exit marker, `name`."""
        if self.active:
            self.out.mkdir(parents=True, exist_ok=True)
            for other in EXIT_MARKERS:
                if other != name:
                    (self.out / other).unlink(missing_ok=True)
            (self.out / name).touch()

    def succeed(self) -> None:
        """Mark success; an abort asked for once the outputs were in place came too late to act on."""
        self._mark("RELION_JOB_EXIT_SUCCESS")
        if self.active:
            (self.out / ABORT_NOW).unlink(missing_ok=True)

    # On the way out of a failed or aborted run a marker that cannot be written (an output directory
    # that cannot be made) must not hide the run's own error.

    def fail(self) -> None:
        """Mark failure (RELION_JOB_EXIT_FAILURE); a marker that cannot be written is passed over."""
        with contextlib.suppress(OSError):
            self._mark("RELION_JOB_EXIT_FAILURE")

    def aborted(self) -> None:
        """Mark an abort (RELION_JOB_EXIT_ABORTED) and remove the abort request, as RELION asks; a
        marker that cannot be written is passed over."""
        with contextlib.suppress(OSError):
            self._mark("RELION_JOB_EXIT_ABORTED")
            if self.active:
                (self.out / ABORT_NOW).unlink(missing_ok=True)

    def outputs(self, nodes: list[tuple[Path, str]], folder: Path | None = None) -> None:
        """Declare (path, kind) output nodes, kind a key of NODE_TYPES, in RELION_OUTPUT_NODES.star,
        written into `folder` (default the job's folder; the run's staging folder before its commit).

        The table `data_output_nodes` carries both the integer type RELION 3.1 reads and the label
        RELION 4.0/5.0 read (the particle label after the project's version). Nothing is written
        when inactive.

        Parameters
        ----------
        nodes : list of tuple of (Path, str)
            Each output's path, as RELION will read it, and its kind: 'particles', 'map', 'mask' or
            'halfmap'.
        folder : Path or None
            Where to write the file; None: the job directory.
        """
        if not self.active:
            return
        labels = {**NODE_LABELS, "particles": particle_label(project_version())}
        table = pd.DataFrame(
            {
                "rlnPipeLineNodeName": [str(path) for path, _ in nodes],
                "rlnPipeLineNodeType": [NODE_TYPES[kind] for _, kind in nodes],
                "rlnPipeLineNodeTypeLabel": [labels[kind] for _, kind in nodes],
            }
        )
        with atomic_path(Path(folder or self.out) / "RELION_OUTPUT_NODES.star") as tmp:
            starfile.write({"output_nodes": table}, tmp, overwrite=True)
