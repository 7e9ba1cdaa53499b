"""The files of a finished run read back for the report: `Run` and `read_run`.

Everything the report shows comes from the files a run leaves in its output folder (see
run_files/write.py), so the report can be rebuilt at any time. Optional files may be missing; what
cannot be shown, and why, goes into `Run.notes`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from relion_graphsplit.fourier.fsc import resolution_at

CONFIDENCE_COLUMNS = ("rlnClassNumber", "rlnMaxValueProbDistribution", "rlnGraphSplitScore")
FSC_THRESHOLD = 0.143
"""The gold-standard FSC threshold the report's resolutions are read at."""


@dataclass(frozen=True)
class FscCurve:
    """One class's gold-standard FSC from run_model.star, shells 0..box // 2.

    frequency: rlnResolution, the shells' spatial frequency (1/A); fsc: rlnGoldStandardFsc;
    box (pixels) and pixel_size (A): the sampling of the maps the curve was measured on.
    """

    frequency: pd.Series
    fsc: pd.Series
    box: int
    pixel_size: float

    @property
    def nyquist(self) -> float:
        """The resolution (A) of the curve's last shell."""
        return self.box * self.pixel_size / (len(self.fsc) - 1)

    def resolution(self, threshold: float = FSC_THRESHOLD) -> float:
        """The resolution (A) where the curve first drops below `threshold`: `fourier.fsc.resolution_at`
        (the Nyquist resolution when it never does; inf when it starts below)."""
        return resolution_at(self.fsc.to_numpy(np.float64), self.box, self.pixel_size, threshold)

    def drops(self, threshold: float = FSC_THRESHOLD) -> bool:
        """Whether the curve drops below `threshold` at some shell (shell 0 aside) before Nyquist."""
        return bool((self.fsc.to_numpy(np.float64)[1:] < threshold).any())


@dataclass
class Run:
    """The files of a finished run, read back."""

    out: Path
    summary: dict
    cones: pd.DataFrame  # one row per cone, sorted by cone id
    edges: pd.DataFrame  # cone1, cone2, shared, weight
    memberships: pd.DataFrame  # cone, particle, rho, llr
    particles: pd.DataFrame | None  # run_data.star's particle table
    images: dict[int, np.ndarray]  # cone id -> (4, w, w): mean, eigen-image, class-1 and class-2 averages
    maps: tuple[np.ndarray, np.ndarray] | None  # class 1 and class 2 maps [z, y, x]
    fsc: dict[int, FscCurve] = field(default_factory=dict)  # class -> its gold-standard FSC
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why


def read_run(out_dir: Path) -> Run:
    """Read the files of a finished run.

    Parameters
    ----------
    out_dir : Path
        The run's output folder. run_summary.json, run_cones.star and run_memberships.star must be
        there; run_data.star, run_cone_images.mrcs, run_class001.mrc / run_class002.mrc and
        run_model.star may be missing (then the report leaves out what needs them).

    Returns
    -------
    Run
        The run's tables, images, class maps and FSC curves, with notes on what could not be read.
    """
    out = Path(out_dir)
    summary = json.loads((out / "run_summary.json").read_text())
    blocks = starfile.read(out / "run_cones.star", always_dict=True)
    cones = blocks["cones"].sort_values("cone", ignore_index=True)
    edges = blocks.get("edges")
    if not isinstance(edges, pd.DataFrame) or edges.empty:
        edges = pd.DataFrame({"cone1": [], "cone2": [], "shared": [], "weight": []})
    memberships = starfile.read(out / "run_memberships.star", always_dict=True)["memberships"]
    notes: list[str] = []
    data = out / "run_data.star"
    particles = starfile.read(data, always_dict=True).get("particles") if data.is_file() else None
    if particles is not None and not set(CONFIDENCE_COLUMNS) <= set(particles.columns):
        notes.append(f"{data.name} lacks {', '.join(CONFIDENCE_COLUMNS)}: no particle confidence")
        particles = None
    images = _read_cone_images(out / "run_cone_images.mrcs", cones["cone"].to_numpy(), notes)
    maps = None
    class_maps = [out / f"run_class{k:03d}.mrc" for k in (1, 2)]
    if all(p.is_file() for p in class_maps):
        maps = tuple(_read_map(p) for p in class_maps)
    fsc = read_fsc(out / "run_model.star")
    return Run(out, summary, cones, edges, memberships, particles, images, maps, fsc, notes)


def class_sizes(run: Run) -> dict[int, int]:
    """Particles in class 1 and class 2: the summary's counts, else run_data.star's, else zeros."""
    sizes = run.summary.get("class_sizes")
    if sizes:
        return {k: int(sizes.get(str(k), 0)) for k in (1, 2)}
    if run.particles is not None:
        classes = run.particles["rlnClassNumber"].to_numpy()
        return {k: int((classes == k).sum()) for k in (1, 2)}
    return {1: 0, 2: 0}


def read_fsc(path: Path) -> dict[int, FscCurve]:
    """The gold-standard FSC of each class from a RELION model.star.

    Parameters
    ----------
    path : Path
        The model.star (data_model_general, data_model_class_N blocks with rlnResolution in 1/A and
        rlnGoldStandardFsc per shell).

    Returns
    -------
    dict[int, FscCurve]
        Class (1, 2) -> its curve; empty when the file is missing. The box and pixel size come from
        model_general's rlnOriginalImageSize and rlnPixelSize; where those are missing, from the
        frequencies themselves (shell s at s / (box * pixel_size) 1/A, an even box taken).
    """
    if not path.is_file():
        return {}
    blocks = starfile.read(path, always_dict=True)
    general = blocks.get("model_general")
    general = general if isinstance(general, dict) else {}
    curves = {}
    for k in (1, 2):
        block = blocks.get(f"model_class_{k}")
        if isinstance(block, pd.DataFrame) and {"rlnResolution", "rlnGoldStandardFsc"} <= set(block.columns) \
                and len(block) > 1:
            table = block[["rlnResolution", "rlnGoldStandardFsc"]].astype(float).reset_index(drop=True)
            last = len(table) - 1
            box = int(general.get("rlnOriginalImageSize", 2 * last))
            pixel_size = float(general.get("rlnPixelSize", last / (box * table["rlnResolution"].iloc[-1])))
            curves[k] = FscCurve(table["rlnResolution"], table["rlnGoldStandardFsc"], box, pixel_size)
    return curves


def _read_cone_images(path: Path, cone_ids: np.ndarray, notes: list[str]) -> dict[int, np.ndarray]:
    """Cone id -> its 4 images (mean, eigen-image, class averages) from run_cone_images.mrcs."""
    if not path.is_file():
        notes.append(f"{path.name} is missing: no cone images")
        return {}
    with mrcfile.mmap(path, mode="r") as mrc:
        stack = np.array(mrc.data, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    n_cones = int(cone_ids.max()) + 1 if len(cone_ids) else 0
    if len(stack) != 4 * n_cones:
        notes.append(f"{path.name} holds {len(stack)} images for {n_cones} cones, not 4 per cone "
                     "(mean, eigen-image, class averages): no cone images")
        return {}
    return {int(c): stack[4 * c: 4 * c + 4] for c in cone_ids}


def _read_map(path: Path) -> np.ndarray:
    with mrcfile.open(path, mode="r", permissive=True) as mrc:
        return np.array(mrc.data, dtype=np.float32)
