"""Simulate particles from the bundled adenylate kinase maps, split them, and print the accuracy.

    python scripts/demo.py [--out demo] [--n 2000] [--snr 0.05]

Runs the two installed programs as a user would (relion_graphsplit_simulate, then relion_graphsplit)
and compares the classes with the simulation's ground truth, matching particles by rlnImageName.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import typer

from relion_graphsplit.relion import star as star_io
from relion_graphsplit.run_files.write import image_names_from_workdir
from relion_graphsplit.simulate.metrics import accuracy, adjusted_rand_index

ROOT = Path(__file__).resolve().parents[1]


def main(
    out: Path = typer.Option(Path("demo"), help="Output folder."),
    n: int = typer.Option(2000, help="Particles to simulate."),
    snr: float = typer.Option(0.05, help="Signal-to-noise ratio of the images."),
    j: int = typer.Option(2, help="Threads."),
) -> None:
    sim, split = out / "simulated", out / "split"
    start = time.perf_counter()
    subprocess.run(
        ["relion_graphsplit_simulate", "--map1", str(ROOT / "test_data" / "adk_open.mrc"),
         "--map2", str(ROOT / "test_data" / "adk_closed.mrc"), "--n", str(n), "--snr", str(snr),
         "--fraction", "0.5", "--pose_error", "1.0", "--seed", "1", "--o", str(sim)],
        check=True,
    )  # fmt: skip
    subprocess.run(["relion_graphsplit", "--i", str(sim / "particles.star"), "--o", str(split), "--j", str(j)], check=True)
    # run_data.star names the stacks as found from here (through sim/): name the truth's the same way.
    truth_set = star_io.read_particles(sim / "truth.star")
    truth = truth_set.particles.set_index(image_names_from_workdir(truth_set))["rlnClassNumber"]
    found = star_io.read_particles(split / "run_data.star").particles.set_index("rlnImageName")["rlnClassNumber"]
    true_classes = truth.loc[found.index].to_numpy()
    print(
        f"{n} particles, SNR {snr}: accuracy {accuracy(found.to_numpy(), true_classes):.3f}, "
        f"adjusted Rand index {adjusted_rand_index(found.to_numpy(), true_classes):.3f} "
        f"({time.perf_counter() - start:.0f} s in all); report: {split / 'report.html'}"
    )


if __name__ == "__main__":
    typer.run(main)
