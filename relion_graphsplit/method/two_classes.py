"""One split in two of any set of rows (the whole set, a class, a half-set): steps 3-6 of chapter 4.

`Splitter` holds what the rows share once the images are prepared (the scratch files, the mask, the
consensus) and splits any subset of them: cones of projection direction for those rows, per-cone
principal components and log-likelihood ratios (classify), the graph of cones synchronised by max-cut,
each particle's mean synchronised ratio, and the fixed-pose refinement against the two class maps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from relion_graphsplit.engine import CPU, LOCAL, Compute, Engine
from relion_graphsplit.fourier.reconstruct import FourierAccumulator
from relion_graphsplit.method.alignment import cone_reference
from relion_graphsplit.method.classify import classify_cones
from relion_graphsplit.method.cones import (
    Cones,
    assign_to_cones,
    asymmetric_unit_directions,
    check_cone_counts,
    default_sampling,
)
from relion_graphsplit.method.graph import classes_by_sign, cone_weights, particle_scores, ratio_matrix
from relion_graphsplit.method.masks import project_mask
from relion_graphsplit.method.maxcut import SyncResult, synchronise
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.method.progress import Track, no_progress
from relion_graphsplit.method.refine import (
    class_sums,
    difference_maps,
    held_out_posterior,
    projection_scores,
    refine_classes,
    residual_sums,
)
from relion_graphsplit.scratch import ScratchArray, row_batches

TOTALS_KEPT = 4
"""Sets of rows whose residual sums a Splitter keeps (`Splitter.residual_totals`): two grids each."""


@dataclass
class ConeSet:
    """Cones of projection direction for m rows (step 1), with the sampling that made them.

    Attributes
    ----------
    cones : Cones
        Axes and memberships; `cones.particle` indexes the m rows (0..m - 1), sparse cones dropped.
    sampling : float
        Angular sampling between cone axes (degrees).
    cone_angle : float
        Cone half-aperture (degrees).
    empty : int
        Cone directions that held no particle before the sparse cones were dropped.
    directions : int
        Cone directions of the sampling.
    """

    cones: Cones
    sampling: float
    cone_angle: float
    empty: int
    directions: int


def cones_for(rotations: torch.Tensor, options: SplitOptions, symmetry: torch.Tensor) -> ConeSet:
    """Cones for particles of these orientations: sampling from their number unless given; cones with
    fewer than options.min_cone_particles members dropped, their particles joining the nearest others.

    Parameters
    ----------
    rotations : torch.Tensor
        (m, 3, 3) RELION matrices of the rows (left-multiplying xyz column vectors of the map).
    options : SplitOptions
        angular_sampling, cone_angle, particles_per_cone, min_cone_particles.
    symmetry : torch.Tensor
        (G, 3, 3) the point group's matrices.

    Returns
    -------
    ConeSet

    Raises
    ------
    ValueError
        When every cone is too sparse to split (`cones.check_cone_counts`).
    """
    m = len(rotations)
    sampling = options.angular_sampling or default_sampling(m, len(symmetry), options.particles_per_cone)
    cone_angle = options.cone_angle or sampling
    axes = asymmetric_unit_directions(sampling, symmetry)
    cones = assign_to_cones(rotations, axes, cone_angle, symmetry)
    counts = cones.counts()
    check_cone_counts(counts, options.min_cone_particles, sampling, options.angular_sampling is not None)
    sparse = counts < options.min_cone_particles
    if sparse.any():
        # Too few members for a principal component: drop those cones and let their particles join
        # the nearest remaining ones.
        cones = assign_to_cones(rotations, axes[~sparse], cone_angle, symmetry)
    return ConeSet(cones, sampling, cone_angle, int((counts == 0).sum()), len(axes))


@dataclass
class Graph:
    """The graph split of m rows (steps 3-5), kept for the diagnostics of the whole set's split.

    Attributes
    ----------
    cone_set : ConeSet
        The cones.
    rho, llr : torch.Tensor
        (K,) float64 per membership: score on the cone's first component, log-likelihood ratio.
    cone_table : pd.DataFrame
        `classify.classify_cones`' per-cone table.
    cone_images : np.ndarray
        (M, 4, w, w) the per-cone images of `classify.classify_cones`.
    sync : SyncResult
        The max-cut synchronisation.
    ratios : sp.csr_matrix
        (M, m) the cones' ratios (`graph.ratio_matrix`).
    weights : sp.csr_matrix
        (M, M) the edge weights (`graph.cone_weights`).
    score : np.ndarray
        (m,) float64 each row's mean synchronised ratio (positive for class 1).
    """

    cone_set: ConeSet
    rho: torch.Tensor
    llr: torch.Tensor
    cone_table: pd.DataFrame
    cone_images: np.ndarray
    sync: SyncResult
    ratios: sp.csr_matrix
    weights: sp.csr_matrix
    score: np.ndarray


@dataclass
class TwoClasses:
    """A split of m rows in two.

    Attributes
    ----------
    rows : np.ndarray
        (m,) int64 the rows split, ascending.
    log_posterior : np.ndarray
        (m, 2) float64 log posterior probabilities of the two classes: the refinement's, or from the
        graph score alone (as log odds) where no refinement ran.
    changed : list of int
        Particles that changed class in each refinement round.
    mask : torch.Tensor
        (w, w, w) the 3D mask of the refinement (the graph split's where none ran).
    """

    rows: np.ndarray
    log_posterior: np.ndarray
    changed: list[int]
    mask: torch.Tensor

    @property
    def classes(self) -> np.ndarray:
        """(m,) int64 1 or 2, the more probable class (class 1 on a tie)."""
        return np.where(self.log_posterior[:, 0] >= self.log_posterior[:, 1], 1, 2)


@dataclass
class Splitter:
    """What every split shares once the images are prepared (`preprocess.prepare_images`).

    n is the number of particles and w the working box.

    Attributes
    ----------
    scratch : ScratchArray
        (n, w, w) the preprocessed images.
    filters : ScratchArray
        (n, w, w // 2 + 1) the data filters (CTFs; whitened where the spectra are).
    spectra : ScratchArray or None
        (n, w, w // 2 + 1, 2) the images' transforms (`refine.image_spectra`), or None where the
        refinement cannot run (a CTF correction other than subtract-multiply, premultiplied data).
    rotations : torch.Tensor
        (n, 3, 3) RELION matrices.
    scale : torch.Tensor
        (n,) each image's grey scale relative to the consensus projection.
    symmetry : torch.Tensor
        (G, 3, 3) the point group's matrices.
    mask : torch.Tensor
        (w, w, w) the graph split's 3D mask.
    consensus : torch.Tensor
        (w, w, w) the consensus map at the working box.
    pixel_size : float
        Pixel size (A) at the working box.
    options : SplitOptions
        The split's parameters.
    redraw_mask : bool
        Whether the refinement draws its mask again around the class maps.
    track : Track
        Progress callback.
    timings : dict of str to float
        Seconds spent per step, summed over every split.
    engine : Engine
        Where the passes over the particles run (`engine`; the same result wherever).
    compute : Compute
        The device they compute on (`engine.Compute`; the same classes, to rounding).
    """

    scratch: ScratchArray
    filters: ScratchArray
    spectra: ScratchArray | None
    rotations: torch.Tensor
    scale: torch.Tensor
    symmetry: torch.Tensor
    mask: torch.Tensor
    consensus: torch.Tensor
    pixel_size: float
    options: SplitOptions
    redraw_mask: bool
    track: Track = no_progress
    timings: dict[str, float] | None = None
    engine: Engine = LOCAL
    compute: Compute = CPU
    _totals: dict[bytes, list[FourierAccumulator]] = field(default_factory=dict, repr=False)

    def _time(self, step: str, start: float) -> None:
        if self.timings is not None:
            self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - start

    def graph(self, rows: np.ndarray, cone_set: ConeSet | None = None) -> Graph:
        """Steps 3-5 on `rows`: per-cone components and ratios, the graph, each row's mean
        synchronised ratio. Raises ValueError where the rows' cones are all too sparse."""
        start = time.perf_counter()
        cone_set = cone_set or cones_for(self.rotations[rows], self.options, self.symmetry)
        self._time("cones", start)
        start = time.perf_counter()
        cones = cone_set.cones
        masks = project_mask(self.mask, cone_reference(cones.axes)).to(torch.float32)
        members = replace(cones, particle=torch.from_numpy(rows)[cones.particle])  # rows of the scratch files
        rho, llr, cone_table, cone_images = classify_cones(
            self.scratch, members, self.rotations, self.symmetry, masks, self.track, engine=self.engine,
            compute=self.compute,
        )  # fmt: skip
        self._time("classify", start)
        start = time.perf_counter()
        ratios = ratio_matrix(cones.cone, cones.particle, llr, cones.n_cones, len(rows))
        weights = cone_weights(ratios)
        sync = synchronise(weights, seed=self.options.seed)
        score, _ = particle_scores(ratios, np.asarray(sync.signs, dtype=np.int64))
        self._time("graph", start)
        return Graph(cone_set, rho, llr, cone_table, cone_images, sync, ratios, weights, score)

    @property
    def refines(self) -> bool:
        """Whether the fixed-pose refinement (and so the test of splits) can run."""
        return self.spectra is not None and self.options.refine_iterations > 0

    def split(self, rows: np.ndarray, rounds: int | None = None, graph: Graph | None = None) -> TwoClasses:
        """Steps 3-6 on `rows`: the graph split (`graph` where already made), then the refinement
        against the two class maps (at most `rounds` rounds; None: options.refine_iterations)."""
        graph = graph or self.graph(rows)
        if not self.refines:  # the graph score, taken as log odds, is the answer
            half = graph.score / 2
            log_posterior = np.stack([half - np.logaddexp(half, -half), -half - np.logaddexp(half, -half)], axis=1)
            return TwoClasses(rows, log_posterior, [], self.mask)
        refined = self.refine(rows, classes_by_sign(graph.score), rounds)
        return TwoClasses(rows, refined.log_posterior, refined.changed, refined.mask)

    def refine(self, rows: np.ndarray, classes: np.ndarray, rounds: int | None = None, local: bool = False):
        """`refine.refine_classes` of `rows` from `classes` (1..K), at most `rounds` rounds (None:
        options.refine_iterations), the class maps weighted voxel by voxel if `local` (for classes
        already found)."""
        start = time.perf_counter()
        options = self.options if rounds is None else replace(self.options, refine_iterations=rounds)
        refined = refine_classes(
            self.spectra, self.filters, rows, self.rotations, self.scale, classes, self.mask, self.consensus,
            self.pixel_size, options, redraw_mask=self.redraw_mask, track=self.track, engine=self.engine,
            compute=self.compute, totals=self.residual_totals(rows), local=local,
        )  # fmt: skip
        self._time("refine", start)
        return refined

    def held_out(self, rows: np.ndarray, probability: np.ndarray, mask: torch.Tensor) -> np.ndarray:
        """`refine.held_out_posterior` of `rows` with class probabilities (m, K) within `mask`:
        (m, K) log posteriors, each half's particles scored against the other half's maps."""
        start = time.perf_counter()
        log_posterior = held_out_posterior(
            self.spectra, self.filters, rows, self.rotations, self.scale, probability, mask, self.options,
            self.engine, self.compute, self.residual_totals(rows),
        )  # fmt: skip
        self._time("refine", start)
        return log_posterior

    def residual_totals(self, rows: np.ndarray) -> list[FourierAccumulator]:
        """`refine.residual_sums` of `rows` (two FourierAccumulator), kept for the last TOTALS_KEPT
        sets of rows: a split's refinement and its difference map, and each refinement of all classes
        and the closest pair's maps, sum the same rows. The same sums as made anew, bit for bit."""
        key = np.ascontiguousarray(rows, dtype=np.int64).tobytes()
        if key not in self._totals:
            batches = [rows[index] for index in row_batches(len(rows), self.options.batch_size)]
            if len(self._totals) >= TOTALS_KEPT:
                del self._totals[next(iter(self._totals))]
            self._totals[key] = residual_sums(self.spectra, self.rotations, self.filters, batches, self.engine, self.compute)
        return self._totals[key]

    def class_maps(
        self, rows: np.ndarray, probability: np.ndarray, mask: torch.Tensor, local: bool = False
    ) -> list[torch.Tensor]:
        """The K classes' difference maps to the consensus (`refine.difference_maps`, (w, w, w) each)
        for `rows` with class probabilities (m, K), FSC-weighted within `mask`, and voxel by voxel if
        `local`."""
        batches = [rows[index] for index in row_batches(len(rows), self.options.batch_size)]
        totals = self.residual_totals(rows)
        everyone = np.zeros((self.spectra.shape[0], probability.shape[1]))
        everyone[rows] = probability
        sums = class_sums(
            self.spectra, everyone, totals, self.rotations, self.filters, batches, self.engine, self.compute
        )
        return difference_maps(sums, self.options.symmetry, mask, self.compute, local)

    def difference(self, split: TwoClasses) -> torch.Tensor:
        """(w, w, w) class 1's map minus class 2's, from the split's rows and probabilities, masked by
        the split's own mask."""
        start = time.perf_counter()
        first, second = self.class_maps(split.rows, np.exp(split.log_posterior), split.mask)
        self._time("split tests", start)
        return (first - second) * split.mask

    def scores(self, rows: np.ndarray, direction: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """`refine.projection_scores` of `rows` along `direction`: (m,) amounts and (m,) variances."""
        start = time.perf_counter()
        batches = [rows[index] for index in row_batches(len(rows), self.options.batch_size)]
        z, variance = projection_scores(
            self.spectra, direction, torch.ones_like(direction), self.rotations, self.scale, self.filters, batches,
            self.engine, self.compute,
        )  # fmt: skip
        self._time("split tests", start)
        return z[rows], variance[rows]
