"""Time of the alignment's in-plane rotation on the CPU: the compiled bicubic loop against torch's grid_sample.

Random float32 images (new ones for every call, as each cone brings its own) and rotations, a cone's
worth (--n) at a time as the classification passes them; the best and the median of --repeats runs
are printed in milliseconds per image, with the largest difference of the two ways' images relative
to their maximum.

    python scripts/bench_alignment.py [--boxes 26 --boxes 38] [--n 560] [--j 2]
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable

from relion_graphsplit.cli.launch import THREAD_WAITING

# The console commands' thread waiting (relion_graphsplit/cli/launch.py), before numpy and torch load: the
# times are those of the program. A setting of your own wins.
os.environ.update({name: value for name, value in THREAD_WAITING.items() if name not in os.environ})

import torch
import typer

from relion_graphsplit.method import alignment


def _times(sample: Callable, box: int, matrix: torch.Tensor, repeats: int, gen: torch.Generator) -> list[float]:
    """Wall times (s) of `repeats` calls, each on new images."""
    times = []
    for _ in range(repeats):
        images = torch.randn(len(matrix), box, box, generator=gen)
        start = time.perf_counter()
        sample(images, matrix)
        times.append(time.perf_counter() - start)
    return times


def main(
    boxes: list[int] = typer.Option([26, 38, 64], help="image sizes"),
    n: int = typer.Option(560, help="images per call (a cone)"),
    repeats: int = typer.Option(20, help="runs of each way"),
    j: int = typer.Option(2, help="threads"),
) -> None:
    torch.set_num_threads(j)
    gen = torch.Generator().manual_seed(0)
    phi = torch.rand(n, generator=gen, dtype=torch.float64) * 2 * math.pi
    c, s = torch.cos(phi), torch.sin(phi)
    matrix = torch.stack([torch.stack([c, -s], dim=-1), torch.stack([s, c], dim=-1)], dim=-2)
    for box in boxes:
        images = torch.randn(n, box, box, generator=gen)
        times, out = {}, {}
        for way, sample in (("compiled", alignment._sample), ("grid_sample", alignment._grid_sample)):
            out[way] = sample(images, matrix)  # the first call compiles (or loads the cache)
            times[way] = _times(sample, box, matrix, repeats, gen)
        difference = float((out["compiled"] - out["grid_sample"]).abs().max() / out["grid_sample"].abs().max())
        ms = {way: (1e3 * min(t) / n, 1e3 * statistics.median(t) / n) for way, t in times.items()}
        print(
            f"box {box}, ms per image (best, median): compiled {ms['compiled'][0]:.4f}, {ms['compiled'][1]:.4f}; "
            f"grid_sample {ms['grid_sample'][0]:.4f}, {ms['grid_sample'][1]:.4f}; images within {difference:.1e}"
        )


if __name__ == "__main__":
    typer.run(main)
