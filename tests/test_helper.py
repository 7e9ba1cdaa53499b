"""The helper process: calls made there give what they give here, errors come back, and a helper that
is gone or unsafe to fork leaves the work to the calling process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import scipy.sparse as sp

from relion_graphsplit import helper
from relion_graphsplit.maxcut import synchronise


def _in_fresh_process(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_calls_run_in_the_helper_and_errors_come_back():
    code = """
import os, signal
from relion_graphsplit import helper
assert helper.start(("json",)) and helper.running()
child = helper.call("os:getpid")
assert child != os.getpid()
assert helper.call("builtins:divmod", 17, 5) == (3, 2)
assert helper.call("builtins:sorted", [3, 1, 2], reverse=True) == [3, 2, 1]
try:
    helper.call("json:loads", "{")
except ValueError as err:
    print("raised", type(err).__name__)
assert helper.call("os:getpid") == child  # the helper survives its callers' errors
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
assert helper.call("os:getpid") == os.getpid() and not helper.running()  # gone: done here
print("ok")
"""
    assert _in_fresh_process(code).split("\n") == ["raised JSONDecodeError", "ok"]


def test_the_sign_synchronisation_is_the_same_in_the_helper():
    """The program's own use: the max-cut of a weighted graph (the same seeded one), solved there and here."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((30, 30)) * (rng.random((30, 30)) < 0.3)
    W = sp.csr_matrix(np.triu(W, 1) + np.triu(W, 1).T)
    code = """
from relion_graphsplit import helper
assert helper.start()  # before numpy, whose BLAS starts threads as it loads (as the program does)
import numpy as np, scipy.sparse as sp
rng = np.random.default_rng(3)
W = rng.standard_normal((30, 30)) * (rng.random((30, 30)) < 0.3)
W = sp.csr_matrix(np.triu(W, 1) + np.triu(W, 1).T)
result = helper.call("relion_graphsplit.maxcut:synchronise", W, seed=5)
print(result.method, result.objective, ''.join('+' if s > 0 else '-' for s in result.signs))
"""
    method, objective, signs = _in_fresh_process(code).split()
    here = synchronise(W, seed=5)
    assert method == here.method == "sdp"
    assert float(objective) == here.objective
    assert signs == "".join("+" if s > 0 else "-" for s in here.signs)


def test_no_fork_in_a_process_with_threads():
    """A fork copies only the calling thread: with another thread alive the helper is not started, and
    calls run here."""
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert helper._thread_count() > 1
        assert not helper.start(())
        assert not helper.running()
        assert helper.call("builtins:divmod", 17, 5) == (3, 2)
    finally:
        release.set()
        worker.join()


def test_the_helper_dies_with_the_main_process():
    """A main process killed outright (SIGKILL: no cleanup runs) while its helper works leaves no
    helper behind: the helper, busy, does not read the pipe's end, but gets its parent's death signal."""
    code = """
from relion_graphsplit import helper
assert helper.start(("json",))
print(helper.call("os:getpid"), flush=True)
helper.call("time:sleep", 60)
"""
    main = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(main.stdout.readline())
        os.kill(child, 0)  # alive
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        main.kill()
        main.stdout.close()


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
