"""The multi-component alternative to the tree of splits, measured against it on the K benchmark's sets.

    python scripts/multi_component.py --sets kbench_out/adk-3state-snr0.02,kbench_out/1bd2-4state-snr0.02 \
        --components 0,6 --j 2

Instead of splitting in two again and again, each cone keeps q principal components (Xmipp's unreleased
multi-class branch keeps 6); the cones' bases are synchronised over O(q) by the spectral method (the top q
eigenvectors of the matrix of the cones' cross-covariances on their shared particles, each cone's block
rounded to the nearest orthogonal matrix), each particle's synchronised scores are averaged over its
cones, and a K-class Gaussian mixture (full covariances, k-means++ start, seeded) gives the start of the
same joint K-class refinement the tree's classes go through (`Splitter.refine`). K is the true K here,
an advantage the tree does not have. q = 0 means K - 1, the least that holds K classes.

Each set folder is one of `scripts/k_benchmark.py`'s (particles.star, consensus.mrc, truth.star; its
graph split in graphsplit/run_data.star for the comparison). Prints a table: the accuracy of the
mixture's start and after the refinement, the tree's accuracy and K, and the seconds of each part.
"""

from __future__ import annotations

import os
from pathlib import Path

from relion_graphsplit.cli.launch import THREAD_WAITING

os.environ.update({name: value for name, value in THREAD_WAITING.items() if name not in os.environ})

import json
import time

import numpy as np
import torch
import typer
from threadpoolctl import threadpool_limits

from relion_graphsplit.method import pipeline
from relion_graphsplit.method.alignment import align_to_reference, cone_reference
from relion_graphsplit.method.masks import project_mask
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.simulate.metrics import accuracy


class _Measured(Exception):
    """Raised once the alternative's classes are measured: the rest of the run is not needed."""


def cone_components(splitter, cones, q: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per cone, its members' rows (k,) and their whitened scores (k, q) on its first q principal
    components of the aligned, masked images."""
    masks = project_mask(splitter.mask, cone_reference(cones.axes)).to(torch.float32)
    references = cone_reference(cones.axes)
    counts = cones.counts().numpy()
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for c in range(cones.n_cones):
        span = slice(int(starts[c]), int(starts[c + 1]))
        rows = cones.particle[span].numpy()
        if len(rows) <= q + 1:
            out.append((rows, np.zeros((len(rows), q))))
            continue
        order = np.argsort(rows)
        images = torch.empty(len(rows), *splitter.scratch.shape[1:], dtype=torch.float32)
        images[order] = torch.from_numpy(np.asarray(splitter.scratch[rows[order]]))
        rotations = cones.rotations(splitter.rotations, splitter.symmetry, span)
        aligned = align_to_reference(images, rotations, references[c], cones.mirrored[span], masks[c])
        x = aligned.reshape(len(rows), -1)[:, masks[c].reshape(-1) > 0].to(torch.float64).numpy()
        x = x - x.mean(axis=0)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        scores = u[:, :q] * np.sqrt(len(rows))  # unit variance per component
        out.append((rows, scores))
    return out


def synchronise(components: list[tuple[np.ndarray, np.ndarray]], n: int, q: int) -> np.ndarray:
    """Each particle's mean synchronised scores (n, q): the cones' bases rotated into one frame by the
    top q eigenvectors of Z^T Z (Z (n, C q) the particles' scores in every cone's columns)."""
    cones = len(components)
    z = np.zeros((n, cones * q))
    for c, (rows, scores) in enumerate(components):
        z[rows, c * q : (c + 1) * q] = scores
    gram = z.T @ z
    _, vectors = np.linalg.eigh(gram)
    top = vectors[:, -q:]
    total = np.zeros((n, q))
    count = np.zeros(n)
    for c, (rows, scores) in enumerate(components):
        u, _, vt = np.linalg.svd(top[c * q : (c + 1) * q])
        total[rows] += scores @ (u @ vt)
        count[rows] += 1
    return total / np.maximum(count, 1)[:, None]


def mixture_classes(x: np.ndarray, k: int, seed: int, iterations: int = 200) -> np.ndarray:
    """Classes 1..k of the rows of x (n, q) by a Gaussian mixture with full covariances, started by
    k-means++ (seeded) and 20 rounds of k-means."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())])
    centres = np.array(centres)
    for _ in range(20):
        labels = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        centres = np.array([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
    weights = np.bincount(labels, minlength=k) / len(x)
    eye = np.eye(x.shape[1])
    covariances = np.array([np.cov(x[labels == j].T) + 1e-6 * eye if (labels == j).sum() > x.shape[1] else eye for j in range(k)])
    for _ in range(iterations):
        log_p = np.empty((len(x), k))
        for j in range(k):
            diff = x - centres[j]
            inverse = np.linalg.inv(covariances[j])
            distance = np.einsum("ni,ij,nj->n", diff, inverse, diff)
            log_p[:, j] = np.log(max(weights[j], 1e-12)) - 0.5 * np.linalg.slogdet(covariances[j])[1] - 0.5 * distance
        log_p -= log_p.max(1, keepdims=True)
        r = np.exp(log_p)
        r /= r.sum(1, keepdims=True)
        weights = r.mean(0)
        for j in range(k):
            w = r[:, j] / max(r[:, j].sum(), 1e-12)
            centres[j] = w @ x
            diff = x - centres[j]
            covariances[j] = (w[:, None] * diff).T @ diff + 1e-6 * eye
    return np.argmax(r, axis=1) + 1


def measure(folder: Path, q_option: int, seed: int) -> dict:
    truth_set = star_io.read_particles(folder / "truth.star")
    truth_by_name = dict(zip(truth_set.particles["rlnImageName"], truth_set.particles["rlnClassNumber"]))
    ps = star_io.read_particles(folder / "particles.star")
    particles = star_io.particles(ps)
    truth = np.array([truth_by_name[name] for name in ps.particles["rlnImageName"]])
    k = int(truth.max())
    q = q_option or k - 1
    consensus, _ = read_mrc(folder / "consensus.mrc")
    found = {}

    def multi_component(splitter, graph, halves):
        start = time.perf_counter()
        scores = synchronise(cone_components(splitter, graph.cone_set.cones, q), len(halves), q)
        found["components_s"] = time.perf_counter() - start
        start = time.perf_counter()
        classes = mixture_classes(scores, k, seed)
        found["mixture_s"] = time.perf_counter() - start
        found["start_accuracy"] = accuracy(classes, truth)
        start = time.perf_counter()
        refined = splitter.refine(np.arange(len(halves), dtype=np.int64), classes)
        found["refine_s"] = time.perf_counter() - start
        found["accuracy"] = accuracy(np.argmax(refined.log_posterior, axis=1) + 1, truth)
        raise _Measured

    original = pipeline.find_classes
    pipeline.find_classes = multi_component
    start = time.perf_counter()
    try:
        with ImageStacks(ps) as stacks:
            pipeline.split(particles, stacks, SplitOptions(seed=seed), consensus=torch.as_tensor(consensus))
    except _Measured:
        pass
    finally:
        pipeline.find_classes = original
    found["total_s"] = time.perf_counter() - start
    tree = star_io.read_particles(folder / "graphsplit" / "run_data.star").particles
    tree_classes = tree.set_index("rlnImageName").loc[ps.particles["rlnImageName"], "rlnClassNumber"].to_numpy()
    return {
        "set": folder.name, "K": k, "q": q, **found,
        "tree_accuracy": accuracy(tree_classes, truth), "tree_K": int(len(np.unique(tree_classes))),
    }  # fmt: skip


def main(
    sets: str = typer.Option(..., help="Comma-separated set folders of scripts/k_benchmark.py."),
    components: str = typer.Option("0", help="Comma-separated q (principal components per cone; 0: K - 1)."),
    j: int = typer.Option(2, help="Threads."),
    seed: int = typer.Option(0, help="Seed of the mixture's start and of the split."),
    out: Path = typer.Option(Path("multi_component.jsonl"), help="JSON lines written here."),
) -> None:
    torch.set_num_threads(j)
    threadpool_limits(j)
    rows = []
    with out.open("a") as log:
        for folder in sets.split(","):
            for q in (int(x) for x in components.split(",")):
                row = measure(Path(folder), q, seed)
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
    print("| set | K | q | start acc. | refined acc. | tree acc. (K found) | components + mixture + refine (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['K']} | {r['q']} | {r['start_accuracy']:.3f} | {r['accuracy']:.3f} | "
            f"{r['tree_accuracy']:.3f} ({r['tree_K']}) | {r['components_s']:.1f} + {r['mixture_s']:.1f} + {r['refine_s']:.1f} |"
        )


if __name__ == "__main__":
    typer.run(main)
