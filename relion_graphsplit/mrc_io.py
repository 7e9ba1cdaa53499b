"""Reading and writing 3D maps as MRC files, with the header RELION writes."""

from __future__ import annotations

import os

import mrcfile
import numpy as np

from .files import atomic_path


def write_mrc(path: str | os.PathLike, volume: np.ndarray, pixel_size: float) -> None:
    """Write a map [z, y, x] as float32 (mode 2) with voxel size `pixel_size` and origin 0."""
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            mrc.voxel_size = pixel_size
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.update_header_stats()


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A map [z, y, x] as float32 and its pixel size in Angstrom (the x voxel size of the header)."""
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float32).copy(), float(mrc.voxel_size.x)
