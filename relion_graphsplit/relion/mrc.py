"""Reading and writing 3D maps as MRC files, with the header RELION writes; image stacks written as they
are made."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import BinaryIO

import mrcfile
import numpy as np
from mrcfile.mrcfile import MrcFile
from mrcfile.mrcinterpreter import MrcInterpreter
from mrcfile.utils import data_dtype_from_header

from relion_graphsplit.files import atomic_path

MAP_ID = b"MAP "
"""The label at byte 208 of every MRC2000 (and later) header."""

class NotMrcError(ValueError):
    """A file without an MRC header; the message says why, callers add the file's name and purpose."""


def write_mrc(path: str | os.PathLike, volume: np.ndarray, pixel_size: float) -> None:
    """Write a map [z, y, x] as float32 (mode 2) with voxel size `pixel_size` and origin 0.

    The header is RELION's: cell = pixel_size * n, mx, my, mz = n, mapc/mapr/maps = 1, 2, 3, and
    the data statistics. The file is written whole or not at all.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write (replaced if it exists).
    volume : np.ndarray
        (nz, ny, nx) map [z, y, x], any real dtype (written as float32).
    pixel_size : float
        Voxel size (A).
    """
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            mrc.voxel_size = pixel_size
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.update_header_stats()


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A map [z, y, x] as float32 and its pixel size in Angstrom (the x voxel size of the header).

    Parameters
    ----------
    path : str or os.PathLike
        The MRC file.

    Returns
    -------
    volume : np.ndarray
        (nz, ny, nx) float32 [z, y, x], a copy (a 2D file gives (ny, nx)).
    pixel_size : float
        The x voxel size of the header, cell a / mx (A).

    Raises
    ------
    ValueError
        In one line naming `path`, for a file that is not an MRC map (empty, another format such as
        a STAR file) or whose data block cannot be read (shorter than its header says).
    """
    try:
        with open_mrc(path) as mrc:
            if mrc.data is None:  # permissive mode leaves it unread rather than raising
                raise NotMrcError(_why_no_data(mrc.header))
            return np.asarray(mrc.data, dtype=np.float32).copy(), float(mrc.voxel_size.x)
    except NotMrcError as err:
        raise ValueError(f"{path}: not an MRC map ({err})") from None


@contextlib.contextmanager
def open_mrc(path: str | os.PathLike, header_only: bool = False) -> Iterator[MrcFile]:
    """mrcfile.open(path, permissive=True) for a file that has an MRC header, else NotMrcError.

    Permissive because files from many programs bend the standard (machine stamp, extended header
    type) in ways that do not matter here; mrcfile's warnings about them are silenced and the header
    is judged by `has_mrc_header` instead.

    Parameters
    ----------
    path : str or os.PathLike
        The file, opened read-only.
    header_only : bool
        Read only the header (and extended header), not the data block.

    Yields
    ------
    MrcFile
        The open file, closed when the context ends. Its `data` is None when the data block could not
        be read.

    Raises
    ------
    NotMrcError
        For an empty file, one shorter than an MRC header, or one without an MRC header.
    """
    if os.path.getsize(path) == 0:
        raise NotMrcError("an empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            mrc = mrcfile.open(path, header_only=header_only, permissive=True)
        except ValueError:  # mrcfile: "Couldn't read enough bytes for MRC header"
            raise NotMrcError("shorter than an MRC header") from None
    with mrc:
        if not has_mrc_header(mrc.header):
            raise NotMrcError("no MRC header")
        yield mrc


def has_mrc_header(header: np.recarray) -> bool:
    """Whether a header read permissively is an MRC header.

    MRC2000 headers carry the 'MAP ' label; older ones, which RELION still reads, do not, so those are
    taken when their mode is an MRC mode and their dimensions are positive. Text (a STAR file) read
    as a header fails both: its bytes make a mode in the hundreds of millions.

    Parameters
    ----------
    header : np.recarray
        mrcfile's header record.

    Returns
    -------
    bool
        True for the 'MAP ' label, or a mode mrcfile knows and nx, ny, nz >= 1.
    """
    if header.map == MAP_ID:
        return True
    try:
        data_dtype_from_header(header)
    except ValueError:
        return False
    return min(int(header.nx), int(header.ny), int(header.nz)) >= 1


def _why_no_data(header: np.recarray) -> str:
    """Why mrcfile could not read the data block of a file with an MRC header."""
    try:
        data_dtype_from_header(header)
    except ValueError:
        return f"MRC mode {int(header.mode)} cannot be read"
    shape = f"{int(header.nx)} x {int(header.ny)} x {int(header.nz)}"
    return f"the file is shorter than its header announces: {shape} voxels of mode {int(header.mode)}"


class StackWriter:
    """An MRC stack of float32 images (mode 2) written batch by batch into an open file.

    The header goes first, the images are appended as they come, and `finish` writes the header again
    with the statistics (summed in float64 as the images pass): the file is what mrcfile writes for the
    whole stack (new_mmap, set_image_stack, voxel_size, update_header_stats), the data byte for byte,
    the mean and rms to float32 rounding, while the process holds one batch. Use through `write_stack`.

    Parameters
    ----------
    file : BinaryIO
        Opened for writing and reading ("w+b"), empty.
    count : int
        Number of images, at least 1.
    box : int
        Their size N (pixels).
    pixel_size : float
        Their pixel size (A).
    """

    def __init__(self, file: BinaryIO, count: int, box: int, pixel_size: float):
        if count < 1:
            raise ValueError(f"a stack holds one image or more, got {count}")
        self._file, self._count, self._box = file, count, box
        mrc = MrcInterpreter()
        mrc._create_default_attributes()  # how MrcInterpreter's docstring makes a new object without a file
        mrc.set_data(np.zeros((1, box, box), dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size
        mrc.header.nz = count
        self._header = mrc.header
        self._file.write(self._header.tobytes())
        self._written = 0
        self._sum = self._squares = 0.0
        self._min, self._max = np.float32(np.inf), np.float32(-np.inf)

    def append(self, images: np.ndarray) -> None:
        """Write the next images (B, N, N), cast to float32.

        Raises
        ------
        ValueError
            If they are not N x N, or more than `count` images in all.
        """
        data = np.ascontiguousarray(images, dtype=np.float32)
        if data.ndim != 3 or data.shape[1:] != (self._box, self._box):
            raise ValueError(f"expected images of {self._box} x {self._box}, got shape {data.shape}")
        if self._written + len(data) > self._count:
            raise ValueError(f"more than the {self._count} images of the stack")
        if not len(data):
            return
        self._file.write(data)
        values = data.astype(np.float64)
        self._sum += float(values.sum())
        self._squares += float(np.square(values).sum())
        self._min, self._max = np.minimum(self._min, data.min()), np.maximum(self._max, data.max())
        self._written += len(data)

    def finish(self) -> None:
        """Write the header with dmin, dmax, dmean and rms (the standard deviation about the mean).

        Raises
        ------
        ValueError
            If fewer than `count` images were appended.
        """
        if self._written != self._count:
            raise ValueError(f"{self._written} of the stack's {self._count} images were written")
        values = self._count * self._box * self._box
        mean = self._sum / values
        self._header.dmin, self._header.dmax, self._header.dmean = self._min, self._max, mean
        self._header.rms = np.sqrt(max(self._squares / values - mean**2, 0.0))
        self._file.seek(0)
        self._file.write(self._header.tobytes())


@contextlib.contextmanager
def write_stack(path: str | os.PathLike, count: int, box: int, pixel_size: float) -> Iterator[StackWriter]:
    """Write an MRC image stack batch by batch (`StackWriter.append`), whole or not at all.

    The stack is written under a temporary name and moved onto `path` when the block ends without an
    exception and all `count` images were appended; otherwise nothing is left.

    Parameters
    ----------
    path : str or os.PathLike
        The stack to write (replaced if it exists).
    count : int
        Number of images (at least 1).
    box : int
        Their size N (pixels).
    pixel_size : float
        Their pixel size (A).

    Yields
    ------
    StackWriter
        Append (B, N, N) images to it, in order.

    Raises
    ------
    ValueError
        If fewer or more than `count` images, or images of another size, were appended.
    """
    with atomic_path(path) as tmp, open(tmp, "w+b") as file:
        stack = StackWriter(file, count, box, pixel_size)
        yield stack
        stack.finish()
