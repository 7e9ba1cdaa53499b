"""Point groups in RELION's orientation."""

from __future__ import annotations

import math

import pytest
import torch

from relion_graphsplit.fourier.symmetry import axis_rotation, symmetry_matrices

ORDERS = {"C1": 1, "C2": 2, "C4": 4, "C11": 11, "D2": 4, "D3": 6, "D7": 14, "T": 12, "O": 24, "I": 60}


def contains(group: torch.Tensor, m: torch.Tensor, tol: float = 1e-6) -> bool:
    return bool(((group - m).abs().amax(dim=(1, 2)) < tol).any())


@pytest.mark.parametrize("name, order", ORDERS.items())
def test_group_order(name, order):
    assert symmetry_matrices(name).shape == (order, 3, 3)


@pytest.mark.parametrize("name", [*ORDERS, "I1", "I2", "I3", "I4"])
def test_rotation_group_closed_under_products(name):
    group = symmetry_matrices(name)
    eye = torch.eye(3, dtype=torch.float64)
    assert group.dtype == torch.float64
    assert torch.equal(group[0], eye)
    assert torch.allclose(group @ group.transpose(1, 2), eye.expand_as(group), atol=1e-6)
    assert torch.allclose(torch.linalg.det(group), torch.ones(len(group), dtype=torch.float64))
    for a in group:
        for b in group:
            assert contains(group, a @ b)
    # No element twice.
    diffs = (group[:, None] - group[None]).abs().amax(dim=(2, 3)) + torch.eye(len(group), dtype=torch.float64)
    assert diffs.min() > 1e-3


def test_cyclic_axis_is_z_and_dihedral_twofold_is_x():
    assert contains(symmetry_matrices("C5"), axis_rotation((0, 0, 1), 72.0))
    d3 = symmetry_matrices("D3")
    assert contains(d3, axis_rotation((1, 0, 0), 180.0))
    assert not contains(d3, axis_rotation((0, 1, 0), 180.0))


def test_tetrahedral_and_icosahedral_axes_as_relion_defines_them():
    t = symmetry_matrices("T")
    assert contains(t, axis_rotation((0, 0, 1), 120.0))
    assert contains(t, axis_rotation((0, math.sqrt(2 / 3), math.sqrt(1 / 3)), 180.0), tol=1e-5)
    i2 = symmetry_matrices("I2")
    assert torch.equal(symmetry_matrices("I"), i2)
    assert contains(i2, axis_rotation((0, 0, 1), 180.0))  # I2: 2-fold on z
    assert contains(symmetry_matrices("I1"), axis_rotation((1, 0, 0), 180.0))  # I1: 2-fold on x
    assert contains(symmetry_matrices("I3"), axis_rotation((0, 0, 1), 72.0))  # I3: 5-fold on z
    assert not contains(i2, axis_rotation((0, 0, 1), 72.0))


def test_names_are_case_insensitive():
    assert torch.equal(symmetry_matrices("d4"), symmetry_matrices("D4"))


@pytest.mark.parametrize("name", ["", "X3", "C0", "D", "Q", "C2v", "I5", "Oh", "C123"])
def test_unknown_names_raise(name):
    with pytest.raises(ValueError, match="symmetry group"):
        symmetry_matrices(name)
