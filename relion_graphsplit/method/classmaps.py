"""Class maps and half maps of a split, reconstructed as relion_reconstruct --ctf does, each image read once.

Every particle is read once and inserted into the accumulator of its class and half set
(rlnRandomSubset); the full map of a class comes from the sum of its two half accumulators, so it is
exactly the reconstruction from all of the class's particles. The FSC between the half maps is the
gold-standard FSC (unmasked, as in RELION's model.star) and gives the resolution at 0.143. On a Dask
cluster, fixed groups of images (TASK_IMAGES) are inserted on the workers, each into grids of its
own, and their grids added in order.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relion_graphsplit.engine import CPU, LOCAL, Compute, Engine, tasks_of
from relion_graphsplit.fourier.compiled import compiled, run_in_runs
from relion_graphsplit.fourier.ctf import CTFParams, ctf_2d
from relion_graphsplit.fourier.fsc import fsc, resolution_at
from relion_graphsplit.fourier.reconstruct import FourierAccumulator
from relion_graphsplit.method.progress import Track, no_progress
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.mrc import write_mrc
from relion_graphsplit.relion.stacks import ImageStacks

GRID_MEMORY = 2 * 2**30
"""Bytes of padded Fourier grids (`FourierAccumulator`, two per class) the class maps hold at a time:
0.1 GB per grid at box 128, so ten classes at once; 0.76 GiB at box 256 and 2.6 GiB at box 384, so
one class at a time, which nothing smaller can hold."""

TASK_IMAGES = 16384
"""Fewest images per task of the class maps on Dask workers (whole batches; the last task may hold
fewer): a task sends back the padded grids of its pass's classes (0.4 GB for two classes at box 128),
so its tasks are larger than the other passes' to keep what is sent well below what is read."""


@dataclass
class ClassMaps:
    """Reconstructions of K classes; class k (1-based) is index k - 1 everywhere."""

    maps: torch.Tensor  # (K, N, N, N) float32, from all particles of the class
    half_maps: torch.Tensor  # (K, 2, N, N, N) float32, half sets 1 and 2
    fsc: torch.Tensor  # (K, N // 2 + 1) float64, between the half maps
    resolution: list[float]  # Angstrom, where the FSC drops below 0.143
    completeness: torch.Tensor  # (K, N // 2 + 1) fraction of each shell's Fourier voxels that got data
    counts: np.ndarray  # (K,) particles per class
    subsets: np.ndarray  # (n,) rlnRandomSubset (1 or 2) of every particle, as used
    pixel_size: float

    @property
    def distribution(self) -> np.ndarray:
        """Fraction of the particles in each class (rlnClassDistribution): (K,) float64, counts / total."""
        return self.counts / self.counts.sum()


def half_sets(particles: star_io.Particles, classes: np.ndarray, seed: int = 0) -> np.ndarray:
    """rlnRandomSubset (1 or 2) per particle: the file's column where it has one, else drawn at random
    (seeded) so that the two halves of every class differ in size by at most one particle.

    Parameters
    ----------
    particles : star_io.Particles
        The particle set; its `subsets` (the file's rlnRandomSubset), when present, are used as they are.
    classes : np.ndarray
        (n,) class of each particle row; only used to draw the halves when the file has none.
    seed : int
        Seed of the random draw (numpy's default_rng).

    Returns
    -------
    np.ndarray
        (n,) int64, 1 or 2 per particle. When drawn, each class's members are shuffled and dealt
        alternately to half 1 and half 2, so half 1 holds the extra particle of an odd-sized class.

    Raises
    ------
    ValueError
        If the file's rlnRandomSubset holds a value other than 1 or 2.
    """
    if particles.subsets is not None:
        if not np.isin(particles.subsets, (1, 2)).all():
            raise ValueError(f"{particles.path}: rlnRandomSubset must be 1 or 2 for every particle")
        return particles.subsets.astype(np.int64)
    rng = np.random.default_rng(seed)
    subsets = np.empty(len(classes), dtype=np.int64)
    for k in np.unique(classes):
        members = rng.permutation(np.flatnonzero(classes == k))
        subsets[members[0::2]], subsets[members[1::2]] = 1, 2
    return subsets


def reconstruct_classes(
    particles: star_io.Particles,
    stacks: ImageStacks,
    classes: np.ndarray,
    sym: str = "C1",
    seed: int = 0,
    batch_size: int = 256,
    compute: Compute = CPU,
    track: Track = no_progress,
    engine: Engine = LOCAL,
) -> ClassMaps:
    """Half maps, full maps and gold-standard FSC of each class (1..K) of a split, reading every image once.

    Images are CTF-corrected (CTF at the full box, RELION's formula; only the weight gets CTF^2 for
    CTF-premultiplied data) and centred by their origins (shifted by +origin, so the particle's
    centre, at the image centre minus its origin, moves to the centre); `sym` is applied to every map.
    The classes are taken as many at a time as their padded Fourier grids fit in GRID_MEMORY, each
    pass reading its classes' images only; images are read in batches in file order (one read per run
    of consecutive images), at most `batch_size` at a time. Half sets come from `half_sets(particles, classes, seed)` and are
    returned, so that a written particle file can carry them.

    Parameters
    ----------
    particles : star_io.Particles
        The particle set: RELION rotations (n, 3, 3), origins (n, 2) in pixels, CTF parameters, box
        (pixels) and pixel size (A).
    stacks : ImageStacks
        The particle images (n, N, N), read by particle row.
    classes : np.ndarray
        (n,) class of each particle row, 1..K, with every class holding at least one particle in
        each half set.
    sym : str
        RELION point group applied to every map.
    seed : int
        Seed of the half sets when the file has no rlnRandomSubset.
    batch_size : int
        Most images read at a time (fewer when the accumulators take fewer per insertion).
    compute : Compute
        The device the CTFs, insertions, inversions and FSCs compute on: the accumulators live there
        (GRID_MEMORY of them at a time), with a batch's images and CTFs at the full box, and each
        inversion's whole padded transform (`reconstruct._invert_torch`, off the CPU: 1.1 GB of
        complex128 at box 256, 3.6 GB at box 384, and its transforms' temporaries). The maps come
        back to the CPU.
    track : Track
        Progress callback, called as track(iterable, description=..., total=...).
    engine : Engine
        Where the insertions run: in this process (LOCAL), every image into the pass's accumulators; on
        a Dask cluster, groups of at least TASK_IMAGES images (the same whatever the workers), each into
        grids of its own on a worker, added in their order here (the maps then differ from this
        process's in the last bits of their sums, and this process holds twice the pass's grids).

    Returns
    -------
    ClassMaps
        Maps (K, N, N, N) float32, half maps (K, 2, N, N, N) float32, FSC between the (unmasked)
        half maps (K, N // 2 + 1) float64 and the resolution (A) where it drops below 0.143
        (`fourier.fsc.resolution_at`), shell completeness (K, N // 2 + 1), particle counts (K,),
        the half sets used (n,) and the pixel size (A). Class k is index k - 1.

    Raises
    ------
    ValueError
        If `classes` is not one value >= 1 per particle, if a class has no particle in one of the
        half sets, or if the file's rlnRandomSubset is not 1 or 2 everywhere.
    """
    classes = np.asarray(classes, dtype=np.int64)
    n = len(particles)
    if classes.shape != (n,) or classes.min() < 1:
        raise ValueError(f"need one class >= 1 per particle ({n}), got shape {classes.shape}")
    n_classes = int(classes.max())
    subsets = half_sets(particles, classes, seed)
    accumulator = (classes - 1) * 2 + subsets - 1  # index of (class, half) in `accumulators`
    sizes = np.bincount(accumulator, minlength=2 * n_classes).reshape(n_classes, 2)
    if (sizes == 0).any():
        k, h = np.argwhere(sizes == 0)[0]
        raise ValueError(f"class {k + 1} has no particle in half set {h + 1}: cannot make its half maps")

    box, apix = particles.box, particles.pixel_size
    rotations, origins, params, premultiplied = particles.rotations, particles.origins, particles.ctf, particles.premultiplied
    # The padded grids grow with box^3 (2.8 GB per accumulator at box 384): the classes are taken as
    # many at a time as fit in GRID_MEMORY, each pass reading only its classes' images, so that every
    # image is still read once and the memory does not grow with K.
    per_class = 2 * FourierAccumulator.grid_bytes(box)
    together = max(1, GRID_MEMORY // per_class)
    passes = [list(range(k, min(n_classes, k + together))) for k in range(0, n_classes, together)]
    maps, halves, curves, completeness = [], [], [], []
    for group in passes:
        accumulators = {a: FourierAccumulator(box, device=compute.device) for k in group for a in (2 * k, 2 * k + 1)}
        rows = np.flatnonzero(np.isin(classes - 1, group))
        # Batches in file order (one read per run of consecutive images), split among the
        # accumulators; about one insertion's worth of images for each, so that a batch's images,
        # CTFs and temporaries stay small at any box size.
        size = min(batch_size, len(accumulators) * accumulators[2 * group[0]].images_per_insert)
        batches = [rows[start : start + size] for start in range(0, len(rows), size)]
        which_classes = f"class {group[0] + 1}" if len(group) == 1 else f"classes {group[0] + 1}-{group[-1] + 1}"
        description = "Reconstructing class maps" + (f" ({which_classes})" if len(passes) > 1 else "")
        with compute.kernels():
            if engine is LOCAL:
                for index, images in track(stacks.read_ahead(batches), description=description, total=len(batches)):
                    batch = torch.from_numpy(index)
                    _insert(accumulators, images, accumulator[index], params[batch], rotations[batch], origins[batch],
                            apix, premultiplied)  # fmt: skip
            else:
                slots = sorted(accumulators)
                tasks = [
                    (task, [accumulator[index] for index in task], *(
                        [values[torch.from_numpy(index)] for index in task] for values in (params, rotations, origins)
                    ))
                    for task in tasks_of(batches, per_task=-(-TASK_IMAGES // size))
                ]  # fmt: skip
                parts = engine.map(_maps_task, tasks, (stacks, slots, apix, premultiplied, compute))
                # Added into the zero grids in task order, one task's grids at a time (a received
                # part may be read-only: np.require copies it then).
                for part in track(parts, description=description, total=len(tasks)):
                    for a, grid in zip(slots, part):
                        accumulators[a].sums += torch.from_numpy(np.require(grid, requirements="W")).to(compute.device)
            for k in track(group, description="Inverting class maps (classes)", total=len(group)):
                first, second = accumulators.pop(2 * k), accumulators.pop(2 * k + 1)
                half_maps = first.finalise(sym=sym), second.finalise(sym=sym)
                curves.append(fsc(*half_maps).cpu())
                halves.append(torch.stack([half.cpu() for half in half_maps]))
                first.sums += second.sums  # the class's full set
                del second, half_maps
                maps.append(first.finalise(sym=sym).cpu())
                completeness.append(_completeness(first))
    curves = torch.stack(curves)
    return ClassMaps(
        maps=torch.stack(maps),
        half_maps=torch.stack(halves),
        fsc=curves,
        resolution=[resolution_at(curve, box, apix) for curve in curves],
        completeness=torch.stack(completeness),
        counts=sizes.sum(1),
        subsets=subsets,
        pixel_size=apix,
    )


def _insert(
    accumulators: dict[int, FourierAccumulator],
    images: torch.Tensor,
    slots: np.ndarray,
    params: CTFParams,
    rotations: torch.Tensor,
    origins: torch.Tensor,
    apix: float,
    premultiplied: bool,
) -> None:
    """A batch of B images (B, N, N) inserted into the accumulators of their (class, half) slots (B,),
    with their CTFs (at pixel size `apix`, A), RELION matrices (B, 3, 3) and origins (B, 2, pixels)."""
    device = accumulators[int(slots[0])].device
    ctf = ctf_2d(params.to(device), images.shape[-1], apix)
    for a in np.unique(slots):
        take = torch.from_numpy(np.flatnonzero(slots == a))
        accumulators[a].insert(
            images[take], rotations[take], ctf=ctf[take.to(device)], origins=origins[take],
            ctf_premultiplied=premultiplied,
        )  # fmt: skip


def _maps_task(
    stacks: ImageStacks,
    slots: list[int],
    apix: float,
    premultiplied: bool,
    compute: Compute,
    batches: list[np.ndarray],
    which: list[np.ndarray],
    params: list[CTFParams],
    rotations: list[torch.Tensor],
    origins: list[torch.Tensor],
) -> list[np.ndarray]:
    """One task of the class maps on a Dask worker: its batches (rows (B,), (class, half) slots (B,),
    CTF parameters, RELION matrices (B, 3, 3) and origins (B, 2) per batch) read from the stacks and
    inserted, on `compute`'s device, into grids of its own, one per slot of the pass; returns them in
    the order of `slots`, each (3, 2c + 1, 2c + 1, c + 1) float32 (on the CPU the accumulators' own
    sums, not a copy: a task's grids are the largest thing a worker holds)."""
    # A copy of its own: the tasks on one worker's threads share their arguments, and an open file's
    # position is not to be shared.
    with copy.copy(stacks) as own, compute.kernels():
        accumulators = {a: FourierAccumulator(own.box, device=compute.device) for a in slots}
        for (_, images), slot, param, rotation, origin in zip(own.read_ahead(batches), which, params, rotations, origins):
            _insert(accumulators, images, slot, param, rotation, origin, apix, premultiplied)
        return [accumulators[a].sums.cpu().numpy() for a in slots]


def _completeness(acc: FourierAccumulator) -> torch.Tensor:
    """Per shell of the box (0..N // 2), the fraction of the padded half grid's voxels with weight > 0."""
    weight = acc.sums[2].cpu().numpy()
    shells = acc.box // 2 + 1
    filled, total = (np.zeros((len(weight), shells), dtype=np.int64) for _ in range(2))
    run_in_runs(_completeness_kernel, (filled, total, weight, acc.pad), len(weight), torch.get_num_threads(), least=1)
    return torch.from_numpy(filled.sum(0) / np.maximum(total.sum(0), 1))


@compiled
def _completeness_kernel(
    filled: np.ndarray, total: np.ndarray, weight: np.ndarray, pad: int, start: int, stop: int
) -> None:
    """For the rows z in [start, stop) of a centred half grid (2c + 1, 2c + 1, c + 1): the voxels in
    each shell round(r / pad) of the box below `total.shape[1]`, and those of them with weight > 0."""
    c = weight.shape[0] // 2
    for zi in range(start, stop):
        for yi in range(weight.shape[1]):
            for x in range(weight.shape[2]):
                r2 = (zi - c) ** 2 + (yi - c) ** 2 + x * x
                shell = int(np.rint(math.sqrt(r2) / pad))
                if shell < total.shape[1]:
                    total[zi, shell] += 1
                    if weight[zi, yi, x] > 0:
                        filled[zi, shell] += 1


def write_class_maps(out: Path, maps: ClassMaps) -> list[tuple[Path, str]]:
    """run_classNNN.mrc and run_half{1,2}_classNNN_unfil.mrc for every class, with RELION's MRC header.

    NNN is the 1-based class number on three digits (run_class001.mrc for index 0).

    Parameters
    ----------
    out : Path
        The folder to write into.
    maps : ClassMaps
        The maps (`reconstruct_classes`), written with their pixel size (A).

    Returns
    -------
    list of (Path, str)
        The output nodes as (path, kind) for ExternalJob.outputs: each class map ("map") and each
        half-1 map ("halfmap"; RELION declares half 1 only and finds half 2 by its name).
    """
    nodes = []
    for k in range(len(maps.maps)):
        name = f"class{k + 1:03d}"
        write_mrc(out / f"run_{name}.mrc", maps.maps[k].numpy(), maps.pixel_size)
        for h in (0, 1):
            write_mrc(out / f"run_half{h + 1}_{name}_unfil.mrc", maps.half_maps[k, h].numpy(), maps.pixel_size)
        nodes += [(out / f"run_{name}.mrc", "map"), (out / f"run_half1_{name}_unfil.mrc", "halfmap")]
    return nodes
