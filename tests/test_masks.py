import math

import pytest
import torch

from relion_graphsplit.geometry import euler_to_matrix
from relion_graphsplit.masks import project_mask, resample_volume, soft_sphere

BOX = 32


def test_soft_sphere():
    mask = soft_sphere(BOX, radius=8.0, edge=4.0)
    assert mask.shape == (BOX, BOX, BOX) and mask.dtype == torch.float32
    c = BOX // 2
    assert mask[c, c, c] == 1 and mask[c, c, c + 8] == 1
    assert mask[c, c, c + 12] == 0 and mask[0, 0, 0] == 0
    edge = mask[c, c, c + 8 : c + 13]
    assert torch.all(edge[1:] < edge[:-1])
    assert float(mask[c, c, c + 10]) == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 2 / 4))


def test_projected_mask_follows_the_viewing_direction():
    # A box-shaped mask off centre along +x of the map: seen down z it is off centre along +x of the
    # image; seen down x (rot 0, tilt 90) its ray passes through the centre.
    mask = torch.zeros(BOX, BOX, BOX)
    c = BOX // 2
    mask[c - 2 : c + 3, c - 2 : c + 3, c + 6 : c + 11] = 1.0
    views = euler_to_matrix(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0]))
    down_z, down_x = project_mask(mask, views)
    ys, xs = torch.nonzero(down_z, as_tuple=True)
    assert xs.min() >= c + 5 and xs.max() <= c + 11 and ys.min() >= c - 3 and ys.max() <= c + 3
    # Viewing along +x (tilt 90): map x becomes image depth; map z maps onto image x.
    assert down_x[c, c] and down_x.sum() < down_z.numel() / 10


def test_resample_keeps_extent():
    mask = soft_sphere(BOX, radius=8.0)
    small = resample_volume(mask, 16)
    assert small.shape == (16, 16, 16)
    assert small[8, 8, 8] > 0.99 and small[8, 8, 14] < 0.05
