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


def project_version(project_dir: Path = Path(".")) -> int:
    """RELION version of the project (the `# version` line of default_pipeline.star; 30001 if none)."""
    pipeline = project_dir / "default_pipeline.star"
    if pipeline.exists():
        for line in pipeline.read_text().splitlines()[:5]:
            if line.startswith("# version"):
                return int(line.split()[2])
    return 30001


def particle_label(version: int) -> str:
    return "ParticleGroupMetadata.star.relion" if version >= 50000 else "ParticlesData.star.relion"


class ExternalJob:
    """The job directory's RELION markers (no-ops outside a RELION project)."""

    def __init__(self, out: Path, active: bool | None = None):
        self.out = Path(out)
        self.active = Path("default_pipeline.star").exists() if active is None else active

    def abort_requested(self) -> bool:
        return self.active and (self.out / "RELION_JOB_ABORT_NOW").exists()

    def _mark(self, name: str) -> None:
        if self.active:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / name).touch()

    def succeed(self) -> None:
        self._mark("RELION_JOB_EXIT_SUCCESS")

    # On the way out of a failed or aborted run a marker that cannot be written (an output directory
    # that cannot be made) must not hide the run's own error.

    def fail(self) -> None:
        with contextlib.suppress(OSError):
            self._mark("RELION_JOB_EXIT_FAILURE")

    def aborted(self) -> None:
        with contextlib.suppress(OSError):
            self._mark("RELION_JOB_EXIT_ABORTED")
            if self.active:
                (self.out / "RELION_JOB_ABORT_NOW").unlink(missing_ok=True)

    def outputs(self, nodes: list[tuple[Path, str]]) -> None:
        """Declare (path, kind) output nodes in RELION_OUTPUT_NODES.star, kind a key of NODE_TYPES."""
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
        with atomic_path(self.out / "RELION_OUTPUT_NODES.star") as tmp:
            starfile.write({"output_nodes": table}, tmp, overwrite=True)
