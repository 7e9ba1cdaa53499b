"""Image preparation before the per-cone analysis: centring, downsampling and CTF correction.

The thesis assumed CTF-corrected images. With a real defocus spread the first principal component then
follows the CTF and the signal shared by both classes rather than the heterogeneity. The default here
removes from every image its CTF-modulated projection of the consensus map (scaled per image by least
squares), so what is left is the difference between the particle's state and the average plus noise,
and then multiplies by the CTF once more: under white noise the correlation of an image with the
CTF-modulated difference is the likelihood-ratio statistic, so the residual times the CTF is the space
in which the first component is a matched filter. docs/benchmarks.md has the measurements behind this.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from relion_graphsplit.engine import CPU, LOCAL, Compute, Engine, StoredArray, ordered_sum, tasks_of
from relion_graphsplit.fourier.ctf import CTFParams, ctf_2d
from relion_graphsplit.fourier.projection import PreparedVolume, prepare_volume, project_rfft, rfft_weights, shift_images
from relion_graphsplit.fourier.reconstruct import FourierAccumulator
from relion_graphsplit.method.options import MIN_WORKING_BOX, CtfCorrection, SplitOptions
from relion_graphsplit.method.progress import Track, no_progress
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.scratch import ScratchArray, row_batches


def working_box(box: int, pixel_size: float, maxres: float | None, resize: int | None) -> int:
    """Even box to work at: `resize` if given, else the box whose Nyquist is `maxres` but at least
    MIN_WORKING_BOX pixels; never above the box.

    Parameters
    ----------
    box : int
        The particles' box (pixels).
    pixel_size : float
        Their pixel size (A).
    maxres : float or None
        Resolution (A) to put at the working Nyquist: round(2 box pixel_size / maxres) pixels, at least
        MIN_WORKING_BOX (32). None: the full box.
    resize : int or None
        Explicit working box (pixels); overrides `maxres`.

    Returns
    -------
    int
        The working box w: clipped to [8, box], then rounded down to even. The working pixel size is
        pixel_size * box / w.
    """
    if resize is not None:
        n = resize
    elif maxres is not None:
        n = max(MIN_WORKING_BOX, int(round(box * 2.0 * pixel_size / maxres)))
    else:
        n = box
    n = max(8, min(box, n))
    return n - n % 2


def fourier_crop(images_rfft: torch.Tensor, n: int) -> torch.Tensor:
    """Crop an unshifted rfft (..., N, N // 2 + 1) to (..., n, n // 2 + 1): downsampling to n pixels.

    Values are rescaled so that the real-space images keep their grey levels.

    Parameters
    ----------
    images_rfft : torch.Tensor
        (..., N, N // 2 + 1) complex, unshifted rfft2 of N x N images.
    n : int
        The new box (pixels), even and at most N.

    Returns
    -------
    torch.Tensor
        (..., n, n // 2 + 1): rows of frequencies 0..n/2 - 1 and -n/2..-1 and columns 0..n/2, times
        (n / N)^2; the input itself when n == N.
    """
    big = images_rfft.shape[-2]
    if n == big:
        return images_rfft
    device = images_rfft.device
    rows = torch.cat([torch.arange(n // 2, device=device), torch.arange(big - n // 2, big, device=device)])
    return images_rfft[..., rows, : n // 2 + 1] * (n / big) ** 2


def centre_downsampled(images_rfft: torch.Tensor, origins_px: torch.Tensor, n: int) -> torch.Tensor:
    """Crop unshifted rffts (B, N, N // 2 + 1) to n pixels (`fourier_crop`) and translate each image by
    +origin (B, 2), in pixels of the N box, as RELION centres particles.

    Shifting after the crop gives the kept frequencies the same phases as shifting the whole transform
    would, and computes only theirs (at box 256 to 50, a 25th).

    Parameters
    ----------
    images_rfft : torch.Tensor
        (B, N, N // 2 + 1) complex, unshifted rfft2 of the particle images.
    origins_px : torch.Tensor
        (B, 2) the particles' origins (rlnOriginX/Y) as (x, y) in pixels of the N box; a particle's
        centre lies at the image centre minus its origin.
    n : int
        The working box (pixels).

    Returns
    -------
    torch.Tensor
        (B, n, n // 2 + 1) unshifted rfft2 of the downsampled images, translated by +origin (scaled to
        n / N pixels) so that each particle's centre is at the image centre.
    """
    return shift_images(fourier_crop(images_rfft, n), origins_px * (n / images_rfft.shape[-2]))


def fourier_crop_volume(volume: torch.Tensor, n: int) -> torch.Tensor:
    """Downsample a cubic volume [z, y, x] to n^3 by cropping its Fourier transform.

    Parameters
    ----------
    volume : torch.Tensor
        (N, N, N) [z, y, x] map.
    n : int
        The new box (pixels), at most N.

    Returns
    -------
    torch.Tensor
        (n, n, n) float32, the transform cropped in float64 and scaled by (n / N)^3 so that the grey
        levels are kept; the volume itself (as float32) when n == N.
    """
    big = volume.shape[-1]
    if n == big:
        return volume.to(torch.float32)
    f = torch.fft.rfftn(volume.to(torch.float64), dim=(-3, -2, -1))
    keep = torch.cat([torch.arange(n // 2), torch.arange(big - n // 2, big)])
    f = f[keep][:, keep][:, :, : n // 2 + 1] * (n / big) ** 3
    return torch.fft.irfftn(f, s=(n, n, n), dim=(-3, -2, -1)).to(torch.float32)


def subtract_consensus(images_rfft: torch.Tensor, model_rfft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images less their model (the CTF-modulated consensus projection) scaled by least squares, and
    the scales (B,).

    Parameters
    ----------
    images_rfft : torch.Tensor
        (B, n, n // 2 + 1) complex, unshifted rfft2 of the images.
    model_rfft : torch.Tensor
        (B, n, n // 2 + 1) complex, their models on the same grid.

    Returns
    -------
    residual : torch.Tensor
        (B, n, n // 2 + 1) complex, images_rfft - a model_rfft.
    scale : torch.Tensor
        (B,) the scales a (`least_squares_scale`).
    """
    scale = least_squares_scale(images_rfft, model_rfft)
    return images_rfft - scale[:, None, None] * model_rfft, scale


def least_squares_scale(images_rfft: torch.Tensor, model_rfft: torch.Tensor) -> torch.Tensor:
    """Per-image a minimising |image - a model|^2 over the half-plane (DC excluded), shape (B,).

    The sums count each rfft coefficient as often as it stands in the full plane (`rfft_weights`).

    Parameters
    ----------
    images_rfft, model_rfft : torch.Tensor
        (B, n, n // 2 + 1) complex, unshifted rfft2 of the images and of their models, on one device.

    Returns
    -------
    torch.Tensor
        (B,) float64 on their device, a = Re<image, model> / |model|^2 (the denominator kept above 1e-30).
    """
    weight = rfft_weights(images_rfft.shape[-2]).to(images_rfft.device)
    weight[0, 0] = 0.0
    num = (weight * (images_rfft.conj() * model_rfft).real).sum(dim=(-2, -1))
    den = (weight * model_rfft.abs() ** 2).sum(dim=(-2, -1)).clamp(min=1e-30)
    return num / den


COLOURED_NOISE = 2.0
"""Noise whose power varies less than this many times across the rings counts as white (whitening_filter)."""


@dataclass(frozen=True)
class Whitening:
    """The noise estimate of `whitening_filter` and the filter that makes the noise white.

    A radial filter that makes the noise white (ones when not `applied`), the noise power of rings
    1..n // 2 relative to their mean (`spectrum`, empty when not estimated), and the noise's contrast:
    the power of the noisiest of those rings over the least noisy one's (None when not estimated). n is
    the working box (pixels).

    Attributes
    ----------
    filter : torch.Tensor
        (n, n // 2 + 1) float64 on the unshifted rfft grid: in each ring of integer radius, sqrt of the
        mean power over the ring's mean power (the DC ring taking ring 1's value); ones when not
        `applied`.
    contrast : float or None
        Power of the noisiest of rings 1..n // 2 over the least noisy one's; None when not estimated.
    applied : bool
        Whether the filter whitens: the contrast is at least `whitening_filter`'s min_contrast
        (COLOURED_NOISE, 2).
    spectrum : torch.Tensor
        (n // 2,) float64 noise power of rings 1..n // 2 relative to their mean; empty (0,) when not
        estimated.
    """

    filter: torch.Tensor
    contrast: float | None
    applied: bool
    spectrum: torch.Tensor

    @classmethod
    def none(cls, n: int) -> Whitening:
        """No estimate, no whitening: a filter of ones (n, n // 2 + 1) float64, contrast None, empty
        spectrum."""
        return cls(torch.ones(n, n // 2 + 1, dtype=torch.float64), None, False, torch.zeros(0))


def whitening_filter(residuals: Iterable[torch.Tensor], min_contrast: float = COLOURED_NOISE) -> Whitening:
    """The Whitening of noise whose transforms are `residuals`.

    The filter is 1 / sqrt of the mean power of the residual transforms `residuals` (batches
    (B, n, n // 2 + 1), unshifted rfft) in each ring of integer radius, relative to their mean power.
    The DC ring takes the first ring's value.

    Real images carry more noise at low frequencies than at high ones (ice, the structured background);
    the principal component and the refinement's likelihood assume white noise, so images and their
    CTFs are multiplied by this filter before the CTF correction. Residuals to the consensus projection
    are noise, plus the difference between the classes and what pose errors leave: on white noise
    these make the rings' power vary by up to 1.4-fold (docs/benchmarks.md), and whitening by them
    would damp the very frequencies the classes differ at. So unless the power of the rings within
    Nyquist varies by at least `min_contrast`, the noise counts as white and the filter is ones.

    Parameters
    ----------
    residuals : iterable of torch.Tensor
        Batches (B, n, n // 2 + 1) of unshifted rfft2 of noise estimates (the residuals to the
        consensus projection), all at the working box n, on one device; read one batch at a time.
    min_contrast : float
        Least ratio of the noisiest ring's power to the least noisy one's (rings 1..n // 2) at which
        the noise counts as coloured (COLOURED_NOISE, 2).

    Returns
    -------
    Whitening
        filter (n, n // 2 + 1) on the unshifted rfft grid, ones unless `applied`; contrast, the ratio
        of the rings' largest power to their smallest; applied, whether contrast >= min_contrast;
        spectrum (n // 2,) the powers of rings 1..n // 2 relative to their mean; on the CPU.
    """
    power = sum((r.abs() ** 2).sum(0) for r in residuals).cpu()  # one batch at a time, where they are
    n = power.shape[-2]
    ky = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    kx = torch.arange(n // 2 + 1, dtype=torch.float64)
    ring = torch.round(torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)).long()
    weight = rfft_weights(n)
    rings = int(ring.max()) + 1
    ring_power = torch.bincount(ring.reshape(-1), (weight * power).reshape(-1), minlength=rings)
    ring_count = torch.bincount(ring.reshape(-1), weight.reshape(-1), minlength=rings)
    mean = ring_power / ring_count
    mean[0] = mean[1]
    mean = mean.clamp(min=1e-12 * float(mean.max()))
    within = mean[1 : n // 2 + 1]
    contrast = float(within.max() / within.min())
    spectrum = within / within.mean()
    if contrast < min_contrast:
        return Whitening(Whitening.none(n).filter, contrast, False, spectrum)
    overall = (ring_power[1:].sum() + mean[0]) / ring_count.sum()
    return Whitening(torch.sqrt(overall / mean[ring]), contrast, True, spectrum)


def correct(
    images_rfft: torch.Tensor,
    ctf: torch.Tensor,
    mode: CtfCorrection,
    consensus_rfft: torch.Tensor | None = None,
    wiener_constant: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the CTF correction `mode` to centred images (B, n, n // 2 + 1, unshifted rfft).

    `ctf` is the filter the data carry (the CTF, or its square for CTF-premultiplied data);
    `consensus_rfft` the consensus map's projections for the subtracting modes. Returns the corrected
    transforms and each image's scale relative to the consensus projection (ones when not subtracting).

    Parameters
    ----------
    images_rfft : torch.Tensor
        (B, n, n // 2 + 1) complex, unshifted rfft2 of centred images I.
    ctf : torch.Tensor
        (B, n, n // 2 + 1) real, the filter the data carry, on the same grid.
    mode : CtfCorrection
        subtract-multiply: (I - a CTF P) CTF; subtract-flip: (I - a CTF P) sign(CTF); flip:
        I sign(CTF); wiener: I CTF / (CTF^2 + wiener_constant); none: I. sign(CTF) is +1 where the
        CTF is 0; a is each image's least-squares scale (`subtract_consensus`).
    consensus_rfft : torch.Tensor or None
        (B, n, n // 2 + 1) the consensus projections P (without CTF), needed by the subtracting modes.
    wiener_constant : float
        The constant SNR term of the Wiener filter.

    Returns
    -------
    corrected : torch.Tensor
        (B, n, n // 2 + 1) complex, a new tensor with the DC coefficient set to 0.
    scale : torch.Tensor
        (B,) float64, a per image (ones when not subtracting); both on the images' device.

    Raises
    ------
    ValueError
        If a subtracting mode gets no `consensus_rfft`.
    """
    scale = torch.ones(images_rfft.shape[0], dtype=torch.float64, device=images_rfft.device)
    if mode.subtracts:
        if consensus_rfft is None:
            raise ValueError(f"CTF correction {mode.value} needs the consensus projections")
        images_rfft, scale = subtract_consensus(images_rfft, ctf * consensus_rfft)
    if mode in (CtfCorrection.subtract_multiply,):
        out = images_rfft * ctf
    elif mode in (CtfCorrection.subtract_flip, CtfCorrection.flip):
        out = images_rfft * torch.where(ctf < 0, -1.0, 1.0)
    elif mode is CtfCorrection.wiener:
        out = images_rfft * ctf / (ctf * ctf + wiener_constant)
    else:
        out = images_rfft
    out = out.clone()
    out[..., 0, 0] = 0
    return out, scale


NOISE_SAMPLE = 2048
"""About this many particles, in evenly spread batches, give the noise spectrum for the whitening."""


def prepare_images(
    particles: star_io.Particles,
    stacks: ImageStacks,
    scratch: StoredArray,
    filters: StoredArray,
    options: SplitOptions,
    consensus: torch.Tensor | None,
    track: Track = no_progress,
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> tuple[torch.Tensor, torch.Tensor | None, Whitening, dict[str, float]]:
    """Fill `scratch` (n, w, w) with centred, downsampled, CTF-corrected images; read each image once.

    `filters` (n, w, w // 2 + 1) receives the filter each image's data carry at the working size
    (its CTF, squared if CTF-premultiplied), computed once for this and the later steps. Returns each
    image's grey scale relative to the consensus projection (ones when not subtracting), the consensus
    map at the working size, the noise estimate and its whitening filter (preprocess.whitening_filter)
    and the time spent per step.

    Pass 1 reads the stacks, centres and downsamples the images into `scratch` and, when no consensus
    map is given, reconstructs it at the working size (not possible from CTF-premultiplied images,
    whose consensus stays None). Pass 2 corrects the images in `scratch` for the CTF, whitened by the
    noise spectrum of the residuals of a sample of them (about NOISE_SAMPLE particles, in evenly
    spread batches; only for the corrections that subtract the consensus projection, and with
    options.whiten). Images and projections are whitened, the CTF not: the corrected images hold the
    whitened residual times the CTF (or its sign).

    Both passes are tasks of fixed groups of batches (`engine.tasks_of`) that read the stacks and
    write their own rows of the files where they run; the consensus's partial sums are added in task
    order, so the result is the same, bit for bit, in this process and on any number of workers. The
    noise sample is read here. Every step computes on `compute`'s device, a batch of
    options.batch_size images at a time (it holds their transforms at the particles' box, complex128,
    and the consensus reconstruction's or projection's temporaries); what is stored comes back to the
    CPU.

    Parameters
    ----------
    particles : star_io.Particles
        The n particles: RELION matrices (n, 3, 3) that left-multiply xyz column vectors of the map,
        origins (x, y) in pixels, CTF parameters (defocus in A, positive for underfocus), box N
        (pixels), pixel size (A), and whether the images are CTF-premultiplied.
    stacks : ImageStacks
        Their image stacks, on a file system the engine's workers see.
    scratch : StoredArray
        (n, w, w) float32, filled with the images [y, x], centred at w // 2 (`correct` sets their mean,
        the DC coefficient, to 0).
    filters : StoredArray
        (n, w, w // 2 + 1) float32, filled with each image's data filter on the unshifted rfft grid, at
        the working pixel size N pixel_size / w (not whitened).
    options : SplitOptions
        batch_size, ctf_correction, whiten, and symmetry for the reconstruction.
    consensus : torch.Tensor or None
        (w, w, w) [z, y, x] the consensus map at the working size, or None.
    track : Track
        Progress callback, called as track(iterable, description=..., total=...), here once per task.
    engine : Engine
        Where the passes' tasks run (`engine.LocalEngine`, `engine.DaskEngine`).
    compute : Compute
        The device the steps compute on (`engine.Compute`).

    Returns
    -------
    scale : torch.Tensor
        (n,) float64 each image's least-squares grey scale relative to the consensus projection (ones
        when not subtracting).
    consensus : torch.Tensor or None
        (w, w, w) [z, y, x] the consensus map at the working size: the one given, or reconstructed
        (float32); None for CTF-premultiplied particles without one. These and the whitening on the
        CPU.
    whitening : Whitening
        The noise estimate and its filter (`Whitening.none(w)` when not estimated).
    timings : dict of str to float
        Seconds spent reading ('read') and correcting for the CTF ('ctf').

    Raises
    ------
    ValueError
        For CTF-premultiplied particles without a consensus map, with a CTF correction that subtracts
        the consensus projection.
    """
    timings: dict[str, float] = {}
    n, w = scratch.shape[0], scratch.shape[-1]
    rotations = particles.rotations
    squared = particles.premultiplied
    need_consensus = consensus is None and not squared
    if consensus is None and squared and options.ctf_correction.subtracts:
        raise ValueError("CTF-premultiplied particles need the consensus map (--ref) for this CTF correction")

    start = time.perf_counter()
    batches = row_batches(n, options.batch_size)
    groups = tasks_of(batches)
    tasks = [
        (
            group,
            [particles.origins[index] for index in group],
            [particles.ctf[torch.as_tensor(index)] for index in group],
            [rotations[index] for index in group],
        )
        for group in groups
    ]
    work_apix = particles.pixel_size * particles.box / w
    common = (stacks, scratch, filters, work_apix, squared, need_consensus, compute)
    read = track(engine.map(_read_task, tasks, common), description="Reading and centring images", total=len(groups))
    with compute.kernels():
        if need_consensus:
            # the consensus's reconstruction, its sums added task by task
            accumulator = FourierAccumulator(w, device=compute.device)
            accumulator.sums = torch.from_numpy(ordered_sum(read)).to(compute.device)
            consensus = accumulator.finalise(sym=options.symmetry).cpu()
        else:
            for _ in read:  # the tasks write their rows; nothing comes back
                pass
    timings["read"] = time.perf_counter() - start

    start = time.perf_counter()
    prepared = prepare_volume(consensus.to(torch.float64)) if options.ctf_correction.subtracts else None
    whitening = Whitening.none(w)
    if prepared is not None and options.whiten:
        sample = batches[:: max(1, len(batches) * options.batch_size // NOISE_SAMPLE)]
        # Opened after the tasks above closed their files: on a network file system a file shows
        # another machine's writes only to an opening after the writer closed it (close-to-open).
        with scratch.open() as images, filters.open() as ctfs, compute.kernels():
            here = prepared.to(compute.device)
            whitening = whitening_filter(_residual(images, ctfs, here, rotations, index) for index in sample)
    tasks = [(group, [rotations[index] for index in group]) for group in groups]
    common = (scratch, filters, prepared, whitening.filter, options.ctf_correction, compute)
    scale = torch.ones(n, dtype=torch.float64)
    corrected = engine.map(_correct_task, tasks, common)
    # The bar first in the zip: it is asked for the item after the last, and so ends full.
    for scales, group in zip(track(corrected, description="Correcting for the CTF", total=len(groups)), groups):
        scale[np.concatenate(group)] = torch.from_numpy(scales)
    timings["ctf"] = time.perf_counter() - start
    return scale, consensus, whitening, timings


def _read_task(
    stacks: ImageStacks,
    scratch: StoredArray,
    filters: StoredArray,
    work_apix: float,
    squared: bool,
    need_consensus: bool,
    compute: Compute,
    batches: list[np.ndarray],
    origins: list[torch.Tensor],
    params: list[CTFParams],
    rotations: list[torch.Tensor],
) -> np.ndarray | None:
    """One task of pass 1 of `prepare_images`: its batches (rows (B,), origins (B, 2) in pixels of the
    particles' box, CTF parameters (B,) and RELION matrices (B, 3, 3) per batch) read from the stacks,
    centred and downsampled into `scratch`, their data filters (CTF, or CTF^2 when `squared`) at
    `work_apix` (A) into `filters`; with `need_consensus`, the consensus reconstruction's sums of its
    images, (3, 2c + 1, 2c + 1, c + 1) float32 (`FourierAccumulator.sums` at the working box), else
    None. Computes on `compute`'s device."""
    device = compute.device
    # A copy of its own: the tasks on one worker's threads share their arguments, and an open file's
    # position is not to be shared.
    with copy.copy(stacks) as own, scratch.open() as images, filters.open() as ctfs, compute.kernels():
        w = images.shape[-1]
        accumulator = FourierAccumulator(w, device=device) if need_consensus else None
        for (index, read), origin, param, rotation in zip(own.read_ahead(batches), origins, params, rotations):
            centred = centre_downsampled(torch.fft.rfft2(read.to(device, torch.float64)), origin, w)
            small = torch.fft.irfft2(centred, s=(w, w)).to(torch.float32)
            images[index] = small.cpu().numpy()
            ctf = ctf_2d(param.to(device), w, work_apix)
            ctfs[index] = (ctf * ctf if squared else ctf).cpu().numpy()
            if accumulator is not None:
                accumulator.insert(small, rotation, ctf=ctf)
        return accumulator.sums.cpu().numpy() if accumulator is not None else None


def _correct_task(
    scratch: StoredArray,
    filters: StoredArray,
    prepared: PreparedVolume | None,
    white: torch.Tensor,
    mode: CtfCorrection,
    compute: Compute,
    batches: list[np.ndarray],
    rotations: list[torch.Tensor],
) -> np.ndarray:
    """One task of pass 2 of `prepare_images`: the images of its batches (rows (B,) and RELION matrices
    (B, 3, 3) per batch) in `scratch` corrected for the CTF (`correct` in `mode`, against the prepared
    consensus, or None when not subtracting) and written back, images and projections multiplied by
    the whitening filter `white` (w, w // 2 + 1); the images' scales, (B,) float64 for all its batches
    together. Computes on `compute`'s device."""
    device = compute.device
    with scratch.open() as images, filters.open() as ctfs, compute.kernels():
        volume = prepared.to(device) if prepared is not None else None  # once per task
        white = white.to(device)
        w = images.shape[-1]
        scales = []
        for index, rotation in zip(batches, rotations):
            # Images and projections whitened, the CTF not: the corrected images hold the whitened
            # residual times the CTF (or its sign), whose noise is as white as without whitening.
            f = white * torch.fft.rfft2(torch.from_numpy(np.asarray(images[index])).to(device, torch.float64))
            projections = white * project_rfft(volume, rotation) if volume is not None else None
            data_filter = torch.from_numpy(np.asarray(ctfs[index])).to(device, torch.float64)
            corrected, scale = correct(f, data_filter, mode, projections)
            scales.append(scale.cpu().numpy())
            images[index] = torch.fft.irfft2(corrected, s=(w, w)).cpu().numpy().astype(np.float32)
    return np.concatenate(scales)


def _residual(
    scratch: ScratchArray, filters: ScratchArray, prepared: PreparedVolume, rotations: torch.Tensor, index: np.ndarray
) -> torch.Tensor:
    """Images `index` less their least-squares scaled, CTF-modulated consensus projections (rfft), on
    the prepared consensus's device."""
    device = prepared.data.device
    f = torch.fft.rfft2(torch.from_numpy(np.asarray(scratch[index])).to(device, torch.float64))
    model = torch.from_numpy(np.asarray(filters[index])).to(device, torch.float64) * project_rfft(prepared, rotations[index])
    return subtract_consensus(f, model)[0]
