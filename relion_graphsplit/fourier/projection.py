"""Forward projection of a 3D map by the Fourier slice theorem, as relion_project does it.

RELION (projector.cpp) divides the map by sinc^2(r / M) (the transform of the trilinear kernel on the
padded grid of size M = pad * N), pads it to M^3, Fourier transforms it once, keeps the transform
inside the Nyquist sphere, and for each image samples the transform trilinearly at pad * A^T (kx, ky, 0)
for every pixel (kx, ky) of the N x N rfft grid with |k| <= N / 2 (Friedel mates for x < 0).
The sampling is written out rather than taken from torch-fourier-slice: that library samples an
fftshifted transform and leaves padding, gridding correction and RELION's Nyquist sphere to the
caller, so matching relion_project would need shifting, cropping and masking around it. Sampling
RELION's own layout (real and imaginary parts apart, several maps at once) matches relion_project to
float precision. On the CPU it is a compiled loop (numba) over images and pixels, split among threads
by image, with coordinates and weights in float64: 3 to 4.6 times as fast as torch's grid_sample at
boxes 26 to 64 (`scripts/bench_projection.py`; docs/notes/speed-history.md). The same loop's
`slice_values` serves the refinement's likelihood (refine.py), which sums over a slice as it samples.
On other devices the same trilinear sampling is written out in torch (`central_slices`), with
coordinates, weights and sums in float64 too, so that both agree to rounding.

Real-space projections are P(x, y) = sum_z V(A^T (x, y, z)) in voxel units (RELION's scaling), with
the origin at index N // 2 in both the map and the image. RELION works with even boxes; for odd ones
relion_project's images are one pixel off this (its CenterFFT puts their origin at N // 2 + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from relion_graphsplit.fourier.compiled import compiled, run_in_runs, runs_compiled


@dataclass(frozen=True)
class PreparedVolume:
    """The padded, gridding-corrected transforms of one map or a stack of maps, laid out for sampling.

    Made by `prepare_volume`; M = `padded_box` is the padded size (even).

    Attributes
    ----------
    data : torch.Tensor
        (K, 2, M + 3, M + 3, M // 2 + 2) real (float32, or float64 from float64 maps): the real and
        imaginary parts of map k's F(kz, ky, kx) at index (k, ., kz + M // 2 + 1, ky + M // 2 + 1, kx)
        for kx >= 0 (integer frequencies of the padded grid, kz and ky from -M // 2 + 1 to M // 2),
        zero beyond the Nyquist sphere and in the one-voxel margin, so that every trilinear neighbour
        of a point inside the sphere is in range.
    box : int
        N, the maps' size (voxels).
    pad : int
        The padding factor.
    stacked : bool
        Prepared from a stack (K, N, N, N) rather than one map (N, N, N) (then K = 1).
    """

    data: torch.Tensor
    box: int
    pad: int
    stacked: bool

    @property
    def padded_box(self) -> int:
        """M, the size of the padded grid: pad * N, made even."""
        return self.data.shape[-1] * 2 - 4

    def to(self, device: torch.device | str) -> PreparedVolume:
        """The same transforms on `device` (where `project_rfft` and `central_slices` then sample)."""
        return replace(self, data=self.data.to(device))


def gridding_correction(box: int, padded_box: int) -> torch.Tensor:
    """sinc^2(r / padded_box) over a box^3 map, r in voxels from index box // 2 (1 at the centre).

    The transform of the trilinear kernel on the padded grid, squared; maps are divided by it before
    they are padded and transformed (RELION's projector.cpp).

    Parameters
    ----------
    box : int
        Map size N (voxels).
    padded_box : int
        Size M of the padded grid.

    Returns
    -------
    torch.Tensor
        (N, N, N) float64, [z, y, x], with sinc(t) = sin(pi t) / (pi t).
    """
    coords = torch.arange(box, dtype=torch.float64) - box // 2
    r = torch.sqrt(coords[:, None, None] ** 2 + coords[None, :, None] ** 2 + coords[None, None, :] ** 2)
    return torch.sinc(r / padded_box) ** 2


def prepare_volume(volume: torch.Tensor, pad: int = 2) -> PreparedVolume:
    """Gridding-correct, pad and Fourier transform a map (N, N, N) [z, y, x], or a stack of maps
    (K, N, N, N), once for many projections. Float64 maps stay float64; others become float32.

    Parameters
    ----------
    volume : torch.Tensor
        (N, N, N) map or (K, N, N, N) stack of maps, [z, y, x], centred at index N // 2, on any device.
    pad : int
        Padding factor: the map is padded to M = pad * N (made even) in each dimension, and only
        frequencies up to radius pad * (N // 2) of the padded grid are kept (RELION's r_max = N / 2).

    Returns
    -------
    PreparedVolume
        The transforms laid out for `project_rfft`, `central_slices` and `slice_values`, on the
        volume's device.

    Raises
    ------
    ValueError
        If `volume` is not a cubic map or a stack of them.
    """
    n = volume.shape[-1]
    stacked = volume.dim() == 4
    if volume.shape[-3:] != (n, n, n) or volume.dim() not in (3, 4):
        raise ValueError(f"expected a cubic map or a stack of them, got shape {tuple(volume.shape)}")
    maps = volume.reshape(-1, n, n, n)
    m = pad * n + (pad * n) % 2
    real_dtype = torch.float64 if volume.dtype == torch.float64 else torch.float32
    device = volume.device
    corrected = (maps.to(torch.float64) / gridding_correction(n, m).to(device)).to(real_dtype)
    padded = torch.zeros((len(maps), m, m, m), dtype=real_dtype, device=device)
    lo = m // 2 - n // 2
    padded[:, lo : lo + n, lo : lo + n, lo : lo + n] = corrected
    ft = torch.fft.rfftn(torch.fft.ifftshift(padded, dim=(-3, -2, -1)), dim=(-3, -2, -1))
    del padded

    half = m // 2
    j = torch.arange(m, device=device)
    k = torch.where(j <= half, j, j - m)  # RELION keeps the Nyquist plane at +m/2
    kx = torch.arange(half + 1, device=device)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    max_r = n // 2 * pad  # RELION: ROUND(r_max * padding_factor), r_max = N / 2
    ft = ft.masked_fill_(r2 > max_r * max_r, 0)

    # Frequency k (from -half + 1 to half) goes to index k + half + 1; the roll puts k = -half + 1 first.
    data = torch.zeros((len(maps), 2, m + 3, m + 3, half + 2), dtype=real_dtype, device=device)
    rolled = torch.roll(ft, shifts=(half - 1, half - 1), dims=(-3, -2))
    data[:, 0, 2 : m + 2, 2 : m + 2, : half + 1] = rolled.real
    data[:, 1, 2 : m + 2, 2 : m + 2, : half + 1] = rolled.imag
    return PreparedVolume(data=data, box=n, pad=pad, stacked=stacked)


def rfft_frequencies(box: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer frequencies kx (box // 2 + 1,) and ky (box,) of the unshifted rfft grid of a box x box
    image (float64; RELION takes the Nyquist row as +N/2), and which pixels are inside the Nyquist
    circle (box, box // 2 + 1).

    Parameters
    ----------
    box : int
        Image size N (pixels).

    Returns
    -------
    kx : torch.Tensor
        (N // 2 + 1,) float64: 0, 1, ..., N // 2 (Fourier pixels; kx / (N * pixel size) in 1/A).
    ky : torch.Tensor
        (N,) float64 in FFT order: 0, 1, ..., then negative frequencies; index N // 2 of an even box
        is +N / 2.
    inside : torch.Tensor
        (N, N // 2 + 1) bool: kx^2 + ky^2 <= (N // 2)^2.
    """
    half = box // 2
    ky = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64)
    if box % 2 == 0:
        ky[half] = half
    kx = torch.arange(half + 1, dtype=torch.float64)
    return kx, ky, kx[None, :] ** 2 + ky[:, None] ** 2 <= half * half


def _slice_points(box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kx, ky) (P, 2) of the rfft pixels of a box x box image inside the Nyquist circle, and their mask."""
    kx, ky, inside = rfft_frequencies(box)
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    inside = inside.reshape(-1)
    return torch.stack([kxx.reshape(-1)[inside], kyy.reshape(-1)[inside]], dim=-1), inside


def project_rfft(volume: PreparedVolume, rotations: torch.Tensor) -> torch.Tensor:
    """Central slices (B, N, N // 2 + 1), complex, on the unshifted rfft grid of the N x N image;
    (K, B, N, N // 2 + 1) for a stack of K maps, which share the sampling coordinates.

    The result is torch.fft.rfft2 of the real-space projection with its origin at index N // 2, so
    `torch.fft.irfft2(out, s=(N, N))` equals `project(...)`, and a CTF from ctf.ctf_2d multiplies it
    directly. `rotations` are RELION's A matrices (B, 3, 3). On the CPU the trilinear sampling is the
    compiled `_gather_kernel`, elsewhere (and inside `compiled.torch_twins`) `central_slices`' torch
    code; they agree to rounding (the same float64 sums in the same order, not bit for bit).

    Parameters
    ----------
    volume : PreparedVolume
        One map or a stack of K maps from `prepare_volume`.
    rotations : torch.Tensor
        (B, 3, 3) RELION matrices A, which left-multiply xyz column vectors: image pixel (kx, ky)
        samples the map's transform at A^T (kx, ky, 0).

    Returns
    -------
    torch.Tensor
        (B, N, N // 2 + 1), or (K, B, N, N // 2 + 1) for a stack: complex64 (complex128 for float64
        maps) on the prepared data's device; rfft half grid, DC at [0, 0], rows in FFT order. Pixels
        outside the Nyquist circle (`rfft_frequencies`) are 0.
    """
    n, data = volume.box, volume.data
    k, b = data.shape[0], len(rotations)
    points, inside = _slice_points(n)
    dtype = torch.complex128 if data.dtype == torch.float64 else torch.complex64
    # The slices are relative to the centre; the phase moves the real-space origin to index N // 2.
    phase = centre_phase(n, dtype).reshape(-1)[inside]
    out = torch.zeros((k, b, n * (n // 2 + 1)), dtype=dtype, device=data.device)
    sample = _gather if runs_compiled(data.device) else _gather_torch
    sample(out, volume, points, torch.nonzero(inside).squeeze(1), phase, rotations)
    out = out.reshape(k, b, n, n // 2 + 1)
    return out if volume.stacked else out[0]


def _gather(
    out: torch.Tensor,
    volume: PreparedVolume,
    points: torch.Tensor,
    pixels: torch.Tensor,
    phase: torch.Tensor,
    rotations: torch.Tensor,
) -> None:
    """out[k, b, pixels] = the maps' values at pad * A_b^T (kx, ky, 0) times `phase`, by
    `_gather_kernel` on torch.get_num_threads() threads, each on its own run of images."""
    args = (
        out.numpy(),
        volume.data.numpy(),
        points[:, 0].contiguous().numpy(),
        points[:, 1].contiguous().numpy(),
        pixels.numpy(),
        phase.numpy(),
        rotations.to(torch.float64).contiguous().numpy(),
        volume.pad,
        volume.padded_box // 2 + 1,
    )
    run_in_runs(_gather_kernel, args, len(rotations), torch.get_num_threads())


@compiled
def _gather_kernel(
    out: np.ndarray, data: np.ndarray, kx: np.ndarray, ky: np.ndarray, pixels: np.ndarray, phase: np.ndarray,
    rotations: np.ndarray, pad: int, c: int, start: int, stop: int,
) -> None:
    """out[k, b, pixels] (K, B, *) = map k's value at pad * A_b^T (kx, ky, 0) (`slice_values`) times
    `phase`, for images b from start to stop."""
    values = np.empty(data.shape[0], dtype=np.complex128)
    for b in range(start, stop):
        a0, a1 = rotations[b, 0], rotations[b, 1]
        for p in range(kx.shape[0]):
            x = pad * (kx[p] * a0[0] + ky[p] * a1[0])
            y = pad * (kx[p] * a0[1] + ky[p] * a1[1])
            z = pad * (kx[p] * a0[2] + ky[p] * a1[2])
            slice_values(data, x, y, z, c, values)
            for k in range(data.shape[0]):
                out[k, b, pixels[p]] = values[k] * phase[p]


@compiled
def slice_values(data: np.ndarray, x: float, y: float, z: float, c: int, values: np.ndarray) -> None:
    """values[k] = the trilinear value of each prepared map k (`PreparedVolume.data`, (K, 2, M + 3,
    M + 3, M // 2 + 2)) at the padded grid's frequency (x, y, z) inside the Nyquist sphere: (x, y, z)
    is at index (z + c, y + c, x), c = M // 2 + 1, and a point with x < 0 is the complex conjugate of
    the value at -(x, y, z).

    Compiled (numba), for other compiled loops (`_gather_kernel`, the refinement's likelihood). It
    does not check bounds: the point must lie within radius M / 2 of the origin.

    Parameters
    ----------
    data : np.ndarray
        `PreparedVolume.data` as an array, (K, 2, M + 3, M + 3, M // 2 + 2).
    x, y, z : float
        The frequency in Fourier pixels of the padded grid (pad times the image's frequency; for an
        image pixel (kx, ky) and matrix A, pad * A^T (kx, ky, 0)).
    c : int
        M // 2 + 1 (`PreparedVolume.padded_box // 2 + 1`), the index of frequency 0 along z and y.
    values : np.ndarray
        (K,) complex128, written in place.

    Returns
    -------
    None
        The values are written into `values`.
    """
    conjugate = x < 0
    if conjugate:
        x, y, z = -x, -y, -z
    x0, y0, z0 = math.floor(x), math.floor(y), math.floor(z)
    fx, fy, fz = x - x0, y - y0, z - z0
    ix, iy, iz = int(x0), int(y0) + c, int(z0) + c
    for k in range(data.shape[0]):
        re = 0.0
        im = 0.0
        for dz in range(2):
            wz = fz if dz else 1 - fz
            for dy in range(2):
                wzy = wz * (fy if dy else 1 - fy)
                for dx in range(2):
                    w = wzy * (fx if dx else 1 - fx)
                    re += w * data[k, 0, iz + dz, iy + dy, ix + dx]
                    im += w * data[k, 1, iz + dz, iy + dy, ix + dx]
        values[k] = complex(re, -im if conjugate else im)


def _gather_torch(
    out: torch.Tensor,
    volume: PreparedVolume,
    points: torch.Tensor,
    pixels: torch.Tensor,
    phase: torch.Tensor,
    rotations: torch.Tensor,
) -> None:
    """As `_gather`, in torch on any device (the GPU's way): `_trilinear_slices` times `phase`."""
    values = _trilinear_slices(volume.data, points, rotations, volume.pad)
    out[..., pixels.to(out.device)] = (values * phase.to(out.device)).to(out.dtype)


def central_slices(volume: PreparedVolume, rotations: torch.Tensor) -> torch.Tensor:
    """The prepared maps' values at pad * A^T (kx, ky, 0) for every pixel (kx, ky) of the unshifted
    rfft grid of an N x N image: `slice_values` over a batch of images, in torch on any device.

    These are the central slices relative to the centre, the refinement's centred projections: times
    `centre_phase` they are `project_rfft`'s. Coordinates, trilinear weights and sums are float64, and
    each value adds its 8 neighbours in `slice_values`' order (z, then y, then x), so that the values
    agree with the compiled loops' to rounding (not bit for bit: torch may fuse or reorder the
    products). For K maps and B images it holds float64 sums of 2K x B x P (P the pixels inside the
    Nyquist circle), the B x P coordinates, weights and indices, and the complex128 result: the batch
    size bounds its memory.

    Parameters
    ----------
    volume : PreparedVolume
        One map or a stack of K maps from `prepare_volume`, on the device to sample on (`.to`).
    rotations : torch.Tensor
        (B, 3, 3) RELION matrices A, which left-multiply xyz column vectors: image pixel (kx, ky)
        samples the map's transform at A^T (kx, ky, 0), in Fourier pixels of the padded grid after
        scaling by pad.

    Returns
    -------
    torch.Tensor
        (B, N, N // 2 + 1), or (K, B, N, N // 2 + 1) for a stack: complex128 on the prepared data's
        device; rfft half grid, DC at [0, 0], rows in FFT order with RELION's Nyquist row +N / 2
        (`rfft_frequencies`). Pixels outside the Nyquist circle are 0.
    """
    n, data = volume.box, volume.data
    points, inside = _slice_points(n)
    values = _trilinear_slices(data, points, rotations, volume.pad)
    out = torch.zeros((data.shape[0], len(rotations), n * (n // 2 + 1)), dtype=torch.complex128, device=data.device)
    out[..., torch.nonzero(inside).squeeze(1).to(data.device)] = values
    out = out.reshape(data.shape[0], len(rotations), n, n // 2 + 1)
    return out if volume.stacked else out[0]


def _trilinear_slices(data: torch.Tensor, points: torch.Tensor, rotations: torch.Tensor, pad: int) -> torch.Tensor:
    """(K, B, P) complex128: `slice_values` of the prepared maps `data` (K, 2, M + 3, M + 3, M // 2 + 2)
    at pad * A_b^T (kx, ky, 0) for every rotation A_b (B, 3, 3) and point (kx, ky) of `points` (P, 2),
    which lie inside the Nyquist circle; on `data`'s device, with float64 coordinates, weights and sums,
    the 8 neighbours added in `slice_values`' order."""
    device = data.device
    k, size, width = data.shape[0], data.shape[-2], data.shape[-1]
    c = size // 2  # M // 2 + 1, the index of frequency 0 along z and y
    # Rows kx A_0 + ky A_1 = A^T (kx, ky, 0) as (x, y, z).
    xyz = pad * (points.to(device, torch.float64) @ rotations[:, :2, :].to(device, torch.float64))  # (B, P, 3)
    conjugate = xyz[..., 0] < 0  # the grid holds x >= 0: F(-k) = conj F(k)
    xyz = torch.where(conjugate[..., None], -xyz, xyz)
    lo = torch.floor(xyz)
    fx, fy, fz = (xyz - lo).unbind(-1)
    lo = lo.long()
    base = ((lo[..., 2] + c) * size + lo[..., 1] + c) * width + lo[..., 0]
    flat = data.reshape(2 * k, -1)
    sums = torch.zeros((2 * k, *base.shape), dtype=torch.float64, device=device)
    for dz in range(2):
        wz = fz if dz else 1 - fz
        for dy in range(2):
            wzy = wz * (fy if dy else 1 - fy)
            for dx in range(2):
                w = wzy * (fx if dx else 1 - fx)
                sums += w * flat[:, base + ((dz * size + dy) * width + dx)].to(torch.float64)
    real, imag = sums.reshape(k, 2, *base.shape).unbind(1)
    return torch.complex(real, torch.where(conjugate, -imag, imag))


def rfft_weights(box: int) -> torch.Tensor:
    """How many pixels of the full 2D transform of a box x box image each pixel of its unshifted rfft
    grid (box, box // 2 + 1) stands for in a sum over all of them (float64): 2 for a pixel and its
    Friedel mate, 1 on the x = 0 column and, for an even box, the Nyquist column.

    Parameters
    ----------
    box : int
        Image size N (pixels).

    Returns
    -------
    torch.Tensor
        (N, N // 2 + 1) float64 of 1s and 2s: with it, a sum over the rfft half grid of a quantity
        that is the same at Friedel mates (|F|^2 of a real image) equals the sum over the full N x N
        transform.
    """
    weights = torch.full((box, box // 2 + 1), 2.0, dtype=torch.float64)
    weights[:, 0] = 1.0
    if box % 2 == 0:
        weights[:, -1] = 1.0
    return weights


def centre_phase(box: int, dtype: torch.dtype) -> torch.Tensor:
    """exp(-2 pi i k . c / N) with c = N // 2: the transform of a shift of the origin to index N // 2.

    Parameters
    ----------
    box : int
        Image size N (pixels).
    dtype : torch.dtype
        Complex dtype of the result.

    Returns
    -------
    torch.Tensor
        (N, N // 2 + 1) on the unshifted rfft grid (k in integer Fourier pixels); `shift_phase` for
        the shift (N // 2, N // 2).
    """
    return shift_phase(box, torch.tensor([[box // 2, box // 2]], dtype=torch.float64))[0].to(dtype)


def shift_phase(box: int, shifts_px: torch.Tensor) -> torch.Tensor:
    """exp(-2 pi i (kx sx + ky sy) / N) on the unshifted rfft grid, (B, box, box // 2 + 1) complex128.

    Multiplying an image's rfft2 by it translates the image by +s: out(x) = in(x - s).

    Parameters
    ----------
    box : int
        Image size N (pixels).
    shifts_px : torch.Tensor
        (B, 2) shifts (sx, sy) in pixels, on any device.

    Returns
    -------
    torch.Tensor
        (B, N, N // 2 + 1) complex128 on the shifts' device; kx, ky integer frequencies in FFT order
        (torch.fft.fftfreq times N: the Nyquist row of an even box is -N / 2).
    """
    ky = torch.fft.fftfreq(box, dtype=torch.float64, device=shifts_px.device)
    kx = torch.fft.rfftfreq(box, dtype=torch.float64, device=shifts_px.device)
    s = shifts_px.to(torch.float64)
    phase = kx[None, None, :] * s[:, 0, None, None] + ky[None, :, None] * s[:, 1, None, None]
    return torch.polar(torch.ones_like(phase), -2.0 * math.pi * phase)


def shift_images(images_rfft: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Translate images given as rfft2 (B, N, N // 2 + 1) by shifts (B, 2) as (x, y) pixels.

    A positive shift moves the content towards higher x / y indices: out(x) = in(x - s). RELION's
    particle image is image(x) = P(x + o), the projection shifted by -o (o = origin in pixels).

    Parameters
    ----------
    images_rfft : torch.Tensor
        (B, N, N // 2 + 1) complex: torch.fft.rfft2 of the images (unshifted grid, DC at [0, 0]).
    shifts_px : torch.Tensor
        (B, 2) shifts s as (x, y) in pixels: +origin centres RELION particles, -origin makes particle
        images of centred projections; on any device.

    Returns
    -------
    torch.Tensor
        (B, N, N // 2 + 1) of images_rfft's dtype and device: the translated images' rfft2.
    """
    box = images_rfft.shape[-2]
    return images_rfft * shift_phase(box, shifts_px.to(images_rfft.device)).to(images_rfft.dtype)


def project(volume: torch.Tensor, rotations: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Real-space projections (B, N, N) of a map (N, N, N) [z, y, x] along RELION matrices (B, 3, 3).

    P(x, y) = sum_z V(A^T (x, y, z)) in voxel units (RELION's scaling), origins at index N // 2 of
    the map and the images; computed as irfft2 of `project_rfft`.

    Parameters
    ----------
    volume : torch.Tensor
        (N, N, N) map [z, y, x] on any device, centred at index N // 2; a stack (K, N, N, N) is taken too.
    rotations : torch.Tensor
        (B, 3, 3) RELION matrices A, which left-multiply xyz column vectors: a map point r (from the
        centre) lands at (A r)_xy.
    pad : int
        Padding factor of the Fourier sampling (`prepare_volume`).

    Returns
    -------
    torch.Tensor
        (B, N, N) [y, x], or (K, B, N, N) for a stack; float32 (float64 for float64 maps).
    """
    n = volume.shape[-1]
    slices = project_rfft(prepare_volume(volume, pad), rotations)
    return torch.fft.irfft2(slices, s=(n, n))
