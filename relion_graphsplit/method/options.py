"""The split's parameters: what the command line sets, with its defaults. No heavy imports, so that
the command's help comes at once."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CtfCorrection(str, enum.Enum):
    """How images are corrected for the CTF before the principal component (method.md item 1)."""

    subtract_multiply = "subtract-multiply"  # residual to the consensus projection, times the CTF
    subtract_flip = "subtract-flip"  # residual to the consensus projection, phase flipped
    flip = "flip"  # phase flipping alone
    wiener = "wiener"  # Wiener filter with a constant SNR term
    none = "none"

    @property
    def subtracts(self) -> bool:
        """Whether the mode subtracts the consensus projection first (and so needs it)."""
        return self in (CtfCorrection.subtract_multiply, CtfCorrection.subtract_flip)


MIN_WORKING_BOX = 32
"""Fewest pixels `maxres` downsamples to. On two structures at every SNR benchmarked the accuracy fell
with the working box below about 32 pixels, and moved by a few particles either way above it
(docs/benchmarks.md, "The working box"): a small particle in a small box, where 10 A leaves some 26
pixels, is analysed at a finer resolution."""


@dataclass
class SplitOptions:
    """Parameters of the split (the command-line options, with the same defaults)."""

    symmetry: str = "C1"
    angular_sampling: float | None = None  # degrees between cone axes; None: from the particle count
    cone_angle: float | None = None  # cone half-aperture in degrees; None: the sampling
    particles_per_cone: int = 600  # target of the automatic sampling
    min_cone_particles: int = 10  # cones with fewer members are dropped
    maxres: float | None = 10.0  # A; images are downsampled to this Nyquist (at least MIN_WORKING_BOX pixels)
    resize: int | None = None  # explicit working box (overrides maxres)
    ctf_correction: CtfCorrection = CtfCorrection.subtract_multiply
    whiten: bool = True  # whiten images and CTFs by the residuals' noise spectrum (subtracting corrections)
    mask_threshold: float = 0.1  # default mask: fraction of the low-passed consensus map's maximum ...
    refine_mask_threshold: float = 0.3  # ... then, for the refinement, of the two class maps' (0: keep the first)
    mask_extend: float = 3.0  # extension of both in A
    refine_iterations: int = 30  # at most this many rounds of fixed-pose classification against the class maps
    refine_tolerance: float = 0.0025  # ... stopping once fewer than this fraction of particles change class
    refine_relaxation: float = 1.8  # ... over-relaxing each round's change of the probabilities by this factor
    n_classes: int | None = None  # classes asked for; None: as many as the test of splits keeps ...
    max_classes: int = 4  # ... up to this many
    batch_size: int = 256  # images per batch at the particles' box (see working_batch)
    seed: int = 0

    def working_batch(self, box: int, working_box: int) -> int:
        """Images per batch of the passes over the working-size images: as many as hold the pixels of
        batch_size images at the particles' box, so a batch takes the same memory at either size. At
        a working box of 32 a batch of 256 images spent more time in its per-batch steps than in its
        sums: with 4 times as many, the refinement of a three-state set took a fifth less time."""
        return self.batch_size * max(1, (box * box) // (working_box * working_box))


FLAGS = {
    "symmetry": "--sym", "angular_sampling": "--angular_sampling", "cone_angle": "--cone_angle",
    "particles_per_cone": "--particles_per_cone", "maxres": "--maxres", "resize": "--resize",
    "ctf_correction": "--ctf_correction", "whiten": "--whiten", "mask_threshold": "--mask_threshold",
    "refine_mask_threshold": "--refine_mask_threshold", "mask_extend": "--mask_extend",
    "refine_iterations": "--refine_iter", "n_classes": "--K", "max_classes": "--max_K",
    "batch_size": "--batch_size", "seed": "--random_seed",
}  # fmt: skip
"""The flag of each SplitOptions field the command line sets (the others keep their defaults)."""
