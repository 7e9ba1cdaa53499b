"""Step 3 of chapter 4, cone by cone: in-plane alignment onto the cone's reference view, the projected
mask, the first principal component, the two-Gaussian mixture and each member's log-likelihood ratio
(alignment, masks, pca, mixture); cones of similar size are processed in batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from relion_graphsplit.engine import CPU, LOCAL, Compute, Engine, StoredArray
from relion_graphsplit.method.alignment import align_to_reference, cone_reference
from relion_graphsplit.method.cones import Cones
from relion_graphsplit.method.mixture import fit_mixture, log_likelihood_ratio
from relion_graphsplit.method.pca import first_component
from relion_graphsplit.method.progress import Track, no_progress
from relion_graphsplit.scratch import ScratchArray


def classify_cones(
    scratch: ScratchArray,
    cones: Cones,
    rotations: torch.Tensor,
    symmetry: torch.Tensor,
    masks: torch.Tensor,
    track: Track = no_progress,
    max_images: int = 8192,
    engine: Engine = LOCAL,
    compute: Compute = CPU,
) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame, np.ndarray]:
    """Align, mask and analyse each cone.

    Each cone's members are read from `scratch`, aligned onto the cone's reference view
    (`alignment.cone_reference`, `alignment.align_to_reference`: mirrored members mirrored in y first)
    and multiplied by the cone's 2D mask; then the first principal component (`pca.first_component`),
    the two-Gaussian mixture of its scores (`mixture.fit_mixture`) and each member's log-likelihood
    ratio (`mixture.log_likelihood_ratio`). Only pixels inside some cone's mask enter the principal
    component (fewer dimensions, same result). Cones of similar size are processed in batches, padded
    to the largest: the tasks of `engine`, the same whoever runs them.

    Parameters
    ----------
    scratch : ScratchArray
        (n, w, w) float32 the centred, downsampled, CTF-corrected images [y, x], centred at w // 2
        (`preprocess.prepare_images`).
    cones : Cones
        M cones and their K memberships, sorted by cone; `cones.particle` indexes the rows of `scratch`.
    rotations : torch.Tensor
        (n, 3, 3) float64 RELION matrices of the rows of `scratch`.
    symmetry : torch.Tensor
        (G, 3, 3) float64 the point group's rotations the cones were made with.
    masks : torch.Tensor
        (M, w, w) [y, x] each cone's 2D mask, 0 or 1: the 3D mask projected along the cone's reference
        view (`masks.project_mask`; float32 in `split`).
    track : Track
        Progress callback, called as track(iterable, description=..., total=...).
    max_images : int
        Most images (padding included) in a batch of cones; a larger cone is taken alone.
    engine : Engine
        Where the batches of cones run, each a task that reads its members from `scratch`'s file.
    compute : Compute
        The device each batch of cones computes on: its images, aligned and masked, float32, with the
        principal component's float64 copies and Gram or covariance matrices (a batch of at most
        `max_images` images, as `cones.check_cone_memory` counts them), and the mixture fits.

    Returns
    -------
    rho : torch.Tensor
        (K,) float64 per membership, in the order of `cones`: its score on the cone's first principal
        component (whose eigen-image's sign makes it sum to a non-negative value).
    llr : torch.Tensor
        (K,) float64 per membership: its log-likelihood ratio lambda, the posterior log odds of the
        mixture component of larger mean (positive on that side).
    table : pd.DataFrame
        The per-cone table, one row per non-empty cone sorted by cone: cone, particles,
        explained_variance (the first eigenvalue over the total variance), mean1 and mean2 (the
        mixture's means, mean1 the larger), sigma (their shared standard deviation), weight1 (the
        weight of the component of mean1) and separation ((mean1 - mean2) / sigma).
    images : np.ndarray
        (M, 4, w, w) float32 [y, x] per cone: the mean image, the eigen-image (unit norm), and the
        averages of the members with positive and with non-positive ratio (aligned, masked images);
        0 outside every cone's mask, and for an empty cone.
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
    batches = _cone_batches(counts, max_images)
    tasks = []
    for batch in batches:
        spans = [slice(int(starts[c]), int(starts[c + 1])) for c in batch]
        # Copies, not views: a pickled view of a tensor carries the whole of it to the worker.
        members = [
            (cones.particle[span].numpy(), cones.rotations(rotations, symmetry, span), cones.mirrored[span].clone())
            for span in spans
        ]
        tasks.append((members, references[batch], masks[batch]))
    results = zip(batches, engine.map(_classify_batch, tasks, (StoredArray.of(scratch), inside, compute)))
    for batch, (scores, ratios, images, cone_rows) in track(results, description="Classifying cones", total=len(batches)):
        for c, score, ratio in zip(batch, scores, ratios):
            span = slice(int(starts[c]), int(starts[c + 1]))
            rho[span], llr[span] = score, ratio
        images_out[batch] = images
        rows += [{"cone": int(c), **row} for c, row in zip(batch, cone_rows)]
    table = pd.DataFrame(rows).sort_values("cone", ignore_index=True)
    return rho, llr, table, images_out


def _classify_batch(
    scratch: StoredArray,
    inside: torch.Tensor,
    compute: Compute,
    members: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]],
    references: torch.Tensor,
    masks: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray, list[dict]]:
    """One task of `classify_cones`: a batch of B cones, each given as its members' rows (k,), RELION
    matrices (k, 3, 3) and mirror flags (k,), with their reference views (B, 3, 3) and 2D masks
    (B, w, w); `inside` (D,) the flat pixels that enter the principal component. The alignment, the
    principal component and the mixture run on `compute`'s device.

    Returns per cone its members' scores rho (k,) and ratios lambda (k,), float64; the images
    (B, 4, w, w) float32 of `classify_cones`; and its table row without the cone's index; on the CPU."""
    w, device = scratch.shape[-1], compute.device
    size = max(len(rows) for rows, _, _ in members)
    data = torch.zeros(len(members), size, len(inside), dtype=torch.float32, device=device)
    valid = torch.zeros(len(members), size, dtype=torch.bool, device=device)
    on_device = inside.to(device)
    with scratch.open() as stored, compute.kernels():
        for row, (particles, rotations, mirrored) in enumerate(members):
            order = np.argsort(particles)  # sorted reads from the scratch file
            images = torch.empty(len(particles), w, w, dtype=torch.float32)
            images[order] = torch.from_numpy(np.asarray(stored[particles[order]]))
            aligned = align_to_reference(images.to(device), rotations, references[row], mirrored, masks[row])
            data[row, : len(particles)] = aligned.reshape(len(particles), -1)[:, on_device]
            valid[row, : len(particles)] = True
        comp = first_component(data, valid)
        mixture = fit_mixture(comp.scores, valid)
        ratios = log_likelihood_ratio(comp.scores, mixture)

    def full_image(values: torch.Tensor) -> np.ndarray:
        out = torch.zeros(w * w, dtype=torch.float64)
        out[inside] = values.to("cpu", torch.float64)
        return out.reshape(w, w).numpy()

    scores, lambdas, table = [], [], []
    images_out = np.zeros((len(members), 4, w, w), dtype=np.float32)
    for row, (particles, _, _) in enumerate(members):
        k = len(particles)
        scores.append(comp.scores[row, :k].to("cpu", copy=True))
        lambdas.append(ratios[row, :k].to("cpu", copy=True))
        positive = ratios[row, :k] > 0
        averaged = data[row, :k].to(torch.float64)
        images_out[row, 0] = full_image(comp.mean[row])
        images_out[row, 1] = full_image(comp.eigenimage[row])
        images_out[row, 2] = full_image(averaged[positive].mean(0)) if positive.any() else 0
        images_out[row, 3] = full_image(averaged[~positive].mean(0)) if (~positive).any() else 0
        table.append(
            {
                "particles": k,
                "explained_variance": float(comp.explained[row]),
                "mean1": float(mixture.means[row, 0]),
                "mean2": float(mixture.means[row, 1]),
                "sigma": float(mixture.sigma[row]),
                "weight1": float(mixture.weights[row, 0]),
                "separation": float(mixture.separation[row]),
            }
        )
    return scores, lambdas, images_out, table


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
