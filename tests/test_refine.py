import numpy as np
import torch

from relion_graphsplit.refine import class_sums, difference_maps, residual_sums
from relion_graphsplit.simulate import uniform_rotations


def test_class_two_from_the_totals_equals_its_own_insertion():
    """Class 2's sums are the totals minus class 1's: swapping the probabilities swaps the maps."""
    rng = np.random.default_rng(0)
    n, box = 64, 12
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    filters = rng.uniform(0.2, 1.0, (n, box, box // 2 + 1)).astype(np.float32)
    rotations = torch.from_numpy(uniform_rotations(n, rng))
    batches = [np.arange(0, 40), np.arange(40, n)]
    probability = rng.uniform(0.0, 1.0, n)
    probability[:5], probability[5:10] = 0.0, 1.0  # hard members of either class
    mask = torch.ones(box, box, box)
    totals = residual_sums(images, rotations, filters, batches)
    maps = difference_maps(class_sums(images, probability, totals, rotations, filters, batches), "C1", mask)
    swapped = difference_maps(class_sums(images, 1.0 - probability, totals, rotations, filters, batches), "C1", mask)
    scale = float(maps[0].abs().max())
    assert scale > 0
    for a, b in zip(maps, swapped[::-1]):
        assert torch.allclose(a, b, atol=1e-4 * scale)
    assert not torch.allclose(maps[0], maps[1], atol=1e-2 * scale)
