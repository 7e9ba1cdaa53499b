"""The one-pass floor: the least time a program that reads every particle image can take here.

Reads every image of a particle STAR file once, batch by batch in file order, with the reader the
program uses (relion_graphsplit.relion.stacks.ImageStacks), and Fourier transforms each batch as the
program's first pass does (torch.fft.rfft2 of the images in float64), on --j threads. Prints the
wall time, the images per second and the peak memory (VmHWM), and with --results appends them to a
file as one JSON line. A run of relion_graphsplit on the same set, divided by this time, says how many
passes' worth of work the method costs.

    python scripts/floor.py --i sim/particles.star --j 4 [--batch_size 256] [--results floor.jsonl]

    # from disk rather than from the page cache (needs root):
    sudo .venv/bin/python scripts/floor.py --i sim/particles.star --j 4 --drop-cache

Without --drop-cache a set written or read recently is likely read from memory (the page cache);
--drop-cache writes 3 to /proc/sys/vm/drop_caches after a sync first, which only root may do.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import typer

from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.relion.star import read_particles

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> None:
    """Write the dirty pages out and empty Linux's page cache, so that the next reads come from disk.

    Raises
    ------
    PermissionError
        Unless run as root.
    """
    os.sync()
    DROP_CACHES.write_text("3\n")


def peak_memory_mb() -> float:
    """This process's peak resident memory (MiB), VmHWM of /proc/self/status; NaN where there is none."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return float("nan")


def one_pass(star: Path, j: int = 1, batch_size: int = 256) -> dict:
    """Read every image of `star` once and rfft2 it, batch by batch in file order; the times and memory.

    Parameters
    ----------
    star : Path
        A particle STAR file whose rlnImageName points to MRC stacks.
    j : int
        torch threads.
    batch_size : int
        Images read at a time (the program's default is 256).

    Returns
    -------
    dict
        star, images, box, threads, batch_size; star_s (reading the STAR file and checking the stacks),
        pass_s (reading and transforming the images), seconds (both, s), images_per_s (images over
        seconds) and peak_memory_mb (MiB).
    """
    torch.set_num_threads(j)
    start = time.perf_counter()
    particles = read_particles(star, require_poses=False)
    with ImageStacks(particles) as stacks:
        opened = time.perf_counter()
        n = len(stacks)
        for first in range(0, n, batch_size):
            torch.fft.rfft2(stacks.read(np.arange(first, min(n, first + batch_size))).to(torch.float64))
        box = stacks.box
    end = time.perf_counter()
    return {
        "star": str(star), "images": n, "box": box, "threads": j, "batch_size": batch_size,
        "star_s": opened - start, "pass_s": end - opened, "seconds": end - start,
        "images_per_s": n / (end - start), "peak_memory_mb": peak_memory_mb(),
    }  # fmt: skip


def main(
    i: Path = typer.Option(..., "--i", exists=True, dir_okay=False, help="Particle STAR file."),
    j: int = typer.Option(1, "--j", min=1, help="Threads (torch)."),
    batch_size: int = typer.Option(256, "--batch_size", min=1, help="Images read at a time."),
    results: Path | None = typer.Option(None, "--results", help="Append the result to this file as a JSON line."),
    drop_cache: bool = typer.Option(False, "--drop-cache", help="Empty the page cache first (root only)."),
) -> None:
    if drop_cache:
        try:
            drop_page_cache()
        except PermissionError:
            raise typer.BadParameter("emptying the page cache needs root", param_hint="--drop-cache") from None
    row = {**one_pass(i, j, batch_size), "dropped_cache": drop_cache, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(
        f"{row['images']} images of {row['box']} px in {row['seconds']:.2f} s ({row['star_s']:.2f} s STAR file "
        f"and stacks, {row['pass_s']:.2f} s reading and rfft2): {row['images_per_s']:.0f} images/s, "
        f"peak memory {row['peak_memory_mb']:.0f} MiB"
    )
    if results is not None:
        with open(results, "a") as file:
            file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    typer.run(main)
