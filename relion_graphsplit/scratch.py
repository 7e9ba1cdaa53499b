"""Arrays of equal-sized rows in files, read through a mapping held for one read, written with
explicit file I/O.

The split passes over all particles several times, so it keeps the preprocessed images and their
CTF filters in a temporary file. A memory map of the whole file, kept open, is the obvious choice, but
every page it touches counts towards the process's resident memory, which then grows with the number
of particles. Here each read maps the span of its rows and copies them out, and each write is a file
write: the file's pages stay in the kernel's cache, outside the process, which holds one batch at a
time. The same reading serves the particle stacks (relion/stacks.py).
"""

from __future__ import annotations

import io
import mmap
import os
from pathlib import Path

import numpy as np

MAPPED_ROWS = 256
"""Most rows `read_rows` reads through one mapping."""


def consecutive_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Positions [start, stop) of the runs of consecutive numbers (step 1) in sorted distinct `rows`.

    Parameters
    ----------
    rows : np.ndarray
        (k,) integers, sorted and distinct.

    Returns
    -------
    list of (int, int)
        Per run, the positions in `rows` (not the row numbers) of its first element and one past its
        last: [3, 4, 5, 9] gives [(0, 3), (3, 4)]. Empty for empty `rows`.
    """
    starts = np.flatnonzero(np.diff(rows, prepend=rows[:1] - 2) != 1)
    stops = np.append(starts[1:], len(rows))
    return list(zip(starts.tolist(), stops.tolist()))


def _runs(offset: int, rows: np.ndarray, block: np.ndarray):
    """(file position, bytes of `block`) per run of consecutive `rows` (sorted, distinct), where row r
    of an array stored from byte `offset` is block row i for rows[i] = r."""
    row_bytes = block[0].nbytes if len(block) else 0
    for start, stop in consecutive_runs(rows):
        yield offset + int(rows[start]) * row_bytes, memoryview(block[start:stop].reshape(-1).view(np.uint8))


def read_rows(
    file: io.RawIOBase, offset: int, rows: np.ndarray, row_shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """Rows `rows` (any order, repeats allowed) of an array of `row_shape` rows in `dtype` stored from
    byte `offset` of `file`, in the order asked.

    The span of the rows is mapped for the length of the call and the rows copied out of it at once:
    scattered rows (a class's members, a cone's) cost a page fault each rather than a system call and
    a Python loop step each, and the mapping is gone, its pages no longer counted as the process's,
    when the call returns. The rows are taken in order, MAPPED_ROWS at a time, each group through its
    own mapping: a page fault maps the cached pages around it too (64 KiB), so that 8192 rows scattered
    over a large file could hold 0.5 GB of its pages at once.

    Parameters
    ----------
    file : io.RawIOBase
        An open binary file.
    offset : int
        Byte position of row 0 in the file.
    rows : np.ndarray
        (k,) row numbers (any shape, flattened), in any order, repeats allowed.
    row_shape : tuple of int
        The shape of one row.
    dtype : np.dtype
        The rows' dtype as stored (its byte order included).

    Returns
    -------
    np.ndarray
        (k, *row_shape) in `dtype`, row i being stored row rows[i].

    Raises
    ------
    EOFError
        If the file ends before a row asked for.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), *row_shape), dtype=dtype)
    if not len(rows):
        return out
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    end = offset + (int(rows.max()) + 1) * row_bytes
    if os.fstat(file.fileno()).st_size < end:
        raise EOFError(f"{file.name}: ends before byte {end}")
    order = np.argsort(rows, kind="stable")
    for group in range(0, len(rows), MAPPED_ROWS):
        where = order[group : group + MAPPED_ROWS]
        first, last = int(rows[where[0]]), int(rows[where[-1]])
        start, stop = offset + first * row_bytes, offset + (last + 1) * row_bytes
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(file.fileno(), stop - base, access=mmap.ACCESS_READ, offset=base)
        try:
            out[where] = np.ndarray((last - first + 1, *row_shape), dtype, buffer=mapped, offset=start - base)[
                rows[where] - first
            ]
        finally:
            mapped.close()
    return out


def write_rows(file: io.RawIOBase, offset: int, rows: np.ndarray, values: np.ndarray) -> None:
    """Write `values` (k, ...) as the rows `rows` (sorted, distinct) of an array stored from byte
    `offset` of `file`; one write per run of consecutive rows.

    Parameters
    ----------
    file : io.RawIOBase
        An open binary file, writable.
    offset : int
        Byte position of row 0 in the file.
    rows : np.ndarray
        (k,) row numbers, sorted and distinct.
    values : np.ndarray
        (k, ...) C-contiguous rows, written as their bytes (in their own dtype).
    """
    for position, buffer in _runs(offset, rows, values):
        file.seek(position)
        done = 0
        while done < len(buffer):
            done += file.write(buffer[done:])


class ScratchArray:
    """A float32 array of shape (n, ...) in a file, indexed by integer arrays along the first axis.

    `a[rows]` reads those rows into a new array, `a[rows] = values` writes them (for repeated rows the
    last value stays, as in numpy). Rows never written read as zeros. Use as a context manager or call
    close(); the file is left for its directory's owner to delete.

    Parameters
    ----------
    path : str or os.PathLike
        The file, created (or emptied) and sized to the whole array (4 bytes per value, native order);
        with `existing`, a file written so before, opened as it is.
    shape : tuple of int
        (n, ...) the array's shape.
    existing : bool
        Open the file that is there, rows and all (a continued run's working files), instead of
        making an empty one.

    Raises
    ------
    IndexError
        On reading or writing a row outside [0, n).
    ValueError
        On writing values not shaped (len(rows), ...) as the rows; with `existing`, for a file whose
        size is not the array's.
    FileNotFoundError
        With `existing`, for a file that is not there.

    Attributes
    ----------
    path : Path
        The file, as given.
    shape : tuple of int
        The array's shape.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], existing: bool = False):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        size = int(np.prod(self.shape)) * 4
        self._file = open(Path(path), "r+b" if existing else "w+b", buffering=0)
        if not existing:
            self._file.truncate(size)
        elif os.fstat(self._file.fileno()).st_size != size:
            self._file.close()
            raise ValueError(f"{path} holds {os.path.getsize(path)} bytes, not the {size} of a {self.shape} array")

    def _rows(self, index: np.ndarray) -> np.ndarray:
        rows = np.asarray(index, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows must lie in [0, {self.shape[0]}), got {rows.min()}..{rows.max()}")
        return rows

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        return read_rows(self._file, 0, self._rows(index), self.shape[1:], np.float32)

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


def row_batches(n: int, size: int) -> list[np.ndarray]:
    """Consecutive row indices 0..n-1 in batches of at most `size` (the last one shorter)."""
    return [np.arange(start, min(n, start + size)) for start in range(0, n, size)]
