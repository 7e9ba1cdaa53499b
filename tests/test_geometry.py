import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from relion_graphsplit.fourier.geometry import (
    MIRROR,
    direction_to_matrix,
    euler_to_matrix,
    inplane_angle,
    matrix_to_euler,
    projection_direction,
)


def relion_formula(rot, tilt, psi):
    """RELION's Euler_angles2matrix, element by element (relion-conventions.md)."""
    a, b, g = np.radians([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array(
        [
            [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
            [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
            [sb * ca, sb * sa, cb],
        ]
    )


ANGLES = [(0, 0, 0), (10, 20, 30), (-170, 95, 44), (250, 179, -60), (33, 90, 0)]


@pytest.mark.parametrize("rot,tilt,psi", ANGLES)
def test_euler_matrix_matches_relion_and_scipy(rot, tilt, psi):
    A = euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi)).numpy()
    np.testing.assert_allclose(A, relion_formula(rot, tilt, psi), atol=1e-12)
    # scipy's intrinsic ZYZ matrix is A^T (library notes).
    np.testing.assert_allclose(A.T, Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix(), atol=1e-12)


def test_projection_direction_is_relion_formula():
    rot, tilt = torch.tensor([30.0, -100.0]), torch.tensor([60.0, 150.0])
    d = projection_direction(euler_to_matrix(rot, tilt, torch.tensor([77.0, 5.0])))
    r, t = torch.deg2rad(rot.double()), torch.deg2rad(tilt.double())
    expected = torch.stack([t.sin() * r.cos(), t.sin() * r.sin(), t.cos()], dim=-1)
    torch.testing.assert_close(d, expected)


def test_matrix_to_euler_round_trip_including_poles():
    g = torch.Generator().manual_seed(1)
    rot, tilt, psi = torch.rand(3, 200, generator=g, dtype=torch.float64) * torch.tensor([[360.0], [180.0], [360.0]])
    tilt[:3] = torch.tensor([0.0, 180.0, 0.0])
    A = euler_to_matrix(rot, tilt, psi)
    torch.testing.assert_close(euler_to_matrix(*matrix_to_euler(A)), A)


def test_direction_to_matrix_views_along_direction():
    d = torch.nn.functional.normalize(torch.tensor([[0.3, -0.2, 0.9], [-1.0, 0.0, 0.0]], dtype=torch.float64), dim=-1)
    torch.testing.assert_close(projection_direction(direction_to_matrix(d)), d)


def test_inplane_angle_of_pure_psi_change():
    A_ref = euler_to_matrix(torch.tensor(40.0), torch.tensor(70.0), torch.tensor(0.0))
    A = euler_to_matrix(torch.tensor(40.0), torch.tensor(70.0), torch.tensor(25.0))
    # Rz(psi) in RELION's convention is [[c, s], [-s, c]]: a turn by -psi in the usual sense.
    assert math.isclose(float(inplane_angle(A, A_ref)), math.radians(-25.0), abs_tol=1e-12)


def test_mirror_views_antipode():
    A = euler_to_matrix(torch.tensor(12.0), torch.tensor(34.0), torch.tensor(56.0))
    torch.testing.assert_close(projection_direction(MIRROR @ A), -projection_direction(A))
