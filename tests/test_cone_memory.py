"""The up-front estimate of the per-cone steps' memory, and the refusal of cones that cannot fit."""

import os

import pytest
import torch

from relion_graphsplit import pipeline, star_io
from relion_graphsplit.grouping import assign_to_cones, asymmetric_unit_directions
from relion_graphsplit.pipeline import SplitOptions, available_memory, check_cone_memory, cone_memory
from relion_graphsplit.symmetry import symmetry_matrices


def cones_at(sampling: float, n: int = 500):
    sym = symmetry_matrices("C1")
    q = torch.linalg.qr(torch.randn(n, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    return assign_to_cones(q * torch.det(q)[:, None, None], asymmetric_unit_directions(sampling, sym), sampling, sym)


def test_estimate_grows_with_cones_and_working_box():
    coarse, fine = cones_at(10.0), cones_at(2.0)
    assert fine.n_cones > 20 * coarse.n_cones
    assert cone_memory(fine, 32) > 20 * cone_memory(coarse, 32)
    # Masks and cone images: 37 bytes per cone and pixel, so four times the pixels cost about 37 * 3 w^2 more.
    grown = cone_memory(fine, 64) - cone_memory(fine, 32)
    assert grown == pipeline.IMAGE_BYTES_PER_PIXEL * fine.n_cones * (64**2 - 32**2)


def test_refusal_is_one_line_with_the_estimate():
    cones = cones_at(2.0)
    need = cone_memory(cones, 26)
    check_cone_memory(cones, 26, 2.0, explicit=True, available=need)  # fits
    with pytest.raises(ValueError) as refused:
        check_cone_memory(cones, 26, 2.0, explicit=True, available=need // 2)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"--angular_sampling 2 gives {cones.n_cones} cones: about {need / 1e9:.1f} GB")
    assert f"{need / 2e9:.1f} GB available" in message and "coarser sampling" in message
    with pytest.raises(ValueError, match=r"the default sampling \(5\.0 deg\) .* smaller working box"):
        check_cone_memory(cones, 26, 5.0, explicit=False, available=1)


def test_available_memory_is_at_most_the_physical_memory():
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available_memory() <= physical


class NoImages:
    """Stacks that must not be read."""

    def read(self, index):
        raise AssertionError("an image was read")


def test_split_refuses_before_reading_an_image(small_set, monkeypatch):
    ps = star_io.read_particles(small_set / "particles.star")
    monkeypatch.setattr(pipeline, "available_memory", lambda: 10**6)
    with pytest.raises(ValueError, match=r"^--angular_sampling 3 gives \d+ cones: about .* GB .* 0\.0 GB available"):
        pipeline.split(ps, NoImages(), SplitOptions(angular_sampling=3.0))
