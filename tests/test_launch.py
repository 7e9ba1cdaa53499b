"""The console entry points: imports with the garbage collector paused, then frozen, then the program."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from relion_graphsplit import launch

PROGRAM = '''
import gc
seen = {"import": gc.isenabled()}

def main():
    seen["main"] = gc.isenabled()
'''


@pytest.fixture
def collector():
    """Leaves the collector as it found it: on, nothing frozen."""
    yield
    gc.unfreeze()
    gc.enable()


def test_a_program_is_imported_with_the_collector_paused_and_run_with_it_on(tmp_path, monkeypatch, collector):
    (tmp_path / "graphsplit_probe.py").write_text(PROGRAM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "graphsplit_probe", raising=False)
    gc.unfreeze()
    launch._run("graphsplit_probe")
    seen = sys.modules["graphsplit_probe"].seen
    assert seen == {"import": False, "main": True}
    assert gc.get_freeze_count() > 0  # what the import made is out of the collector's reach


def test_a_failed_import_leaves_the_collector_on(collector):
    with pytest.raises(ModuleNotFoundError):
        launch._run("relion_graphsplit.no_such_module")
    assert gc.isenabled()


def test_every_console_command_starts_through_launch():
    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("relion_graphsplit")}
    assert set(scripts) == {"relion_graphsplit", "relion_graphsplit_simulate", "relion_graphsplit_report"}
    for script in scripts.values():
        assert script.module == "relion_graphsplit.launch" and callable(script.load())


def test_the_package_sets_thread_waiting_before_numpy_and_torch_load():
    """Importing the package (as every console command first does) sets passive OpenMP waiting and
    OpenBLAS's shortest spin before numpy or torch is loaded; a user's own settings are kept."""
    code = (
        "import os, sys, relion_graphsplit.launch; "
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_THREAD_TIMEOUT'], "
        "'numpy' in sys.modules, 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    assert _python(code, env) == "PASSIVE 4 False False"
    assert _python(code, {**env, "OPENBLAS_THREAD_TIMEOUT": "10"}) == "PASSIVE 10 False False"


def _python(code: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
