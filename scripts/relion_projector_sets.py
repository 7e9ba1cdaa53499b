"""Homogeneous sets made by RELION's own projector, classified with --K auto: is one class found?

The project's simulator and RELION's projector differ in interpolation, CTF and noise; a split of
noise that one of them hides the other may show. For each set: relion_graphsplit_simulate makes a
homogeneous set of one map (poses, CTF, shifts, pose errors, `truth.star` with the true poses), then
relion_project --ctf projects the same map at the true poses and origins of truth.star, once without
noise (to measure the signal) and once with white noise of standard deviation
sqrt(mean signal variance / SNR) (the signal variance of each image over the whole box); the particle
file given to relion_graphsplit is relion_project's, with the poses and origins of the simulator's
particles.star (the true ones plus the pose errors). One JSON line per set goes to OUT/results.jsonl
(the K found, every split tested, the time), and a Markdown table ends the run. Run on demand.

    python scripts/relion_projector_sets.py --out rp_out --j 2
    python scripts/relion_projector_sets.py --out rp_out --sets adk_open:0.05:2:1:1 --n 3000

A set is MAP:SNR:POSE_ERROR_DEG:SHIFT_ERROR_A:SEED, MAP one of adk_open, adk_closed (test_data/).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import typer

from relion_graphsplit.relion import star as star_io

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETS = (
    "adk_open:0.05:2:1:1,adk_closed:0.05:2:1:2,adk_open:0.02:2:1:3,adk_closed:0.1:3:1.5:4,"
    "adk_open:0.1:1:0.5:5,adk_closed:0.02:3:1.5:6"
)
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def make_set(work: Path, map_path: Path, snr: float, pose_error: float, shift_error: float, seed: int, n: int) -> Path:
    """work/data.star: relion_project's noisy images of `map_path`, with the simulator's erroneous poses."""
    work.mkdir(parents=True, exist_ok=True)
    if (work / "data.star").exists():
        return work / "data.star"
    run(["relion_graphsplit_simulate", "--map", str(map_path), "--n", str(n), "--snr", str(snr), "--max_shift", "4",
         "--pose_error", str(pose_error), "--shift_error", str(shift_error), "--seed", str(seed), "--o", "sim"], work)
    run(["relion_project", "--i", str(map_path), "--ang", "sim/truth.star", "--ctf", "--o", "clean"], work)
    with mrcfile.open(work / "clean.mrcs", permissive=True) as mrc:
        signal = float(np.mean(np.var(mrc.data.astype(np.float64), axis=(1, 2))))
    (work / "clean.mrcs").unlink()
    sigma = np.sqrt(signal / snr)
    run(["relion_project", "--i", str(map_path), "--ang", "sim/truth.star", "--ctf", "--add_noise",
         "--white_noise", f"{sigma:.6g}", "--o", "proj"], work)
    projected = star_io.read_particles(work / "proj.star")
    given = star_io.read_particles(work / "sim" / "particles.star").particles
    table = projected.particles.copy()
    for column in POSE_COLUMNS:
        table[column] = given[column].to_numpy()
    table["rlnRandomSubset"] = given["rlnRandomSubset"].to_numpy()
    star_io.write_particles(work / "data.star", projected, table)
    return work / "data.star"


def main(
    out: Path = typer.Option(Path("rp_out"), help="Working folder."),
    sets: str = typer.Option(DEFAULT_SETS, help="Comma-separated MAP:SNR:POSE_ERROR:SHIFT_ERROR:SEED."),
    n: int = typer.Option(6000, help="Particles per set."),
    j: int = typer.Option(2, help="Threads."),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for spec in sets.split(","):
        name, snr, pose_error, shift_error, seed = spec.split(":")
        work = out / spec.replace(":", "_")
        star = make_set(work, ROOT / "test_data" / f"{name}.mrc", float(snr), float(pose_error), float(shift_error), int(seed), n)
        start = time.perf_counter()
        run(["relion_graphsplit", "--i", str(star), "--o", "split", "--j", str(j)], work)
        seconds = time.perf_counter() - start
        summary = json.loads((work / "split" / "run_summary.json").read_text())
        row = {"set": spec, "n": n, "K": summary["K"], "split_tests": summary["split_tests"], "seconds": round(seconds, 1),
               "date": time.strftime("%Y-%m-%d")}
        with open(out / "results.jsonl", "a") as results:
            results.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    print("| set (map:SNR:pose error:shift error:seed) | K | gain, half 1 / half 2 (threshold) | FSC | reason |")
    print("| --- | --- | --- | --- | --- |")
    for line in open(out / "results.jsonl"):
        row = json.loads(line)
        root = row["split_tests"][0]
        gains = " / ".join("nan" if g is None or g != g else f"{g:.4f}" for g in root["gain"])
        fsc = "n/a" if root["fsc"] is None else f"{root['fsc']:.2f}"
        print(f"| {row['set']} | {row['K']} | {gains} ({root['threshold']:.4f}) | {fsc} | {root['reason']} |")


if __name__ == "__main__":
    typer.run(main)
