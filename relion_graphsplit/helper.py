"""A helper process for the steps that need large libraries and little data: the max-cut SDP (cvxpy)
and the report (matplotlib, plotly).

Loading those libraries takes 1.1-1.4 s of a core here, while the main process, which loads torch
and reads the images meanwhile, leaves the second core idle for much of its run. `start` forks the
helper as the program starts; the helper loads the libraries, then runs what `call` sends it while
the main process waits (drawing the report while the class maps were made slowed them as much as it
saved: docs/benchmarks.md). Arguments and results travel pickled through a pipe; functions are named
("module:function"), so the main process never loads their libraries.

The fork is made only on Linux, and only while the process has a single thread: a fork copies no
other thread, and a library whose pool lost its threads waits for them forever (seen with Clarabel's
pool in a process that had solved an SDP). Without a helper, or once it is gone (killed, out of
memory), every step runs in the calling process; the results are the same either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import resource
import signal
import sys
from multiprocessing.connection import Connection, Pipe
from typing import Any

from threadpoolctl import threadpool_limits

PRELOAD = ("relion_graphsplit.maxcut", "cvxpy", "relion_graphsplit.report")
"""Modules the helper loads as it starts: the max-cut (with cvxpy, which it loads only when solving)
and the report."""

_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies

_connection: Connection | None = None


def start(modules: tuple[str, ...] = PRELOAD) -> bool:
    """Fork the helper, which loads `modules`; False (and no helper) where a fork is not safe."""
    global _connection
    if _connection is not None or not sys.platform.startswith("linux") or _thread_count() != 1:
        return False
    ours, theirs = Pipe()
    if os.fork() == 0:
        ours.close()
        _serve(theirs, modules)
    theirs.close()
    _connection = ours
    return True


def running() -> bool:
    """Whether a helper process serves this one."""
    return _connection is not None


def stop() -> None:
    """Close the pipe, which ends the helper; later calls run here."""
    global _connection
    if _connection is not None:
        _connection.close()
    _connection = None


def call(target: str, *args: Any, **kwargs: Any) -> Any:
    """target ("module:function") called with the arguments, in the helper if there is one (its
    errors raised here), else here."""
    if _connection is not None:
        try:
            _connection.send((target, args, kwargs))
            ok, value = _connection.recv()
        except (EOFError, OSError):  # the helper is gone
            stop()
        else:
            if not ok:
                raise value
            return value
    return _run(target, args, kwargs)


def limit_threads(threads: int) -> None:
    """Limit the BLAS threads (numpy, scipy) here and in the helper."""
    _limit_blas(threads)
    if _connection is not None:
        call(f"{__name__}:_limit_blas", threads)


def _limit_blas(threads: int) -> None:
    threadpool_limits(threads)


def peak_memory_mb() -> float:
    """This process's peak resident memory (MiB): VmHWM where Linux gives it. getrusage's ru_maxrss
    is not used there: a process started by fork and exec inherits the parent's peak in it, so a run
    started from a large process (a benchmark, a notebook) reported that process's memory."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(target: str, args: tuple, kwargs: dict) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _serve(connection: Connection, modules: tuple[str, ...]) -> None:
    """The helper's life: load the modules, then run each call it reads until the pipe closes."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which closes the pipe
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the helper leaves at the pipe's end
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # killed with the main process
        gc.disable()  # as the program's own start does (launch.py)
        for module in modules:
            with contextlib.suppress(Exception):  # the call that needs the module will give the error
                importlib.import_module(module)
        gc.freeze()
        gc.enable()
        while True:
            try:
                target, args, kwargs = connection.recv()
            except EOFError:
                break
            try:
                reply = (True, _run(target, args, kwargs))
            except BaseException as err:  # noqa: BLE001 - given back to the caller, which raises it
                reply = (False, err)
            try:
                connection.send(reply)
            except Exception as err:  # noqa: BLE001 - a result or an error that does not pickle
                connection.send((False, RuntimeError(f"{target}: {err!r}")))
    finally:
        os._exit(0)
