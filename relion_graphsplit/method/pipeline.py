"""The graph split, top to bottom as in chapter 4 of the thesis.

1. cones of projection direction (grouping);
2. images centred, downsampled and CTF-corrected once, kept in a scratch file (preprocess);
3. per cone: in-plane alignment, mask, first principal component, two-Gaussian mixture and
   log-likelihood ratio of every member (alignment, masks, pca, mixture);
4. graph of cones weighted by the agreement of their ratios; sign synchronisation by max-cut
   (graph, maxcut);
5. each particle's mean synchronised ratio; classes by its sign;
6. refinement with fixed poses against the two class maps, started from that split (refine).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from relion_graphsplit.fourier.ctf import ctf_2d
from relion_graphsplit.fourier.projection import PreparedVolume, prepare_volume, project_rfft
from relion_graphsplit.fourier.reconstruct import reconstruct_stream
from relion_graphsplit.fourier.symmetry import symmetry_matrices
from relion_graphsplit.method.alignment import align_to_reference, cone_reference
from relion_graphsplit.method.cones import Cones, assign_to_cones, asymmetric_unit_directions, default_sampling
from relion_graphsplit.method.diagnostics import cone_diagnostics
from relion_graphsplit.method.graph import classes_by_sign, cone_weights, particle_scores, ratio_matrix
from relion_graphsplit.method.masks import consensus_mask, project_mask, resample_volume
from relion_graphsplit.method.maxcut import synchronise
from relion_graphsplit.method.mixture import fit_mixture, log_likelihood_ratio
from relion_graphsplit.method.options import CtfCorrection, SplitOptions
from relion_graphsplit.method.pca import first_component
from relion_graphsplit.method.preprocess import (
    Whitening,
    centre_downsampled,
    correct,
    fourier_crop_volume,
    subtract_consensus,
    whitening_filter,
    working_box,
)
from relion_graphsplit.method.refine import image_spectra, refine_classes
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.scratch import ScratchArray

Track = Callable[..., Iterable]


def no_progress(iterable: Iterable, description: str = "", total: int | None = None) -> Iterable:
    """Default progress callback: iterate silently."""
    return iterable


@dataclass
class SplitResult:
    """Everything the split found, per particle and per cone."""

    classes: np.ndarray  # (n,) 1 or 2
    score: np.ndarray  # (n,) log posterior odds of class 1 (after refinement, if any)
    graph_score: np.ndarray  # (n,) mean synchronised log-likelihood ratio of the graph split
    refine_changes: list[int]  # particles that changed class in each refinement round
    probability: np.ndarray  # (n,) posterior probability of the assigned class
    cones: Cones
    cone_table: pd.DataFrame  # per-cone diagnostics
    membership: pd.DataFrame  # per (cone, particle): rho, llr
    cone_images: np.ndarray  # (M, 4, w, w): mean, eigen-image, class-1 and class-2 averages
    edges: pd.DataFrame  # cone pairs: shared particles, weight
    components: list[np.ndarray]  # cone indices of each connected part of the graph
    sync_method: str
    sync_gap: float  # relative gap between the max-cut bound and the solution (0: proven optimal)
    noise_contrast: float | None  # noise power of the noisiest ring over the least noisy (None: not estimated)
    whitened: bool  # images and CTFs whitened (preprocess.whitening_filter)
    noise_spectrum: np.ndarray  # noise power of rings 1..w // 2 relative to their mean (empty: not estimated)
    sampling: float
    cone_angle: float
    working_box: int
    working_pixel_size: float
    mask: torch.Tensor  # (w, w, w) the graph split's 3D mask, at the working size
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


NOISE_SAMPLE = 2048
"""About this many particles, in evenly spread batches, give the noise spectrum for the whitening."""


def _batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(start, min(n, start + size)) for start in range(0, n, size)]


def prepare_images(
    particles: star_io.Particles,
    stacks: ImageStacks,
    scratch: ScratchArray,
    filters: ScratchArray,
    options: SplitOptions,
    consensus: torch.Tensor | None,
    track: Track = no_progress,
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
    noise spectrum of the residuals of a sample of them.
    """
    timings: dict[str, float] = {}
    n, w = scratch.shape[0], scratch.shape[-1]
    rotations, origins, params = particles.rotations, particles.origins, particles.ctf
    work_apix = particles.pixel_size * particles.box / w
    squared = particles.premultiplied
    need_consensus = consensus is None and not squared
    if consensus is None and squared and options.ctf_correction.subtracts:
        raise ValueError("CTF-premultiplied particles need the consensus map (--ref) for this CTF correction")

    def centred_small(index: np.ndarray) -> torch.Tensor:
        return centre_downsampled(torch.fft.rfft2(stacks.read(index).to(torch.float64)), origins[index], w)

    start = time.perf_counter()
    batches = _batches(n, options.batch_size)

    def pass_one() -> Iterator[tuple[torch.Tensor, torch.Tensor, None, torch.Tensor]]:
        for index in track(batches, description="Reading and centring images", total=len(batches)):
            small = torch.fft.irfft2(centred_small(index), s=(w, w)).to(torch.float32)
            scratch[index] = small.numpy()
            ctf = ctf_2d(params[torch.as_tensor(index)], w, work_apix)
            filters[index] = (ctf * ctf if squared else ctf).numpy()
            if need_consensus:
                yield small, rotations[index], None, ctf

    if need_consensus:
        consensus = reconstruct_stream(pass_one(), box=w, sym=options.symmetry)
    else:
        for _ in pass_one():
            pass
    timings["read"] = time.perf_counter() - start

    start = time.perf_counter()
    prepared = prepare_volume(consensus.to(torch.float64)) if options.ctf_correction.subtracts else None
    whitening = Whitening.none(w)
    if prepared is not None and options.whiten:
        sample = batches[:: max(1, len(batches) * options.batch_size // NOISE_SAMPLE)]
        whitening = whitening_filter(_residual(scratch, filters, prepared, rotations, index) for index in sample)
    scale = torch.ones(n, dtype=torch.float64)
    for index in track(batches, description="Correcting for the CTF", total=len(batches)):
        # Images and projections whitened, the CTF not: the corrected images hold the whitened
        # residual times the CTF (or its sign), whose noise is as white as without whitening.
        f = whitening.filter * torch.fft.rfft2(torch.from_numpy(np.asarray(scratch[index])).to(torch.float64))
        projections = whitening.filter * project_rfft(prepared, rotations[index]) if prepared is not None else None
        data_filter = torch.from_numpy(np.asarray(filters[index])).to(torch.float64)
        corrected, scale[index] = correct(f, data_filter, options.ctf_correction, projections)
        scratch[index] = torch.fft.irfft2(corrected, s=(w, w)).numpy().astype(np.float32)
    timings["ctf"] = time.perf_counter() - start
    return scale, consensus, whitening, timings


def _residual(
    scratch: ScratchArray, filters: ScratchArray, prepared: PreparedVolume, rotations: torch.Tensor, index: np.ndarray
) -> torch.Tensor:
    """Images `index` less their least-squares scaled, CTF-modulated consensus projections (rfft)."""
    f = torch.fft.rfft2(torch.from_numpy(np.asarray(scratch[index])).to(torch.float64))
    model = torch.from_numpy(np.asarray(filters[index])).to(torch.float64) * project_rfft(prepared, rotations[index])
    return subtract_consensus(f, model)[0]


def _cone_batches(counts: np.ndarray, max_elements: int) -> list[np.ndarray]:
    """Group non-empty cones of similar size so that a padded batch holds at most `max_elements` images."""
    order = [c for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    batches, current = [], []
    for c in order:
        if current and (len(current) + 1) * counts[current[0]] > max_elements:
            batches.append(np.array(current))
            current = []
        current.append(int(c))
    if current:
        batches.append(np.array(current))
    return batches


def classify_cones(
    scratch: ScratchArray,
    cones: Cones,
    masks: torch.Tensor,
    track: Track = no_progress,
    max_images: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame, np.ndarray]:
    """Align, mask and analyse each cone.

    Returns rho and lambda per membership, the per-cone table, and per cone (M, 4, w, w) the mean image,
    the eigen-image and the averages of the members with positive and with negative ratio.
    """
    w = scratch.shape[-1]
    counts = cones.counts().numpy()
    starts = np.concatenate([[0], np.cumsum(counts)])
    rho = torch.zeros(len(cones.cone), dtype=torch.float64)
    llr = torch.zeros(len(cones.cone), dtype=torch.float64)
    rows = []
    # Per cone: mean image, eigen-image, and the averages of members with positive / negative ratio.
    images_out = np.zeros((cones.n_cones, 4, w, w), dtype=np.float32)
    references = cone_reference(cones.axes)
    # Only pixels inside some cone's mask enter the principal component (fewer dimensions, same result).
    inside = torch.nonzero(masks.reshape(len(masks), -1).any(dim=0)).squeeze(1)

    def full_image(values: torch.Tensor) -> np.ndarray:
        out = torch.zeros(w * w, dtype=torch.float64)
        out[inside] = values.to(torch.float64)
        return out.reshape(w, w).numpy()
    batches = _cone_batches(counts, max_images)
    for batch in track(batches, description="Classifying cones", total=len(batches)):
        size = int(counts[batch].max())
        data = torch.zeros(len(batch), size, len(inside), dtype=torch.float32)
        valid = torch.zeros(len(batch), size, dtype=torch.bool)
        spans = []
        for row, c in enumerate(batch):
            span = slice(int(starts[c]), int(starts[c + 1]))
            members = cones.particle[span].numpy()
            order = np.argsort(members)  # sorted reads from the scratch file
            images = torch.empty(len(members), w, w, dtype=torch.float32)
            images[order] = torch.from_numpy(np.asarray(scratch[members[order]]))
            aligned = align_to_reference(images, cones.rotation[span], references[c], cones.mirrored[span])
            data[row, : len(members)] = (aligned * masks[c]).reshape(len(members), -1)[:, inside]
            valid[row, : len(members)] = True
            spans.append(span)
        comp = first_component(data, valid)
        mixture = fit_mixture(comp.scores, valid)
        ratios = log_likelihood_ratio(comp.scores, mixture)
        for row, (c, span) in enumerate(zip(batch, spans)):
            k = span.stop - span.start
            rho[span] = comp.scores[row, :k]
            llr[span] = ratios[row, :k]
            positive = ratios[row, :k] > 0
            members = data[row, :k].to(torch.float64)
            images_out[c, 0] = full_image(comp.mean[row])
            images_out[c, 1] = full_image(comp.eigenimage[row])
            images_out[c, 2] = full_image(members[positive].mean(0)) if positive.any() else 0
            images_out[c, 3] = full_image(members[~positive].mean(0)) if (~positive).any() else 0
            rows.append(
                {
                    "cone": int(c),
                    "particles": k,
                    "explained_variance": float(comp.explained[row]),
                    "mean1": float(mixture.means[row, 0]),
                    "mean2": float(mixture.means[row, 1]),
                    "sigma": float(mixture.sigma[row]),
                    "weight1": float(mixture.weights[row, 0]),
                    "separation": float(mixture.separation[row]),
                }
            )
    table = pd.DataFrame(rows).sort_values("cone", ignore_index=True)
    return rho, llr, table, images_out


IMAGE_BYTES_PER_PIXEL = 37
"""Bytes per cone and working pixel of the per-cone images: the projected masks (bool, then float32),
the cone images (4 float32) and their reordered copy for the swapped cones (4 float32 more)."""

MAXCUT_BYTES_PER_CONE = 8 * 8 * 201
"""maxcut.synchronise holds about 8 float64 arrays of its 201 sign candidates (n_rounds + 1) per node
of a component (7.3 measured with tracemalloc on 2000 to 10000 nodes)."""

GRAPH_BYTES_PER_PAIR = 100
"""The graph's sparse matrices per pair of cones sharing a particle: weights and shared counts with
their products' work space (12 bytes a value), the max-cut's copies and the edge table."""

MEMBERSHIP_BYTES = 100
"""Per membership: the ratio matrix, rho and lambda, and the membership table."""


def cone_memory(cones: Cones, w: int) -> int:
    """Bytes that the per-cone steps (3-5 of `split`) hold at their peak, for `cones` at working box w.

    The per-cone images and the max-cut grow with the cones, the graph with the pairs of cones that
    share a particle (the sum over particles of their cone count squared) and the rest with the
    memberships. Work space that does not grow with these (a batch of images) is left out.
    """
    per_particle = torch.bincount(cones.particle).to(torch.float64)
    pairs = int((per_particle * per_particle).sum())
    per_cone = IMAGE_BYTES_PER_PIXEL * w * w + MAXCUT_BYTES_PER_CONE
    return cones.n_cones * per_cone + GRAPH_BYTES_PER_PAIR * pairs + MEMBERSHIP_BYTES * len(cones.cone)


def available_memory() -> int:
    """Bytes of memory available: MemAvailable of /proc/meminfo where it exists, else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(size: int) -> str:
    """Bytes as '180 GB', '2.5 GB' or '310 MB'."""
    if size >= 1e10:
        return f"{size / 1e9:.0f} GB"
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def _sampling_name(sampling: float, explicit: bool) -> str:
    return f"--angular_sampling {sampling:g}" if explicit else f"the default sampling ({sampling:.1f} deg)"


def check_cone_counts(counts: torch.Tensor, minimum: int, sampling: float, explicit: bool) -> None:
    """Refuse a sampling that leaves every cone with fewer than `minimum` particles.

    `counts` (M,) are the cones' particle counts, `sampling` (degrees) their angular sampling and
    `explicit` whether the user chose it. Dropping the sparse cones would leave none; keeping them,
    their mixtures on a few points degenerate, and with them the graph and its max-cut (2000
    particles at 2 degrees, at most 8 a cone, gave weights up to 4e12; Clarabel failed on 65 of the
    components and never returned from the next). Raises ValueError with one line.
    """
    if len(counts) and not (counts < minimum).all():
        return
    advice = "(the default chooses it from the particle count)" if explicit else "(--angular_sampling, up to 90)"
    most = int(counts.max()) if len(counts) else 0
    raise ValueError(
        f"{_sampling_name(sampling, explicit)} leaves every cone with fewer than {minimum} particles (at most "
        f"{most}): too few for the split; use a coarser sampling {advice}"
    )


def check_cone_memory(
    cones: Cones, w: int, sampling: float, explicit: bool, available: int | None = None
) -> None:
    """Refuse, before any image is read, cones whose per-cone steps need more than the memory available.

    `w` is the working box (pixels), `sampling` (degrees) the cones' angular sampling, `explicit`
    whether the user chose it, and `available` (bytes) defaults to `available_memory()`. Raises
    ValueError with one line that holds the estimate (`cone_memory`).
    """
    need = cone_memory(cones, w)
    available = available_memory() if available is None else available
    if need > available:
        advice = "(the default chooses it from the particle count)"
        if not explicit:
            advice = "or a smaller working box (--maxres, --resize)"
        raise ValueError(
            f"{_sampling_name(sampling, explicit)} gives {cones.n_cones} cones: about {_size(need)} for the "
            f"per-cone images and the graph at a {w}-pixel working box, {_size(available)} available; use a "
            f"coarser sampling {advice}"
        )


def split(
    particles: star_io.Particles,
    stacks: ImageStacks,
    options: SplitOptions,
    mask: torch.Tensor | None = None,
    consensus: torch.Tensor | None = None,
    scratch_dir: str | Path | None = None,
    track: Track = no_progress,
) -> SplitResult:
    """Split a refined particle set into two classes with the graph method.

    `mask` and `consensus` are maps at the particles' box and pixel size (or None). Without a mask,
    one is drawn around the consensus map (masks.consensus_mask). Cones all too sparse to split, or
    too many for the memory available, are refused before any image is read (check_cone_counts,
    check_cone_memory).
    """
    if mask is None and consensus is None and particles.premultiplied:
        raise ValueError("CTF-premultiplied particles need a consensus map (--ref) or a mask (--mask)")
    timings: dict[str, float] = {}
    warnings: list[str] = []
    n = len(particles)
    box, apix, rotations = particles.box, particles.pixel_size, particles.rotations

    # 1. Cones of projection direction.
    start = time.perf_counter()
    symmetry = symmetry_matrices(options.symmetry)
    sampling = options.angular_sampling or default_sampling(n, len(symmetry), options.particles_per_cone)
    cone_angle = options.cone_angle or sampling
    axes = asymmetric_unit_directions(sampling, symmetry)
    cones = assign_to_cones(rotations, axes, cone_angle, symmetry)
    explicit = options.angular_sampling is not None
    counts = cones.counts()
    empty = int((counts == 0).sum())
    if empty:
        warnings.append(f"{empty} of {len(axes)} cone directions hold no particle: holes in the angular coverage")
    check_cone_counts(counts, options.min_cone_particles, sampling, explicit)
    sparse = counts < options.min_cone_particles
    if sparse.any():
        # Too few members for a principal component: drop those cones and let their particles join
        # the nearest remaining ones.
        axes = axes[~sparse]
        cones = assign_to_cones(rotations, axes, cone_angle, symmetry)
    timings["cones"] = time.perf_counter() - start
    w = working_box(box, apix, options.maxres, options.resize)
    check_cone_memory(cones, w, sampling, explicit)

    # 2. Centred, downsampled, CTF-corrected images in a scratch file.
    work_apix = apix * box / w
    small_consensus = fourier_crop_volume(consensus, w) if consensus is not None else None
    with (
        tempfile.TemporaryDirectory(prefix="graphsplit_", dir=scratch_dir) as tmp,
        ScratchArray(Path(tmp) / "images.f32", (n, w, w)) as scratch,
        ScratchArray(Path(tmp) / "filters.f32", (n, w, w // 2 + 1)) as filters,
        ScratchArray(Path(tmp) / "spectra.f32", (n, w, w // 2 + 1, 2)) as spectra,
    ):
        scale, small_consensus, whitening, prep_times = prepare_images(
            particles, stacks, scratch, filters, options, small_consensus, track
        )
        timings.update(prep_times)

        # 3. Per-cone alignment, principal component, mixture and log-likelihood ratios.
        start = time.perf_counter()
        # The 3D mask focuses every later step; by default it is drawn around the consensus map.
        mask_volume = resample_volume(mask, w) if mask is not None else consensus_mask(
            small_consensus, work_apix, threshold=options.mask_threshold, extend=options.mask_extend
        )
        masks = project_mask(mask_volume, cone_reference(axes)).to(torch.float32)
        rho, llr, cone_table, cone_images = classify_cones(scratch, cones, masks, track)
        timings["classify"] = time.perf_counter() - start

        # 4. Graph of cones and sign synchronisation.
        start = time.perf_counter()
        ratios = ratio_matrix(cones.cone, cones.particle, llr, cones.n_cones, n)
        weights = cone_weights(ratios)
        sync = synchronise(weights, seed=options.seed)
        signs = np.asarray(sync.signs, dtype=np.int64)
        timings["graph"] = time.perf_counter() - start

        # 5. Mean synchronised ratio per particle; classes by sign.
        graph_score, _ = particle_scores(ratios, signs)
        score, changed = graph_score, []

        # 6. Refinement against the two class maps with fixed poses (refine.py); its likelihood
        # assumes the scratch images are residuals times the CTF.
        plain = options.ctf_correction is CtfCorrection.subtract_multiply and not particles.premultiplied
        if plain and options.refine_iterations:
            start = time.perf_counter()
            batches = _batches(n, options.batch_size)
            image_spectra(scratch, filters, batches, spectra, whitening.filter if whitening.applied else None)
            score, changed = refine_classes(
                spectra, filters, batches, rotations, scale, graph_score, mask_volume, small_consensus, work_apix,
                options, redraw_mask=mask is None and options.refine_mask_threshold > 0, track=track,
            )  # fmt: skip
            timings["refine"] = time.perf_counter() - start
    classes = classes_by_sign(score)
    probability = 1.0 / (1.0 + np.exp(-np.abs(score)))
    cone_table, membership, edges = cone_diagnostics(
        cone_table, cone_images, cones, rho, llr, signs, [c.nodes for c in sync.components], ratios, weights
    )
    return SplitResult(
        classes=classes,
        score=score,
        probability=probability,
        cones=cones,
        cone_table=cone_table,
        membership=membership,
        cone_images=cone_images,
        edges=edges,
        components=[c.nodes for c in sync.components],
        sync_method=sync.method,
        sync_gap=float((sync.upper_bound - sync.objective) / max(abs(sync.upper_bound), 1e-300)),
        noise_contrast=whitening.contrast,
        whitened=whitening.applied,
        noise_spectrum=whitening.spectrum.numpy(),
        graph_score=graph_score,
        refine_changes=changed,
        sampling=sampling,
        cone_angle=cone_angle,
        working_box=w,
        working_pixel_size=work_apix,
        mask=mask_volume,
        timings=timings,
        warnings=warnings,
    )
