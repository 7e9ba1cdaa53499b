"""The graph split, top to bottom as in chapter 4 of the thesis.

1. cones of projection direction (cones), refused up front if they cannot fit in memory;
2. images centred, downsampled and CTF-corrected once, kept in a scratch file (preprocess);
3. per cone: in-plane alignment, mask, first principal component, two-Gaussian mixture and
   log-likelihood ratio of every member (classify: alignment, masks, pca, mixture);
4. graph of cones weighted by the agreement of their ratios; sign synchronisation by max-cut
   (graph, maxcut);
5. each particle's mean synchronised ratio; classes by its sign (graph);
6. refinement with fixed poses against the two class maps, started from that split (refine);
   steps 3-6 on any subset of the particles are two_classes.Splitter.split;
7. how many classes: each split learnt on the two half-sets alone and kept only where the held-out
   half shows several modes (gold_standard); kept classes split again, up to max_classes; then all the
   classes refined together (hierarchy);
and the tables to judge the whole set's split in two by (diagnostics).

`split` runs them all; a run that keeps its stages (cli.job) calls `prepare` (steps 1-2) and
`split_prepared` (steps 3-7) itself, so that a continued run starts from the images it prepared.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from relion_graphsplit.engine import CPU, LOCAL, Compute, Engine, StoredArray
from relion_graphsplit.fourier.symmetry import symmetry_matrices
from relion_graphsplit.method.classmaps import half_sets
from relion_graphsplit.method.cones import check_cone_memory
from relion_graphsplit.method.diagnostics import cone_diagnostics
from relion_graphsplit.method.gold_standard import SplitTest
from relion_graphsplit.method.hierarchy import find_classes
from relion_graphsplit.method.masks import consensus_mask, resample_volume
from relion_graphsplit.method.options import CtfCorrection, SplitOptions
from relion_graphsplit.method.preprocess import Whitening, fourier_crop_volume, prepare_images, working_box
from relion_graphsplit.method.progress import Track, no_progress
from relion_graphsplit.method.refine import image_spectra
from relion_graphsplit.method.two_classes import ConeSet, Splitter, cones_for
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.scratch import ScratchArray, row_batches


@dataclass
class SplitResult:
    """Everything the split found, per particle and per cone.

    n is the number of particles, M the number of cones, K the number of memberships (a particle can
    belong to several cones) and w the working box (pixels).

    Attributes
    ----------
    classes : np.ndarray
        (n,) int64, 1..K: each particle's most probable class in the last refinement round.
    log_posterior : np.ndarray
        (n, K) float64 log posterior probability of each class: held out, each half's particles
        scored against the other half's class maps (`refine.held_out_posterior`), or for two classes
        the graph score taken as log odds where no refinement ran (refine_iterations 0, a CTF
        correction other than subtract-multiply, or CTF-premultiplied particles); all 0 for K = 1.
    graph_score : np.ndarray
        (n,) float64 mean synchronised log-likelihood ratio of the graph split: over the particle's cones,
        the mean of the cone's sign times the particle's lambda there (`graph.particle_scores`).
    refine_changes : list of int
        The number of particles that changed class in each round of the last refinement (that of all
        K classes; empty when none ran).
    probability : np.ndarray
        (n,) float64 posterior probability of the assigned class (from `log_posterior`: for a few
        uncertain particles below that of another class).
    class_nodes : list of str
        Each class's leaf in the tree of splits ("1" the whole set; the classes of node X are X.1 and X.2).
    split_tests : list of SplitTest
        Every split tested on half-sets, in order (`hierarchy.test_split`).
    verdict : str
        One sentence for the user on the number of classes.
    cone_table : pd.DataFrame
        Per-cone diagnostics of the whole set's split in two, one row per cone (cones with fewer than
        min_cone_particles members already dropped, their particles moved to the nearest remaining
        cones; the memberships themselves are not kept, a membership table aside): the columns of
        `classify.classify_cones` and those `diagnostics.cone_diagnostics` adds (sign, component, axis_x,
        axis_y, axis_z, class1_fraction).
    membership : pd.DataFrame
        K rows, one per (cone, particle) membership: cone, particle, rho (the score on the cone's first
        principal component) and llr (the log-likelihood ratio lambda).
    cone_images : np.ndarray
        (M, 4, w, w) float32 [y, x] per cone, from its members aligned onto its reference view and masked:
        the mean, the eigen-image, and the class-1 and class-2 averages (the members on either side of the
        cone's synchronised ratio: swapped for cones of sign -1; the cone's own vote, not the particles'
        final classes). Zeros for an empty cone.
    edges : pd.DataFrame
        One row per pair of cones that share particles: cone1 < cone2, shared (the number of shared
        particles) and weight (w_ij).
    components : list of np.ndarray
        The cone indices (ascending, int64) of each connected part of the graph, ordered by lowest cone;
        the classes of different parts are synchronised separately.
    sync_method : str
        The max-cut methods used on the non-trivial components ('sdp', 'bm', 'spectral') joined by '+', or
        'trivial'.
    sync_gap : float
        Relative gap between the max-cut's certified upper bound and the solution's objective,
        (bound - objective) / |bound| (0: proven optimal).
    noise_contrast : float or None
        Noise power of the noisiest ring (rings 1..w // 2) over the least noisy one's. None: not estimated
        (whitening off, or a CTF correction that does not subtract the consensus projection).
    whitened : bool
        Whether images and CTFs were whitened (`preprocess.whitening_filter`: a contrast of at least 2).
    noise_spectrum : np.ndarray
        (w // 2,) float64 noise power of rings 1..w // 2 relative to their mean; empty when not estimated.
    sampling : float
        Angular sampling between cone axes (degrees): options.angular_sampling, or
        `cones.default_sampling`.
    cone_angle : float
        Cone half-aperture (degrees): options.cone_angle, or the sampling.
    working_box : int
        The working box w (pixels, `preprocess.working_box`).
    working_pixel_size : float
        Pixel size at the working box (A): the particles' pixel size times box / w.
    mask : torch.Tensor
        (w, w, w) float32 [z, y, x] the graph split's 3D mask at the working size: the given mask
        resampled, or drawn around the consensus map (`masks.consensus_mask`). Not the mask the
        refinement redraws around the class maps.
    timings : dict of str to float
        Seconds per step: cones, read, ctf, classify, graph and, when it ran, refine.
    warnings : list of str
        Warnings for the user (such as cone directions that hold no particle).
    """

    classes: np.ndarray  # (n,) 1..K
    log_posterior: np.ndarray  # (n, K) log posterior probability of each class
    graph_score: np.ndarray  # (n,) mean synchronised log-likelihood ratio of the graph split
    refine_changes: list[int]  # particles that changed class in each refinement round
    probability: np.ndarray  # (n,) posterior probability of the assigned class
    class_nodes: list[str]  # each class's leaf in the tree of splits
    split_tests: list[SplitTest]  # every split tested on half-sets
    verdict: str
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

    @property
    def n_classes(self) -> int:
        return self.log_posterior.shape[1]


@dataclass
class Prepared:
    """The images read and prepared once (steps 1-2), in files of their own, and what the later steps
    need with them: the first stage of a run, which a continued run keeps (cli.job).

    n is the number of particles and w the working box (pixels).

    The images are in the working files of a folder of their own (`working_files`), beside this:
    images.f32 (n, w, w) centred, downsampled, CTF-corrected images [y, x]; filters.f32
    (n, w, w // 2 + 1) their data filters on the unshifted rfft grid (whitened where the spectra were
    made with whitening); spectra.f32 (n, w, w // 2 + 1, 2) the images' centred transforms for the
    refinement (`refine.image_spectra`; unwritten where it does not run), all float32.

    Attributes
    ----------
    cone_set : ConeSet
        The cones of the whole set (`two_classes.cones_for`).
    working_box : int
        w.
    scale : torch.Tensor
        (n,) float64 each image's grey scale relative to the consensus projection (`preprocess.prepare_images`).
    consensus : torch.Tensor or None
        (w, w, w) [z, y, x] the consensus map at the working size (None: CTF-premultiplied particles
        without one).
    whitening : Whitening
        The noise estimate and its filter.
    mask : torch.Tensor
        (w, w, w) [z, y, x] float32 the graph split's 3D mask (`SplitResult.mask`).
    redraw_mask : bool
        Whether the refinement draws its mask again around the class maps (no mask was given).
    timings : dict of str to float
        Seconds per step so far: cones, read, ctf and, where the spectra were made, refine.
    warnings : list of str
        Warnings for the user so far.
    """

    cone_set: ConeSet
    working_box: int
    scale: torch.Tensor
    consensus: torch.Tensor | None
    whitening: Whitening
    mask: torch.Tensor
    redraw_mask: bool
    timings: dict[str, float]
    warnings: list[str]


@contextlib.contextmanager
def working_files(
    folder: Path, n: int, w: int, existing: bool = False
) -> Iterator[tuple[ScratchArray, ScratchArray, ScratchArray]]:
    """The working files of `Prepared` in `folder`: images (n, w, w), filters (n, w, w // 2 + 1) and
    spectra (n, w, w // 2 + 1, 2), float32; made empty, or with `existing` opened as they are."""
    with (
        ScratchArray(folder / "images.f32", (n, w, w), existing) as images,
        ScratchArray(folder / "filters.f32", (n, w, w // 2 + 1), existing) as filters,
        ScratchArray(folder / "spectra.f32", (n, w, w // 2 + 1, 2), existing) as spectra,
    ):
        yield images, filters, spectra


def _plain(particles: star_io.Particles, options: SplitOptions) -> bool:
    """Whether the scratch images are residuals times the CTF, as the refinement's likelihood assumes."""
    return options.ctf_correction is CtfCorrection.subtract_multiply and not particles.premultiplied


def split(
    particles: star_io.Particles,
    stacks: ImageStacks,
    options: SplitOptions,
    mask: torch.Tensor | None = None,
    consensus: torch.Tensor | None = None,
    scratch_dir: str | Path | None = None,
    track: Track = no_progress,
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> SplitResult:
    """Classify a refined particle set: the graph split in two, applied again to each class kept.

    `prepare` then `split_prepared`, with the working files (images, data filters and transforms at
    the working box, about 10 bytes per particle and working pixel) in a temporary folder, removed on
    return.

    Parameters
    ----------
    particles, stacks, options, mask, consensus, track
        As `prepare`.
    scratch_dir : str or Path or None
        Folder to make the temporary folder in; None: the system's temporary folder.
    engine : Engine
        As `prepare` and `split_prepared`; a Dask engine's workers must see `scratch_dir`.
    compute : Compute
        As `prepare` and `split_prepared`.

    Returns
    -------
    SplitResult
        The classes and posteriors per particle, the splits tested, and the diagnostics per cone of the
        whole set's split in two.

    Raises
    ------
    ValueError
        As `prepare`.
    """
    with tempfile.TemporaryDirectory(prefix="graphsplit_", dir=scratch_dir) as tmp:
        prepared = prepare(particles, stacks, options, Path(tmp), mask, consensus, track, engine, compute)
        return split_prepared(particles, prepared, Path(tmp), options, track, engine, compute)


def prepare(
    particles: star_io.Particles,
    stacks: ImageStacks,
    options: SplitOptions,
    folder: Path,
    mask: torch.Tensor | None = None,
    consensus: torch.Tensor | None = None,
    track: Track = no_progress,
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> Prepared:
    """Steps 1-2: the cones, and every image read once into working files in `folder`.

    Cones all too sparse to split, or too many for the memory available, are refused before any image
    is read (check_cone_counts, check_cone_memory). Cones with fewer than options.min_cone_particles
    members have too few for a principal component: they are dropped and their particles join the
    nearest remaining cones. Without a mask, one is drawn around the consensus map
    (masks.consensus_mask).

    Parameters
    ----------
    particles : star_io.Particles
        The n refined particles: RELION matrices (n, 3, 3) that left-multiply xyz column vectors of the
        map, origins and CTF parameters (defocus in A, positive for underfocus), half-sets, box N
        (pixels) and pixel size (A).
    stacks : ImageStacks
        Their image stacks; every image is read once here.
    options : SplitOptions
        The split's parameters.
    folder : Path
        Existing folder for the working files (`working_files`), replaced if there.
    mask : torch.Tensor or None
        (N, N, N) [z, y, x] 3D mask (values from 0 to 1) at the particles' box and pixel size, used
        throughout. None: drawn around the consensus map at the working size, and for the refinement
        drawn again around the class maps (when options.refine_mask_threshold > 0).
    consensus : torch.Tensor or None
        (N, N, N) [z, y, x] consensus map at the particles' box and pixel size. None: reconstructed from
        the particles at the working size while they are read (not possible for CTF-premultiplied
        particles).
    track : Track
        Progress callback, called as track(iterable, description=..., total=...).
    engine : Engine
        Where the passes over the particles run (`preprocess.prepare_images`, `refine.image_spectra`):
        the same working files in this process or on any number of Dask workers, which must see the
        stacks and `folder`.
    compute : Compute
        The device the images are prepared on (`preprocess.prepare_images`, `refine.image_spectra`), a
        batch at a time; what `Prepared` holds is on the CPU.

    Returns
    -------
    Prepared
        What the later steps need with the working files.

    Raises
    ------
    ValueError
        For CTF-premultiplied particles without a consensus map or a mask (with a CTF correction that
        subtracts the consensus projection, without a consensus map: `preprocess.prepare_images`); an
        unknown point group; a sampling or cone angle outside (0, 90] degrees; cones all too sparse to
        split (`cones.check_cone_counts`) or too many for the memory available
        (`cones.check_cone_memory`).
    """
    if mask is None and consensus is None and particles.premultiplied:
        raise ValueError("CTF-premultiplied particles need a consensus map (--ref) or a mask (--mask)")
    timings: dict[str, float] = {}
    warnings: list[str] = []
    n, box, apix = len(particles), particles.box, particles.pixel_size

    # 1. Cones of projection direction for the whole set, refused up front if they cannot fit.
    start = time.perf_counter()
    cone_set = cones_for(particles.rotations, options, symmetry_matrices(options.symmetry))
    if cone_set.empty:
        warnings.append(
            f"{cone_set.empty} of {cone_set.directions} cone directions hold no particle: holes in the angular coverage"
        )
    timings["cones"] = time.perf_counter() - start
    w = working_box(box, apix, options.maxres, options.resize)
    check_cone_memory(cone_set.cones, w, cone_set.sampling, options.angular_sampling is not None)

    # 2. Centred, downsampled, CTF-corrected images in a scratch file.
    small_consensus = fourier_crop_volume(consensus, w) if consensus is not None else None
    # Made empty and closed here: the tasks open them by path where they run and write their rows, and
    # whoever reads them after (split_prepared) opens them after the tasks closed them. On a network
    # file system a file shows another machine's writes only to an opening after the writer closed it
    # (close-to-open consistency).
    with working_files(folder, n, w) as files:
        scratch, filters, spectra = (StoredArray.of(file) for file in files)
    scale, small_consensus, whitening, prep_times = prepare_images(
        particles, stacks, scratch, filters, options, small_consensus, track, engine, compute
    )
    timings.update(prep_times)
    if _plain(particles, options) and options.refine_iterations:
        start = time.perf_counter()
        batches = row_batches(n, options.working_batch(box, w))
        white = whitening.filter if whitening.applied else None
        image_spectra(scratch, filters, batches, spectra, white, engine, compute)
        timings["refine"] = time.perf_counter() - start
    # The 3D mask focuses every later step; by default it is drawn around the consensus map.
    mask_volume = resample_volume(mask, w) if mask is not None else consensus_mask(
        small_consensus, apix * box / w, threshold=options.mask_threshold, extend=options.mask_extend
    )
    return Prepared(
        cone_set, w, scale, small_consensus, whitening, mask_volume,
        redraw_mask=mask is None and options.refine_mask_threshold > 0, timings=timings, warnings=warnings,
    )  # fmt: skip


def split_prepared(
    particles: star_io.Particles,
    prepared: Prepared,
    folder: Path,
    options: SplitOptions,
    track: Track = no_progress,
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> SplitResult:
    """Steps 3-7 on the prepared images: the graph split of the whole set, then how many classes.

    Parameters
    ----------
    particles : star_io.Particles
        The n particles `prepared` was made from (`prepare`).
    prepared : Prepared
        What goes with their working files.
    folder : Path
        The folder of the working files (`working_files`), read, never written.
    options : SplitOptions
        The split's parameters, as given to `prepare`.
    track : Track
        Progress callback, called as track(iterable, description=..., total=...).
    engine : Engine
        Where the passes over the particles run (the per-cone classification, the refinement's sums
        and likelihoods): the same result in this process or on any number of Dask workers, which must
        see `folder`.
    compute : Compute
        The device those passes compute on, a batch at a time (each Dask worker on its own device of
        that name): the classes of the CPU's compiled loops, the posteriors to rounding
        (docs/method.md, "Determinism and memory"); the graph's max-cut and the split test's fits on
        the CPU.

    Returns
    -------
    SplitResult
        The classes and posteriors per particle, the splits tested, and the diagnostics per cone of the
        whole set's split in two.

    Raises
    ------
    FileNotFoundError, ValueError
        For working files that are gone or not of the sizes `prepared` describes.
    """
    timings, warnings = dict(prepared.timings), list(prepared.warnings)
    n, w = len(particles), prepared.working_box
    work_apix = particles.pixel_size * particles.box / w
    cone_set, whitening = prepared.cone_set, prepared.whitening
    with working_files(folder, n, w, existing=True) as (scratch, filters, spectra):
        # Every pass of the split is over the working-size images: batches of as many pixels as
        # options.batch_size full-size images.
        working = replace(options, batch_size=options.working_batch(particles.box, w))
        splitter = Splitter(
            scratch, filters, spectra if _plain(particles, options) else None, particles.rotations,
            prepared.scale, symmetry_matrices(options.symmetry), prepared.mask, prepared.consensus, work_apix,
            working, redraw_mask=prepared.redraw_mask, track=track, timings=timings, engine=engine,
            compute=compute,
        )  # fmt: skip

        # 3-5. The graph split of the whole set: cones, graph, synchronisation (two_classes).
        graph = splitter.graph(np.arange(n, dtype=np.int64), cone_set)

        # 6-7. How many classes: each split tested on half-sets and refined (step 6) where kept; then
        # all classes refined together.
        found = find_classes(splitter, graph, half_sets(particles, np.ones(n, dtype=np.int64), options.seed))
    warnings += found.warnings
    components = [c.nodes for c in graph.sync.components]
    cone_table, membership, edges = cone_diagnostics(
        graph.cone_table, graph.cone_images, cone_set.cones, graph.rho, graph.llr,
        np.asarray(graph.sync.signs, dtype=np.int64), components, graph.ratios, graph.weights,
    )  # fmt: skip
    sync = graph.sync
    return SplitResult(
        classes=found.classes,
        log_posterior=found.log_posterior,
        probability=np.exp(found.log_posterior[np.arange(n), found.classes - 1]),
        class_nodes=found.nodes,
        split_tests=found.tests,
        verdict=found.verdict,
        cone_table=cone_table,
        membership=membership,
        cone_images=graph.cone_images,
        edges=edges,
        components=components,
        sync_method=sync.method,
        sync_gap=float((sync.upper_bound - sync.objective) / max(abs(sync.upper_bound), 1e-300)),
        noise_contrast=whitening.contrast,
        whitened=whitening.applied,
        noise_spectrum=whitening.spectrum.numpy(),
        graph_score=graph.score,
        refine_changes=found.changed,
        sampling=cone_set.sampling,
        cone_angle=cone_set.cone_angle,
        working_box=w,
        working_pixel_size=work_apix,
        mask=prepared.mask,
        timings=timings,
        warnings=warnings,
    )
