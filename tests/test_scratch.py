"""Row arrays in files, read and written by explicit file I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from relion_graphsplit import scratch
from relion_graphsplit.scratch import ScratchArray, consecutive_runs, read_rows


def test_consecutive_runs():
    assert consecutive_runs(np.array([2, 3, 4, 7, 9, 10])) == [(0, 3), (3, 4), (4, 6)]
    assert consecutive_runs(np.array([5])) == [(0, 1)]
    assert consecutive_runs(np.array([], dtype=np.int64)) == []


def test_scattered_writes_and_reads_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    shape = (50, 6, 4)
    expected = np.zeros(shape, dtype=np.float32)
    with ScratchArray(tmp_path / "a.f32", shape) as scratch:
        assert scratch.shape == shape
        for _ in range(20):
            rows = rng.choice(shape[0], size=rng.integers(1, 12), replace=False)
            values = rng.normal(size=(len(rows), *shape[1:])).astype(np.float32)
            scratch[rows] = values
            expected[rows] = values
        scratch[np.arange(10, 20)] = np.ones((10, *shape[1:]))  # a contiguous run, cast to float32
        expected[10:20] = 1
        dense = np.array([31, 30, 33, 30, 36, 34])  # repeats, out of order, within a short span
        for rows in (np.arange(shape[0]), rng.permutation(shape[0]), np.array([7, 3, 3, 49, 0, 7]), dense, np.array([], int)):
            got = scratch[rows]
            assert got.dtype == np.float32 and got.shape == (len(rows), *shape[1:])
            np.testing.assert_array_equal(got, expected[rows])


def test_rows_read_at_an_offset_and_past_the_end(tmp_path):
    path = tmp_path / "stack.bin"
    values = np.arange(5 * 3, dtype=">f4").reshape(5, 3)
    path.write_bytes(b"h" * 10 + values.tobytes())
    with open(path, "rb", buffering=0) as file:
        got = read_rows(file, 10, np.array([4, 0, 4]), (3,), np.dtype(">f4"))
        assert got.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(got, values[[4, 0, 4]])
        assert read_rows(file, 10, np.array([], int), (3,), np.dtype(">f4")).shape == (0, 3)
        with pytest.raises(EOFError):
            read_rows(file, 11, np.array([4]), (3,), np.dtype(">f4"))


def test_repeated_rows_keep_the_last_value_as_numpy(tmp_path):
    rows = np.array([4, 1, 4, 2, 1])
    values = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    expected = np.zeros((6, 3), dtype=np.float32)
    expected[rows] = values
    with ScratchArray(tmp_path / "a.f32", (6, 3)) as scratch:
        scratch[rows] = values
        np.testing.assert_array_equal(scratch[np.arange(6)], expected)


def test_bad_rows_and_shapes_are_refused(tmp_path):
    with ScratchArray(tmp_path / "a.f32", (4, 2)) as scratch:
        with pytest.raises(IndexError):
            scratch[np.array([4])]
        with pytest.raises(IndexError):
            scratch[np.array([-1])] = np.zeros((1, 2))
        with pytest.raises(ValueError):
            scratch[np.array([0, 1])] = np.zeros((2, 3))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_the_file_is_not_memory_mapped(tmp_path):
    path = tmp_path / "not_mapped.f32"
    with ScratchArray(path, (8, 4, 4)) as scratch:
        scratch[np.arange(8)] = np.ones((8, 4, 4))
        scratch[np.arange(8)]
        assert str(path) not in Path("/proc/self/maps").read_text()


def test_scattered_rows_are_mapped_a_group_at_a_time(tmp_path, monkeypatch):
    """Rows in any order, repeats too, read MAPPED_ROWS at a time in row order: each mapping spans
    only its group's rows, and the rows come back in the order asked."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((1000, 4, 4)).astype(np.float32)
    path = tmp_path / "rows.bin"
    path.write_bytes(values.tobytes())
    rows = rng.integers(0, 1000, 300)
    lengths = []
    mapping = scratch.mmap.mmap

    def recorded(fileno, length, **kwargs):
        lengths.append(length)
        return mapping(fileno, length, **kwargs)

    monkeypatch.setattr(scratch, "MAPPED_ROWS", 16)
    monkeypatch.setattr(scratch.mmap, "mmap", recorded)
    with open(path, "rb", buffering=0) as file:
        got = read_rows(file, 0, rows, (4, 4), np.dtype(np.float32))
    np.testing.assert_array_equal(got, values[rows])
    assert len(lengths) == -(-len(rows) // 16)
    spans = [np.sort(rows)[i : i + 16] for i in range(0, len(rows), 16)]
    for length, group in zip(lengths, spans):
        assert length <= (group[-1] - group[0] + 1) * 64 + scratch.mmap.ALLOCATIONGRANULARITY
