"""Shared fixtures. The tests wait for threads as the console commands do (cli/launch.py), set here
before numpy and torch load."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from relion_graphsplit.cli.launch import THREAD_WAITING

os.environ.update({name: value for name, value in THREAD_WAITING.items() if name not in os.environ})

import pytest
import torch

from relion_graphsplit.method.preprocess import fourier_crop_volume
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.simulate.particles import Conditions, write_simulation

TEST_DATA = Path(__file__).resolve().parents[1] / "test_data"


def adk_maps(box: int) -> list:
    """The bundled adenylate kinase states (open, closed), Fourier-cropped to `box` (4 A at 32)."""
    maps = []
    for name in ("adk_open.mrc", "adk_closed.mrc"):
        volume, _ = read_mrc(TEST_DATA / name)
        maps.append(fourier_crop_volume(torch.from_numpy(volume), box).numpy())
    return maps


def adk_pixel_size(box: int) -> float:
    """The pixel size (A) of adk_maps(box): the bundled maps' own, scaled by the cropping."""
    volume, pixel_size = read_mrc(TEST_DATA / "adk_open.mrc")
    return pixel_size * volume.shape[-1] / box


SimulatedSet = Callable[..., Path]


@pytest.fixture(scope="session")
def simulated_set(tmp_path_factory) -> SimulatedSet:
    """A factory of simulated particle sets of the two adenylate kinase states (adk_maps(box), at
    adk_pixel_size(box): 4 A at 32):

        simulated_set(n, snr, fractions, seed, box=32, stack_name="particles.mrcs", **conditions)

    with `conditions` the fields of simulate.particles.Conditions (max_shift_A, pose_error_deg,
    noise_excess...). Returns a folder with particles.star, particles.mrcs, truth.star, class1.mrc and
    class2.mrc (the maps simulated from). Each distinct set is made once a session and shared by the
    tests asking for it: read only, so copy it before changing anything or running a program in it."""
    made: dict[tuple, Path] = {}

    def make(
        n: int, snr: float, fractions: Sequence[float], seed: int, *, box: int = 32,
        stack_name: str = "particles.mrcs", **conditions: float,
    ) -> Path:  # fmt: skip
        key = (n, snr, tuple(fractions), seed, box, stack_name, tuple(sorted(conditions.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"simulated_n{n}_seed{seed}")
            write_simulation(
                out, adk_maps(box), adk_pixel_size(box), n, snr, list(fractions), seed=seed,
                conditions=Conditions(**conditions), stack_name=stack_name,
            )  # fmt: skip
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def small_set(simulated_set: SimulatedSet) -> Path:
    """600 simulated particles of the two adenylate kinase states, box 32 at 4 A, SNR 0.3, 60/40,
    origins up to 6 A, pose errors of 1 degree: a folder with particles.star, particles.mrcs,
    truth.star, class1.mrc and class2.mrc. Read only: copy it before changing anything."""
    return simulated_set(600, 0.3, [0.6, 0.4], seed=5, pose_error_deg=1.0, max_shift_A=6.0)
