"""Writing files so that a killed run never leaves one half-written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write to; rename it onto `path` only on success.

    The temporary name keeps the final suffix (libraries such as mrcfile and starfile look at it).

    Parameters
    ----------
    path : str or os.PathLike
        The file to write; its folder is made if missing.

    Yields
    ------
    Path
        The temporary file ".{stem}.partial{pid}{suffix}" beside `path`. When the block ends without
        an exception it is renamed onto `path` (os.replace, so `path` never holds a half-written
        file); in any case no temporary file is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
