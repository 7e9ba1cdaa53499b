"""The up-front refusals of `split`: cones that cannot fit in memory, and cones all too sparse to split."""

import os

import pytest
import torch

from relion_graphsplit.fourier.symmetry import symmetry_matrices
from relion_graphsplit.method import cones as cones_module
from relion_graphsplit.method import pipeline
from relion_graphsplit.method.cones import (
    IMAGE_BYTES_PER_PIXEL,
    assign_to_cones,
    asymmetric_unit_directions,
    available_memory,
    check_cone_counts,
    check_cone_memory,
    cone_memory,
)
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.relion import star as star_io


def cones_at(sampling: float, n: int = 500):
    sym = symmetry_matrices("C1")
    q = torch.linalg.qr(torch.randn(n, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    return assign_to_cones(q * torch.det(q)[:, None, None], asymmetric_unit_directions(sampling, sym), sampling, sym)


def test_estimate_grows_with_cones_and_working_box():
    coarse, fine = cones_at(10.0), cones_at(2.0)
    assert fine.n_cones > 20 * coarse.n_cones
    assert cone_memory(fine, 32) > 20 * cone_memory(coarse, 32)
    # Masks and cone images: IMAGE_BYTES_PER_PIXEL per cone and working pixel.
    grown = cone_memory(fine, 64) - cone_memory(fine, 32)
    assert grown == IMAGE_BYTES_PER_PIXEL * fine.n_cones * (64**2 - 32**2)


def test_refusal_is_one_line_with_the_estimate():
    cones = cones_at(2.0)
    need = cone_memory(cones, 26)
    check_cone_memory(cones, 26, 2.0, explicit=True, available=need)  # fits
    with pytest.raises(ValueError) as refused:
        check_cone_memory(cones, 26, 2.0, explicit=True, available=need // 2)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"--angular_sampling 2 gives {cones.n_cones} cones: about {need / 1e6:.0f} MB")
    assert f"{need / 2e6:.0f} MB available" in message and "coarser sampling" in message
    with pytest.raises(ValueError, match=r"the default sampling \(5\.0 deg\) .* smaller working box"):
        check_cone_memory(cones, 26, 5.0, explicit=False, available=1)


def test_available_memory_is_at_most_the_physical_memory():
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available_memory() <= physical


class NoImages:
    """Stacks that must not be read."""

    def read(self, index):
        raise AssertionError("an image was read")


def test_split_refuses_cones_that_cannot_fit_before_reading_an_image(small_set, monkeypatch):
    ps = star_io.read_particles(small_set / "particles.star")
    monkeypatch.setattr(cones_module, "available_memory", lambda: 10**5)
    expected = r"^the default sampling \(25\.0 deg\) gives 41 cones: about \d+ MB .* 0 MB available"
    with pytest.raises(ValueError, match=expected):
        pipeline.split(star_io.particles(ps), NoImages(), SplitOptions())


def test_split_refuses_a_sampling_that_leaves_every_cone_sparse(small_set):
    ps = star_io.read_particles(small_set / "particles.star")  # 600 particles: at 3 degrees, about 1 a cone
    with pytest.raises(ValueError, match=r"^--angular_sampling 3 leaves every cone with fewer than 10 particles"):
        pipeline.split(star_io.particles(ps), NoImages(), SplitOptions(angular_sampling=3.0))


def test_sparse_refusal_names_the_fullest_cone():
    check_cone_counts(torch.tensor([0, 3, 10]), 10, 5.0, explicit=True)  # one cone is enough
    with pytest.raises(ValueError) as refused:
        check_cone_counts(torch.tensor([0, 3, 9]), 10, 25.0, explicit=False)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("the default sampling (25.0 deg) leaves every cone with fewer than 10 particles")
    assert "(at most 9)" in message
