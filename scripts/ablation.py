"""Measure the split's design choices on one simulated scenario: CTF correction, cone size, refinement.

    python scripts/ablation.py --out bench_out --scenario adk-snr0.01-50 --n 6000 \
        --variant "ctf_correction=flip,refine_iterations=0" --variant "particles_per_cone=300" ...

Each --variant is a comma-separated list of SplitOptions fields (see relion_graphsplit/pipeline.py).
Prints, per variant, the accuracy of the graph split alone and after refinement, and the time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import typer

from relion_graphsplit import pipeline, star_io
from relion_graphsplit.metrics import accuracy
from relion_graphsplit.preprocess import CtfCorrection
from relion_graphsplit.stack import ImageStacks

from relion_graphsplit.simulate import write_simulation

from benchmark import class_maps, scenarios  # scripts/ is on sys.path when run as a script


def parse(variant: str) -> dict:
    options = {}
    for item in filter(None, variant.split(",")):
        key, value = item.split("=")
        field = pipeline.SplitOptions.__dataclass_fields__[key]
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(field.type), str)
        options[key] = CtfCorrection(value) if key == "ctf_correction" else kind(value)
    return options


def main(
    out: Path = typer.Option(Path("bench_out")),
    scenario: str = typer.Option("adk-snr0.01-50"),
    n: int = typer.Option(6000),
    seed: int = typer.Option(1),
    j: int = typer.Option(1),
    variant: list[str] = typer.Option([""], help="SplitOptions overrides, e.g. 'particles_per_cone=300'."),
) -> None:
    torch.set_num_threads(j)
    sc = next(s for s in scenarios() if s.name == scenario)
    work = out / f"ablation-{sc.name}-{n}"
    volumes, apix = class_maps(sc.structure, out)
    if not (work / "particles.star").exists():
        write_simulation(work, volumes, apix, n, sc.snr, [sc.fraction, 1 - sc.fraction], seed=seed,
                         pose_error_deg=1.0, shift_error_A=0.5, max_shift_A=4.0)
    ps = star_io.read_particles(work / "particles.star")
    truth = star_io.read_particles(work / "truth.star").particles["rlnClassNumber"].to_numpy()
    for spec in variant:
        options = pipeline.SplitOptions(**parse(spec))
        start = time.perf_counter()
        with ImageStacks(ps) as stacks:
            result = pipeline.split(ps, stacks, options)
        row = {
            "scenario": sc.name, "n": n, "variant": spec or "defaults",
            "graph_accuracy": accuracy(np.where(result.graph_score >= 0, 1, 2), truth),
            "accuracy": accuracy(result.classes, truth), "sampling": round(result.sampling, 1),
            "cones": result.cones.n_cones, "seconds": round(time.perf_counter() - start, 1),
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    typer.run(main)
