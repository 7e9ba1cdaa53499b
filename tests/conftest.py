"""Shared fixtures. The package is imported first: it sets OpenMP's passive waiting before torch loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import relion_graphsplit  # noqa: F401
from relion_graphsplit.mrc_io import read_mrc
from relion_graphsplit.preprocess import fourier_crop_volume
from relion_graphsplit.simulate import Conditions, write_simulation

TEST_DATA = Path(__file__).resolve().parents[1] / "test_data"


def adk_maps(box: int) -> list:
    """The bundled adenylate kinase states (open, closed), Fourier-cropped to `box` (4 A at 32)."""
    maps = []
    for name in ("adk_open.mrc", "adk_closed.mrc"):
        volume, _ = read_mrc(TEST_DATA / name)
        maps.append(fourier_crop_volume(torch.from_numpy(volume), box).numpy())
    return maps


@pytest.fixture(scope="session")
def small_set(tmp_path_factory) -> Path:
    """600 simulated particles of the two adenylate kinase states, box 32 at 4 A, SNR 0.3, 60/40,
    origins up to 6 A, pose errors of 1 degree: a folder with particles.star, particles.mrcs,
    truth.star, class1.mrc and class2.mrc. Read only: copy it before changing anything."""
    out = tmp_path_factory.mktemp("small_set")
    conditions = Conditions(pose_error_deg=1.0, max_shift_A=6.0)
    write_simulation(out, adk_maps(32), 4.0, 600, 0.3, [0.6, 0.4], seed=5, conditions=conditions)
    return out
