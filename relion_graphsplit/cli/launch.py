"""The console commands' entry points: the process-wide settings a program makes as it starts.

- Thread waiting, set before numpy and torch load (a user's own settings win). torch's OpenMP
  workers spin while they wait; on a node shared with other jobs that made one step 82 s instead of
  1 s. OpenBLAS's workers (numpy's and scipy's) spin for about 2^28 cycles after each call; 2^4 is the
  shortest wait it allows, and leaves the cores to the compiled loops.
- SIGTERM, a batch system's cancel, ends a run as Ctrl-C does, through the same clean-up (the output
  folder left as it was); so does either of them while the libraries are still loading.

Importing the package itself sets nothing: it can be used as a library.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

THREAD_WAITING = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _run(module: str) -> None:
    for name, value in THREAD_WAITING.items():
        os.environ.setdefault(name, value)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        importlib.import_module(module).main()
    except KeyboardInterrupt:  # while loading, or on the way out: a run handles its own
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def graphsplit() -> None:
    """relion_graphsplit (relion_graphsplit.cli.graphsplit)."""
    _run("relion_graphsplit.cli.graphsplit")


def simulate() -> None:
    """relion_graphsplit_simulate (relion_graphsplit.cli.simulate)."""
    _run("relion_graphsplit.cli.simulate")


def report() -> None:
    """relion_graphsplit_report (relion_graphsplit.cli.report)."""
    _run("relion_graphsplit.cli.report")
