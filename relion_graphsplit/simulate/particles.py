"""Simulated particle sets with known classes, written as a RELION 3.1 project would hold them.

Each particle is the projection of one of several maps in a uniformly random orientation, multiplied
by RELION's CTF, shifted by its origin (image(x) = P(x + o)), with Gaussian noise added and the
result normalised as RELION's extraction does. The noise is white, or coloured: real images carry
extra noise at low frequencies (ice, the structured background), modelled by a noise power spectrum
1 + E exp(-B s^2 / 2) (Conditions.noise_excess E, noise_bfactor B). The particle STAR file carries
the poses perturbed by known errors, as a consensus refinement would give them; the truth table
carries the true ones.

Signal-to-noise ratio: for each particle, the noise variance is the variance of its noiseless
CTF-modulated image over the pixels inside the normalisation circle (diameter 0.75 box), divided by
`snr`. Normalisation: the pixels outside that circle get mean 0 and standard deviation 1.

The images are made a batch at a time and handed on as they are made (`simulate_stream`;
`write_simulation` appends them to the stack file), so memory does not grow with the number of particles
beyond their tables.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.spatial.transform import Rotation

from relion_graphsplit.fourier.ctf import ctf_2d
from relion_graphsplit.fourier.geometry import euler_to_matrix, matrix_to_euler
from relion_graphsplit.fourier.projection import PreparedVolume, prepare_volume, project_rfft, rfft_weights, shift_images
from relion_graphsplit.relion.mrc import write_mrc, write_stack
from relion_graphsplit.relion.star import ctf_params, make_particle_set, poses, write_particles

NORMALISATION_DIAMETER = 0.75
"""Diameter of the circle outside which the background is normalised, as a fraction of the box."""

PARTICLES_PER_MICROGRAPH = 100


@dataclasses.dataclass(frozen=True)
class Conditions:
    """How the particles were imaged, and how far off the poses a consensus refinement reports are."""

    defocus_range: tuple[float, float] = (10000.0, 30000.0)  # A, mean defocus (underfocus)
    astigmatism: float = 500.0  # A, DefocusU - DefocusV
    voltage: float = 300.0  # kV
    cs: float = 2.7  # mm
    q0: float = 0.1  # amplitude contrast
    bfactor: float = 0.0  # A^2, CTF envelope (rlnCtfBfactor)
    max_shift_A: float = 0.0  # true origins uniform in [-max, max] per axis
    pose_error_deg: float = 0.0  # RMS angle of the rotation between true and reported poses
    shift_error_A: float = 0.0  # RMS length of the error of the reported origins
    noise_excess: float = 0.0  # extra noise power at zero frequency, in units of the white part (0: white)
    noise_bfactor: float = 1000.0  # A^2; the extra power falls as exp(-B s^2 / 2)

    def noise_filter(self, box: int, pixel_size: float) -> torch.Tensor:
        """Amplitude filter (box, box // 2 + 1) on the unshifted rfft grid that colours white noise as
        1 + E exp(-B s^2 / 2) in power, keeping unit variance per pixel (ones for white noise).

        Parameters
        ----------
        box : int
            The images' box (pixels).
        pixel_size : float
            Their pixel size (A); s is the spatial frequency in 1/A.

        Returns
        -------
        torch.Tensor
            (box, box // 2 + 1) float64, the square root of the power spectrum divided by its mean over
            the full box x box grid (Parseval: a filtered unit-variance white noise keeps unit variance).
        """
        k = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64)
        power = 1.0 + self.noise_excess * torch.exp(-self.noise_bfactor * (k[:, None] ** 2 + k[None, :] ** 2) / 2)
        return (power / power.mean()).sqrt()[:, : box // 2 + 1]  # Parseval, over the full grid


def model_images(
    volume: PreparedVolume, rotations: torch.Tensor, origins_px: torch.Tensor, ctf: torch.Tensor
) -> torch.Tensor:
    """Noiseless particle images (B, N, N): projections times CTF (B, N, N // 2 + 1), shifted by -origin.

    Parameters
    ----------
    volume : PreparedVolume
        The map (`prepare_volume`), box N.
    rotations : torch.Tensor
        (B, 3, 3) RELION matrices (left-multiplying xyz column vectors of the map).
    origins_px : torch.Tensor
        (B, 2) origins as (x, y) in pixels: image(x) = P(x + o), so the particle's centre lies at the
        image centre minus its origin.
    ctf : torch.Tensor
        (B, N, N // 2 + 1) CTFs on the unshifted rfft grid (`ctf_2d`).

    Returns
    -------
    torch.Tensor
        (B, N, N) [y, x] real images, the projection's origin at index N // 2 before the shift.
    """
    n = volume.box
    slices = project_rfft(volume, rotations) * ctf
    return torch.fft.irfft2(shift_images(slices, -origins_px), s=(n, n))


def normalisation_mask(box: int) -> torch.Tensor:
    """True inside the circle of diameter NORMALISATION_DIAMETER * box centred at box // 2 (box, box).

    Parameters
    ----------
    box : int
        The images' box (pixels).

    Returns
    -------
    torch.Tensor
        (box, box) bool, True where the distance (pixels) from (box // 2, box // 2) is at most
        NORMALISATION_DIAMETER * box / 2.
    """
    c = torch.arange(box, dtype=torch.float64) - box // 2
    return c[:, None] ** 2 + c[None, :] ** 2 <= (NORMALISATION_DIAMETER * box / 2) ** 2


def uniform_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n rotation matrices (n, 3, 3) uniform on SO(3) (normalised Gaussian quaternions).

    Parameters
    ----------
    n : int
        How many.
    rng : np.random.Generator
        The random generator (4 n standard normal draws).

    Returns
    -------
    np.ndarray
        (n, 3, 3) float64 rotation matrices.
    """
    return Rotation.from_quat(rng.standard_normal((n, 4))).as_matrix()


def draw_particles(
    n_particles: int,
    box: int,
    pixel_size: float,
    fractions: Sequence[float],
    conditions: Conditions = Conditions(),
    seed: int = 0,
    stack_name: str = "particles.mrcs",
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-particle parameters: (particles, optics, truth) tables.

    `particles` holds the poses a refinement would report: the true rotation turned by a random
    rotation about a uniform axis with RMS angle `pose_error_deg`, and the true origin plus a 2D
    Gaussian error of RMS length `shift_error_A`. `truth` holds the true poses and the true class
    (rlnClassNumber, 1-based). Origins are uniform in [-max_shift_A, max_shift_A] per axis; the mean
    defocus is uniform in `defocus_range` with DefocusU - DefocusV = `astigmatism` at a uniform angle
    (all of them fields of `conditions`).

    Parameters
    ----------
    n_particles : int
        How many particles.
    box : int
        Their box (pixels), for rlnImageSize.
    pixel_size : float
        Their pixel size (A), for rlnImagePixelSize.
    fractions : sequence of float
        Each class's share (non-negative, normalised here); classes are drawn independently per
        particle.
    conditions : Conditions
        Imaging conditions and pose errors.
    seed : int
        Seed of all the draws (numpy's default_rng).
    stack_name : str
        The stack named in rlnImageName ("000001@particles.mrcs" for the first particle).

    Returns
    -------
    particles : pd.DataFrame
        RELION 3.1 particle columns: rlnImageName, rlnMicrographName (PARTICLES_PER_MICROGRAPH
        particles per micrograph), rlnOpticsGroup, the reported rlnAngleRot/Tilt/Psi (degrees) and
        rlnOriginX/YAngst (A), rlnDefocusU/V (A, positive for underfocus), rlnDefocusAngle (degrees,
        uniform in [0, 180)), rlnCtfBfactor (A^2) and rlnRandomSubset (1 or 2, at random).
    optics : pd.DataFrame
        One optics group with the conditions' voltage, Cs, amplitude contrast, the pixel size and box,
        not CTF-premultiplied.
    truth : pd.DataFrame
        The particle table with the true angles and origins and rlnClassNumber (1-based).

    Raises
    ------
    ValueError
        If `fractions` is not one-dimensional, non-negative with a positive sum.
    """
    c = conditions
    rng = np.random.default_rng(seed)
    p = np.asarray(fractions, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
    classes = rng.choice(len(p), size=n_particles, p=p / p.sum())
    true_rot, true_tilt, true_psi = matrix_to_euler(torch.from_numpy(uniform_rotations(n_particles, rng)))
    origins = rng.uniform(-c.max_shift_A, c.max_shift_A, size=(n_particles, 2))
    defocus = rng.uniform(*c.defocus_range, size=n_particles)
    defocus_angle = rng.uniform(0.0, 180.0, size=n_particles)
    error_axes = rng.standard_normal((n_particles, 3)) * math.radians(c.pose_error_deg) / math.sqrt(3.0)
    shift_errors = rng.standard_normal((n_particles, 2)) * c.shift_error_A / math.sqrt(2.0)
    subsets = rng.integers(1, 3, size=n_particles)

    A_true = euler_to_matrix(true_rot, true_tilt, true_psi)
    A_seen = torch.from_numpy(Rotation.from_rotvec(error_axes).as_matrix()) @ A_true
    rot, tilt, psi = matrix_to_euler(A_seen)
    index = np.arange(n_particles)
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in index],
            "rlnMicrographName": [f"Micrographs/sim_{i // PARTICLES_PER_MICROGRAPH + 1:05d}.mrc" for i in index],
            "rlnOpticsGroup": np.ones(n_particles, dtype=np.int64),
            "rlnAngleRot": rot.numpy(),
            "rlnAngleTilt": tilt.numpy(),
            "rlnAnglePsi": psi.numpy(),
            "rlnOriginXAngst": origins[:, 0] + shift_errors[:, 0],
            "rlnOriginYAngst": origins[:, 1] + shift_errors[:, 1],
            "rlnDefocusU": defocus + c.astigmatism / 2.0,
            "rlnDefocusV": defocus - c.astigmatism / 2.0,
            "rlnDefocusAngle": defocus_angle,
            "rlnCtfBfactor": np.full(n_particles, float(c.bfactor)),
            "rlnRandomSubset": subsets,
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnAmplitudeContrast": [c.q0],
            "rlnSphericalAberration": [c.cs],
            "rlnVoltage": [c.voltage],
            "rlnImagePixelSize": [pixel_size],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
            "rlnCtfDataAreCtfPremultiplied": [0],
        }
    )
    truth = particles.copy()
    truth["rlnAngleRot"], truth["rlnAngleTilt"], truth["rlnAnglePsi"] = (
        true_rot.numpy(),
        true_tilt.numpy(),
        true_psi.numpy(),
    )
    truth["rlnOriginXAngst"], truth["rlnOriginYAngst"] = origins[:, 0], origins[:, 1]
    truth["rlnClassNumber"] = classes + 1
    return particles, optics, truth


def prepare_maps(maps: Sequence[np.ndarray]) -> PreparedVolume:
    """The K maps (N, N, N) [z, y, x] prepared for projection as one stack (`prepare_volume`, float32).

    Each map is prepared alone and copied into the stack, so that only one map's padded transform is
    made at a time (several GB at box 384).

    Parameters
    ----------
    maps : sequence of np.ndarray
        K maps (N, N, N), any real dtype.

    Returns
    -------
    PreparedVolume
        Stacked, data (K, 2, M + 3, M + 3, M // 2 + 2) float32 with M = 2 N.
    """
    data = None
    for k, volume in enumerate(maps):
        one = prepare_volume(torch.from_numpy(np.asarray(volume, dtype=np.float32)))
        if data is None:
            data = one.data.new_empty((len(maps), *one.data.shape[1:]))
        data[k] = one.data[0]
    return dataclasses.replace(one, data=data, stacked=True)


def _signal_images(
    volumes: PreparedVolume,
    classes: np.ndarray,
    rotations: torch.Tensor,
    origins_px: torch.Tensor,
    ctf: torch.Tensor,
) -> torch.Tensor:
    """Noiseless images (B, N, N) float32 of particles of the given 0-based classes (B,), each projected
    from its own map of the stack `volumes` only."""
    box = volumes.box
    out = torch.zeros((len(classes), box, box), dtype=torch.float32)
    for k in range(len(volumes.data)):
        rows = torch.from_numpy(np.flatnonzero(classes == k))
        if len(rows):
            volume = dataclasses.replace(volumes, data=volumes.data[k : k + 1], stacked=False)
            out[rows] = model_images(volume, rotations[rows], origins_px[rows], ctf[rows])
    return out


def _noise(rng: np.random.Generator, shape: tuple[int, int, int], colour: torch.Tensor | None) -> torch.Tensor:
    """Gaussian noise (B, N, N) float64 of unit variance per pixel, white or filtered by `colour`
    (`Conditions.noise_filter`, (N, N // 2 + 1))."""
    noise = torch.from_numpy(rng.standard_normal(shape))
    if colour is None:
        return noise
    return torch.fft.irfft2(torch.fft.rfft2(noise) * colour, s=shape[1:])


def _normalised(
    signal: torch.Tensor, noise: torch.Tensor, snr: float, inside: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Signal plus noise at the given SNR, normalised as RELION's extraction does.

    Parameters
    ----------
    signal, noise : torch.Tensor
        (B, N, N) float64 noiseless images and unit-variance noise.
    snr : float
        Per image, the variance of its signal inside `inside` over the noise variance.
    inside : torch.Tensor
        (N, N) bool, the normalisation circle (`normalisation_mask`).

    Returns
    -------
    images : np.ndarray
        (B, N, N) float32, the pixels outside the circle of mean 0 and standard deviation 1.
    scale, offset, noise_sd : np.ndarray
        (B,) float64: images = scale * (signal + noise) + offset, noise_sd the noise's standard
        deviation in image units.
    """
    sigma = torch.sqrt(signal[:, inside].var(dim=1, correction=0) / snr)
    image = signal + sigma[:, None, None] * noise
    background = image[:, ~inside]
    mean, sd = background.mean(dim=1), background.std(dim=1, correction=0)
    images = ((image - mean[:, None, None]) / sd[:, None, None]).to(torch.float32).numpy()
    return images, (1.0 / sd).numpy(), (-mean / sd).numpy(), (sigma / sd).numpy()


def _log_likelihoods(
    images: np.ndarray,
    models: torch.Tensor,
    scale: np.ndarray,
    offset: np.ndarray,
    noise_sd: np.ndarray,
    weights: torch.Tensor,
) -> np.ndarray:
    """log p(image | class k) (B, K) of a batch (see class_log_likelihoods).

    Parameters
    ----------
    images : np.ndarray
        (B, N, N) the normalised images.
    models : torch.Tensor
        (K, B, N, N) their noiseless images under each class (`model_images` of the stacked maps).
    scale, offset, noise_sd : np.ndarray
        (B,) the images' normalisation (simulate's NormScale, NormOffset, NoiseStddev).
    weights : torch.Tensor
        (N, N // 2 + 1) each rfft pixel's weight in the squared norm (Friedel mates, noise colour).

    Returns
    -------
    np.ndarray
        (B, K) float64.
    """
    y = torch.from_numpy(np.asarray(images, dtype=np.float64))
    scale, offset, noise_sd = (torch.tensor(a, dtype=torch.float64) for a in (scale, offset, noise_sd))
    out = np.empty((len(y), len(models)))
    for k, model in enumerate(models):  # one class at a time: the batch's float64 copies stay few
        model = scale[:, None, None] * model.to(torch.float64) + offset[:, None, None]
        residual = (weights * torch.fft.rfft2(y - model).abs().square()).sum(dim=(1, 2))
        out[:, k] = (-residual / (2.0 * noise_sd**2)).numpy()
    return out


def _likelihood_weights(box: int, pixel_size: float, conditions: Conditions) -> torch.Tensor:
    """(N, N // 2 + 1) weights of the rfft pixels in the squared norm of a residual: Parseval on the
    rfft grid, each frequency divided by its relative noise power (sum_x r^2 for white noise)."""
    return rfft_weights(box) / conditions.noise_filter(box, pixel_size) ** 2 / box**2


def _check_inputs(maps: Sequence[np.ndarray], snr: float, fractions: Sequence[float]) -> int:
    """The maps' box N; ValueError unless `snr` > 0, one fraction per map and the maps even cubes of one size."""
    if snr <= 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if len(fractions) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(fractions)} fractions")
    box = maps[0].shape[-1]
    if any(m.shape != (box, box, box) for m in maps):
        raise ValueError("maps must be cubic and all of the same size")
    if box % 2:
        raise ValueError(f"RELION particles have even boxes, got {box}")
    return box


def simulate_stream(
    write: Callable[[slice, np.ndarray], None],
    maps: Sequence[np.ndarray],
    pixel_size: float,
    n_particles: int,
    snr: float,
    fractions: Sequence[float],
    conditions: Conditions = Conditions(),
    seed: int = 0,
    stack_name: str = "particles.mrcs",
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    log_likelihoods: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Simulate particles of `maps`, handing the images to `write` batch by batch, in order.

    The images are made `batch_size` at a time and never all held: memory is one batch plus the
    per-particle tables. The particles (their parameters and noise) do not depend on `batch_size`.
    The truth table also records, per particle, how its image was normalised: image =
    NormScale * (signal + noise) + NormOffset, with the noise's standard deviation in image units in
    NoiseStddev.

    Parameters
    ----------
    write : callable
        Called as write(rows, images) per batch: rows a slice of the particles, images
        (rows.stop - rows.start, N, N) [y, x] float32, each normalised so that the pixels outside the
        normalisation circle have mean 0 and standard deviation 1.
    maps : sequence of np.ndarray
        One (N, N, N) [z, y, x] map per class, N even, all of one size.
    pixel_size : float
        Their pixel size (A), also the images'.
    n_particles : int
        How many particles.
    snr : float
        Signal-to-noise ratio, positive: per particle, the variance of its noiseless CTF-modulated
        image inside the normalisation circle over the noise variance.
    fractions : sequence of float
        Each map's share, one per map.
    conditions : Conditions
        Imaging conditions, pose errors and noise colour.
    seed : int
        Seed of the particle parameters (`draw_particles`) and, through a spawned stream, of the noise.
    stack_name : str
        The stack named in rlnImageName.
    batch_size : int
        Images made at a time.
    progress : callable or None
        Called with the number of particles done after each batch.
    log_likelihoods : np.ndarray or None
        (n_particles, K) array to fill with `class_log_likelihoods` of the images as they are made
        (for `bayes_accuracy`, the ceiling, without reading the images again), or None. Each batch is
        then projected from every map, which costs about half as much again as from its own.

    Returns
    -------
    particles, optics, truth : pd.DataFrame
        As `draw_particles`, the truth table with NormScale, NormOffset and NoiseStddev added.

    Raises
    ------
    ValueError
        If `snr` is not positive, the fractions do not match the maps, or the maps are not cubic,
        of one size and of an even box.
    """
    box = _check_inputs(maps, snr, fractions)
    particles, optics, truth = draw_particles(n_particles, box, pixel_size, fractions, conditions, seed, stack_name)
    noise_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    volumes = prepare_maps(maps)
    truth_set = make_particle_set(truth, optics)
    rotations, origins_px = poses(truth_set)
    ctf = ctf_params(truth_set)
    classes = truth["rlnClassNumber"].to_numpy() - 1
    inside = normalisation_mask(box)
    colour = conditions.noise_filter(box, pixel_size) if conditions.noise_excess else None
    weights = _likelihood_weights(box, pixel_size, conditions)
    scale, offset, noise_sd = (np.empty(n_particles) for _ in range(3))

    for start in range(0, n_particles, batch_size):
        rows = slice(start, min(start + batch_size, n_particles))
        c = ctf_2d(ctf[rows], box, pixel_size)
        if log_likelihoods is None:
            signal = _signal_images(volumes, classes[rows], rotations[rows], origins_px[rows], c)
        else:  # every class's model, for the likelihoods; the particle's own is its signal
            models = model_images(volumes, rotations[rows], origins_px[rows], c)
            signal = models[torch.from_numpy(classes[rows]), torch.arange(rows.stop - start)]
        noise = _noise(noise_rng, tuple(signal.shape), colour)
        images, scale[rows], offset[rows], noise_sd[rows] = _normalised(signal.to(torch.float64), noise, snr, inside)
        write(rows, images)
        if log_likelihoods is not None:
            log_likelihoods[rows] = _log_likelihoods(images, models, scale[rows], offset[rows], noise_sd[rows], weights)
        if progress is not None:
            progress(rows.stop)

    truth["NormScale"], truth["NormOffset"], truth["NoiseStddev"] = scale, offset, noise_sd
    return particles, optics, truth


def simulate(
    maps: Sequence[np.ndarray],
    pixel_size: float,
    n_particles: int,
    snr: float,
    fractions: Sequence[float],
    conditions: Conditions = Conditions(),
    seed: int = 0,
    stack_name: str = "particles.mrcs",
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    log_likelihoods: np.ndarray | None = None,
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Simulate particles of `maps` (each box^3 [z, y, x]) into an array; returns (images, particles,
    optics, truth). `simulate_stream` makes them without holding them all.

    Parameters
    ----------
    maps, pixel_size, n_particles, snr, fractions, conditions, seed, stack_name, batch_size
        As `simulate_stream`.
    progress, log_likelihoods
        As `simulate_stream`.

    Returns
    -------
    images : np.ndarray
        (n_particles, N, N) [y, x] float32, each normalised so that the pixels
        outside the normalisation circle have mean 0 and standard deviation 1.
    particles, optics, truth : pd.DataFrame
        As `simulate_stream`.

    Raises
    ------
    ValueError
        As `simulate_stream`.
    """
    box = maps[0].shape[-1]
    images = np.empty((n_particles, box, box), dtype=np.float32)

    def keep(rows: slice, batch: np.ndarray) -> None:
        images[rows] = batch

    particles, optics, truth = simulate_stream(
        keep, maps, pixel_size, n_particles, snr, fractions, conditions, seed, stack_name, batch_size, progress,
        log_likelihoods,
    )  # fmt: skip
    return images, particles, optics, truth


def write_simulation(
    out_dir: str | os.PathLike,
    maps: Sequence[np.ndarray],
    pixel_size: float,
    n_particles: int,
    snr: float,
    fractions: Sequence[float],
    progress: Callable[[int], None] | None = None,
    **options,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Simulate into `out_dir`: particles.mrcs, particles.star, truth.star and class1.mrc, class2.mrc...

    `options` are simulate_stream's keyword arguments. The stack is written batch by batch as the
    images are made (`relion.mrc.write_stack`), so the memory used is one batch and the per-particle
    tables, whatever `n_particles`. Image names point to particles.mrcs beside the STAR files.
    truth.star is a particle file too (true poses, true rlnClassNumber), usable for example with
    `relion_reconstruct --class k`. Returns (particles, optics, truth).

    Parameters
    ----------
    out_dir : str or os.PathLike
        The folder, made if missing; each file is written whole or not at all.
    maps : sequence of np.ndarray
        One (N, N, N) [z, y, x] map per class, written as classK.mrc (K from 1) with `pixel_size`.
    pixel_size : float
        Pixel size (A) of the maps and images.
    n_particles, snr, fractions, progress
        As `simulate_stream`.
    **options
        simulate_stream's other keyword arguments (conditions, seed, stack_name, batch_size,
        log_likelihoods). The stack is always written as particles.mrcs: a `stack_name` changes only
        the names in rlnImageName (for example a path relative to a RELION project folder that holds
        `out_dir`).

    Returns
    -------
    particles, optics, truth : pd.DataFrame
        As `simulate_stream`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    box = maps[0].shape[-1]
    with write_stack(out_dir / "particles.mrcs", n_particles, box, pixel_size) as stack:
        particles, optics, truth = simulate_stream(
            lambda _, images: stack.append(images), maps, pixel_size, n_particles, snr, fractions,
            progress=progress, **options,
        )  # fmt: skip
    write_particles(out_dir / "particles.star", make_particle_set(particles, optics, out_dir / "particles.star"))
    write_particles(out_dir / "truth.star", make_particle_set(truth, optics, out_dir / "truth.star"))
    for k, volume in enumerate(maps, start=1):
        write_mrc(out_dir / f"class{k}.mrc", volume, pixel_size)
    return particles, optics, truth


def class_log_likelihoods(
    images: np.ndarray,
    maps: Sequence[np.ndarray],
    truth: pd.DataFrame,
    optics: pd.DataFrame,
    batch_size: int = 256,
    conditions: Conditions = Conditions(),
) -> np.ndarray:
    """log p(image | class k) (n, K) under Gaussian noise, given the true pose, CTF and noise (its
    level per particle, its colour from the `conditions` of the simulation).

    Uses the truth table's poses and its normalisation columns (see simulate_stream); constant terms
    dropped.

    Parameters
    ----------
    images : np.ndarray
        (n, N, N) the simulated, normalised images (any array read by row slices).
    maps : sequence of np.ndarray
        The K class maps (N, N, N) [z, y, x] they were made from.
    truth : pd.DataFrame
        The truth table of `simulate` (true poses, CTF, NormScale, NormOffset, NoiseStddev).
    optics : pd.DataFrame
        The optics table (its first rlnImagePixelSize is used).
    batch_size : int
        Images compared at a time.
    conditions : Conditions
        The simulation's conditions, for the noise colour (`Conditions.noise_filter`).

    Returns
    -------
    np.ndarray
        (n, K) float64, -|y - model_k|^2 / (2 NoiseStddev^2), the squared norm taken over every
        frequency divided by the noise's relative power there (the sum over pixels for white noise).
    """
    truth_set = make_particle_set(truth, optics)
    rotations, origins_px = poses(truth_set)
    ctf = ctf_params(truth_set)
    box = maps[0].shape[-1]
    pixel_size = float(optics["rlnImagePixelSize"].iloc[0])
    volumes = prepare_maps(maps)
    scale, offset, noise_sd = (truth[c].to_numpy(np.float64) for c in ("NormScale", "NormOffset", "NoiseStddev"))
    weights = _likelihood_weights(box, pixel_size, conditions)
    out = np.empty((len(truth), len(maps)))
    for start in range(0, len(truth), batch_size):
        rows = slice(start, min(start + batch_size, len(truth)))
        models = model_images(volumes, rotations[rows], origins_px[rows], ctf_2d(ctf[rows], box, pixel_size))
        out[rows] = _log_likelihoods(images[rows], models, scale[rows], offset[rows], noise_sd[rows], weights)
    return out


def bayes_accuracy(log_likelihoods: np.ndarray, truth: pd.DataFrame) -> float:
    """Accuracy of the classifier that puts each particle in the class of highest posterior: the
    log-likelihoods plus the log of the class frequencies in `truth`.

    Parameters
    ----------
    log_likelihoods : np.ndarray
        (n, K) log p(image | class k) (`class_log_likelihoods`).
    truth : pd.DataFrame
        The truth table (rlnClassNumber, 1-based).

    Returns
    -------
    float
        The fraction in [0, 1] of particles whose most probable class is their true one.
    """
    true_classes = truth["rlnClassNumber"].to_numpy() - 1
    counts = np.bincount(true_classes, minlength=log_likelihoods.shape[1])
    log_prior = np.log(np.maximum(counts, 1) / counts.sum())
    predicted = np.argmax(log_likelihoods + log_prior, axis=1)
    return float(np.mean(predicted == true_classes))


def ceiling_accuracy(
    images: np.ndarray,
    maps: Sequence[np.ndarray],
    truth: pd.DataFrame,
    optics: pd.DataFrame,
    batch_size: int = 256,
    conditions: Conditions = Conditions(),
) -> float:
    """Accuracy of the Bayes classifier that knows the true maps, poses, CTF and noise (level and colour).

    Each particle goes to the class of highest posterior (`bayes_accuracy` of `class_log_likelihoods`):
    no method that sees only the images can do better on average.

    Parameters
    ----------
    images, maps, truth, optics, batch_size, conditions
        As `class_log_likelihoods`.

    Returns
    -------
    float
        The fraction in [0, 1] of particles whose most probable class is their true one.
    """
    return bayes_accuracy(class_log_likelihoods(images, maps, truth, optics, batch_size, conditions), truth)
