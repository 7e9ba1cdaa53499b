"""Reading and writing 3D maps as MRC files, with the header RELION writes."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import mrcfile
import numpy as np
from mrcfile.mrcfile import MrcFile
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
