"""Time of the class-map step against relion_reconstruct, on simulated data split into its true classes.

Our reconstruct_classes (both classes' half maps, full maps and FSC from one pass over the stack, with
the STAR file read and the maps written) against relion_reconstruct --ctf on the same particles: the two
class maps alone (--class k), and all six maps (--class k, --class k --subset 1|2). The maps are compared
by FSC. (The workflow, graph split followed by a seeded Class3D, against Class3D from the consensus map,
is measured by scripts/benchmark.py, in the same run as the rest.)

    python scripts/bench_classmaps.py --out bench_classmaps [--n 6000] [--j 2]
    python scripts/bench_classmaps.py --out bench_classmaps --box 256 --apix 1.0 --n 2000 --no-relion

With --no-relion only ours is timed (at large boxes relion_reconstruct takes minutes per map); with
an older checkout of the package first on PYTHONPATH (run from outside the repository), the same
data time that version.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

try:
    from relion_graphsplit.cli.launch import THREAD_WAITING
except ImportError:  # an older checkout first on PYTHONPATH: importing its package set them
    THREAD_WAITING = {}

# The console commands' thread waiting (relion_graphsplit/cli/launch.py), before numpy and torch load: the
# times are those of the program. A setting of your own wins.
os.environ.update({name: value for name, value in THREAD_WAITING.items() if name not in os.environ})

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # scripts/benchmark.py: scenarios, simulated maps, utilities

from relion_graphsplit.fourier.fsc import fsc
from relion_graphsplit.method.classmaps import reconstruct_classes, write_class_maps
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.simulate.particles import write_simulation

app = typer.Typer(add_completion=False)


def _machine(j: int) -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, j={j}, torch threads {torch.get_num_threads()}"


def _best_and_median(times: list[float]) -> str:
    return f"best {min(times):7.2f} s, median {statistics.median(times):7.2f} s ({len(times)} runs)"


@app.command()
def reconstruct(
    out: Path = typer.Option(Path("bench_classmaps"), help="Working folder."),
    structure: str = typer.Option("1bd2", help="adk (64^2, 2 A) or 1bd2 (80^2, 2.4 A), as in benchmark.py."),
    box: int = typer.Option(benchmark.BOX_1BD2, help="Box of the 1bd2 maps (pixels)."),
    apix: float = typer.Option(benchmark.APIX_1BD2, help="Pixel size of the 1bd2 maps (A)."),
    n: int = typer.Option(6000, help="Particles."),
    snr: float = typer.Option(0.05, help="Signal-to-noise ratio of the simulated images."),
    j: int = typer.Option(2, help="relion_reconstruct --j and torch threads."),
    repeats: int = typer.Option(3, help="Runs of each program (in rounds)."),
    seed: int = typer.Option(1, help="Simulation seed."),
    relion: bool = typer.Option(True, help="Time relion_reconstruct too, and compare the maps."),
) -> None:
    """Time the class-map step: ours against relion_reconstruct --ctf."""
    torch.set_num_threads(j)
    out.mkdir(parents=True, exist_ok=True)
    resized = structure == "1bd2" and (box, apix) != (benchmark.BOX_1BD2, benchmark.APIX_1BD2)
    work = out / (f"reconstruct-{structure}-box{box}-{apix:g}A-{n}" if resized else f"reconstruct-{structure}-{n}")
    volumes, apix = benchmark.class_maps(structure, out, box, apix)
    box = volumes[0].shape[-1]
    if not (work / "split.star").exists():
        write_simulation(
            work, volumes, apix, n, snr, [0.5, 0.5], seed=seed, conditions=benchmark.CONDITIONS
        )
        ps = star_io.read_particles(work / "particles.star")
        true_class = star_io.read_particles(work / "truth.star").particles["rlnClassNumber"].to_numpy()
        star_io.write_particles(work / "split.star", ps, ps.particles.assign(rlnClassNumber=true_class))

    def ours() -> None:
        ps = star_io.read_particles(work / "split.star")
        with ImageStacks(ps) as stacks:
            maps = reconstruct_classes(star_io.particles(ps), stacks, ps.particles["rlnClassNumber"].to_numpy(), batch_size=256)
        write_class_maps(work / "ours", maps)

    def relion_reconstruct(selections: list[list[str]]) -> None:
        for extra in selections:
            name = "relion_" + "_".join(extra[1::2])
            cmd = ["relion_reconstruct", "--i", "split.star", "--o", f"{name}.mrc", "--ctf", "--j", str(j), *extra]
            benchmark.run(cmd, work / f"{name}.log", cwd=work)

    full = [["--class", str(k)] for k in (1, 2)]
    every = full + [["--class", str(k), "--subset", str(h)] for k in (1, 2) for h in (1, 2)]
    programs = {
        "ours: 2 classes x (2 half maps + full map), FSC, files": ours,
        f"relion_reconstruct --ctf --j {j}: 2 class maps": lambda: relion_reconstruct(full),
        f"relion_reconstruct --ctf --j {j}: 2 class maps + 4 half maps": lambda: relion_reconstruct(every),
    }
    if not relion:
        programs = dict(list(programs.items())[:1])
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(repeats):
        for name, program in programs.items():
            start = time.perf_counter()
            program()
            times[name].append(time.perf_counter() - start)

    print(f"{n} particles of {box}^2 ({structure}, SNR {snr:g}), {_machine(j)}, {time.strftime('%Y-%m-%d')}")
    print(f"package: {Path(reconstruct_classes.__code__.co_filename).parent}")
    for name, t in times.items():
        print(f"{name:62s} {_best_and_median(t)}")
    if relion:
        cut = int(0.8 * (box // 2))
        agreement = []
        for k in (1, 2):
            a = torch.from_numpy(read_mrc(work / "ours" / f"run_class{k:03d}.mrc")[0])
            b = torch.from_numpy(read_mrc(work / f"relion_{k}.mrc")[0])
            agreement.append(float(fsc(a, b)[1 : cut + 1].min()))
        print(f"lowest FSC(ours, relion_reconstruct) up to 0.8 Nyquist: class 1 {agreement[0]:.4f}, class 2 {agreement[1]:.4f}")


if __name__ == "__main__":
    app()
