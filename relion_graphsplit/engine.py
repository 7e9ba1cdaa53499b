"""Where the heavy steps run: in this process, or on the workers of a Dask cluster (--dask_scheduler);
and on which device they compute (`Compute`: the CPU, or a GPU with --gpu).

The steps that pass over the particles (the image preparation's reading, centring and CTF
correction, the transforms for the refinement, the refinement's Fourier sums and likelihoods, the
per-cone classification, the class maps) are cut into tasks that do not depend on who runs them:
fixed groups of particle batches (`tasks_of`), or of cones. Both engines run the same tasks and hand
their results back in the order they were submitted, and partial sums are added in that order
(`ordered_sum`), so the result is the same, bit for bit, in one process and on any number of
workers. A task opens the particle stacks and the working files itself, by path
(`relion.stacks.ImageStacks` pickles without its open files; `StoredArray`), and the preparation's
tasks write their rows of the working files there: nothing image-sized passes through the scheduler,
and the files must be on a file system the workers see. Whoever reads what a task wrote opens the
file after the task closed it (close-to-open: on a network file system, the only way to see another
machine's writes). The full-size class maps' insertions are tasks too (`method.classmaps`), fewer
and larger, as each sends back its padded grids; their sums differ from one process's in the last
bits (added per task), not from one worker count's to another's.

Dask's `distributed` is an optional extra (relion-graphsplit[dask]), imported only when a scheduler is
named.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from relion_graphsplit.fourier.compiled import torch_twins
from relion_graphsplit.scratch import ScratchArray

T = TypeVar("T")

TASK_BATCHES = 16
"""Batches of particles per task: at the default --batch_size, 4096 particles, enough work to repay a
task's partial Fourier sums (tens of MB at a working box of 64) and few enough that their in-order
reduction costs little beside the insertions."""


class Engine(Protocol):
    """Runs independent tasks and yields their results in submission order."""

    def map(self, function: Callable[..., T], tasks: Iterable[Sequence[Any]], common: Sequence[Any] = ()) -> Iterator[T]:
        """function(*common, *task) for every task, yielded in the order of `tasks`."""
        ...


class LocalEngine:
    """The tasks one after the other, in this process: the run without --dask_scheduler."""

    def map(self, function: Callable[..., T], tasks: Iterable[Sequence[Any]], common: Sequence[Any] = ()) -> Iterator[T]:
        """function(*common, *task) for every task, in order, each run when its result is asked for.

        Parameters
        ----------
        function : callable
            A module-level function (so that another process can import it).
        tasks : iterable of sequences
            Each task's own arguments.
        common : sequence
            Arguments shared by every task, passed before the task's own.

        Yields
        ------
        object
            Each task's result, in the order of `tasks`.
        """
        for task in tasks:
            yield function(*common, *task)


LOCAL = LocalEngine()
"""The in-process engine, the default of every step that takes one."""


@dataclass(frozen=True)
class Compute:
    """The device the heavy steps compute on (--gpu), passed beside the engine: an execution setting,
    which changes the classes by rounding at most (docs/method.md, "Determinism and memory").

    The heavy steps move their data there a batch at a time and bring their results back to the CPU
    as they store them; small steps (the max-cut, the split test's fits) stay on the CPU.

    Attributes
    ----------
    device : torch.device
        Where the heavy steps' tensors go: the CPU, or one GPU ("cuda:1"); a Dask worker uses the
        device of that name on its own machine.
    twins : bool
        Whether their kernels take the torch twins of the compiled loops (`fourier.compiled.torch_twins`):
        always off the CPU, and on the CPU for "cpu-torch", the GPU's way run on CPU tensors.
    """

    device: torch.device
    twins: bool

    @classmethod
    def named(cls, name: str) -> Compute:
        """The Compute of "cpu-torch" (the GPU's way on the CPU) or of a torch device name ("cpu", "cuda:0").

        Parameters
        ----------
        name : str
            "cpu-torch", or anything `torch.device` takes.

        Returns
        -------
        Compute
        """
        if name == "cpu-torch":
            return cls(torch.device("cpu"), True)
        device = torch.device(name)
        return cls(device, device.type != "cpu")

    def kernels(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the kernels run this Compute's way (`fourier.compiled.torch_twins`); every
        heavy step enters it where it runs, a Dask task too (its own thread)."""
        return torch_twins(self.twins)


CPU = Compute(torch.device("cpu"), False)
"""The compiled loops on the CPU, the default of every step that takes a Compute."""


class DaskEngine:
    """The tasks on the workers of a Dask cluster, through a `distributed.Client`.

    Parameters
    ----------
    client : distributed.Client
        A client connected to the cluster's scheduler.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def map(self, function: Callable[..., T], tasks: Iterable[Sequence[Any]], common: Sequence[Any] = ()) -> Iterator[T]:
        """function(*common, *task) for every task on the workers, results yielded in the order of `tasks`.

        The common arguments are sent to every worker once; at most two tasks per worker thread
        wait with their results on the workers for the ones before them to be taken, which bounds
        the workers' memory and not the result (the tasks and their order are the same).

        Parameters
        ----------
        function, tasks, common
            As `LocalEngine.map`; every argument and result must pickle.

        Yields
        ------
        object
            Each task's result, in the order of `tasks`.
        """
        shared = self.client.scatter(list(common), broadcast=True, hash=False) if common else []
        ahead = max(4, 2 * sum(self.client.nthreads().values()))
        pending: deque = deque()
        for task in tasks:
            pending.append(self.client.submit(function, *shared, *task, pure=False))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextlib.contextmanager
def connect(scheduler: str | None, timeout: float = 30.0) -> Iterator[Engine]:
    """The engine of a run: `LOCAL` without a scheduler, else a `DaskEngine` on the cluster's, closed
    on exit.

    Parameters
    ----------
    scheduler : str or None
        A scheduler file (as `dask scheduler --scheduler-file` and dask-jobqueue write them) or a
        scheduler's address (tcp://host:8786); None: this process alone.
    timeout : float
        Seconds to wait for the scheduler.

    Yields
    ------
    Engine

    Raises
    ------
    ValueError
        With one line saying why, when dask's distributed is not installed, `scheduler` is neither a
        file nor an address, or the scheduler cannot be reached.
    """
    if scheduler is None:
        yield LOCAL
        return
    try:
        from distributed import Client
    except ImportError:
        raise ValueError(
            "--dask_scheduler needs dask's distributed: pip install 'relion-graphsplit[dask]'"
        ) from None
    if not Path(scheduler).is_file() and ":" not in scheduler:
        raise ValueError(f"--dask_scheduler {scheduler}: no such scheduler file, nor an address (tcp://host:8786)")
    where = {"scheduler_file": scheduler} if Path(scheduler).is_file() else {"address": scheduler}
    try:
        client = Client(**where, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise ValueError(f"cannot reach the Dask scheduler {scheduler}: {' '.join(str(err).split())}") from None
    with client:
        yield DaskEngine(client)


def tasks_of(batches: list[np.ndarray], per_task: int = TASK_BATCHES) -> list[list[np.ndarray]]:
    """Consecutive batches grouped `per_task` at a time: the tasks of a pass over the particles,
    the same whoever runs them."""
    return [batches[start : start + per_task] for start in range(0, len(batches), per_task)]


def ordered_sum(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The sum of at least one array, added left to right in the order given (float addition is not
    associative: a fixed order gives the same bits whoever computed the parts)."""
    parts = iter(parts)
    total = np.array(next(parts))  # a copy: a part received from a worker may be read-only
    for part in parts:
        total += part
    return total


@dataclass(frozen=True)
class StoredArray:
    """A `ScratchArray` by its path and shape, which a task opens where it runs (a worker's process
    cannot share an open file), and closes before it returns.

    Attributes
    ----------
    path : Path
        The file, absolute.
    shape : tuple of int
        The array's shape (n, ...).
    """

    path: Path
    shape: tuple[int, ...]

    @classmethod
    def of(cls, array: ScratchArray) -> StoredArray:
        """The open `array`'s file."""
        return cls(array.path.resolve(), array.shape)

    def open(self) -> ScratchArray:
        """The array, opened as it is: rows read, and written (the preparation's tasks write their own)."""
        return ScratchArray(self.path, self.shape, existing=True)
