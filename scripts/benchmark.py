"""Accuracy and speed of the graph split against RELION's Class3D on simulated data with ground truth.

For each scenario: simulate particles (relion_graphsplit.simulate.particles), reconstruct the consensus map with
relion_reconstruct (the input both methods get), then in the same run
- the graph split (`relion_graphsplit --ref consensus.mrc`), timed;
- RELION Class3D with fixed poses (`relion_refine --K 2 --skip_align --iter 25`, fixed --random_seed), timed;
- the ceiling: the accuracy of the Bayes classifier that knows the true maps, poses, CTF and noise.
Results are appended as JSON lines to OUT/results.jsonl and printed as a Markdown table.

    python scripts/benchmark.py --out bench_out [--scenarios adk-snr0.03-50,...] [--n 6000] [--j 2]

`--noise-excess E` simulates coloured noise instead (simulate.Conditions.noise_excess), in scenarios
named with the suffix `-excessE`; `--box B --apix P` makes the 1bd2 maps at box B and P A per pixel
(default 80 at 2.4 A), in scenarios named with the suffix `-boxB-PA`.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import torch
import typer

from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.mrc import read_mrc, write_mrc
from relion_graphsplit.simulate.metrics import accuracy, adjusted_rand_index
from relion_graphsplit.simulate.particles import Conditions, ceiling_accuracy, write_simulation

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = ROOT / "test_data" / "structures"
BOX_1BD2, APIX_1BD2 = 80, 2.4
"""Box and pixel size (A) of the 1bd2 scenarios unless --box / --apix say otherwise."""
CONDITIONS = Conditions(pose_error_deg=1.0, shift_error_A=0.5, max_shift_A=4.0)
"""Pose errors and shifts of every simulated scenario (CTF: the simulator's defaults)."""


@dataclass
class Scenario:
    name: str
    structure: str  # "adk" or "1bd2"
    snr: float
    fraction: float  # of class 1


def scenarios() -> list[Scenario]:
    out = []
    for structure in ("adk", "1bd2"):
        for snr in (0.1, 0.03, 0.01):
            for fraction in (0.5, 0.8):
                out.append(Scenario(f"{structure}-snr{snr:g}-{round(fraction * 100)}", structure, snr, fraction))
    return out


def class_maps(
    structure: str, cache: Path, box: int = BOX_1BD2, apix: float = APIX_1BD2
) -> tuple[list[np.ndarray], float]:
    """The two states' maps: adk open/closed (bundled, box 64), or 1BD2 with and without chain B."""
    if structure == "adk":
        volumes = [read_mrc(ROOT / "test_data" / f"adk_{state}.mrc") for state in ("open", "closed")]
        return [v for v, _ in volumes], volumes[0][1]
    tag = "" if (box, apix) == (BOX_1BD2, APIX_1BD2) else f"_box{box}_{apix:g}A"
    paths = [cache / f"1bd2_full{tag}.mrc", cache / f"1bd2_noB{tag}.mrc"]
    if not all(p.exists() for p in paths):
        from relion_graphsplit.simulate import models as maps  # gemmi, the [models] extra: only to make these maps once

        full = maps.read_model(STRUCTURES / "1BD2.pdb.gz")
        centre = maps.center_of_mass(full)
        for path, chains in zip(paths, (None, ["A", "C", "D", "E"])):
            model = maps.read_model(STRUCTURES / "1BD2.pdb.gz", chains=chains)
            write_mrc(path, maps.density_from_model(model, box, apix, bfactor=50.0, center=centre), apix)
    return [read_mrc(p)[0] for p in paths], apix


def cached(path: Path, compute):
    """A number computed once and kept in `path` (JSON) for later runs of the benchmark."""
    if path.exists():
        return json.loads(path.read_text())["value"]
    value = compute()
    path.write_text(json.dumps({"value": value, "date": time.strftime("%Y-%m-%d")}))
    return value


def scenario_ceiling(work: Path, volumes: list[np.ndarray], truth: star_io.ParticleSet, conditions: Conditions) -> float:
    """The ceiling accuracy of the simulated set in `work` (simulate.ceiling_accuracy)."""
    with mrcfile.mmap(work / "particles.mrcs", mode="r") as mrc:
        return ceiling_accuracy(mrc.data, volumes, truth.particles, truth.optics, conditions=conditions)


def classes_by_name(star: Path, names: np.ndarray) -> np.ndarray:
    table = star_io.read_particles(star).particles.set_index("rlnImageName")
    return table.loc[names, "rlnClassNumber"].to_numpy()


def run(cmd: list[str], log: Path, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    return time.perf_counter() - start


def consensus_map(work: Path, j: int) -> Path:
    """work/consensus.mrc, made once by relion_reconstruct --ctf from work/particles.star: the map both
    programs start from."""
    consensus = work / "consensus.mrc"
    if not consensus.exists():
        run(["relion_reconstruct", "--i", "particles.star", "--o", "consensus.mrc", "--ctf", "--j", str(j)],
            work / "reconstruct.log", cwd=work)  # fmt: skip
    return consensus


def class3d_command(
    size: int, pixel_size: float, iterations: int, j: int, seed: int, k: int = 2, out: str = "class3d/run"
) -> list[str]:
    """RELION's fixed-pose Class3D (the GUI's options) of particles.star into `k` classes from
    consensus.mrc, run in the scenario's folder; the particle diameter 0.75 of the box (`size` pixels
    of `pixel_size` A)."""
    diameter = round(0.75 * size * pixel_size)
    return ["relion_refine", "--o", out, "--i", "particles.star", "--ref", "consensus.mrc",
            "--ini_high", "50", "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "2", "--ctf",
            "--iter", str(iterations), "--tau2_fudge", "4", "--particle_diameter", str(diameter), "--K", str(k),
            "--flatten_solvent", "--zero_mask", "--skip_align", "--sym", "C1", "--norm", "--scale",
            "--j", str(j), "--random_seed", str(seed)]  # fmt: skip


def main(
    out: Path = typer.Option(Path("bench_out"), help="Working folder (simulations, runs, results)."),
    only: str = typer.Option("", "--scenarios", help="Comma-separated scenario names (default: all)."),
    n: int = typer.Option(6000, help="Particles per scenario."),
    j: int = typer.Option(2, help="Threads for both programs."),
    iterations: int = typer.Option(25, help="RELION Class3D iterations."),
    seeded_iter: int = typer.Option(5, help="Class3D iterations after the graph split (the workflow); 0: not run."),
    seed: int = typer.Option(1, help="Simulation seed and RELION --random_seed."),
    skip_relion: bool = typer.Option(False, help="Only the graph split and the ceiling."),
    reuse_relion: bool = typer.Option(False, help="Reuse RELION runs (and their times) from an earlier run of this script."),
    noise_excess: float = typer.Option(0.0, help="Coloured noise (simulate.Conditions.noise_excess); 0: white."),
    box: int = typer.Option(BOX_1BD2, help="Box of the 1bd2 scenarios (pixels)."),
    apix: float = typer.Option(APIX_1BD2, help="Pixel size of the 1bd2 scenarios (A)."),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in scenarios() if not only or s.name in only.split(",")]
    resized = (box, apix) != (BOX_1BD2, APIX_1BD2)
    if resized and any(s.structure == "adk" for s in chosen):
        raise typer.BadParameter("applies to the 1bd2 scenarios only (the adk maps are bundled at box 64)", param_hint="--box")
    conditions = dataclasses.replace(CONDITIONS, noise_excess=noise_excess)
    suffix = (f"-excess{noise_excess:g}" if noise_excess else "") + (f"-box{box}-{apix:g}A" if resized else "")
    results = out / "results.jsonl"
    for sc in chosen:
        sc = dataclasses.replace(sc, name=sc.name + suffix)
        work = out / sc.name
        volumes, pixel_size = class_maps(sc.structure, out, box, apix)
        size = volumes[0].shape[-1]
        if not (work / "particles.star").exists():
            write_simulation(
                work, volumes, pixel_size, n, sc.snr, [sc.fraction, 1 - sc.fraction], seed=seed, conditions=conditions,
            )  # fmt: skip
        truth = star_io.read_particles(work / "truth.star")
        names = truth.particles["rlnImageName"].to_numpy()
        true_class = truth.particles["rlnClassNumber"].to_numpy()
        ceiling = cached(work / "ceiling.json", lambda: scenario_ceiling(work, volumes, truth, conditions))
        consensus_map(work, j)
        row = {"scenario": sc.name, "n": n, "box": size, "pixel_size": pixel_size, "snr": sc.snr, "noise_excess": noise_excess,
               "fraction": sc.fraction, "ceiling": ceiling, "chance": max(sc.fraction, 1 - sc.fraction)}

        split_dir = work / "graphsplit"
        shutil.rmtree(split_dir, ignore_errors=True)
        row["graphsplit_time"] = run(
            ["relion_graphsplit", "--i", "particles.star", "--o", "graphsplit/", "--ref", "consensus.mrc", "--j", str(j)],
            work / "graphsplit.log", cwd=work,
        )
        pred = classes_by_name(split_dir / "run_data.star", names)
        summary = json.loads((split_dir / "run_summary.json").read_text())
        row["graphsplit_peak_memory_mb"] = summary["peak_memory_mb"]
        row["graphsplit_accuracy"] = accuracy(pred, true_class)
        row["graphsplit_ari"] = adjusted_rand_index(pred, true_class)

        # The workflow users run: the graph split, then the Class3D command it prints, for a few iterations.
        # None when a class came out too small for class maps (the program then says so).
        if summary["next_command"] is not None and seeded_iter > 0:
            command = summary["next_command"].replace("--iter 25", f"--iter {seeded_iter}")
            row["seeded_time"] = run(["bash", "-c", command], work / "seeded.log", cwd=work)
            for it in sorted({1, seeded_iter}):
                seeded = classes_by_name(split_dir / "Class3D" / f"run_it{it:03d}_data.star", names)
                row[f"seeded_accuracy_it{it}"] = accuracy(seeded, true_class)
            row["workflow_time"] = row["graphsplit_time"] + row["seeded_time"]

        if not skip_relion:
            class3d = work / "class3d"

            def class3d_run() -> float:
                shutil.rmtree(class3d, ignore_errors=True)
                class3d.mkdir()
                return run(class3d_command(size, pixel_size, iterations, j, seed), work / "class3d.log", cwd=work)

            # RELION's run does not depend on this package; --reuse-relion keeps it between runs.
            timing = work / f"class3d_time_j{j}_it{iterations}.json"
            if not reuse_relion:
                timing.unlink(missing_ok=True)
            row["relion_time"] = cached(timing, class3d_run)
            row["relion_reused"] = reuse_relion
            if seeded_iter > 0:
                early = classes_by_name(class3d / f"run_it{seeded_iter:03d}_data.star", names)
                row[f"relion_accuracy_it{seeded_iter}"] = accuracy(early, true_class)
            pred = classes_by_name(class3d / f"run_it{iterations:03d}_data.star", names)
            row["relion_accuracy"] = accuracy(pred, true_class)
            row["relion_ari"] = adjusted_rand_index(pred, true_class)
            row["speedup"] = row["relion_time"] / row["graphsplit_time"]
        gap = row["ceiling"] - row["chance"]
        row["graphsplit_share_of_gap"] = (row["graphsplit_accuracy"] - row["chance"]) / gap if gap > 0 else float("nan")
        row["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads available, j={j}"
        row["date"] = time.strftime("%Y-%m-%d")
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print_table(results)


def print_table(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    print("| scenario | ceiling | graph split acc / ARI | share of gap | time (s) | RELION acc / ARI | time (s) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = (f"{r['relion_accuracy']:.3f} / {r['relion_ari']:.3f} | {r['relion_time']:.0f} | {r['speedup']:.1f}x"
               if "relion_accuracy" in r else "- | - | -")
        print(f"| {r['scenario']} | {r['ceiling']:.3f} | {r['graphsplit_accuracy']:.3f} / {r['graphsplit_ari']:.3f} | "
              f"{r['graphsplit_share_of_gap']:.2f} | {r['graphsplit_time']:.1f} | {rel} |")
    print()
    print("| scenario | split + seeded Class3D: acc it 1 / it 5 | time (s) "
          "| Class3D from consensus: acc it 5 / it 25 | time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "relion_accuracy" in r and "seeded_time" in r:
            print(f"| {r['scenario']} | {r['seeded_accuracy_it1']:.3f} / {r['seeded_accuracy_it5']:.3f} | "
                  f"{r['workflow_time']:.0f} | {r['relion_accuracy_it5']:.3f} / {r['relion_accuracy']:.3f} | "
                  f"{r['relion_time']:.0f} |")


if __name__ == "__main__":
    typer.run(main)
