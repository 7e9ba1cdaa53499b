"""The files of a finished run read back for the report: `Run` and `read_run`.

Everything the report shows comes from the files a run leaves in its output folder (see
run_files/write.py), so the report can be rebuilt at any time. Optional files may be missing; what
cannot be shown, and why, goes into `Run.notes`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from relion_graphsplit.fourier.fsc import resolution_at
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.relion.star_tables import read_star

CONFIDENCE_COLUMNS = ("rlnClassNumber", "rlnMaxValueProbDistribution")
"""run_data.star's columns the particle confidence needs: the class (1..K) and its posterior."""
LOG_ODDS_LABEL = "rlnGraphSplitLogOdds"
"""rlnGraphSplitLogOdds1 .. rlnGraphSplitLogOddsK (runs with K >= 2): per class k, ln(P(k|x) / (1 - P(k|x)))."""
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
    images: dict[int, np.ndarray]  # cone id -> (4, w, w): mean, eigen-image, side-1 and side-2 averages
    n_classes: int  # K, the number of classes (1 when no split was kept)
    maps: list[np.ndarray] | None  # class 1..K maps [z, y, x] (K = 1: the consensus), float32
    map_pixel_size: float  # of the class maps (A): their header's, else the summary's pixel_size; nan without maps
    mask: np.ndarray | None  # run_mask.mrc [z, y, x], at the maps' box; None when missing or another box
    fsc: dict[int, FscCurve] = field(default_factory=dict)  # class -> its gold-standard FSC
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why


def read_run(out_dir: Path) -> Run:
    """Read the files of a finished run.

    Parameters
    ----------
    out_dir : Path
        The run's output folder. run_summary.json, run_cones.star and run_memberships.star must be
        there; run_data.star, run_cone_images.mrcs, run_class001.mrc .. run_classKKK.mrc,
        run_mask.mrc and run_model.star may be missing (then the report leaves out what needs them).

    Returns
    -------
    Run
        The run's tables, images, class maps, mask and FSC curves, with notes on what could not be
        read. K is run_summary.json's "K"; for runs that predate it, the number of classes in its
        class_sizes, else in run_data.star, else of consecutive run_classNNN.mrc files.
    """
    out = Path(out_dir)
    summary = json.loads((out / "run_summary.json").read_text())
    blocks = read_star(out / "run_cones.star")
    cones = blocks["cones"].sort_values("cone", ignore_index=True)
    edges = blocks.get("edges")
    if not isinstance(edges, pd.DataFrame) or edges.empty:
        edges = pd.DataFrame({"cone1": [], "cone2": [], "shared": [], "weight": []})
    memberships = read_star(out / "run_memberships.star")["memberships"]
    notes: list[str] = []
    data = out / "run_data.star"
    particles = read_star(data, keep=_shown).get("particles") if data.is_file() else None
    if particles is not None and not set(CONFIDENCE_COLUMNS) <= set(particles.columns):
        notes.append(f"{data.name} lacks {', '.join(CONFIDENCE_COLUMNS)}: no particle confidence")
        particles = None
    images = _read_cone_images(out / "run_cone_images.mrcs", cones["cone"].to_numpy(), notes)
    n_classes = _class_count(out, summary, particles)
    maps, map_pixel_size, mask = None, float("nan"), None
    class_maps = [out / f"run_class{k:03d}.mrc" for k in range(1, n_classes + 1)]
    if class_maps and all(p.is_file() for p in class_maps):
        read = [read_mrc(p) for p in class_maps]
        maps = [volume for volume, _ in read]
        map_pixel_size = read[0][1] if read[0][1] > 0 else float(summary.get("pixel_size", "nan"))  # header unset
        mask = _read_mask(out / "run_mask.mrc", maps[0].shape, notes)
    elif class_maps:
        notes.append(f"{', '.join(p.name for p in class_maps if not p.is_file())} missing: no class maps")
    fsc = read_fsc(out / "run_model.star")
    return Run(out, summary, cones, edges, memberships, particles, images, n_classes, maps, map_pixel_size, mask,
               fsc, notes)


def _shown(column: str) -> bool:
    """Whether the report reads this column of run_data.star: the class, its posterior, the log odds
    (a million particles' other columns would take about 0.3 GB)."""
    return column in CONFIDENCE_COLUMNS or column.startswith(LOG_ODDS_LABEL)


def class_sizes(run: Run) -> dict[int, int]:
    """Particles in classes 1..K: the summary's counts, else run_data.star's, else zeros."""
    classes = range(1, run.n_classes + 1)
    sizes = run.summary.get("class_sizes")
    if sizes:
        return {k: int(sizes.get(str(k), 0)) for k in classes}
    if run.particles is not None:
        numbers = run.particles["rlnClassNumber"].to_numpy()
        return {k: int((numbers == k).sum()) for k in classes}
    return dict.fromkeys(classes, 0)


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
        Class k (1..K, one per model_class_k block) -> its curve, in class order; empty when the file
        is missing. The box and pixel size come from model_general's rlnOriginalImageSize and
        rlnPixelSize; where those are missing, from the frequencies themselves (shell s at
        s / (box * pixel_size) 1/A, an even box taken).
    """
    if not path.is_file():
        return {}
    blocks = read_star(path)
    general = blocks.get("model_general")
    general = general if isinstance(general, dict) else {}
    curves = {}
    numbers = sorted(int(m[1]) for name in blocks if (m := re.fullmatch(r"model_class_(\d+)", name)))
    for k in numbers:
        block = blocks[f"model_class_{k}"]
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


def _class_count(out: Path, summary: dict, particles: pd.DataFrame | None) -> int:
    """K: the summary's, else that of its class_sizes, run_data.star's classes, the class map files."""
    if "K" in summary:
        return int(summary["K"])
    if summary.get("class_sizes"):
        return max(int(k) for k in summary["class_sizes"])
    if particles is not None:
        return int(particles["rlnClassNumber"].max())
    k = 0
    while (out / f"run_class{k + 1:03d}.mrc").is_file():
        k += 1
    return k


def _read_mask(path: Path, shape: tuple[int, ...], notes: list[str]) -> np.ndarray | None:
    """run_mask.mrc when it is there and at the class maps' box; else None, with a note why."""
    if not path.is_file():
        notes.append(f"{path.name} is missing: map sections unmasked")
        return None
    mask, _ = read_mrc(path)
    if mask.shape != shape:
        notes.append(f"{path.name} is {mask.shape}, the class maps {shape}: map sections unmasked")
        return None
    return mask
