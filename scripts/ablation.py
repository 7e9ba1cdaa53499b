"""Measure the split's design choices on one simulated scenario: CTF correction, cone size, refinement.

    python scripts/ablation.py --out bench_out --scenario adk-snr0.01-50 --n 6000 \
        --variant "ctf_correction=flip,refine_iterations=0" --variant "particles_per_cone=300" ...

Each --variant is a comma-separated list of SplitOptions fields (see relion_graphsplit/method/options.py),
or `mask=sphere` for a soft sphere of 80% of the box instead of the default mask around the consensus,
or `noise=true` to whiten by the simulated noise spectrum instead of the estimated one.
`--fraction` replaces the scenario's class-1 fraction, `--noise-excess` makes the noise coloured (each a
separate simulation).
Prints, per variant, the accuracy of the graph split alone and after refinement, and the time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from unittest import mock

from relion_graphsplit.cli.launch import THREAD_WAITING

# The console commands' thread waiting (relion_graphsplit/cli/launch.py), before numpy and torch load: the
# times are those of the program. A setting of your own wins.
os.environ.update({name: value for name, value in THREAD_WAITING.items() if name not in os.environ})

import numpy as np
import torch
import typer
from benchmark import CONDITIONS, cached, class_maps, scenario_ceiling, scenarios  # scripts/ is on sys.path when run as a script
from threadpoolctl import threadpool_limits

from relion_graphsplit.method import pipeline, preprocess
from relion_graphsplit.method.options import CtfCorrection, SplitOptions
from relion_graphsplit.method.preprocess import Whitening
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.simulate.metrics import accuracy
from relion_graphsplit.simulate.particles import Conditions, write_simulation


def sphere(box: int, radius: float, edge: float = 6.0) -> torch.Tensor:
    """Soft-edged sphere (box^3) of `radius` pixels with a raised-cosine edge of `edge` pixels."""
    c = torch.arange(box, dtype=torch.float32) - box // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return 0.5 * (1.0 + torch.cos(torch.pi * ((r - radius) / edge).clamp(0.0, 1.0)))


def true_whitening(conditions: Conditions, box: int, pixel_size: float):
    """A stand-in for preprocess.whitening_filter that whitens by the simulated noise spectrum at the
    working size (keeping the estimate's contrast and spectrum for the report): how much a better
    estimate could gain."""
    estimate = preprocess.whitening_filter

    def whitening(residuals):
        found = estimate(residuals)
        n = found.filter.shape[0]
        # The simulated amplitude filter at the working pixel size, inverted: whitens the noise.
        colour = conditions.noise_filter(n, pixel_size * box / n)
        return Whitening(1.0 / colour, found.contrast, conditions.noise_excess > 0, found.spectrum)

    return whitening


def parse(variant: str) -> dict:
    options = {}
    for item in filter(None, variant.split(",")):
        key, value = item.split("=")
        if key in ("mask", "noise"):
            options[key] = value
            continue
        field = SplitOptions.__dataclass_fields__[key]
        kind = {"int": int, "float": float, "int | None": int, "float | None": float,
                "bool": lambda v: v.lower() not in ("0", "false", "no")}.get(str(field.type), str)
        options[key] = CtfCorrection(value) if key == "ctf_correction" else kind(value)
    return options


def main(
    out: Path = typer.Option(Path("bench_out"), help="Working folder (shared with scripts/benchmark.py)."),
    scenario: str = typer.Option("adk-snr0.01-50", help="Scenario name, as in scripts/benchmark.py."),
    n: int = typer.Option(6000, help="Particles."),
    seed: int = typer.Option(1, help="Simulation seed."),
    j: int = typer.Option(1, help="Threads (torch and the BLAS under numpy and scipy), as the program's --j."),
    fraction: float = typer.Option(None, help="Class-1 fraction instead of the scenario's."),
    noise_excess: float = typer.Option(0.0, help="Coloured noise (simulate.Conditions.noise_excess); 0: white."),
    variant: list[str] = typer.Option([""], help="SplitOptions overrides, e.g. 'particles_per_cone=300'."),
) -> None:
    torch.set_num_threads(j)
    threadpool_limits(j)
    sc = next(s for s in scenarios() if s.name == scenario)
    if fraction is not None:
        sc = dataclasses.replace(sc, name=f"{sc.structure}-snr{sc.snr:g}-{round(fraction * 100)}", fraction=fraction)
    conditions = dataclasses.replace(CONDITIONS, noise_excess=noise_excess)
    work = out / (f"ablation-{sc.name}-{n}" + (f"-excess{noise_excess:g}" if noise_excess else ""))
    volumes, apix = class_maps(sc.structure, out)
    if not (work / "particles.star").exists():
        write_simulation(work, volumes, apix, n, sc.snr, [sc.fraction, 1 - sc.fraction], seed=seed,
                         conditions=conditions)
    ps = star_io.read_particles(work / "particles.star")
    truth_set = star_io.read_particles(work / "truth.star")
    truth = truth_set.particles["rlnClassNumber"].to_numpy()
    ceiling_value = cached(work / "ceiling.json", lambda: scenario_ceiling(work, volumes, truth_set, conditions))
    for spec in variant:
        overrides = parse(spec)
        box = star_io.image_size(ps)
        mask = sphere(box, 0.4 * box, edge=6.0 / star_io.pixel_size(ps)) if overrides.pop("mask", None) == "sphere" else None
        noise = (
            mock.patch.object(preprocess, "whitening_filter", true_whitening(conditions, box, star_io.pixel_size(ps)))
            if overrides.pop("noise", None) == "true" else contextlib.nullcontext()
        )  # fmt: skip
        options = SplitOptions(**{"n_classes": 2, **overrides})  # the two-class split, untested, unless asked
        start = time.perf_counter()
        with ImageStacks(ps) as stacks, noise:
            result = pipeline.split(star_io.particles(ps), stacks, options, mask=mask)
        row = {
            "scenario": sc.name, "n": n, "noise_excess": noise_excess, "variant": spec or "defaults",
            "graph_accuracy": accuracy(np.where(result.graph_score >= 0, 1, 2), truth),
            "accuracy": accuracy(result.classes, truth), "ceiling": ceiling_value, "sampling": round(result.sampling, 1),
            "cones": result.cones.n_cones, "rounds": len(result.refine_changes),
            "noise_contrast": None if result.noise_contrast is None else round(result.noise_contrast, 2),
            "seconds": round(time.perf_counter() - start, 1),
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    typer.run(main)
