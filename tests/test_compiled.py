"""The compiled loops' decorator (machine code cached where numba can write it, compiled anew elsewhere)
and the threads that run them on runs of items."""

from __future__ import annotations

import numba.core.caching
import numpy as np
import pytest

from relion_graphsplit.fourier.compiled import compiled, run_in_runs


def test_the_kernel_compiles_where_numba_cannot_cache(monkeypatch):
    """With nowhere to write its cache (read-only install and home), a kernel is compiled anew."""
    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator"):
        numba.njit(cache=True)(_one_more)
    kernel = compiled(_one_more)
    assert kernel(np.arange(3.0)).tolist() == [1.0, 2.0, 3.0]


def _one_more(x):
    return x + 1


@pytest.mark.parametrize(("count", "workers"), [(100, 3), (100, 1), (20, 4), (0, 2)])
def test_runs_cover_every_item_once(count, workers):
    seen = np.zeros(count, dtype=np.int64)
    runs = []

    def mark(seen, start, stop):
        seen[start:stop] += 1
        runs.append((start, stop))

    run_in_runs(mark, (seen,), count, workers, least=16)
    assert (seen == 1).all()
    assert len(runs) == max(1, min(workers, count // 16))  # one run a thread, of at least 16 items


def test_an_error_in_a_run_reaches_the_caller():
    def fail(start, stop):
        if start > 0:
            raise ValueError(f"no items from {start}")

    with pytest.raises(ValueError, match="no items from 50"):
        run_in_runs(fail, (), 100, workers=2)
