"""The hand-off to RELION: time of the class-map step, and the workflow it enables, on simulated data.

reconstruct: our reconstruct_classes (both classes' half maps, full maps and FSC from one pass over the
    stack, with the STAR file read and the maps written) against relion_reconstruct --ctf on the same
    particles split into their true classes: the two class maps alone (--class k), and all six maps
    (--class k, --class k --subset 1|2). The maps are compared by FSC.
workflow: per scenario of scripts/benchmark.py, from the same consensus map (relion_reconstruct):
    A. relion_graphsplit, then a fixed-pose Class3D seeded with its run_model.star (the command it prints)
       for --seeded-iter iterations;
    B. a fixed-pose Class3D from the consensus map (K 2, --iter --iterations, fixed --random_seed).
    Accuracy against the ground truth and wall time of each step. Results go to OUT/handoff.jsonl.

    python scripts/bench_handoff.py reconstruct --out bench_handoff [--n 6000] [--j 2]
    python scripts/bench_handoff.py workflow --out bench_handoff [--scenarios adk-snr0.03-50] [--n 6000]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

# Passive OpenMP waiting, as the package sets it, must be in place before torch loads (see docs/method.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import starfile  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (scripts/benchmark.py: scenarios, simulated maps, helpers)

from relion_graphsplit import star_io  # noqa: E402
from relion_graphsplit.classmaps import reconstruct_classes, write_class_maps  # noqa: E402
from relion_graphsplit.fsc import fsc  # noqa: E402
from relion_graphsplit.metrics import accuracy  # noqa: E402
from relion_graphsplit.model_star import MODEL_NAME, next_command  # noqa: E402
from relion_graphsplit.mrc_io import read_mrc  # noqa: E402
from relion_graphsplit.simulate import write_simulation  # noqa: E402
from relion_graphsplit.stack import ImageStacks  # noqa: E402

app = typer.Typer(add_completion=False)


def _machine(j: int) -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, j={j}, torch threads {torch.get_num_threads()}"


def _best_and_median(times: list[float]) -> str:
    return f"best {min(times):7.2f} s, median {statistics.median(times):7.2f} s ({len(times)} runs)"


@app.command()
def reconstruct(
    out: Path = typer.Option(Path("bench_handoff"), help="Working folder."),
    structure: str = typer.Option("1bd2", help="adk (64^2, 2 A) or 1bd2 (80^2, 2.4 A), as in benchmark.py."),
    n: int = typer.Option(6000, help="Particles."),
    snr: float = typer.Option(0.05, help="Signal-to-noise ratio of the simulated images."),
    j: int = typer.Option(2, help="relion_reconstruct --j and torch threads."),
    repeats: int = typer.Option(3, help="Runs of each program (in rounds)."),
    seed: int = typer.Option(1, help="Simulation seed."),
) -> None:
    """Time the class-map step: ours against relion_reconstruct --ctf."""
    torch.set_num_threads(j)
    out.mkdir(parents=True, exist_ok=True)
    volumes, apix = benchmark.class_maps(structure, out)
    box = volumes[0].shape[-1]
    work = out / f"reconstruct-{structure}-{n}"
    if not (work / "split.star").exists():
        write_simulation(
            work, volumes, apix, n, snr, [0.5, 0.5], seed=seed, pose_error_deg=1.0, shift_error_A=0.5, max_shift_A=4.0
        )
        ps = star_io.read_particles(work / "particles.star")
        true_class = star_io.read_particles(work / "truth.star").particles["rlnClassNumber"].to_numpy()
        star_io.write_particles(work / "split.star", ps, ps.particles.assign(rlnClassNumber=true_class))

    def ours() -> None:
        ps = star_io.read_particles(work / "split.star")
        with ImageStacks(ps) as stacks:
            maps = reconstruct_classes(ps, stacks, ps.particles["rlnClassNumber"].to_numpy(), batch_size=256)
        write_class_maps(work / "ours", maps)

    def relion(selections: list[list[str]]) -> None:
        for extra in selections:
            name = "relion_" + "_".join(extra[1::2])
            cmd = ["relion_reconstruct", "--i", "split.star", "--o", f"{name}.mrc", "--ctf", "--j", str(j), *extra]
            benchmark.run(cmd, work / f"{name}.log", cwd=work)

    full = [["--class", str(k)] for k in (1, 2)]
    every = full + [["--class", str(k), "--subset", str(h)] for k in (1, 2) for h in (1, 2)]
    programs = {
        "ours: 2 classes x (2 half maps + full map), FSC, files": ours,
        f"relion_reconstruct --ctf --j {j}: 2 class maps": lambda: relion(full),
        f"relion_reconstruct --ctf --j {j}: 2 class maps + 4 half maps": lambda: relion(every),
    }
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(repeats):
        for name, program in programs.items():
            start = time.perf_counter()
            program()
            times[name].append(time.perf_counter() - start)

    cut = int(0.8 * (box // 2))
    agreement = []
    for k in (1, 2):
        a = torch.from_numpy(read_mrc(work / "ours" / f"run_class{k:03d}.mrc")[0])
        b = torch.from_numpy(read_mrc(work / f"relion_{k}.mrc")[0])
        agreement.append(float(fsc(a, b)[1 : cut + 1].min()))
    print(f"{n} particles of {box}^2 ({structure}, SNR {snr:g}), {_machine(j)}, {time.strftime('%Y-%m-%d')}")
    for name, t in times.items():
        print(f"{name:62s} {_best_and_median(t)}")
    print(f"lowest FSC(ours, relion_reconstruct) up to 0.8 Nyquist: class 1 {agreement[0]:.4f}, class 2 {agreement[1]:.4f}")


def _refine(
    work: Path, root: str, reference: str, iterations: int, diameter: float, j: int, seed: int, extra: list[str]
) -> float:
    """A fixed-pose Class3D (the GUI's options) from `reference`; returns its wall time."""
    (work / root).parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "relion_refine", "--o", root, "--i", "particles.star", "--ref", reference, "--dont_combine_weights_via_disc",
        "--pool", "30", "--pad", "2", "--ctf", "--iter", str(iterations), "--tau2_fudge", "4",
        "--particle_diameter", f"{diameter:g}", "--K", "2", "--flatten_solvent", "--zero_mask", "--skip_align",
        "--sym", "C1", "--norm", "--scale", "--j", str(j), "--random_seed", str(seed), *extra,
    ]  # fmt: skip
    return benchmark.run(cmd, work / f"{Path(root).parent.name}.log", cwd=work)


@app.command()
def workflow(
    out: Path = typer.Option(Path("bench_handoff"), help="Working folder (simulations, runs, results)."),
    only: str = typer.Option("adk-snr0.03-50", "--scenarios", help="Comma-separated names from benchmark.py."),
    n: int = typer.Option(6000, help="Particles per scenario."),
    j: int = typer.Option(2, help="Threads for every program."),
    seeded_iter: int = typer.Option(5, help="Class3D iterations after the graph split."),
    iterations: int = typer.Option(25, help="Class3D iterations from the consensus map."),
    seed: int = typer.Option(1, help="Simulation seed and RELION --random_seed."),
) -> None:
    """Graph split + seeded Class3D against Class3D from a random start, per scenario."""
    out.mkdir(parents=True, exist_ok=True)
    for sc in [s for s in benchmark.scenarios() if s.name in only.split(",")]:
        work = out / f"{sc.name}-{n}"
        volumes, apix = benchmark.class_maps(sc.structure, out)
        box = volumes[0].shape[-1]
        diameter = round(0.75 * box * apix)
        if not (work / "particles.star").exists():
            write_simulation(
                work, volumes, apix, n, sc.snr, [sc.fraction, 1 - sc.fraction], seed=seed,
                pose_error_deg=1.0, shift_error_A=0.5, max_shift_A=4.0,
            )  # fmt: skip
        truth = star_io.read_particles(work / "truth.star").particles
        names, true_class = truth["rlnImageName"].to_numpy(), truth["rlnClassNumber"].to_numpy()

        def acc(star: Path) -> float:
            return accuracy(benchmark.classes_by_name(work / star, names), true_class)

        row = {"scenario": sc.name, "n": n, "box": box, "pixel_size": apix, "snr": sc.snr, "fraction": sc.fraction,
               "chance": max(sc.fraction, 1 - sc.fraction)}  # fmt: skip
        row["ceiling"] = benchmark.cached(
            work / "ceiling.json", lambda: benchmark._ceiling(work, volumes, star_io.read_particles(work / "truth.star"))
        )
        row["consensus_time"] = benchmark.run(
            ["relion_reconstruct", "--i", "particles.star", "--o", "consensus.mrc", "--ctf", "--j", str(j)],
            work / "consensus.log", cwd=work,
        )  # fmt: skip

        # A. The graph split, then the command it prints (with fewer iterations).
        shutil.rmtree(work / "graphsplit", ignore_errors=True)
        row["graphsplit_time"] = benchmark.run(
            ["relion_graphsplit", "--i", "particles.star", "--o", "graphsplit/", "--ref", "consensus.mrc", "--j", str(j)],
            work / "graphsplit.log", cwd=work,
        )  # fmt: skip
        row["graphsplit_accuracy"] = acc(Path("graphsplit/run_data.star"))
        model = starfile.read(work / "graphsplit" / MODEL_NAME, always_dict=True)["model_classes"]
        resolutions = model["rlnEstimatedResolution"].tolist()
        line = next_command("graphsplit", "graphsplit/run_data.star", diameter, j, resolutions, iterations=seeded_iter)
        row["seeded_command"] = line
        row["seeded_time"] = benchmark.run(["bash", "-c", line], work / "seeded.log", cwd=work)
        for it in sorted({1, seeded_iter}):
            row[f"seeded_accuracy_it{it}"] = acc(Path(f"graphsplit/Class3D/run_it{it:03d}_data.star"))
        row["workflow_time"] = row["consensus_time"] + row["graphsplit_time"] + row["seeded_time"]

        # B. Class3D from the consensus map alone.
        shutil.rmtree(work / "class3d", ignore_errors=True)
        row["class3d_time"] = _refine(
            work, "class3d/run", "consensus.mrc", iterations, diameter, j, seed, ["--ini_high", "50"]
        )
        for it in sorted({seeded_iter, iterations}):
            row[f"class3d_accuracy_it{it}"] = acc(Path(f"class3d/run_it{it:03d}_data.star"))
        row["class3d_total_time"] = row["consensus_time"] + row["class3d_time"]
        row["machine"], row["date"] = _machine(j), time.strftime("%Y-%m-%d")
        with open(out / "handoff.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row, indent=1), flush=True)


if __name__ == "__main__":
    app()
