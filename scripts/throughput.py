"""Throughput at scale: relion_graphsplit's wall time against the one-pass floor, set size by set size.
Run on demand, not in CI.

For each size N x B (N particles of B pixels): simulate a two-class set once (1BD2 whole and without
chain B, in equal shares, SNR --snr, scripts/benchmark.py's maps and pose errors, a 192 A box: pixel
size 192 / B A; kept under OUT/sets/ for later runs), then in the same run
- the floor (scripts/floor.py's `one_pass`, in a fresh process so that its peak memory is its own):
  every image read once, in file order, and Fourier transformed, on --j threads;
- `relion_graphsplit --i particles.star --o OUT/runs/<set>-j<J> --j J`, timed.
One JSON line per set is appended to OUT/throughput.jsonl: both wall times and their ratio, the
program's time per step (run_summary.json "timings") and peak memory ("peak_memory_mb"), the floor's
peak memory, the K found, the accuracy against truth.star (best matching of labels) and the ceiling
(the Bayes classifier that knows the truth), and the simulator's time and peak memory (recorded
with the set when it was made). A Markdown table of this run's sets ends it.

    python scripts/throughput.py --out throughput_out --j 4                 # every default size (hours)
    python scripts/throughput.py --out throughput_out --sizes 6000x128,20000x256 --j 8
    python scripts/throughput.py --out tp_check --sizes 1500x64 --j 2      # a quick check that it runs
    sudo .venv/bin/python scripts/throughput.py --out throughput_out --drop-cache   # both from disk

--drop-cache (root only) empties the page cache before the floor and before the program, so that both
read the images from disk; otherwise both are likely to read them from memory after the simulation.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (scripts/benchmark.py: the 1BD2 maps, pose errors, classes by image name)
import floor  # noqa: E402  (scripts/floor.py: the one-pass floor)

from relion_graphsplit.relion import star as star_io  # noqa: E402
from relion_graphsplit.simulate.metrics import accuracy  # noqa: E402
from relion_graphsplit.simulate.particles import bayes_accuracy, write_simulation  # noqa: E402

DEFAULT_SIZES = "6000x128,24000x128,100000x128,200000x128,20000x256,20000x384"
BOX_WIDTH_A = 192.0
"""The box's width in A at every size (scripts/k_benchmark.py's 1BD2 box): the pixel size is this / B."""


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'6000x128,20000x256' -> [(6000, 128), (20000, 256)]: (particles, box in pixels) per set."""
    sizes = []
    for part in text.split(","):
        n, _, box = part.strip().lower().partition("x")
        if not (n.isdigit() and box.isdigit() and int(n) > 0 and int(box) % 2 == 0 and int(box) >= 32):
            raise typer.BadParameter(f"'{part}': sizes are NxB, N particles, B an even box of 32 or more", param_hint="--sizes")
        sizes.append((int(n), int(box)))
    return sizes


def in_fresh_process(function, *args):
    """function(*args) run in a new process (spawned: nothing inherited), so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def simulate_set(folder: Path, maps: Path, n: int, box: int, snr: float, seed: int) -> dict:
    """Simulate the set into `folder` from the maps cached in `maps`; its time (s), the process's peak
    memory (MiB), the ceiling accuracy and the pixel size (A)."""
    pixel_size = BOX_WIDTH_A / box
    volumes, _ = benchmark.class_maps("1bd2", maps, box, pixel_size)
    log_likelihoods = np.empty((n, len(volumes)))
    start = time.perf_counter()
    _, _, truth = write_simulation(
        folder, volumes, pixel_size, n, snr, [0.5, 0.5], conditions=benchmark.CONDITIONS, seed=seed,
        log_likelihoods=log_likelihoods,
    )  # fmt: skip
    return {
        "simulation_s": time.perf_counter() - start, "simulation_peak_memory_mb": floor.peak_memory_mb(),
        "ceiling": bayes_accuracy(log_likelihoods, truth), "pixel_size": pixel_size,
    }  # fmt: skip


def simulated_set(out: Path, n: int, box: int, snr: float, seed: int) -> tuple[Path, dict]:
    """The set's folder under out/sets/ and what its simulation recorded (`simulate_set`), simulated now
    in a process of its own unless an earlier run made it."""
    folder = out / "sets" / f"1bd2-{n}x{box}-snr{snr:g}-seed{seed}"
    record = folder / "simulation.json"  # written last: the set is complete
    if record.exists():
        return folder, json.loads(record.read_text())
    benchmark.class_maps("1bd2", out / "maps", box, BOX_WIDTH_A / box)  # made here, so that the simulator's memory is its own
    simulation = in_fresh_process(simulate_set, folder, out / "maps", n, box, snr, seed)
    record.write_text(json.dumps(simulation))
    return folder, simulation


def program() -> str:
    """The relion_graphsplit command beside this Python, else the one on PATH."""
    beside = Path(sys.executable).with_name("relion_graphsplit")
    found = str(beside) if beside.exists() else shutil.which("relion_graphsplit")
    if found is None:
        raise SystemExit("relion_graphsplit is not installed (pip install .)")
    return found


def run_program(star: Path, run_dir: Path, j: int) -> float:
    """Wall time (s) of relion_graphsplit on `star` into `run_dir` (emptied first), its output in run_dir.log.

    It runs in the STAR file's folder, as in a RELION project, so that the image names it writes are
    those of the input (the truth is matched to them)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(
            [program(), "--i", star.name, "--o", str(run_dir.resolve()), "--j", str(j)],
            check=True, stdout=log, stderr=subprocess.STDOUT, cwd=star.parent,
        )  # fmt: skip
    return time.perf_counter() - start


def measure(out: Path, n: int, box: int, j: int, snr: float, seed: int, drop_cache: bool) -> dict:
    """One set: simulated (or found), the floor, the program; the row of results (see the module's docstring)."""
    folder, simulation = simulated_set(out, n, box, snr, seed)
    star = folder / "particles.star"
    if drop_cache:
        floor.drop_page_cache()
    one_pass = in_fresh_process(floor.one_pass, star, j)
    if drop_cache:
        floor.drop_page_cache()
    run_dir = out / "runs" / f"{folder.name}-j{j}"
    program_s = run_program(star, run_dir, j)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    truth = star_io.read_particles(folder / "truth.star").particles
    found = benchmark.classes_by_name(run_dir / "run_data.star", truth["rlnImageName"].to_numpy())
    return {
        "set": folder.name, "n": n, "box": box, "snr": snr, "j": j, **simulation,
        "floor_s": one_pass["seconds"], "floor_images_per_s": one_pass["images_per_s"],
        "floor_peak_memory_mb": one_pass["peak_memory_mb"],
        "program_s": program_s, "ratio": program_s / one_pass["seconds"], "timings": summary["timings"],
        "program_peak_memory_mb": summary["peak_memory_mb"], "K": summary["K"],
        "accuracy": accuracy(found, truth["rlnClassNumber"].to_numpy()), "dropped_cache": drop_cache,
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, the program's steps longest first."""
    lines = [
        "| set | ceiling | accuracy | K | floor (s) | program (s) | ratio | peak MiB (floor / program) | steps (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = ", ".join(f"{name} {s:.1f}" for name, s in sorted(r["timings"].items(), key=lambda t: -t[1]))
        lines.append(
            f"| {r['set']} j{r['j']} | {r['ceiling']:.3f} | {r['accuracy']:.3f} | {r['K']} | {r['floor_s']:.3g} | "
            f"{r['program_s']:.4g} | {r['ratio']:.1f} | {r['floor_peak_memory_mb']:.0f} / "
            f"{r['program_peak_memory_mb']:.0f} | {steps} |"
        )
    return "\n".join(lines)


def main(
    out: Path = typer.Option(Path("throughput_out"), "--out", help="Working folder (maps, sets, runs, results)."),
    sizes: str = typer.Option(DEFAULT_SIZES, "--sizes", help="Comma-separated NxB: N particles of box B."),
    j: int = typer.Option(4, "--j", min=1, help="Threads of the floor and of the program."),
    snr: float = typer.Option(0.05, "--snr", min=1e-9, help="Signal-to-noise ratio of the simulated sets."),
    seed: int = typer.Option(1, "--seed", help="Simulation seed."),
    drop_cache: bool = typer.Option(
        False, "--drop-cache", help="Empty the page cache before the floor and before the program (root only)."
    ),
) -> None:
    chosen = parse_sizes(sizes)
    if drop_cache and os.geteuid() != 0:
        raise typer.BadParameter("emptying the page cache needs root", param_hint="--drop-cache")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, box in chosen:
        row = measure(out, n, box, j, snr, seed, drop_cache)
        with open(out / "throughput.jsonl", "a") as results:
            results.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(markdown_table(rows))


if __name__ == "__main__":
    typer.run(main)
