"""Particle images read from the MRC stacks that rlnImageName points to (stack_files finds them)."""

from __future__ import annotations

import io
import os
import resource
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from relion_graphsplit.relion.stack_files import StackError, StackLayout, resolve_stack, split_image_names, stack_layout
from relion_graphsplit.relion.star import ParticleSet, image_size
from relion_graphsplit.scratch import read_rows


def _unreadable(path: Path, layout: StackLayout) -> str | None:
    """Why the images of a stack cannot be read, or None."""
    if layout.dtype is None or layout.dtype.kind not in "iuf":
        return f"MRC mode {layout.mode} is not supported for images"
    size, end = path.stat().st_size, layout.offset + layout.images * layout.ny * layout.nx * layout.dtype.itemsize
    if size < end:
        return f"{size} bytes, the header announces {end}"
    return None


def _default_max_open() -> int:
    """How many stacks may stay open: the file descriptors left after a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 16
    return max(16, soft - 256)


class ImageStacks:
    """The images of a ParticleSet, read by particle row as (B, N, N) float32.

    Every stack is checked up front (exists, holds the images asked of it, square boxes of the
    set's size, a readable data block). Images are read with plain file reads, never memory-mapped, so
    the process holds only the batch asked for, however large the stacks. Stacks are opened on first
    use and kept open, at most `max_open` at once (the least recently used is closed; by default as
    many as the open-file limit allows), so sets with one stack per micrograph work on any system. Use
    as a context manager or call close(). len() is the number of particle rows.

    It pickles, and copies (copy.copy), without its open files: a copy, in a task on a Dask worker
    say, opens the stacks for itself by absolute path, and closes them with its own close().

    Parameters
    ----------
    ps : ParticleSet
        The particles; rlnImageName (N@stack, N 1-based) names each row's image.
    workdir : str or os.PathLike or None
        The directory RELION runs in, where relative stack paths are looked for first (then beside
        the STAR file; see `stack_files.resolve_stack`); None: the current directory.
    max_open : int or None
        Most stacks open at once; None: the open-file limit less 256, at least 16.

    Raises
    ------
    StackError
        In one line, when there is no rlnImageName column, a stack is missing, holds fewer images than
        the particles use, the images are not square or not of one size, their size differs from
        rlnImageSize, or a stack's mode cannot be read or its data block is shorter than its header
        announces (each naming the STAR file); or when a stack is not an MRC file (naming the stack).
    """

    def __init__(
        self, ps: ParticleSet, workdir: str | os.PathLike | None = None, max_open: int | None = None
    ):
        if "rlnImageName" not in ps.particles:
            raise StackError(f"{ps.path}: no rlnImageName column, so no images to read")
        self._image, names = split_image_names(ps.particles["rlnImageName"])
        self._stack, stacks = pd.factorize(names)
        star_dir = ps.path.parent
        self._paths = [resolve_stack(s, star_dir, workdir) for s in stacks]
        missing = [s for s, p in zip(stacks, self._paths) if p is None]
        if missing:
            base = Path(workdir) if workdir is not None else Path.cwd()
            raise StackError(
                f"{ps.path}: {len(missing)} of {len(stacks)} image stacks not found, first {missing[0]} "
                f"(looked in {base} and {star_dir})"
            )

        self._layouts = [stack_layout(p) for p in self._paths]
        shapes = np.array([(s.images, s.ny, s.nx) for s in self._layouts]).reshape(-1, 3)
        needed = np.zeros(len(stacks), dtype=np.int64)
        np.maximum.at(needed, self._stack, self._image + 1)
        short = np.flatnonzero(needed > shapes[:, 0])
        if short.size:
            s = short[0]
            raise StackError(
                f"{ps.path}: {short.size} image stacks hold fewer images than the particles use, first "
                f"{self._paths[s]} ({shapes[s, 0]} images, image {needed[s]} asked for)"
            )
        boxes = sorted({(int(nx), int(ny)) for _, ny, nx in shapes})
        if len(boxes) != 1 or boxes[0][0] != boxes[0][1]:
            listed = ", ".join(f"{nx}x{ny}" for nx, ny in boxes)
            raise StackError(f"{ps.path}: stacks must hold square images of one size, found {listed}")
        self._box = boxes[0][0]
        if "rlnImageSize" in ps.optics and image_size(ps) != self._box:
            raise StackError(
                f"{ps.path}: rlnImageSize is {image_size(ps)} but the stacks hold {self._box}-pixel images"
            )
        reasons = [(p, _unreadable(p, layout)) for p, layout in zip(self._paths, self._layouts)]
        unreadable = [(p, why) for p, why in reasons if why is not None]
        if unreadable:
            path, why = unreadable[0]
            raise StackError(
                f"{ps.path}: {len(unreadable)} image stacks cannot be read, first {path} ({why})"
            )
        self._max_open = max(1, max_open if max_open is not None else _default_max_open())
        self._open: OrderedDict[int, io.RawIOBase] = OrderedDict()

    def __len__(self) -> int:
        return len(self._stack)

    @property
    def box(self) -> int:
        """Image size N in pixels."""
        return self._box

    @property
    def paths(self) -> list[Path]:
        """The stacks the particles use, as found on disk, each once."""
        return list(self._paths)

    def read(self, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Images of the given particle rows, (B, N, N) float32, in the order asked.

        Reads stack by stack, each image once however often it is asked for, in one read per run of
        consecutive images. Raises StackError naming the stack and image when an image holds NaN or Inf.

        Parameters
        ----------
        indices : np.ndarray or torch.Tensor
            (B,) particle rows (0-based rows of `ps.particles`), any order, repeats allowed.

        Returns
        -------
        torch.Tensor
            (B, N, N) float32 [y, x] on the CPU, as stored in the stacks (no centring, no CTF).

        Raises
        ------
        IndexError
            For a row outside [0, len(self)).
        StackError
            When an image holds NaN or Inf, or a stack has become shorter since it was checked.
        """
        rows = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"particle rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        out = np.empty((rows.size, self._box, self._box), dtype=np.float32)
        stack, image = self._stack[rows], self._image[rows]
        order = np.argsort(stack, kind="stable")
        for part in np.split(order, np.flatnonzero(np.diff(stack[order])) + 1):
            if part.size:
                out[part] = self._images(stack[part[0]], image[part])
        self._refuse_non_finite(out, stack, image)
        return torch.from_numpy(out)

    def read_ahead(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(rows, `read(rows)`) for each batch of particle rows, in order, the next batch read on a
        thread while the caller works on this one: the disk and the computing overlap (file reads
        leave Python's lock). Two batches of images are held at a time.

        Parameters
        ----------
        batches : sequence of np.ndarray
            Particle rows per batch, as `read` takes them.

        Yields
        ------
        (np.ndarray, torch.Tensor)
            Each batch's rows and its images (B, N, N) float32.
        """
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(self.read, batches[0]) if len(batches) else None
            for i, rows in enumerate(batches):
                images = pending.result()
                if i + 1 < len(batches):
                    pending = reader.submit(self.read, batches[i + 1])
                yield rows, images

    def _refuse_non_finite(self, images: np.ndarray, stack: np.ndarray, image: np.ndarray) -> None:
        """Raise naming the first image that holds NaN or Inf, so it fails here and not deep in a solver.

        A float64 sum is finite exactly when every float32 pixel is (it cannot overflow), and costs
        one pass without a mask as large as the batch.
        """
        bad = np.flatnonzero(~np.isfinite(images.sum(axis=(1, 2), dtype=np.float64)))
        if bad.size:
            first = bad[0]
            raise StackError(
                f"{self._paths[stack[first]]}: image {image[first] + 1} holds pixels that are not finite "
                "numbers (NaN or Inf)"
            )

    def _images(self, stack: int, images: np.ndarray) -> np.ndarray:
        """Images of one stack (0-based, any order, repeats allowed) as stored, (k, N, N)."""
        layout = self._layouts[stack]
        try:
            return read_rows(self._file(stack), layout.offset, images, (self._box, self._box), layout.dtype)
        except EOFError as err:
            raise StackError(f"{self._paths[stack]}: shorter than when checked ({err})") from err

    def _file(self, stack: int) -> io.RawIOBase:
        """The open file of one stack, opening it (and closing the least recently used) if needed."""
        file = self._open.pop(stack, None)
        if file is None:
            if len(self._open) >= self._max_open:
                self._open.popitem(last=False)[1].close()
            file = open(self._paths[stack], "rb", buffering=0)
        self._open[stack] = file
        return file

    def __getstate__(self) -> dict:
        """The state a copy or an unpickled instance gets: no open files (a file's position is no one
        else's to move), and the stacks by absolute path (a worker elsewhere finds them on the shared
        file system; its current directory is not this one)."""
        state = dict(self.__dict__)
        state["_paths"] = [path.absolute() for path in self._paths]
        state["_open"] = OrderedDict()
        return state

    def close(self) -> None:
        """Close every open stack."""
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> ImageStacks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
