"""RELION's model.star for the class maps, and the relion_refine command that continues from them.

relion_refine --ref takes a STAR file and reads its `model_classes` table (any table with
rlnReferenceImage if there is none): one reference per row, K = the number of rows, no random seeding
(ml_model.cpp, MlModel::initialiseFromImages).

What relion_refine expects of such references (3dem/relion source; measured with Debian's 3.1.3):
- Grey scale: relion_reconstruct and relion_refine put maps on one scale. The projector normalises a
  reference's padded transform by pad^3 * box (projector.cpp, Projector::computeFourierTransformMap),
  as the back-projector does for its reconstructions (backprojector.cpp,
  BackProjector::windowToOridimRealSpace); our maps are on relion_reconstruct's scale.
- CTF: unless --ctf_corrected_ref is given, relion_refine 3.1 treats --ref maps as not CTF-corrected
  (ml_optimiser.cpp, parseInitial; MlModel::initialiseFromImages sets it only when there is no --ref)
  and, in iteration 1, compares each image with the reference projection WITHOUT its CTF
  (ml_optimiser.cpp: the projection is multiplied by the CTF only `if (do_ctf_correction &&
  refs_are_ctf_corrected)`); after iteration 1 the flag is set (maximizationOtherParameters: "After
  the first iteration the references are always CTF-corrected"). Maps made with CTF correction (ours,
  relion_reconstruct --ctf) then project at full amplitude against data damped by |CTF| < 1, the
  squared difference is ruled by each map's own power, and every particle goes to the class whose map
  is weaker: seeded with relion_reconstruct maps of the true split of 800 simulated particles,
  iteration 1 put all of them in one class (our maps at --ini_high 10.3: 736 of 800 in one class, 68% kept).
  Scaling both maps by 1/4 or --firstiter_cc (a grey-scale-free correlation in iteration 1) hide
  this; --ctf_corrected_ref removes the cause: iteration 1 then kept 100% of the split, and 98-100%
  with the maps scaled by 0.25 to 2. RELION 5's source assumes CTF-corrected references
  (--ctf_uncorrected_ref for the opposite) and only warns about --ctf_corrected_ref.
- Resolution of iteration 1: references are low-pass filtered to --ini_high and iteration 1 compares
  only up to it. At 50 A, adenylate kinase's two states (box 32, 4 A) differ too little:
  with --ctf_corrected_ref iteration 1 kept 73% of the true split; at 20 A and finer, 100%. The
  command below uses the gold-standard resolution of the worse class map.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from relion_graphsplit.files import atomic_path

MODEL_NAME = "run_model.star"
DEFAULT_INI_HIGH = 60.0
"""Angstrom; the initial low-pass when the class maps give no resolution (RELION's GUI default,
pipeline_jobs.cpp)."""


def ssnr_from_fsc(fsc_curve: torch.Tensor | np.ndarray) -> np.ndarray:
    """Spectral SNR of the full map, 2 FSC / (1 - FSC), from the half-map FSC clipped to [0, 0.999].

    Parameters
    ----------
    fsc_curve : torch.Tensor or np.ndarray
        (n,) gold-standard FSC of two half maps per shell (a CPU tensor).

    Returns
    -------
    np.ndarray
        (n,) float64 SSNR per shell, in [0, 1998].
    """
    f = np.clip(np.asarray(fsc_curve, dtype=np.float64), 0.0, 0.999)
    return 2.0 * f / (1.0 - f)


def write_model_star(
    path: str | os.PathLike,
    reference_images: Sequence[str | os.PathLike],
    class_distribution: Sequence[float],
    resolutions: Sequence[float],
    fsc_curves: torch.Tensor | np.ndarray,
    completeness: torch.Tensor | np.ndarray,
    box: int,
    pixel_size: float,
    average_pmax: float = 0.0,
    pad: int = 2,
    tau2_fudge: float = 4.0,
) -> None:
    """A model.star in RELION 3.1's layout (data_model_general, data_model_classes, data_model_class_N)
    that `relion_refine --ref` takes as the list of K references.

    What the split does not estimate gets the value RELION writes for fixed poses and one group:
    accuracies 0, rlnNrGroups 1, rlnSigmaOffsetsAngst 0, no orientational prior. The file is written
    whole or not at all.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write.
    reference_images : sequence of str or os.PathLike
        K map paths as relion_refine will open them (relative to the directory it runs in).
    class_distribution : sequence of float
        (K,) fraction of the particles in each class (rlnClassDistribution).
    resolutions : sequence of float
        (K,) gold-standard resolution of each class map (A); math.inf where none was measured (written
        as 999). rlnCurrentResolution is the best finite one (999 if none).
    fsc_curves : torch.Tensor or np.ndarray
        (K, box // 2 + 1) gold-standard FSC per shell (rlnGoldStandardFsc; rlnSsnrMap from it by
        `ssnr_from_fsc`).
    completeness : torch.Tensor or np.ndarray
        (K, box // 2 + 1) Fourier completeness per shell, fraction (rlnFourierCompleteness; the overall
        value weighs shells 1 up to the class's resolution, or all where it has none, by their index
        squared).
    box : int
        The maps' box (pixels).
    pixel_size : float
        Their pixel size (A). Shell s is at s / (box * pixel_size) 1/A.
    average_pmax : float
        rlnAveragePmax.
    pad : int
        rlnPaddingFactor.
    tau2_fudge : float
        rlnTau2FudgeFactor.
    """
    fsc_curves, completeness = np.asarray(fsc_curves, np.float64), np.asarray(completeness, np.float64)
    k = len(reference_images)
    shells = np.arange(box // 2 + 1)
    angstrom = np.where(shells > 0, box * pixel_size / np.maximum(shells, 1), 999.0)
    finite = [r for r in resolutions if math.isfinite(r)]
    blocks: dict[str, dict | pd.DataFrame] = {
        "model_general": {
            "rlnReferenceDimensionality": 3,
            "rlnDataDimensionality": 2,
            "rlnOriginalImageSize": box,
            "rlnCurrentResolution": min(finite) if finite else 999.0,
            "rlnCurrentImageSize": box,
            "rlnPaddingFactor": float(pad),
            "rlnIsHelix": 0,
            "rlnFourierSpaceInterpolator": 1,
            "rlnMinRadiusNnInterpolation": 10,
            "rlnPixelSize": pixel_size,
            "rlnNrClasses": k,
            "rlnNrBodies": 1,
            "rlnNrGroups": 1,
            "rlnTau2FudgeFactor": tau2_fudge,
            "rlnNormCorrectionAverage": 1.0,
            "rlnSigmaOffsetsAngst": 0.0,
            "rlnOrientationalPriorMode": 0,
            "rlnSigmaPriorRotAngle": 0.0,
            "rlnSigmaPriorTiltAngle": 0.0,
            "rlnSigmaPriorPsiAngle": 0.0,
            "rlnLogLikelihood": 0.0,
            "rlnAveragePmax": average_pmax,
        },
        "model_classes": pd.DataFrame(
            {
                "rlnReferenceImage": [str(p) for p in reference_images],
                "rlnClassDistribution": np.asarray(class_distribution, np.float64),
                "rlnAccuracyRotations": np.zeros(k),
                "rlnAccuracyTranslationsAngst": np.zeros(k),
                "rlnEstimatedResolution": [r if math.isfinite(r) else 999.0 for r in resolutions],
                "rlnOverallFourierCompleteness": [
                    _overall_completeness(c, r, box, pixel_size) for c, r in zip(completeness, resolutions)
                ],
            }
        ),
    }
    for i in range(k):
        blocks[f"model_class_{i + 1}"] = pd.DataFrame(
            {
                "rlnSpectralIndex": shells,
                "rlnResolution": shells / (box * pixel_size),
                "rlnAngstromResolution": angstrom,
                "rlnSsnrMap": ssnr_from_fsc(fsc_curves[i]),
                "rlnGoldStandardFsc": fsc_curves[i],
                "rlnFourierCompleteness": completeness[i],
            }
        )
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True, float_format="%.8g")


def _overall_completeness(per_shell: np.ndarray, resolution: float, box: int, pixel_size: float) -> float:
    """Completeness of the shells up to `resolution`, each weighted by its surface (shell index squared)."""
    last = len(per_shell) - 1
    if math.isfinite(resolution):
        last = min(last, max(1, int(box * pixel_size / resolution)))
    weights = np.arange(1, last + 1, dtype=np.float64) ** 2
    return float((per_shell[1 : last + 1] * weights).sum() / weights.sum())


def ini_high(resolutions: Sequence[float]) -> float:
    """The initial low-pass (A) for relion_refine: the worse class resolution, rounded up to 0.1 A, at
    most DEFAULT_INI_HIGH (also used when no class has a finite resolution).

    Parameters
    ----------
    resolutions : sequence of float
        Resolution of each class map (A), at least one; math.inf where none was measured.

    Returns
    -------
    float
        --ini_high in A. DEFAULT_INI_HIGH (60) as soon as one class has no finite resolution.
    """
    worst = max(resolutions)
    return min(DEFAULT_INI_HIGH, math.ceil(worst * 10.0) / 10.0) if math.isfinite(worst) else DEFAULT_INI_HIGH


def next_command(
    out: str | os.PathLike,
    particles_star: str | os.PathLike,
    diameter: float,
    j: int,
    resolutions: Sequence[float],
    sym: str = "C1",
    iterations: int = 25,
) -> str:
    """The shell line that continues the split in RELION: a fixed-pose Class3D (the GUI's options,
    conventions file) with K = len(resolutions), seeded with `out`/run_model.star, writing into
    `out`/Class3D/run_itNNN_*. --ctf_corrected_ref and --ini_high as explained in the module docstring.
    Paths are as given, so relative ones are relative to the directory the command runs in.

    Parameters
    ----------
    out : str or os.PathLike
        The split's output folder, which holds run_model.star.
    particles_star : str or os.PathLike
        The particle STAR file for --i.
    diameter : float
        --particle_diameter (A).
    j : int
        --j, threads.
    resolutions : sequence of float
        Resolution of each class map (A): K = their number, --ini_high from `ini_high`.
    sym : str
        --sym, RELION's point group.
    iterations : int
        --iter.

    Returns
    -------
    str
        'mkdir -p OUT/Class3D && relion_refine ...', quoted for a POSIX shell.
    """
    job = Path(out) / "Class3D"
    args = [
        "relion_refine", "--o", str(job / "run"), "--i", str(particles_star), "--ref", str(Path(out) / MODEL_NAME),
        "--ini_high", f"{ini_high(resolutions):g}", "--dont_combine_weights_via_disc", "--pool", "30",
        "--pad", "2", "--ctf", "--ctf_corrected_ref", "--iter", str(iterations), "--tau2_fudge", "4",
        "--particle_diameter", f"{diameter:g}", "--K", str(len(resolutions)), "--flatten_solvent",
        "--zero_mask", "--skip_align", "--sym", sym, "--norm", "--scale", "--j", str(j),
    ]  # fmt: skip
    return f"mkdir -p {shlex.quote(str(job))} && {shlex.join(args)}"
