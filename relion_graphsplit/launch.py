"""The console commands' entry points: each program's module is imported with the cyclic garbage
collector paused, and what the imports made is then frozen out of its reach.

torch, scipy, pandas and matplotlib make some 300,000 Python objects as they load, and the collector
walks all of them again and again while they do: 0.5 s of a 2.7 s start, measured here. Frozen,
they are left out of every later collection too. Nothing the imports make is garbage to be freed.
"""

from __future__ import annotations

import gc
import importlib

from relion_graphsplit import helper


def _run(module: str) -> None:
    gc.disable()
    try:
        main = importlib.import_module(module).main
    finally:
        gc.freeze()
        gc.enable()
    main()


def graphsplit() -> None:
    """relion_graphsplit (relion_graphsplit.cli), with a helper process for the SDP and the report."""
    helper.start()
    _run("relion_graphsplit.cli")


def simulate() -> None:
    """relion_graphsplit_simulate (relion_graphsplit.simulate_cli)."""
    _run("relion_graphsplit.simulate_cli")


def report() -> None:
    """relion_graphsplit_report (relion_graphsplit.report_cli)."""
    _run("relion_graphsplit.report_cli")
