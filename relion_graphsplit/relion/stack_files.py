"""Where the images of a particle STAR file are: rlnImageName parsed (`N@stack.mrcs`, N 1-based),
stacks found as RELION finds them, and their MRC layouts read from the headers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mrcfile.utils import data_dtype_from_header

from relion_graphsplit.relion.mrc import NotMrcError, open_mrc


class StackError(ValueError):
    """Image stacks that are missing, too short or of the wrong size, in one line."""


def parse_image_name(name: str) -> tuple[int, str]:
    """'000012@Particles/x.mrcs' -> (11, 'Particles/x.mrcs'): 0-based index and stack path.

    A name without '@' is a single image, index 0.

    Parameters
    ----------
    name : str
        An rlnImageName: N@stack with N 1-based, any zero padding.

    Returns
    -------
    index : int
        N - 1, the 0-based image number in the stack.
    stack : str
        The stack path as written (relative to the directory RELION runs in, see `resolve_stack`).

    Raises
    ------
    ValueError
        If N is not a whole number >= 1.
    """
    number, at, stack = name.partition("@")
    if not at:
        return 0, name
    if not number.strip().isdigit() or int(number) < 1:
        raise ValueError(f"bad image name {name!r}: expected N@stack with N >= 1")
    return int(number) - 1, stack


def split_image_names(names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """parse_image_name over a whole column: 0-based indices (n,) int64 and stack paths (n,).

    Parameters
    ----------
    names : pd.Series
        (n,) rlnImageName values.

    Returns
    -------
    index : np.ndarray
        (n,) int64, N - 1 of each N@stack (0 for a name without '@').
    stacks : np.ndarray
        (n,) object array of the stack paths as written.

    Raises
    ------
    ValueError
        Naming the first name whose N is not a whole number >= 1.
    """
    parts = names.astype(str).str.partition("@")
    has_at = (parts[1] == "@").to_numpy()
    numbers = parts[0].where(has_at, "1")
    if not numbers.str.strip().str.isdigit().all():
        bad = names[~numbers.str.strip().str.isdigit()].iloc[0]
        raise ValueError(f"bad image name {bad!r}: expected N@stack with N >= 1")
    index = numbers.str.strip().astype(np.int64).to_numpy() - 1
    if (index < 0).any():
        raise ValueError(f"bad image name {names[index < 0].iloc[0]!r}: image numbers start at 1")
    stacks = np.where(has_at, parts[2].to_numpy(dtype=object), parts[0].to_numpy(dtype=object))
    return index, stacks


def resolve_stack(stack: str, star_dir: Path, workdir: str | os.PathLike | None = None) -> Path | None:
    """Where a stack named in a STAR file is: as RELION resolves it, relative to the directory the
    program runs in (`workdir`, default the current one), else relative to the STAR file's directory.

    Parameters
    ----------
    stack : str
        The stack path from rlnImageName.
    star_dir : Path
        The directory of the STAR file, tried second.
    workdir : str or os.PathLike or None
        The directory the program runs in (RELION's project directory), tried first; None: the
        current directory.

    Returns
    -------
    Path or None
        The existing file (an absolute path as given; a relative one joined to the directory it was
        found in), or None if it is in neither.
    """
    name = Path(stack)
    if name.is_absolute():
        return name if name.is_file() else None
    for base in (Path(workdir) if workdir is not None else Path.cwd(), star_dir):
        if (base / name).is_file():
            return base / name
    return None


@dataclass(frozen=True)
class StackLayout:
    """How an MRC file stores its images, from its header: they follow one another from `offset`.

    Attributes
    ----------
    images : int
        Number of images (nz).
    ny, nx : int
        Image rows and columns (pixels).
    offset : int
        Bytes before the first image: header and extended header.
    mode : int
        The MRC mode.
    dtype : np.dtype or None
        The data's dtype as stored (byte order included); None for a mode mrcfile cannot read.
    """

    images: int
    ny: int
    nx: int
    offset: int  # bytes before the first image: header and extended header
    mode: int
    dtype: np.dtype | None  # of the data as stored (byte order included); None: a mode mrcfile cannot read


def stack_layout(path: Path) -> StackLayout:
    """The layout of an MRC file's images; a 2D image is a stack of one.

    Parameters
    ----------
    path : Path
        An MRC stack (or single image).

    Returns
    -------
    StackLayout
        Read from the header only.

    Raises
    ------
    StackError
        Naming the file when it has no MRC header (empty, or another format).
    """
    try:
        with open_mrc(path, header_only=True) as mrc:
            header = mrc.header
            try:
                dtype = data_dtype_from_header(header)
            except ValueError:
                dtype = None
            offset = header.nbytes + int(header.nsymbt)
            return StackLayout(int(header.nz), int(header.ny), int(header.nx), offset, int(header.mode), dtype)
    except NotMrcError as err:
        raise StackError(f"{path}: not a readable MRC stack ({err})") from None


def stack_shape(path: Path) -> tuple[int, int, int]:
    """(images, ny, nx) from an MRC header; a 2D image is a stack of one.

    Parameters
    ----------
    path : Path
        An MRC stack (or single image).

    Returns
    -------
    tuple of int
        (images, ny, nx): number of images, rows and columns (pixels).

    Raises
    ------
    StackError
        As `stack_layout`.
    """
    layout = stack_layout(path)
    return layout.images, layout.ny, layout.nx
