"""CTF-corrected direct Fourier inversion, RELION's way (backprojector.cpp, reconstructor.cpp).

Each image's centred 2D transform is multiplied by its CTF and inserted, with weight CTF^2, as a central
slice through a 3D half transform padded `pad` times: the 2D frequency (kx, ky) lands at
pad * A^T (kx, ky, 0), spread over its 8 neighbours with trilinear weights; a point with negative x
goes in as the complex conjugate at the mirrored position (the grid only holds x >= 0). The DC term of
every image is zeroed, and only frequencies up to `r_max` (Fourier pixels of the image) are inserted.

The finished map: the two halves of the x = 0 plane are summed (Friedel), the grids are symmetrised,
the data are divided by max(weight, radial mean weight / 1000), inverse transformed, cropped to the box,
the corners beyond radius box/2 are softly set to their mean, and the map is divided by sinc^2 (the
transform of the trilinear kernel). That division is RELION 4/5's default and `--skip_gridding` in
RELION 3.1, whose default instead iterates Pipe-Menon gridding weights (maps differ in the last shells).

On the CPU the insertion is a compiled loop (numba) over images, pixels and their 8 neighbours, which
also picks the inserted pixels and applies the CTF and any per-image weight. A padded grid is far larger
than the caches (0.1 GB at box 128, 0.8 GB at box 256), and a pixel's 8 neighbours lie apart in it, so
the loop waits on memory: in grids larger than _SORTED_GRID_BYTES the inserted points of a chunk of
images are first sorted (a stable counting sort) by the grid row (z, y) they fall in, and then added
row after row, so that the rows a chunk writes are brought into the caches once rather than once per
point; smaller grids (the refinement's, at the working box) stay in the caches and take the points in
image, pixel order. The threads first find each point's z plane (or grid row), a run of images each;
then each thread adds the points that fall on its own blocks of z planes, so that a point is handled
by one thread (two where it straddles blocks), and every voxel gets its additions in the same order
whatever the thread count. The threads run on while the caller prepares the next chunk, and reading
`sums` waits for them.
With the transforms and CTFs of the images it takes half the time of torch's scatter_add_ at boxes 64
to 256, which runs on one thread on the CPU and needs index and weight tensors 8 times the batch
(`scripts/bench_insertion.py`; docs/notes/speed-history.md, "Class maps at large boxes"). On other devices the insertion is
torch's scatter_add_ over flattened voxel indices. The finished map is computed in float64, as
RELION's CPU code does: on the CPU compiled loops floor the weight, divide and place the
frequencies, scipy transforms them on the threads, and one compiled pass soft-masks and
gridding-corrects (`_invert`); on other devices torch does the same steps there (`_invert_torch`),
and the two maps agree to rounding.
"""

from __future__ import annotations

import math
from concurrent import futures
from concurrent.futures import Future

import numpy as np
import scipy.fft
import torch

from relion_graphsplit.fourier.compiled import compiled, run_in_runs, runs_compiled, thread_pool
from relion_graphsplit.fourier.symmetry import symmetry_matrices

# Offsets of the 8 trilinear neighbours in (z, y, x), in the order (dz, dy, dx).
_CORNERS = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]

# Image pixels inserted at a time. It keeps each temporary (the largest, on devices other than the
# CPU, the scatter's 8 int64 indices per pixel, 16 MiB) below glibc's largest mmap threshold (32 MiB),
# so that its memory is reused instead of mapped and faulted in afresh for every batch: at box 256 the
# scatter took a third less time than with 64 images at a time (docs/notes/speed-history.md, "Class maps at large boxes"). The
# sums are added in the same order whatever the chunk.
_INSERT_PIXELS = 1 << 18

# Points (image pixels) sorted and inserted at a time on the CPU: enough that a chunk's points write
# each grid row several times (at box 128, 256 images a chunk took half the time of the unsorted loop,
# 64 images three quarters; docs/notes/speed-history.md, "Sorted insertion"), with 12 bytes of sort
# per point.
_SORTED_POINTS = 1 << 20

# Grids of more bytes than this are inserted sorted by row: the smaller ones stay in the caches, where
# the sort costs more than it saves (at box 64, 13 MB of grids: 0.065 against 0.048 ms per image).
_SORTED_GRID_BYTES = 32 << 20

# Most z planes per block of the threads' share of the grids (thread t writes the blocks t, t + T, ...):
# few points straddle two blocks, and sorted points are swept block by block. Smaller blocks where the
# grids have fewer than 4 blocks per thread.
_PLANE_BLOCK = 8


def centred_rfft2(images: torch.Tensor) -> torch.Tensor:
    """rfft2 of images (..., N, N) whose centre is at index N // 2 (phases relative to the centre).

    Parameters
    ----------
    images : torch.Tensor
        (..., N, N) real images [y, x], centred at index N // 2.

    Returns
    -------
    torch.Tensor
        (..., N, N // 2 + 1) complex (complex64 for float32 images): rfft half grid, DC at [0, 0],
        of the images with their centre moved to index 0 (ifftshift).
    """
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))


def radius_for_resolution(box: int, pixel_size: float, maxres: float) -> int:
    """Fourier radius (pixels) of resolution `maxres` (A), as relion_reconstruct --maxres: ceil(N p / maxres).

    Parameters
    ----------
    box : int
        Image size N (pixels).
    pixel_size : float
        Pixel size p (A).
    maxres : float
        Resolution (A).

    Returns
    -------
    int
        ceil(N p / maxres) Fourier pixels, at most N // 2 (Nyquist): an `r_max` for
        `FourierAccumulator`.
    """
    return min(box // 2, math.ceil(box * pixel_size / maxres))


def _signed_frequencies(n: int, device: torch.device) -> torch.Tensor:
    """FFT-order integer frequencies of an n-point axis with RELION's choice: index n // 2 is +n // 2."""
    k = torch.arange(n, device=device)
    return torch.where(k < n // 2 + 1, k, k - n)


class FourierAccumulator:
    """Running sums of CTF-weighted central slices (data) and CTF^2 (weight) on a padded half grid.

    The grid holds frequencies z, y in [-c, c] and x in [0, c], c = pad * r_max + 1, in RELION's
    centred layout; `sums[0]`, `sums[1]`, `sums[2]` are the real and imaginary parts of the data and
    the weight, shape (2c + 1, 2c + 1, c + 1) each.

    Parameters
    ----------
    box : int
        Image size N (pixels); the map is N^3.
    pad : int
        Padding factor of the 3D grid: image frequency k lands at pad * A^T (kx, ky, 0).
    r_max : int or None
        Largest inserted radius, in Fourier pixels of the N x N image (see `radius_for_resolution`);
        None or anything above N // 2 means N // 2.
    device : torch.device or str
        Where the sums live and the insertion runs: on the CPU the compiled `_splat_kernel`, elsewhere
        torch's scatter_add_.
    dtype : torch.dtype
        Real dtype of the sums. On the CPU the compiled insertion takes the image transforms, CTFs,
        image weights and rotation matrices as float32 whatever this dtype.
    """

    def __init__(
        self,
        box: int,
        pad: int = 2,
        r_max: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.box = box
        self.pad = pad
        self.r_max = box // 2 if r_max is None else min(r_max, box // 2)
        self.device = torch.device(device)
        self.dtype = dtype
        self.c = pad * self.r_max + 1
        d = 2 * self.c + 1
        self._sums = torch.zeros((3, d, d, self.c + 1), dtype=dtype, device=self.device)
        self._pending: list[Future] = []  # splats still running into _sums (see _splat)

        # The 2D frequencies that are inserted: x >= 0 (rfft), radius <= r_max, and on the x = 0
        # column only y >= 0 (the negative-y half is the Friedel mate of the positive one).
        h = box // 2 + 1
        ky = _signed_frequencies(box, self.device)[:, None].expand(box, h)
        kx = torch.arange(h, device=self.device)[None, :].expand(box, h)
        keep = (kx * kx + ky * ky <= self.r_max**2) & ~((kx == 0) & (ky < 0))
        self._pixels = torch.nonzero(keep.reshape(-1)).squeeze(1)
        self._kx_axis, self._ky_axis = kx[0].to(dtype), ky[:, 0].to(dtype)  # (h,) and (box,)
        self._kx = kx.reshape(-1)[self._pixels].to(dtype)
        self._ky = ky.reshape(-1)[self._pixels].to(dtype)
        self._dc = (self._kx == 0) & (self._ky == 0)
        self._strides = (d * (self.c + 1), self.c + 1, 1)
        self._offsets = torch.tensor(
            [sum(o * s for o, s in zip(corner, self._strides)) for corner in _CORNERS], device=self.device
        )

    @staticmethod
    def grid_bytes(box: int, pad: int = 2, r_max: int | None = None, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the `sums` of an accumulator made with these arguments (as the constructor's)."""
        c = pad * (box // 2 if r_max is None else min(r_max, box // 2)) + 1
        return 3 * (2 * c + 1) ** 2 * (c + 1) * torch.tensor([], dtype=dtype).element_size()

    @property
    def sums(self) -> torch.Tensor:
        """(3, 2c + 1, 2c + 1, c + 1): real and imaginary parts of the data, and the weight.

        Reading it waits for insertions still running on threads. Index (z + c, y + c, x) holds
        frequency (x, y, z) of the padded grid.
        """
        self._wait()
        return self._sums

    @sums.setter
    def sums(self, value: torch.Tensor) -> None:
        self._wait()
        self._sums = value

    @property
    def images_per_insert(self) -> int:
        """Images inserted at a time: `_SORTED_POINTS` pixels on the CPU (the compiled loop's sorted
        chunk), `_INSERT_PIXELS` elsewhere (the scatter's temporaries)."""
        pixels = _SORTED_POINTS if runs_compiled(self.device) else _INSERT_PIXELS
        return max(1, pixels // len(self._pixels))

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        futures.wait(pending)  # all of them, so that none still writes if one failed
        for job in pending:
            job.result()

    def insert(
        self,
        images: torch.Tensor,
        rotations: torch.Tensor,
        ctf: torch.Tensor | None = None,
        origins: torch.Tensor | None = None,
        ctf_premultiplied: bool = False,
    ) -> None:
        """Insert real images (B, N, N) centred at N // 2, `images_per_insert` at a time; see
        `insert_rfft` for the other arguments.

        Parameters
        ----------
        images : torch.Tensor
            (B, N, N) real images [y, x], centred at index N // 2.
        rotations : torch.Tensor
            (B, 3, 3) RELION matrices A.
        ctf : torch.Tensor or None
            (B, N, N // 2 + 1) CTFs on the unshifted rfft grid (`ctf.ctf_2d`), or None.
        origins : torch.Tensor or None
            (B, 2) rlnOriginX/Y in pixels (x, y), or None.
        ctf_premultiplied : bool
            The images already carry one CTF factor.

        Returns
        -------
        None
            The images are added to `sums`.
        """
        chunk = self.images_per_insert
        for start in range(0, images.shape[0], chunk):
            sl = slice(start, start + chunk)
            f = centred_rfft2(images[sl].to(self.device, self.dtype))
            self.insert_rfft(
                f,
                rotations[sl],
                None if ctf is None else ctf[sl],
                None if origins is None else origins[sl],
                ctf_premultiplied,
            )

    def insert_rfft(
        self,
        images_rfft: torch.Tensor,
        rotations: torch.Tensor,
        ctf: torch.Tensor | None = None,
        origins: torch.Tensor | None = None,
        ctf_premultiplied: bool = False,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Insert centred image transforms (B, N, N // 2 + 1) (see `centred_rfft2`).

        Each image adds data F CTF w (F w if premultiplied) and weight CTF^2 w at pad * A^T (kx, ky, 0)
        for its pixels within radius r_max (on the x = 0 column only ky >= 0), spread over 8
        neighbours; the DC term adds weight only. On the CPU the insertion may still run on threads
        after this returns; `sums` waits for it.

        Parameters
        ----------
        images_rfft : torch.Tensor
            (B, N, N // 2 + 1) complex: `centred_rfft2` of the images (rfft half grid, DC at [0, 0]).
        rotations : torch.Tensor
            (B, 3, 3) RELION's A, which left-multiply xyz column vectors.
        ctf : torch.Tensor or None
            (B, N, N // 2 + 1) on the unshifted rfft grid, or None (no CTF correction: data F w, weight w).
        origins : torch.Tensor or None
            (B, 2) rlnOriginX/Y in pixels (x, y), or None. Images are shifted by +origin (a phase
            ramp) before insertion, which centres the particle as RELION does (the particle's centre
            lies at the image centre minus its origin).
        ctf_premultiplied : bool
            The images already carry one CTF factor (rlnCtfDataAreCtfPremultiplied), so only the
            weight gets CTF^2.
        weights : torch.Tensor or None
            (B,) factors on each image's data and weight (soft assignments), or None; images of
            weight 0 add nothing.

        Returns
        -------
        None
            The images are added to `sums`.
        """
        f = images_rfft.to(self.device)
        if origins is not None:
            # The phase ramp is the product of a ramp along x and one along y: 1D phases, not 2D.
            o = (-2.0 * math.pi / self.box) * origins.to(self.device, self.dtype)
            along_x, along_y = o[:, 0, None] * self._kx_axis, o[:, 1, None] * self._ky_axis
            ramp_x = torch.polar(torch.ones_like(along_x), along_x)
            ramp_y = torch.polar(torch.ones_like(along_y), along_y)
            f = f * ramp_y[:, :, None] * ramp_x[:, None, :]
        rotations = rotations.to(self.device, self.dtype)
        insert = self._splat if runs_compiled(self.device) else self._scatter
        insert(f, ctf, weights, rotations, ctf_premultiplied)

    def _splat(
        self,
        f: torch.Tensor,
        ctf: torch.Tensor | None,
        weights: torch.Tensor | None,
        rotations: torch.Tensor,
        ctf_premultiplied: bool,
    ) -> None:
        """Insert the transforms f (B, N, N // 2 + 1) with the compiled `_splat_kernel` on
        torch.get_num_threads() threads. The threads first find each point's z plane, or its grid row
        where the grids exceed _SORTED_GRID_BYTES (`_point_rows`, a run of images each), and such
        points are sorted by row (`_sort_by_row`); then each thread adds the points that fall on its own
        blocks of z planes (each voxel's additions in the same order whatever the thread count). The
        threads run on while the caller prepares its next chunk."""
        b = f.shape[0]
        f = f.to(torch.complex64).reshape(b, -1).contiguous().numpy()
        c = np.zeros((0, 0), np.float32) if ctf is None else ctf.to(torch.float32).reshape(b, -1).contiguous().numpy()
        w = np.ones(b, np.float32) if weights is None else weights.to(torch.float32).contiguous().numpy()
        a = rotations.to(torch.float32).contiguous().numpy()
        kx, ky = self._kx.numpy(), self._ky.numpy()
        by_row = self._sums.numel() * self._sums.element_size() > _SORTED_GRID_BYTES
        workers = torch.get_num_threads()
        # The points' planes serve to share them out (and rows to sort them): one thread in image
        # order goes without.
        rows = np.empty(b * len(kx) if by_row or workers > 1 else 0, np.int32)
        if len(rows):
            run_in_runs(_point_rows, (rows, w, kx, ky, a, self.pad, self.c, by_row), b, workers, least=4)
        order, starts = _sort_by_row(rows, (2 * self.c + 1) ** 2) if by_row else (np.zeros(0, np.int64),) * 2
        # Enough blocks for every thread to have several (the block size does not change the sums).
        block = min(_PLANE_BLOCK, max(1, (2 * self.c + 1) // (4 * workers)))
        args = (f, c, w, ctf is not None, ctf_premultiplied, self._pixels.numpy(), kx, ky, a, self.pad, self.c, rows,
                order, starts, block)  # fmt: skip
        flat = self.sums.view(3, -1).numpy()  # waits for this accumulator's previous splats
        if workers < 2:
            _splat_kernel(flat, *args, 1, 0)
            return
        self._pending = [thread_pool(workers).submit(_splat_kernel, flat, *args, workers, t) for t in range(workers)]

    def _scatter(
        self,
        f: torch.Tensor,
        ctf: torch.Tensor | None,
        weights: torch.Tensor | None,
        rotations: torch.Tensor,
        ctf_premultiplied: bool,
    ) -> None:
        """What `_splat` does, with torch's scatter_add_ on any device (the GPU's way), in the sums' dtype.

        scatter_add_ adds in its own order (on a GPU atomically, in no fixed order), so the sums agree
        with the compiled loop's to rounding, not bit for bit. It holds 8 int64 indices and 8 weights
        per inserted pixel of the batch (`insert` takes `images_per_insert` images at a time).
        """
        b = f.shape[0]
        vals = f.reshape(b, -1)[:, self._pixels]
        re, im = vals.real, vals.imag
        if ctf is None:
            values_weight = torch.ones(re.shape, dtype=self.dtype, device=self.device)
        else:
            c = ctf.to(self.device, self.dtype).reshape(b, -1)[:, self._pixels]
            if not ctf_premultiplied:
                re, im = re * c, im * c
            values_weight = c * c
        if weights is not None:
            w = weights.to(self.device, self.dtype)[:, None]
            re, im, values_weight = re * w, im * w, values_weight * w
        re, im = re.masked_fill(self._dc, 0), im.masked_fill(self._dc, 0)
        # Slice coordinates in the padded 3D frame: pad * A^T (kx, ky, 0), as (x, y, z); a point with
        # x < 0 is stored as the complex conjugate at -(x, y, z).
        A = rotations
        xyz = self.pad * (self._kx[:, None] * A[:, None, 0, :] + self._ky[:, None] * A[:, None, 1, :])
        sign = 1.0 - 2.0 * (xyz[..., 0] < 0).to(self.dtype)
        xyz = xyz * sign[..., None]
        im = im * sign

        lo = torch.floor(xyz)
        frac = xyz - lo
        lo = lo.long()
        sz, sy, _ = self._strides
        base = (lo[..., 2] + self.c) * sz + (lo[..., 1] + self.c) * sy + lo[..., 0]
        index = (base[None] + self._offsets[:, None, None]).reshape(-1)
        corner_w = _corner_weights(frac)
        flat = self.sums.view(3, -1)
        for channel, values in enumerate([re, im, values_weight]):
            flat[channel].scatter_add_(0, index, (corner_w * values).reshape(-1))

    def finalise(self, sym: str = "C1", regularisation: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstructed map (N, N, N) [z, y, x], float32, centred at N // 2. Leaves the sums intact.

        The steps are the module docstring's (Friedel plane, symmetry, division, inverse transform,
        soft edge, gridding correction); from the division on in float64, on the CPU by compiled loops
        (`_invert`), elsewhere by torch on the accumulator's device (`_invert_torch`).

        Parameters
        ----------
        sym : str
            RELION point group applied to the accumulated grids (`symmetry.symmetry_matrices`).
        regularisation : torch.Tensor or None
            Optional per-shell term (length >= r_max + 1, shells of the unpadded box) added to the
            weight before division, a Wiener-style 1 / SSNR prior in weight units (RELION adds
            1 / (pad^3 tau2_fudge tau2)).

        Returns
        -------
        torch.Tensor
            (N, N, N) float32 [z, y, x] on the accumulator's device.
        """
        fields, plane = self.sums, _friedel_plane(self.sums)
        if sym.strip().upper() != "C1":
            fields = fields.clone()
            fields[..., 0] = plane
            fields = _symmetrise(fields, symmetry_matrices(sym).to(self.device), self.pad * self.r_max)
            plane = fields[..., 0].contiguous()
        invert = _invert if runs_compiled(self.device) else _invert_torch
        return invert(fields, plane, self.box, self.pad, self.r_max, regularisation)


@compiled
def _half_grid_point(kx: float, ky: float, a0: np.ndarray, a1: np.ndarray, pad: int) -> tuple[float, float, float, bool]:
    """Where image frequency (kx, ky) goes in the padded half grid: pad * A^T (kx, ky, 0) for the rows
    a0, a1 (3,) of RELION's A, negated where its x < 0 (the grid holds x >= 0 only; the value goes in
    conjugated there). Returns x, y, z and whether the point was negated."""
    x = pad * (kx * a0[0] + ky * a1[0])
    y = pad * (kx * a0[1] + ky * a1[1])
    z = pad * (kx * a0[2] + ky * a1[2])
    if x < 0:
        return -x, -y, -z, True
    return x, y, z, False


@compiled
def _point_rows(
    rows: np.ndarray, weights: np.ndarray, kx: np.ndarray, ky: np.ndarray, rotations: np.ndarray, pad: int, c: int,
    by_row: bool, start: int, stop: int,
) -> None:
    """Where the inserted points of images start..stop fall: rows[b P + p] for pixel p (frequency
    (kx[p], ky[p]), P pixels) of image b, at pad * A^T (kx, ky, 0) for the RELION matrix
    A = rotations[b] (B, 3, 3), negated where x < 0 (its conjugate's place), is its z plane
    floor(z) + c, or with `by_row` its grid row (floor(z) + c) (2c + 1) + floor(y) + c in a grid
    (2c + 1, 2c + 1, c + 1); -1 for the points of images of weight 0 (`weights`, (B,))."""
    d = 2 * c + 1
    n_pixels = kx.shape[0]
    for b in range(start, stop):
        if weights[b] == 0:
            rows[b * n_pixels : (b + 1) * n_pixels] = -1
            continue
        a0, a1 = rotations[b, 0], rotations[b, 1]
        for p in range(n_pixels):
            _, y, z, _ = _half_grid_point(kx[p], ky[p], a0, a1, pad)
            row = int(math.floor(z)) + c
            if by_row:
                row = row * d + int(math.floor(y)) + c
            rows[b * n_pixels + p] = row


@compiled
def _sort_by_row(rows: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The points of `rows` (`_point_rows`, by_row) sorted by grid row: a stable counting sort.

    Returns
    -------
    order : np.ndarray
        (points,) int64 the points of row >= 0, by row and then in (image, pixel) order.
    starts : np.ndarray
        (n_rows + 1,) int64 where each row's points begin in `order`, and its length last.
    """
    starts = np.zeros(n_rows + 1, np.int64)
    for i in range(rows.shape[0]):
        if rows[i] >= 0:
            starts[rows[i] + 1] += 1
    for r in range(n_rows):
        starts[r + 1] += starts[r]
    next_free = starts[:-1].copy()
    order = np.empty(starts[-1], np.int64)
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0:
            order[next_free[r]] = i
            next_free[r] += 1
    return order, starts


@compiled
def _splat_kernel(
    flat: np.ndarray, f: np.ndarray, ctf: np.ndarray, weights: np.ndarray, with_ctf: bool, premultiplied: bool,
    pixels: np.ndarray, kx: np.ndarray, ky: np.ndarray, rotations: np.ndarray, pad: int, c: int,
    rows: np.ndarray, order: np.ndarray, starts: np.ndarray, block: int, parts: int, part: int,
) -> None:
    """Trilinear insertion of the pixels `pixels` (P,) of flattened transforms f (B, M), of frequencies
    (kx, ky) (P,), from images with RELION matrices `rotations` (B, 3, 3) into `flat`
    (3, (2c + 1)^2 (c + 1)): data f CTF w (f w where `premultiplied`, or without a CTF) and weight
    CTF^2 w (w), for the CTF `ctf` (B, M) and the image weights w (B,); images of weight 0 are left
    out, and the DC term adds weight only. The point pad * A^T (kx, ky, 0) spreads over its 8
    neighbours, and a point with x < 0 goes in conjugated at -(x, y, z).

    This thread (`part` of `parts`) writes the z planes of blocks part, part + parts, ... of `block`
    planes. Without `order` (empty), `rows` holds each point's z plane (`_point_rows`) and the thread
    takes the points (i = b P + p) in (image, pixel) order, those on its planes (all of them where
    `rows` is empty too: one thread); with it, `rows` holds grid rows and the thread takes, block by
    block, the points sorted by row (`order` and `starts`, `_sort_by_row`) that touch the block.
    Either way each voxel gets its additions in the points' order whatever the split into threads."""
    d = 2 * c + 1
    sy = c + 1
    sz = d * sy
    n_pixels = pixels.shape[0]
    sorted_points = order.shape[0] > 0
    planes_found = rows.shape[0] > 0
    # Image order: one pass over all points. Sorted: one pass per block over the points that touch it
    # (those on its planes low..high - 1 and on plane low - 1, which reach plane low).
    for low in range(part * block, d, parts * block) if sorted_points else range(1):
        high = min(low + block, d)
        start, stop = (starts[max(low - 1, 0) * d], starts[high * d]) if sorted_points else (0, weights.shape[0] * n_pixels)
        for j in range(start, stop):
            i = order[j] if sorted_points else j
            b = i // n_pixels
            first = second = True  # one thread without the planes found: every plane is its own
            if sorted_points:
                iz = rows[i] // d
                first, second = iz >= low, iz + 1 < high
            elif planes_found:
                iz = rows[i]
                if iz < 0:
                    continue
                first = (iz // block) % parts == part
                second = ((iz + 1) // block) % parts == part
                if not (first or second):
                    continue
            elif weights[b] == 0:
                continue
            p = i - b * n_pixels
            scale = weights[b]
            a0, a1 = rotations[b, 0], rotations[b, 1]
            x, y, z, conjugate = _half_grid_point(kx[p], ky[p], a0, a1, pad)
            x0, y0, z0 = math.floor(x), math.floor(y), math.floor(z)
            iz = int(z0) + c
            q = pixels[p]
            v = f[b, q]
            vr, vi, vw = v.real, v.imag, np.float32(1.0)
            if with_ctf:
                vw = ctf[b, q] * ctf[b, q]
                if not premultiplied:
                    vr, vi = vr * ctf[b, q], vi * ctf[b, q]
            vr, vi, vw = vr * scale, vi * scale, vw * scale
            if kx[p] == 0 and ky[p] == 0:
                vr = vi = np.float32(0.0)
            if conjugate:
                vi = -vi
            fx, fy, fz = x - x0, y - y0, z - z0
            base = iz * sz + (int(y0) + c) * sy + int(x0)
            for dz in range(2):
                if not (second if dz else first):
                    continue
                wz = fz if dz else 1 - fz
                for dy in range(2):
                    wzy = wz * (fy if dy else 1 - fy)
                    for dx in range(2):
                        w = wzy * (fx if dx else 1 - fx)
                        k = base + dz * sz + dy * sy + dx
                        flat[0, k] += w * vr
                        flat[1, k] += w * vi
                        flat[2, k] += w * vw


def _friedel_plane(sums: torch.Tensor) -> torch.Tensor:
    """The x = 0 plane (3, 2c + 1, 2c + 1) of grids (3, 2c + 1, 2c + 1, c + 1) with each point summed
    with its Friedel mate (-z, -y, 0), the data conjugated (BackProjector::enforceHermitianSymmetry)."""
    plane = sums[..., 0]
    mate = plane.flip(1, 2)
    c = plane.shape[1] // 2
    new = torch.stack([plane[0] + mate[0], plane[1] - mate[1], plane[2] + mate[2]])
    new[:, c, c] = plane[:, c, c]
    return new


def _corner_weights(frac: torch.Tensor) -> torch.Tensor:
    """Trilinear weights (8, ...) of the corners in `_CORNERS` order; frac (..., 3) holds (fx, fy, fz)."""
    fx, fy, fz = frac.unbind(-1)
    wzy = torch.stack([1 - fz, fz])[:, None] * torch.stack([1 - fy, fy])[None, :]
    return (wzy[:, :, None] * torch.stack([1 - fx, fx])[None, None]).reshape(8, *fx.shape)


def _symmetrise(fields: torch.Tensor, ops: torch.Tensor, radius: int, chunk: int = 1 << 20) -> torch.Tensor:
    """Add to each point v of the grids (3, 2c + 1, 2c + 1, c + 1) (data, real and imaginary, and
    weight) the values sampled at R v for every operator R but the identity
    (BackProjector::applyPointGroupSymmetry); points within `radius` of the origin only. In place.

    Samples are trilinear (grid_sample); a point R v with x < 0 is read at -R v and conjugated.
    """
    shape = fields.shape[1:]
    c = shape[0] // 2
    k = torch.arange(shape[0], device=fields.device) - c
    z, y, x = torch.meshgrid(k, k, torch.arange(shape[2], device=fields.device), indexing="ij")
    inside = torch.nonzero((x * x + y * y + z * z <= radius * radius).reshape(-1)).squeeze(1)
    xyz = torch.stack([x, y, z], -1).reshape(-1, 3)[inside].to(fields.dtype)
    # grid_sample's normalised coordinates (align_corners=True): -1 and 1 are the first and last index.
    to_unit = torch.tensor([2.0 / (shape[2] - 1), 1.0 / c, 1.0 / c], dtype=fields.dtype, device=fields.device)
    shift = torch.tensor([-1.0, 0.0, 0.0], dtype=fields.dtype, device=fields.device)
    total = fields.reshape(3, -1)[:, inside]
    for R in ops[1:].to(fields.dtype):
        for start in range(0, len(inside), chunk):
            p = xyz[start : start + chunk] @ (R.T * to_unit)
            sign = 1.0 - 2.0 * (p[:, 0] < 0).to(p.dtype)
            grid = (p * sign[:, None] + shift).reshape(1, -1, 1, 1, 3)
            samples = torch.nn.functional.grid_sample(fields[None], grid, mode="bilinear", align_corners=True)
            samples = samples.reshape(3, -1)
            samples[1] *= sign
            total[:, start : start + chunk] += samples
    fields.view(3, -1)[:, inside] = total
    return fields


# Bytes of complex128 in one slab of x planes of `_invert`: the whole transform up to box 63, 4 planes
# at box 256; below glibc's mmap threshold, so that the slabs' memory is reused.
_SLAB_BYTES = 1 << 24

# RELION's softMaskOutsideMap as relion_reconstruct calls it: beyond radius box / 2, over 3 voxels, the
# map is blended to its mean there.
_EDGE_WIDTH = 3.0


def _invert(
    fields: torch.Tensor,
    plane: torch.Tensor,
    box: int,
    pad: int,
    r_max: int,
    regularisation: torch.Tensor | None,
) -> torch.Tensor:
    """Divide, inverse transform, crop, soft-mask the corners, gridding-correct (BackProjector::reconstruct).

    fields: the centred grids (3, 2c + 1, 2c + 1, c + 1) (data, real and imaginary, and weight), whose
    x = 0 plane is taken from `plane` (3, 2c + 1, 2c + 1) instead. The weight is floored at 1/1000 of
    its radial mean (shells of the unpadded box, floor(r / pad), below radius pad * r_max; the last
    shell's floor on that radius), with `regularisation` added below it, and divides the data.

    The padded transform (p = pad * box) is never built whole, and all of it is computed on the CPU in
    float64, as RELION's CPU code does, whatever the grids' device. Slab by slab of x planes, the
    compiled `_divide_kernel` places the divided frequencies on the FFT grid; they are inverse
    transformed along z, the central box of z rows is kept (cropping in real space commutes with the
    other axes' transforms), and only those rows are transformed along y and cropped; then the kept
    lines are transformed along x and cropped. This is irfftn of the padded grid, cropped, to
    rounding, with the transforms along y and x on a half and a quarter of the lines; the transforms
    are scipy's, on `torch.get_num_threads()` threads (each line transformed alike whatever the count).
    """
    p, rp, h = pad * box, pad * r_max, pad * box // 2 + 1
    workers = torch.get_num_threads()
    grids, plane = fields.cpu().numpy(), plane.cpu().numpy()
    prior = np.zeros(0) if regularisation is None else regularisation.cpu().to(torch.float64).numpy()

    rows = plane.shape[1]
    sums = np.zeros((rows, r_max), dtype=np.float64)  # per z row of the grids, then summed in order
    counts = np.zeros((rows, r_max), dtype=np.int64)
    run_in_runs(_shell_sums_kernel, (sums, counts, grids, plane, prior, pad, rp), rows, workers, least=1)
    floor = sums.sum(0) / (1000.0 * np.maximum(counts.sum(0), 1))
    floor = np.append(floor, floor[-1])

    planes = max(1, _SLAB_BYTES // (16 * p * p))
    kept = np.empty((box, box, h), dtype=np.complex128)
    buffer = np.empty(p * p * min(planes, h), dtype=np.complex128)
    for x0 in range(0, h, planes):
        x1 = min(x0 + planes, h)
        f = buffer[: p * p * (x1 - x0)].reshape(p, p, x1 - x0)
        args = (f.view(np.float64).reshape(p, p, x1 - x0, 2), grids, plane, floor, prior, pad, rp, x0)
        run_in_runs(_divide_kernel, args, p, workers, least=1)
        f = scipy.fft.ifft(f, axis=0, overwrite_x=True, workers=workers)
        f = scipy.fft.ifft(_centred_box(f, box, 0), axis=1, overwrite_x=True, workers=workers)
        kept[:, :, x0:x1] = _centred_box(f, box, 1)
    vol = np.empty((box, box, box), dtype=np.float64)
    planes = max(1, _SLAB_BYTES // (8 * box * p))
    for z in range(0, box, planes):
        lines = scipy.fft.irfft(kept[z : z + planes], n=p, axis=2, workers=workers)
        vol[z : z + planes] = _centred_box(lines, box, 2)
    del kept

    edge = np.zeros((box, 2), dtype=np.float64)  # per z plane: sums of edge * map and of edge
    run_in_runs(_edge_sums_kernel, (edge, vol), box, workers, least=1)
    background = edge[:, 0].sum() / edge[:, 1].sum()
    out = np.empty((box, box, box), dtype=np.float32)
    run_in_runs(_soft_mask_gridding_kernel, (out, vol, background, p), box, workers, least=1)
    return torch.from_numpy(out).to(fields.device)


def _invert_torch(
    fields: torch.Tensor,
    plane: torch.Tensor,
    box: int,
    pad: int,
    r_max: int,
    regularisation: torch.Tensor | None,
) -> torch.Tensor:
    """`_invert` in torch on the grids' device (the GPU's way), in float64, step for step: the shell
    sums of `_shell_sums_kernel`, the division of `_divide_kernel` placed on the whole FFT-order half
    grid (p, p, p // 2 + 1) at once, the transforms along z, y and x each followed by its crop, the
    sums of `_edge_sums_kernel` and the pass of `_soft_mask_gridding_kernel`.

    The sums are torch's reductions rather than the compiled loops' row-by-row order, so the map
    agrees with `_invert`'s to rounding, not bit for bit. Unlike `_invert` it holds the whole padded
    transform, complex128 (p, p, p // 2 + 1) with p = pad * box, and a float64 copy of the grids on
    their device: 1.1 GB at box 256 and 3.6 GB at box 384 for pad 2, with the transforms' temporaries
    about twice that.
    """
    device = fields.device
    p, rp, h = pad * box, pad * r_max, pad * box // 2 + 1
    c = fields.shape[1] // 2
    grids = fields.to(torch.float64, copy=True)  # the caller's grids stay as they are
    grids[..., 0] = plane
    k = torch.arange(-c, c + 1, device=device)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + torch.arange(c + 1, device=device) ** 2
    r = torch.sqrt(r2.to(torch.float64))
    below, kept = r2 < rp * rp, r2 <= rp * rp
    weight = grids[2]
    if regularisation is not None:
        prior = regularisation.to(device, torch.float64)
        shells = torch.round(r / pad).long().clamp(max=len(prior) - 1)  # round half to even, as np.rint
        weight = torch.where(below, weight + prior[shells], weight)
    shell = torch.floor(r / pad).long()
    sums = torch.zeros(r_max, dtype=torch.float64, device=device).index_add_(0, shell[below], weight[below])
    counts = torch.bincount(shell[below], minlength=r_max)
    floor = sums / (1000.0 * counts.clamp(min=1))
    floor = torch.cat([floor, floor[-1:]])
    w = torch.maximum(weight, floor[torch.where(below, shell, r_max)])
    scale = torch.where(w > 0, 1.0 / torch.where(w > 0, w, 1.0), 1.0)
    divided = torch.where(kept, torch.complex(grids[0] * scale, grids[1] * scale), 0)

    # Frequency f of z and y goes to FFT index f mod p, from -(p - p // 2 - 1) to p // 2 (RELION's +p // 2
    # at p // 2); everything beyond radius rp is zero.
    low, high, width = min(c, p - p // 2 - 1), min(c, p // 2), min(c + 1, h)
    index = torch.arange(-low, high + 1, device=device) % p
    f = torch.zeros((p, p, h), dtype=torch.complex128, device=device)
    f[index[:, None], index[None, :], :width] = divided[c - low : c + high + 1, c - low : c + high + 1, :width]
    crop = (torch.arange(box, device=device) - box // 2) % p  # `_centred_box`
    f = torch.fft.ifft(f, dim=0)[crop]
    f = torch.fft.ifft(f, dim=1)[:, crop]
    vol = torch.fft.irfft(f, n=p, dim=2)[..., crop]
    del f

    a = torch.arange(box, device=device, dtype=torch.float64) - box // 2
    r = torch.sqrt(a[:, None, None] ** 2 + a[None, :, None] ** 2 + a[None, None, :] ** 2)
    radius = box / 2.0
    blend = 0.5 + 0.5 * torch.cos(math.pi * (radius + _EDGE_WIDTH - r) / _EDGE_WIDTH)
    edge = torch.where(r < radius, 0.0, torch.where(r > radius + _EDGE_WIDTH, 1.0, blend))  # `_edge`
    background = (edge * vol).sum() / edge.sum()
    vol = torch.where(edge < 0.5, vol + edge * (background - vol), background - (background - vol) * (1.0 - edge))
    angle = math.pi * torch.where(r > 0, r, 1.0) / p
    sinc = torch.where(r > 0, torch.sin(angle) / angle, 1.0)
    return (vol / (sinc * sinc)).to(torch.float32)


@compiled
def _edge(r: float, box: int) -> float:
    """softMaskOutsideMap's blend to the background at radius r: 0 inside box / 2, 1 beyond the edge."""
    radius = box / 2.0
    if r < radius:
        return 0.0
    if r > radius + _EDGE_WIDTH:
        return 1.0
    return 0.5 + 0.5 * math.cos(math.pi * (radius + _EDGE_WIDTH - r) / _EDGE_WIDTH)


@compiled
def _edge_sums_kernel(sums: np.ndarray, vol: np.ndarray, start: int, stop: int) -> None:
    """For the z planes [start, stop) of a map (box, box, box): sum of edge * map and of edge."""
    box = vol.shape[0]
    c = box // 2
    for z in range(start, stop):
        for y in range(box):
            for x in range(box):
                e = _edge(math.sqrt((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2), box)
                if e > 0:
                    sums[z, 0] += e * vol[z, y, x]
                    sums[z, 1] += e


@compiled
def _soft_mask_gridding_kernel(
    out: np.ndarray, vol: np.ndarray, background: float, p: int, start: int, stop: int
) -> None:
    """z planes [start, stop) of the finished map: the map blended to `background` by the edge (as
    torch.lerp), then divided by sinc^2(r / p), the transform of the trilinear kernel squared."""
    box = vol.shape[0]
    c = box // 2
    for z in range(start, stop):
        for y in range(box):
            for x in range(box):
                r = math.sqrt((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2)
                e = _edge(r, box)
                v = vol[z, y, x]
                v = v + e * (background - v) if e < 0.5 else background - (background - v) * (1.0 - e)
                sinc = 1.0
                if r > 0:
                    a = math.pi * r / p
                    sinc = math.sin(a) / a
                out[z, y, x] = v / (sinc * sinc)


@compiled
def _shell_sums_kernel(
    sums: np.ndarray, counts: np.ndarray, grids: np.ndarray, plane: np.ndarray, prior: np.ndarray,
    pad: int, rp: int, start: int, stop: int,
) -> None:
    """For the rows z in [start, stop) of the centred grids (see `_invert`): the weight (plus
    prior[round(r / pad)], if any) and the number of points in each shell floor(r / pad) (r_max,)
    below radius rp = pad * r_max, into sums[z] and counts[z]."""
    c = grids.shape[1] // 2
    for zi in range(start, stop):
        fz = zi - c
        for yi in range(grids.shape[2]):
            fy = yi - c
            for x in range(grids.shape[3]):
                r2 = fz * fz + fy * fy + x * x
                if r2 >= rp * rp:
                    break
                w = np.float64(plane[2, zi, yi] if x == 0 else grids[2, zi, yi, x])
                r = math.sqrt(r2)
                if prior.shape[0]:
                    w += prior[min(int(np.rint(r / pad)), prior.shape[0] - 1)]
                shell = math.floor(r / pad)
                sums[zi, shell] += w
                counts[zi, shell] += 1


@compiled
def _divide_kernel(
    out: np.ndarray, grids: np.ndarray, plane: np.ndarray, floor: np.ndarray, prior: np.ndarray,
    pad: int, rp: int, x0: int, start: int, stop: int,
) -> None:
    """Rows [start, stop) of the x planes x0.. of the FFT-order half grid (p, p, planes, 2) (real and
    imaginary parts) of a p^3 transform: data / max(weight (+ prior), floor[shell]) within radius rp
    of the centred grids (see `_invert`), zero beyond. Along z and y, index k holds frequency k for
    k <= p // 2 and k - p above (RELION's choice: +p // 2 at p // 2)."""
    p = out.shape[0]
    c = grids.shape[1] // 2
    last = floor.shape[0] - 1
    # The grid reads and the prior are written out here and in `_shell_sums_kernel` rather than shared
    # through compiled helpers: with helpers this loop took 1.5-2.2 s instead of 0.7 s per map at box 256.
    for kz in range(start, stop):
        fz = kz if kz <= p // 2 else kz - p
        for ky in range(p):
            fy = ky if ky <= p // 2 else ky - p
            for j in range(out.shape[2]):
                x = x0 + j
                r2 = fz * fz + fy * fy + x * x
                if r2 > rp * rp:
                    out[kz, ky, j, 0] = 0.0
                    out[kz, ky, j, 1] = 0.0
                    continue
                zi, yi = fz + c, fy + c
                if x == 0:
                    re, im, w = np.float64(plane[0, zi, yi]), np.float64(plane[1, zi, yi]), np.float64(plane[2, zi, yi])
                else:
                    re, im, w = np.float64(grids[0, zi, yi, x]), np.float64(grids[1, zi, yi, x]), np.float64(grids[2, zi, yi, x])
                r = math.sqrt(r2)
                shell = last
                if r2 < rp * rp:
                    shell = math.floor(r / pad)
                    if prior.shape[0]:
                        w += prior[min(int(np.rint(r / pad)), prior.shape[0] - 1)]
                w = max(w, floor[shell])
                # A real reciprocal times both parts is what complex division by (w + 0i) computes.
                scale = 1.0 / w if w > 0 else 1.0
                out[kz, ky, j, 0] = re * scale
                out[kz, ky, j, 1] = im * scale


def _centred_box(volume: np.ndarray, box: int, axis: int) -> np.ndarray:
    """The central `box` points along `axis` of an FFT-order array, the origin moved to index
    box // 2: fftshift, then crop, as block copies."""
    half, p = box // 2, volume.shape[axis]
    lead = (slice(None),) * axis
    return np.concatenate([volume[(*lead, slice(p - half, p))], volume[(*lead, slice(0, box - half))]], axis)


def reconstruct(
    images: torch.Tensor,
    rotations: torch.Tensor,
    origins_px: torch.Tensor | None,
    ctf: torch.Tensor | None,
    box: int,
    sym: str = "C1",
    pad: int = 2,
    r_max: int | None = None,
    regularisation: torch.Tensor | None = None,
    ctf_premultiplied: bool = False,
) -> torch.Tensor:
    """Reconstruct from images already in memory, on the images' device. Returns (N, N, N) float32.

    Parameters
    ----------
    images : torch.Tensor
        (B, N, N) real images [y, x], centred at index N // 2.
    rotations : torch.Tensor
        (B, 3, 3) RELION matrices A.
    origins_px : torch.Tensor or None
        (B, 2) rlnOriginX/Y as (x, y) pixels, or None.
    ctf : torch.Tensor or None
        (B, N, N // 2 + 1) CTFs on the unshifted rfft grid, or None.
    box : int
        Image size N (pixels).
    sym : str
        RELION point group.
    pad : int
        Padding factor.
    r_max : int or None
        Largest inserted radius (Fourier pixels of the image; None: N // 2).
    regularisation : torch.Tensor or None
        Per-shell term added to the weight (`FourierAccumulator.finalise`).
    ctf_premultiplied : bool
        The images already carry one CTF factor.

    Returns
    -------
    torch.Tensor
        (N, N, N) float32 [z, y, x] on the images' device, centred at N // 2.
    """
    acc = FourierAccumulator(box, pad=pad, r_max=r_max, device=images.device)
    acc.insert(images, rotations, ctf=ctf, origins=origins_px, ctf_premultiplied=ctf_premultiplied)
    return acc.finalise(sym=sym, regularisation=regularisation)
