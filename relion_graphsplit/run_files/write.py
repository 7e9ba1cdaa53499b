"""Files a split leaves in its output directory (each written atomically)."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from relion_graphsplit.files import atomic_path
from relion_graphsplit.method.pipeline import SplitResult
from relion_graphsplit.method.refine import log_odds
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.stack_files import resolve_stack
from relion_graphsplit.relion.star_tables import write_star

LOG_ODDS_LABEL = "rlnGraphSplitLogOdds"
"""Columns rlnGraphSplitLogOdds1 .. rlnGraphSplitLogOddsK (for K >= 2 classes): each particle's log
posterior odds of class k, log(P(k) / (1 - P(k))), after the refinement, held out: each half's particles
scored against the other half's class maps (for two classes without the refinement, the mean
synchronised log-likelihood ratio of the graph split for class 1 and its negative)."""


def classified_particles(ps: star_io.ParticleSet, result: SplitResult) -> pd.DataFrame:
    """The input particle table, every column kept, with the class, its probability and the log odds
    of every class; image names valid from the working directory (`image_names_from_workdir`).

    Parameters
    ----------
    ps : star_io.ParticleSet
        The input particle file; its table is copied, not changed.
    result : SplitResult
        The split, one value per particle row.

    Returns
    -------
    pd.DataFrame
        The table with rlnImageName rewritten, rlnClassNumber (1..K, int64),
        rlnMaxValueProbDistribution (the posterior probability of the assigned class) and, for
        K >= 2, the LOG_ODDS_LABEL columns set.
    """
    table = ps.particles.copy()
    table["rlnImageName"] = image_names_from_workdir(ps)
    table["rlnClassNumber"] = result.classes.astype(np.int64)
    table["rlnMaxValueProbDistribution"] = result.probability
    if result.n_classes >= 2:
        for k, column in enumerate(log_odds(result.log_posterior).T, start=1):
            table[f"{LOG_ODDS_LABEL}{k}"] = column
    return table


def image_names_from_workdir(ps: star_io.ParticleSet) -> pd.Series:
    """rlnImageName with each stack named as it is found from the working directory.

    RELION opens stacks relative to the directory it runs in (a RELION project's). A stack that was
    found only relative to the input STAR file's folder is named through that folder, so that the
    written STAR file and the `relion_refine` command printed with it work from where the program ran.

    Parameters
    ----------
    ps : star_io.ParticleSet
        The input particle file (its rlnImageName column and its path).

    Returns
    -------
    pd.Series
        Per particle row, "NNNNNN@stack" (or the stack name alone, where the name has no "@") with the
        stack renamed as above; absolute names, names found from the working directory and stacks
        found nowhere are kept as they are.
    """
    names = ps.particles["rlnImageName"].astype(str)
    number, at, stack = (part for _, part in names.str.partition("@").items())
    stack = stack.where(at == "@", number)
    renamed = {}
    for name in stack.unique():
        found = resolve_stack(name, ps.path.parent)  # the working directory's `name` when found there
        renamed[name] = str(found) if found is not None and found != Path.cwd() / name else name
    stack = stack.map(renamed)
    return (number + "@" + stack).where(at == "@", stack)


def noise_spectrum(result: SplitResult) -> dict | None:
    """The estimated noise power per ring of the working box (rings 1..w // 2, relative to their mean)
    with each ring's resolution in A, for run_summary.json; None when the noise was not estimated.

    Parameters
    ----------
    result : SplitResult
        The split: its noise_spectrum, working_box w and working_pixel_size (A).

    Returns
    -------
    dict or None
        {"resolution": [w * pixel size / r for rings r = 1..w // 2] (A), "relative_power": [...]},
        as lists of floats.
    """
    if not len(result.noise_spectrum):
        return None
    rings = np.arange(1, len(result.noise_spectrum) + 1)
    return {
        "resolution": (result.working_box * result.working_pixel_size / rings).tolist(),
        "relative_power": result.noise_spectrum.tolist(),
    }


def noise_description(contrast: float | None, whitened: bool) -> str:
    """How coloured the noise was found (power of the noisiest ring over the least noisy, None when
    not estimated), and whether the images were whitened (method.md item 8).

    Parameters
    ----------
    contrast : float or None
        The noise contrast (preprocess.Whitening.contrast); None when not estimated.
    whitened : bool
        Whether the images were whitened.

    Returns
    -------
    str
        For example "coloured (3.2-fold): whitened", "white (1.3-fold): not whitened" or
        "not estimated (not whitened)".
    """
    if contrast is None:
        return "not estimated (not whitened)"
    return f"{'coloured' if whitened else 'white'} ({contrast:.1f}-fold): {'whitened' if whitened else 'not whitened'}"


def write_particles(out: Path, ps: star_io.ParticleSet, table: pd.DataFrame) -> None:
    """run_data.star and one run_classNNN_data.star per class.

    Parameters
    ----------
    out : Path
        The folder to write into.
    ps : star_io.ParticleSet
        The input particle file: its optics table and RELION version are written with the particles.
    table : pd.DataFrame
        The particles (`classified_particles`); run_classNNN_data.star holds the rows of
        rlnClassNumber NNN (three digits), in their order.
    """
    star_io.write_particles(out / "run_data.star", ps, table)
    for k in sorted(table["rlnClassNumber"].unique()):
        path = out / f"run_class{int(k):03d}_data.star"
        star_io.write_particles(path, ps, table[table["rlnClassNumber"] == k].reset_index(drop=True))


def write_diagnostics(out: Path, result: SplitResult) -> None:
    """Per-cone table and graph (run_cones.star), memberships and cone images.

    run_cone_images.mrcs holds 4 images per cone c: 4c mean, 4c+1 eigen-image, 4c+2 and 4c+3 the
    averages of the cone's class-1 and class-2 members.

    Parameters
    ----------
    out : Path
        The folder to write into; each file is written whole or not at all.
    result : SplitResult
        The split: run_cones.star gets its cone_table (block "cones") and edges (block "edges"),
        run_memberships.star its membership table (block "memberships"), run_cone_images.mrcs its
        cone_images (M, 4, w, w) as a stack of 4 M float32 images with the working pixel size (A).
    """
    write_star(out / "run_cones.star", {"cones": result.cone_table, "edges": result.edges}, float_format="%.6f")
    write_star(out / "run_memberships.star", {"memberships": result.membership}, float_format="%.6f")
    images = out / "run_cone_images.mrcs"
    stack = result.cone_images.reshape(-1, *result.cone_images.shape[2:])  # 4 images per cone
    with atomic_path(images) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(stack.astype(np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = result.working_pixel_size


def write_summary(out: Path, summary: dict) -> None:
    """run_summary.json: the run's parameters, versions, sizes, timings and warnings.

    Parameters
    ----------
    out : Path
        The folder to write into; the file is written whole or not at all.
    summary : dict
        The summary; numpy integers and floats are written as numbers, paths and any other value
        json cannot write as strings.
    """
    summary_path = out / "run_summary.json"
    with atomic_path(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
