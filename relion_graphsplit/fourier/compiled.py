"""Compiled loops on the CPU: numba's njit, cached on disk where it can be, and the threads that run them.

The insertion into Fourier grids (reconstruct.py) and the sampling of central slices (projection.py)
are loops over images, pixels and their 8 trilinear neighbours. Compiled with nogil, several copies
run at once on plain Python threads, each on its own share of the work.

Every compiled loop has a torch twin, which runs on tensors of any device (the GPU's way) and gives
the loop's values to rounding. Each kernel picks between them in one place, by `runs_compiled` of its
tensors' device: the compiled loop on the CPU, the twin elsewhere, and the twin on the CPU too inside
`torch_twins`, so that the GPU's way can be run and tested on a machine without one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import numba
import torch

# Set by `torch_twins`; a context variable, so that it holds for the thread (or task) that set it only.
_TWINS = contextvars.ContextVar("torch_twins", default=False)


def runs_compiled(device: torch.device) -> bool:
    """Whether a kernel on tensors of `device` takes its compiled loop rather than its torch twin.

    Parameters
    ----------
    device : torch.device
        The device of the kernel's tensors.

    Returns
    -------
    bool
        True on the CPU, except inside `torch_twins`; False on every other device.
    """
    return device.type == "cpu" and not _TWINS.get()


@contextlib.contextmanager
def torch_twins(on: bool = True) -> Iterator[None]:
    """Within it (when `on`), in this thread, every kernel takes its torch twin on CPU tensors too.

    Parameters
    ----------
    on : bool
        Whether to force the twins; False leaves the choice as it was outside.

    Yields
    ------
    None
    """
    token = _TWINS.set(on or _TWINS.get())
    try:
        yield
    finally:
        _TWINS.reset(token)


def compiled(function: Callable) -> Callable:
    """numba.njit(nogil=True), with its machine code cached on disk where numba finds a writable place.

    The cache lies beside the module, or in the user's cache folder; where neither can be written
    the function is compiled anew in each run.

    Parameters
    ----------
    function : Callable
        A function numba can compile in nopython mode.

    Returns
    -------
    Callable
        The compiled function (a numba dispatcher), which releases the GIL while it runs.
    """
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)


@functools.lru_cache(maxsize=4)
def thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of `workers` threads for the compiled loops, made once per size.

    Parameters
    ----------
    workers : int
        Number of threads.

    Returns
    -------
    ThreadPoolExecutor
        The pool, shared by every caller that asks for this size (the 4 sizes asked for last are kept).
    """
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graphsplit-compiled")


def run_in_runs(kernel: Callable, args: tuple, count: int, workers: int, least: int = 16) -> None:
    """kernel(*args, start, stop) over `count` items cut into contiguous runs, one per thread.

    Runs on up to `workers` threads with at least `least` items each; returns when all are done,
    raising the first error. Right for kernels whose items are independent (their results do not
    depend on the split). With one thread the kernel runs on the calling thread.

    Parameters
    ----------
    kernel : Callable
        A compiled (nogil) function called as kernel(*args, start, stop) for the items [start, stop).
    args : tuple
        Its leading arguments, the same for every run.
    count : int
        Number of items.
    workers : int
        Most threads to use.
    least : int
        Fewest items per thread: fewer threads are used when `count` is small.

    Returns
    -------
    None
        The kernel writes its results into its arguments.
    """
    workers = max(1, min(workers, count // least))
    bounds = [count * t // workers for t in range(workers + 1)]
    if workers == 1:
        kernel(*args, 0, count)
        return
    jobs = [thread_pool(workers).submit(kernel, *args, lo, hi) for lo, hi in itertools.pairwise(bounds)]
    futures.wait(jobs)
    for job in jobs:
        job.result()
