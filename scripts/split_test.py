"""Candidate statistics of a split's reproducibility and bimodality on independent halves.

    python scripts/split_test.py --set SIM_DIR [--set SIM_DIR ...] [--label TEXT ...] [--j 2] \
        [--refine_iter 30] [--lowpass 20] [--force]

Each SIM_DIR is a folder written by relion_graphsplit_simulate (particles.star with rlnRandomSubset 1 or 2,
particles.mrcs, truth.star). The particles are split by rlnRandomSubset into SIM_DIR/half1.star and
SIM_DIR/half2.star (written with relion_graphsplit.relion.star.write_particles, without the rlnRandomSubset
column, so that relion_graphsplit draws the half sets of its own class maps within each half), and
relion_graphsplit runs on each half separately into SIM_DIR/split_half1 and SIM_DIR/split_half2
(a run already there is reused unless --force). Prints one JSON line per set with:

- fsc_diff: the FSC (relion_graphsplit.fourier.fsc.fsc, unmasked) between the two halves' class-difference
  maps run_class001.mrc - run_class002.mrc, the sign of half 2's taken so that the mean over the shells from
  60 to 20 A is the larger (the halves' labels are arbitrary); its mean over those shells (fsc_diff_60_20),
  the same with each map multiplied by the product of the two runs' run_mask.mrc (fsc_diff_masked_60_20), and
  the real-space correlation of the sign-aligned difference maps;
- heldout: half B's particles scored with half A's class maps (and A's with B's), with the simulator's Gaussian
  likelihood relion_graphsplit.simulate.particles.class_log_likelihoods at the poses particles.star reports
  (not the true ones) and the noise level and grey scale of truth.star (simulator knowledge: a real test would
  estimate them). Maps are low-passed to --lowpass A and scaled by one factor fitted on the scoring half's own
  images to its own consensus (class maps weighted by class fractions). gain_per_particle is the mean over the
  held-out particles of log sum_k pi_k p(x | class k) - log p(x | consensus): positive where the split model
  predicts unseen particles better than one map. The held-out log odds are tested for bimodality too;
- bimodality of each half's final scores (rlnGraphSplitScore in run_data.star): the fraction of particles with
  rlnMaxValueProbDistribution above 0.9, the mean per-particle log-likelihood gain of a two-Gaussian over a
  one-Gaussian fit (EM), its BIC difference, Ashman's D of the two Gaussians and Sarle's bimodality coefficient
  (above 5/9 suggests bimodality);
- the class fractions of each half and, from truth.star, each half's accuracy (labels matched; about 0.5 for a
  homogeneous set, whose truth labels are random).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import scipy.stats
import torch
import typer

from relion_graphsplit.fourier.fsc import fsc
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.simulate.metrics import accuracy
from relion_graphsplit.simulate.particles import class_log_likelihoods

NORM_COLUMNS = ("NormScale", "NormOffset", "NoiseStddev")


def image_number(names: pd.Series) -> np.ndarray:
    """0-based image index in the (single) stack from rlnImageName 'NNNNNN@file'."""
    return names.str.split("@").str[0].astype(int).to_numpy() - 1


def run_half(sim: Path, ps: star_io.ParticleSet, subset: int, j: int, refine_iter: int, force: bool) -> tuple[Path, float]:
    """Write half `subset` of the set and run relion_graphsplit on it; returns the run folder and its time (s)."""
    star = sim / f"half{subset}.star"
    out = sim / f"split_half{subset}"
    if (out / "run_data.star").is_file() and not force:
        return out, float("nan")
    rows = ps.particles[ps.particles["rlnRandomSubset"] == subset].drop(columns="rlnRandomSubset")
    star_io.write_particles(star, ps, rows)
    start = time.perf_counter()
    subprocess.run(
        ["relion_graphsplit", "--i", str(star), "--o", str(out), "--j", str(j), "--refine_iter", str(refine_iter)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return out, time.perf_counter() - start


def shells_between(box: int, pixel_size: float, low: float = 60.0, high: float = 20.0) -> np.ndarray:
    """Shell indices whose resolution box * pixel_size / s lies in [high, low] A."""
    s = np.arange(1, box // 2 + 1)
    resolution = box * pixel_size / s
    return s[(resolution <= low) & (resolution >= high)]


def lowpass(volume: np.ndarray, pixel_size: float, resolution: float, edge: float = 0.005) -> np.ndarray:
    """Low-pass a map to `resolution` A with a raised-cosine edge `edge` (1/A) wide below it."""
    box = volume.shape[-1]
    k = np.fft.fftfreq(box, d=pixel_size)
    kx = np.fft.rfftfreq(box, d=pixel_size)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    cut = 1.0 / resolution
    weight = 0.5 * (1.0 + np.cos(np.pi * np.clip((r - (cut - edge)) / edge, 0.0, 1.0)))
    return np.fft.irfftn(np.fft.rfftn(volume) * weight, s=volume.shape, axes=(0, 1, 2)).astype(np.float32)


def two_gaussian(x: np.ndarray, iterations: int = 300) -> dict:
    """Two-Gaussian versus one-Gaussian fit (EM) of scores x: mean per-point log-likelihood gain, BIC
    difference (one minus two: positive favours two), Ashman's D, Sarle's bimodality coefficient."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    mu0, sd0 = x.mean(), max(x.std(), 1e-12)
    ll1 = scipy.stats.norm.logpdf(x, mu0, sd0).sum()
    lo, hi = x < np.median(x), x >= np.median(x)
    pi, mu, sd = np.array([0.5, 0.5]), np.array([x[lo].mean(), x[hi].mean()]), np.array([x[lo].std(), x[hi].std()]) + 1e-6
    ll2 = -np.inf
    for _ in range(iterations):
        logp = np.log(pi)[None, :] + scipy.stats.norm.logpdf(x[:, None], mu[None, :], sd[None, :])
        top = logp.max(1, keepdims=True)
        total = top[:, 0] + np.log(np.exp(logp - top).sum(1))
        new = total.sum()
        r = np.exp(logp - total[:, None])
        nk = r.sum(0) + 1e-12
        pi = nk / n
        mu = (r * x[:, None]).sum(0) / nk
        sd = np.sqrt((r * (x[:, None] - mu[None, :]) ** 2).sum(0) / nk) + 1e-6 * sd0
        if new - ll2 < 1e-9 * abs(new):
            ll2 = new
            break
        ll2 = new
    g, k = scipy.stats.skew(x), scipy.stats.kurtosis(x)  # excess kurtosis
    sarle = (g**2 + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    return {
        "gain_per_point": float((ll2 - ll1) / n),
        "bic_one_minus_two": float((2 * np.log(n) - 2 * ll1) - (5 * np.log(n) - 2 * ll2)),
        "ashman_d": float(np.sqrt(2) * abs(mu[0] - mu[1]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2)),
        "weights": [float(p) for p in pi],
        "sarle_bc": float(sarle),
    }


def heldout(images, maps_a: list[np.ndarray], share_a: float, rows_a, rows_b, optics, pixel_size, resolution) -> dict:
    """Score half B's particles (rows_b: tables with reported poses and the truth's noise columns) with half
    A's class maps; the maps' grey scale is fitted on half A's own particles to A's consensus."""
    maps = [lowpass(m, pixel_size, resolution) for m in maps_a]
    consensus = share_a * maps[0] + (1 - share_a) * maps[1]
    # log p(x | c M) is quadratic in c: from c = 0, 1, -1 on half A, the c of highest likelihood.
    ll = class_log_likelihoods(images[image_number(rows_a["rlnImageName"])], [0 * consensus, consensus, -consensus],
                               rows_a, optics).sum(0)  # fmt: skip
    beta, gamma = (ll[1] - ll[2]) / 2, (ll[1] + ll[2]) / 2 - ll[0]
    c = float(-beta / (2 * gamma))
    ll = class_log_likelihoods(images[image_number(rows_b["rlnImageName"])], [c * maps[0], c * maps[1], c * consensus],
                               rows_b, optics)  # fmt: skip
    prior = np.log([max(share_a, 1e-6), max(1 - share_a, 1e-6)])
    mixture = np.logaddexp(ll[:, 0] + prior[0], ll[:, 1] + prior[1])
    odds = ll[:, 0] - ll[:, 1] + prior[0] - prior[1]
    return {
        "scale": c,
        "gain_per_particle": float(np.mean(mixture - ll[:, 2])),
        "gain_total": float(np.sum(mixture - ll[:, 2])),
        "fraction_class1": float(np.mean(odds >= 0)),
        "fraction_posterior_above_0.9": float(np.mean(1 / (1 + np.exp(-np.abs(odds))) > 0.9)),
        "odds_bimodality": two_gaussian(odds),
    }


def compare_halves(sim, ps, runs, halves, truth_by_image, box, pixel_size, resolution) -> tuple[dict, dict]:
    """Statistics a (FSC of the class-difference maps) and b (held-out scores) of two runs with two classes each."""
    # a. FSC of the class-difference maps, sign aligned.
    diffs = [read_mrc(r / "run_class001.mrc")[0] - read_mrc(r / "run_class002.mrc")[0] for r in runs]
    mask = read_mrc(runs[0] / "run_mask.mrc")[0] * read_mrc(runs[1] / "run_mask.mrc")[0]
    shells = shells_between(box, pixel_size)
    curve = fsc(torch.from_numpy(diffs[0]), torch.from_numpy(diffs[1])).numpy()
    sign = 1.0 if curve[shells].mean() >= 0 else -1.0
    masked = sign * fsc(torch.from_numpy(diffs[0] * mask), torch.from_numpy(diffs[1] * mask)).numpy()
    curve = sign * curve
    correlation = sign * float(np.corrcoef(diffs[0].ravel(), diffs[1].ravel())[0, 1])

    # b. Held-out: each half's particles scored with the other half's class maps.
    with mrcfile.mmap(sim / "particles.mrcs", mode="r") as mrc:
        images = mrc.data
        tables = []
        for half in halves:
            rows = ps.particles.set_index(image_number(ps.particles["rlnImageName"])).loc[half.index]
            rows = rows.drop(columns="rlnRandomSubset").copy()
            for column in NORM_COLUMNS:
                rows[column] = truth_by_image.loc[half.index, column].to_numpy()
            tables.append(rows.reset_index(drop=True))
        maps = [[read_mrc(r / f"run_class00{k}.mrc")[0] for k in (1, 2)] for r in runs]
        shares = [float(np.mean(h["rlnClassNumber"] == 1)) for h in halves]
        held = {
            "A_to_B": heldout(images, maps[0], shares[0], tables[0], tables[1], ps.optics, pixel_size, resolution),
            "B_to_A": heldout(images, maps[1], shares[1], tables[1], tables[0], ps.optics, pixel_size, resolution),
        }

    return {
        "fsc_diff_60_20": float(curve[shells].mean()),
        "fsc_diff_masked_60_20": float(masked[shells].mean()),
        "fsc_diff_shells": [int(s) for s in shells],
        "fsc_diff": [round(float(v), 4) for v in curve],
        "diff_map_correlation": correlation,
    }, held


def main(
    sets: list[Path] = typer.Option(..., "--set", help="Folder written by relion_graphsplit_simulate (repeatable)."),
    labels: list[str] = typer.Option([], "--label", help="Description of each --set, in order (default: its name)."),
    j: int = typer.Option(2, "--j", help="Threads of relion_graphsplit."),
    refine_iter: int = typer.Option(30, "--refine_iter", help="relion_graphsplit's --refine_iter."),
    resolution: float = typer.Option(20.0, "--lowpass", help="Low-pass (A) of the maps of the held-out test."),
    force: bool = typer.Option(False, "--force", help="Run relion_graphsplit again where a run exists."),
) -> None:
    for index, sim in enumerate(sets):
        sim = sim.resolve()
        ps = star_io.read_particles(sim / "particles.star")
        if "rlnRandomSubset" not in ps.particles or set(ps.particles["rlnRandomSubset"]) != {1, 2}:
            raise typer.BadParameter(f"{sim}: particles.star has no rlnRandomSubset of 1 and 2")
        truth = star_io.read_particles(sim / "truth.star").particles
        truth_by_image = truth.set_index(image_number(truth["rlnImageName"]))
        box, pixel_size = star_io.image_size(ps), star_io.pixel_size(ps)
        runs, seconds, halves = [], [], []
        for subset in (1, 2):
            out, took = run_half(sim, ps, subset, j, refine_iter, force)
            runs.append(out)
            seconds.append(took)
            data = star_io.read_particles(out / "run_data.star").particles
            halves.append(data.set_index(image_number(data["rlnImageName"])))

        both = all((r / f"run_class00{k}.mrc").is_file() for r in runs for k in (1, 2))
        found = {"fsc_diff_60_20": None, "fsc_diff_masked_60_20": None, "fsc_diff": None, "diff_map_correlation": None}
        held = None
        if both:  # a half whose split left one class empty has one class map: nothing to compare
            found, held = compare_halves(sim, ps, runs, halves, truth_by_image, box, pixel_size, resolution)

        # c. Bimodality of each half's final scores; accuracy against the truth.
        per_half = []
        for half in halves:
            classes = half["rlnClassNumber"].to_numpy()
            per_half.append({
                "n": len(half),
                "fraction_class1": float(np.mean(classes == 1)),
                "fraction_posterior_above_0.9": float(np.mean(half["rlnMaxValueProbDistribution"] > 0.9)),
                "score_bimodality": two_gaussian(half["rlnGraphSplitScore"].to_numpy()),
                "accuracy_vs_truth": accuracy(classes, truth_by_image.loc[half.index, "rlnClassNumber"].to_numpy()),
            })  # fmt: skip
        print(json.dumps({
            "set": labels[index] if index < len(labels) else sim.name,
            "folder": str(sim),
            "halves": per_half,
            **found,
            "heldout": held,
            "split_seconds": seconds,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
