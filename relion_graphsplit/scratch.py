"""Arrays of equal-sized rows in files, read and written with explicit file I/O.

The split passes over all particles several times, so it keeps the preprocessed images and their
CTF filters in a temporary file. A memory map of such a file is the obvious choice, but every page it
touches counts towards the process's resident memory, which then grows with the number of particles.
Explicit reads and writes leave the file's pages in the kernel's cache, outside the process: the
process holds one batch at a time. The same reading serves the particle stacks (stack.py).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


def consecutive_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Positions [start, stop) of the runs of consecutive numbers (step 1) in sorted distinct `rows`."""
    starts = np.flatnonzero(np.diff(rows, prepend=rows[:1] - 2) != 1)
    stops = np.append(starts[1:], len(rows))
    return list(zip(starts.tolist(), stops.tolist()))


def _as_bytes(block: np.ndarray) -> memoryview:
    return memoryview(block.reshape(-1).view(np.uint8))


def read_rows(file: io.RawIOBase, offset: int, rows: np.ndarray, out: np.ndarray) -> None:
    """Fill `out` (k, ...) with the rows `rows` (sorted, distinct) of an array stored from byte `offset`
    of `file`, row after row in `out`'s dtype; one read per run of consecutive rows."""
    row_bytes = out[0].nbytes if len(out) else 0
    for start, stop in consecutive_runs(rows):
        buffer = _as_bytes(out[start:stop])
        file.seek(offset + int(rows[start]) * row_bytes)
        done = 0
        while done < len(buffer):
            got = file.readinto(buffer[done:])
            if not got:
                raise EOFError(f"{file.name}: ends before row {int(rows[stop - 1])}")
            done += got


def write_rows(file: io.RawIOBase, offset: int, rows: np.ndarray, values: np.ndarray) -> None:
    """Write `values` (k, ...) as the rows `rows` (sorted, distinct) of an array stored from byte
    `offset` of `file`; one write per run of consecutive rows."""
    row_bytes = values[0].nbytes if len(values) else 0
    for start, stop in consecutive_runs(rows):
        buffer = _as_bytes(values[start:stop])
        file.seek(offset + int(rows[start]) * row_bytes)
        done = 0
        while done < len(buffer):
            done += file.write(buffer[done:])


class ScratchArray:
    """A float32 array of shape (n, ...) in a file, indexed by integer arrays along the first axis.

    `a[rows]` reads those rows into a new array, `a[rows] = values` writes them (for repeated rows the
    last value stays, as in numpy). Rows never written read as zeros. Use as a context manager or call
    close(); the file is left for its directory's owner to delete.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        self._file = open(Path(path), "w+b", buffering=0)
        self._file.truncate(int(np.prod(self.shape)) * 4)

    def _rows(self, index: np.ndarray) -> np.ndarray:
        rows = np.asarray(index, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows must lie in [0, {self.shape[0]}), got {rows.min()}..{rows.max()}")
        return rows

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        rows = self._rows(index)
        distinct, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((len(distinct), *self.shape[1:]), dtype=np.float32)
        read_rows(self._file, 0, distinct, out)
        return out if np.array_equal(distinct, rows) else out[inverse]

    def __setitem__(self, index: np.ndarray, values: np.ndarray) -> None:
        rows = self._rows(index)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(rows), *self.shape[1:]):
            raise ValueError(f"{len(rows)} rows of {self.shape[1:]} expected, got {values.shape}")
        if not rows.size:
            return
        order = np.argsort(rows, kind="stable")
        last = np.append(rows[order][1:] != rows[order][:-1], True)  # the last value of repeated rows
        keep = order[last]
        write_rows(self._file, 0, rows[keep], np.ascontiguousarray(values[keep]))

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> ScratchArray:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
