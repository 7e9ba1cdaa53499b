"""The console entry points: thread waiting set before the libraries load, signals, no import-time
side effects of the package itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points

ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "RAYON_NUM_THREADS")}


def _python(code: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_every_console_command_starts_through_launch():
    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("relion_graphsplit")}
    assert set(scripts) == {"relion_graphsplit", "relion_graphsplit_simulate", "relion_graphsplit_report"}
    for script in scripts.values():
        assert script.module == "relion_graphsplit.cli.launch" and callable(script.load())


def test_importing_the_package_changes_no_environment_variable():
    """The package's own modules set nothing (threadpoolctl, a dependency, sets KMP_DUPLICATE_LIB_OK
    as it loads: it is loaded first)."""
    code = (
        "import os, threadpoolctl, torch, numpy; before = dict(os.environ); "
        "import relion_graphsplit, relion_graphsplit.method.pipeline, relion_graphsplit.cli.graphsplit; "
        "print(dict(os.environ) == before)"
    )
    assert _python(code, ENV) == "True"


def test_a_console_command_sets_thread_waiting_before_numpy_and_torch_load():
    """The console command sets passive OpenMP waiting and OpenBLAS's shortest spin before numpy or
    torch is loaded; a user's own settings are kept."""
    code = (
        "import os, sys; from relion_graphsplit.cli import launch; "
        "sys.modules['probe'] = type(sys)('probe'); "
        "sys.modules['probe'].main = lambda: print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_THREAD_TIMEOUT'], "
        "'numpy' in sys.modules, 'torch' in sys.modules); "
        "launch._run('probe')"
    )
    assert _python(code, ENV) == "PASSIVE 4 False False"
    assert _python(code, {**ENV, "OPENBLAS_THREAD_TIMEOUT": "10"}) == "PASSIVE 10 False False"


def test_sigterm_while_loading_is_one_line_and_exit_130():
    command = [sys.executable, "-c", "from relion_graphsplit.cli.launch import graphsplit; graphsplit()", "--help"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(0.3)  # torch and the rest load for about two seconds
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    if process.returncode != 0:  # it did not finish first
        assert process.returncode == 130
        assert err.strip() == "interrupted"


def test_help_is_plain_text_and_does_not_load_torch():
    """--help of every command comes at once: it does not load torch (a second or more), prints plain
    text with no box drawing, and marks the required options."""
    for module in ("graphsplit", "simulate", "report"):
        code = (
            "import sys; from relion_graphsplit.cli import graphsplit, " + module + " as m; "
            "graphsplit.run_app(m.app, 'prog', ['--help']); "
            "print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
        assert done.returncode == 0, done.stderr
        assert "torch loaded: False" in done.stderr, (module, done.stderr)
        assert done.stdout.startswith("Usage: prog") and "╭" not in done.stdout, module
        assert "[required]" in done.stdout, module
