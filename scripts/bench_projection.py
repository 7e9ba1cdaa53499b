"""Time of the projection (project_rfft) on the CPU: the compiled gather against torch's grid_sample.

Random maps (one, or a stack of two as in the refinement) and poses; each way projects the same
images 256 at a time as the program does, and the best of --repeats runs is printed in milliseconds
per image, with the largest difference of the two ways' slices relative to their maximum.

    python scripts/bench_projection.py [--boxes 26 38 64] [--n 2048] [--j 2]
"""

from __future__ import annotations

import os
import time

from relion_graphsplit.cli.launch import THREAD_WAITING

# The console commands' thread waiting (relion_graphsplit/cli/launch.py), before numpy and torch load: the
# times are those of the program. A setting of your own wins.
os.environ.update({name: value for name, value in THREAD_WAITING.items() if name not in os.environ})

import torch
import typer

from relion_graphsplit.fourier import projection
from relion_graphsplit.fourier.geometry import euler_to_matrix

GATHER = projection._gather


def _time_projection(prepared: projection.PreparedVolume, rotations: torch.Tensor, repeats: int) -> float:
    """Best wall time (s) of projecting all poses, 256 at a time."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for s in range(0, len(rotations), 256):
            projection.project_rfft(prepared, rotations[s : s + 256])
        best = min(best, time.perf_counter() - start)
    return best


def main(
    boxes: list[int] = typer.Option([26, 38, 64], help="image sizes"),
    maps: list[int] = typer.Option([1, 2], help="maps projected at once"),
    n: int = typer.Option(2048, help="images per run"),
    repeats: int = typer.Option(3, help="runs of each way; the best is printed"),
    j: int = typer.Option(2, help="threads"),
) -> None:
    torch.set_num_threads(j)
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    for box in boxes:
        for k in maps:
            prepared = projection.prepare_volume(torch.randn(k, box, box, box, generator=gen))
            times, slices = {}, {}
            for way, sample in (("gather", GATHER), ("grid_sample", projection._grid_sample)):
                projection._gather = sample  # grid_sample: the sampling on other devices
                projection.project_rfft(prepared, rotations[:256])
                times[way] = _time_projection(prepared, rotations, repeats)
                slices[way] = projection.project_rfft(prepared, rotations[:256])
            projection._gather = GATHER
            difference = float((slices["gather"] - slices["grid_sample"]).abs().max() / slices["grid_sample"].abs().max())
            print(
                f"box {box}, {k} map{'s' if k > 1 else ''}: gather {1e3 * times['gather'] / n:.4f} ms/image, "
                f"grid_sample {1e3 * times['grid_sample'] / n:.4f} ms/image "
                f"({times['grid_sample'] / times['gather']:.1f}x), slices within {difference:.1e}"
            )


if __name__ == "__main__":
    typer.run(main)
