"""Time of the insertion into FourierAccumulator on the CPU: the compiled splat against torch's scatter_add_.

Random images, poses, CTFs and origins; each way inserts the same images into an accumulator that has
already been filled once (so that its memory is faulted in), the best of --repeats runs is printed in
milliseconds per image, with the largest difference of the two ways' sums relative to their maximum.

    python scripts/bench_insertion.py [--boxes 38 64 256] [--n 512] [--j 2]
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

from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.fourier.reconstruct import FourierAccumulator


def _time_insertion(acc: FourierAccumulator, images, rotations, ctf, origins, repeats: int) -> float:
    """Best wall time (s) of inserting all images into emptied sums, 256 at a time as the program does."""
    best = float("inf")
    for _ in range(repeats):
        acc.sums.zero_()  # in place: the memory stays faulted in
        start = time.perf_counter()
        for s in range(0, len(images), 256):
            sl = slice(s, s + 256)
            acc.insert(images[sl], rotations[sl], ctf=ctf[sl], origins=origins[sl])
        _ = acc.sums  # reading the sums waits for the last batch
        best = min(best, time.perf_counter() - start)
    return best


def main(
    boxes: list[int] = typer.Option([38, 64, 256], help="image sizes"),
    n: int = typer.Option(512, help="images per run"),
    repeats: int = typer.Option(3, help="runs of each way; the best is printed"),
    j: int = typer.Option(2, help="threads"),
) -> None:
    torch.set_num_threads(j)
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    origins = torch.randn(n, 2, generator=gen)
    for box in boxes:
        images = torch.randn(n, box, box, generator=gen)
        ctf = torch.rand(n, box, box // 2 + 1, generator=gen) * 2 - 1
        times, sums = {}, {}
        for way in ("splat", "scatter"):
            acc = FourierAccumulator(box)
            if way == "scatter":
                acc._splat = acc._scatter  # torch's scatter_add_, the insertion on other devices
            acc.insert(images[:256], rotations[:256], ctf=ctf[:256], origins=origins[:256])
            times[way] = _time_insertion(acc, images, rotations, ctf, origins, repeats)
            sums[way] = acc.sums
        difference = float((sums["splat"] - sums["scatter"]).abs().max() / sums["scatter"].abs().max())
        print(
            f"box {box}: splat {1e3 * times['splat'] / n:.3f} ms/image, scatter_add_ "
            f"{1e3 * times['scatter'] / n:.3f} ms/image ({times['scatter'] / times['splat']:.1f}x), "
            f"sums within {difference:.1e}"
        )


if __name__ == "__main__":
    typer.run(main)
