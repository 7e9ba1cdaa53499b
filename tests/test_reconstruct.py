"""Direct Fourier inversion: round trips on analytic projections, and agreement with relion_reconstruct.

Maps are sums of Gaussian blobs, whose projections are known exactly: a blob at c (pixels from the
box centre) appears in the image of pose A at (A c)_xy - origin, with the same width.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

import relion_graphsplit.fourier.reconstruct as reconstruct_module
from relion_graphsplit.fourier.ctf import CTFParams, ctf_2d
from relion_graphsplit.fourier.fsc import fsc
from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.fourier.reconstruct import (
    FourierAccumulator,
    centred_rfft2,
    radius_for_resolution,
    reconstruct,
)
from relion_graphsplit.fourier.symmetry import symmetry_matrices

BOX = 32
APIX = 2.0


def random_blobs(gen: torch.Generator, n: int = 8, spread: float = 6.0) -> dict[str, torch.Tensor]:
    """Blob centres (n, 3) as (x, y, z) pixels from the centre, widths (pixels) and amplitudes."""
    return {
        "centres": (torch.rand(n, 3, generator=gen, dtype=torch.float64) * 2 - 1) * spread,
        "sigmas": 1.2 + 0.6 * torch.rand(n, generator=gen, dtype=torch.float64),
        "amps": 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64),
    }


def blob_map(blobs: dict[str, torch.Tensor], box: int) -> torch.Tensor:
    """The blobs sampled on a box^3 grid [z, y, x] centred at box // 2."""
    k = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    vol = torch.zeros_like(x)
    for c, s, a in zip(blobs["centres"], blobs["sigmas"], blobs["amps"]):
        vol += a * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.to(torch.float32)


def blob_images(
    blobs: dict[str, torch.Tensor], A: torch.Tensor, box: int, origins: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact projections (B, box, box) [y, x] of the blobs along RELION poses A, shifted by -origins."""
    k = torch.arange(box, dtype=torch.float64) - box // 2
    centres = torch.einsum("bij,nj->bni", A, blobs["centres"])[..., :2]  # (B, n, 2) as (x, y)
    if origins is not None:
        centres = centres - origins[:, None, :]
    dx = k[None, None, None, :] - centres[..., 0, None, None]
    dy = k[None, None, :, None] - centres[..., 1, None, None]
    s = blobs["sigmas"][None, :, None, None]
    a = (blobs["amps"] * math.sqrt(2 * math.pi) * blobs["sigmas"])[None, :, None, None]
    return (a * torch.exp(-(dx * dx + dy * dy) / (2 * s * s))).sum(1).to(torch.float32)


def random_poses(gen: torch.Generator, n: int) -> torch.Tensor:
    rot = torch.rand(n, generator=gen, dtype=torch.float64) * 360 - 180
    tilt = torch.rad2deg(torch.acos(torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1))
    psi = torch.rand(n, generator=gen, dtype=torch.float64) * 360 - 180
    return euler_to_matrix(rot, tilt, psi)


def random_ctf(gen: torch.Generator, n: int, box: int) -> torch.Tensor:
    defocus = 5000 + 20000 * torch.rand(n, generator=gen, dtype=torch.float64)
    const = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    params = CTFParams(defocus, defocus - 300, const(30), const(300), const(2.7), const(0.1), const(0), const(0), const(1))
    return ctf_2d(params, box, APIX)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Images (centred at N // 2) filtered by their CTFs."""
    out = torch.fft.irfft2(centred_rfft2(images) * ctf, s=images.shape[-2:])
    return torch.fft.fftshift(out, dim=(-2, -1))


def min_fsc(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.8) -> float:
    """Lowest FSC over shells 1 .. fraction * Nyquist."""
    curve = fsc(a, b)
    return float(curve[1 : int(fraction * (a.shape[-1] // 2)) + 1].min())


def half_turn_mismatch(vol: torch.Tensor) -> float:
    """Largest change of a map under a half turn about z, (x, y) -> (-x, -y) about the centre voxel.

    Flipping and rolling by one maps index i to N - i; the planes at index 0 (coordinate -N/2) have
    no partner inside the box and are left out.
    """
    turned = torch.roll(vol.flip(1, 2), shifts=(1, 1), dims=(1, 2))
    return float((turned - vol)[:, 1:, 1:].abs().max() / vol.abs().max())


def scale(a: torch.Tensor, reference: torch.Tensor) -> float:
    """Least-squares scale of `a` onto `reference`."""
    return float((a * reference).sum() / (reference * reference).sum())


@pytest.fixture(scope="module")
def blobs() -> dict[str, torch.Tensor]:
    return random_blobs(torch.Generator().manual_seed(1))


@pytest.mark.parametrize("box", [BOX, BOX + 1])
def test_round_trip_without_ctf(blobs, box):
    gen = torch.Generator().manual_seed(2)
    A = random_poses(gen, 800)
    truth = blob_map(blobs, box)
    vol = reconstruct(blob_images(blobs, A, box), A, None, None, box)
    assert vol.shape == (box, box, box) and vol.dtype == torch.float32
    assert min_fsc(vol, truth) > 0.99
    assert scale(vol, truth) == pytest.approx(1.0, abs=0.03)


def test_ctf_correction(blobs):
    gen = torch.Generator().manual_seed(3)
    A = random_poses(gen, 1000)
    ctf = random_ctf(gen, 1000, BOX)
    images = apply_ctf(blob_images(blobs, A, BOX), ctf)
    truth = blob_map(blobs, BOX)
    corrected = reconstruct(images, A, None, ctf, BOX)
    assert min_fsc(corrected, truth) > 0.98
    assert scale(corrected, truth) == pytest.approx(1.0, abs=0.05)
    uncorrected = reconstruct(images, A, None, None, BOX)
    assert min_fsc(uncorrected, truth) < 0.9


def test_origins_are_applied_with_relion_sign(blobs):
    gen = torch.Generator().manual_seed(4)
    A = random_poses(gen, 800)
    origins = (torch.rand(800, 2, generator=gen, dtype=torch.float64) * 2 - 1) * 3
    images = blob_images(blobs, A, BOX, origins)  # image(x) = projection(x + origin)
    truth = blob_map(blobs, BOX)
    assert min_fsc(reconstruct(images, A, origins, None, BOX), truth) > 0.99
    assert min_fsc(reconstruct(images, A, -origins, None, BOX), truth) < 0.5


def test_symmetric_map_with_d2(blobs):
    ops = symmetry_matrices("D2")
    sym_blobs = {
        "centres": torch.cat([blobs["centres"] @ R.T for R in ops]),
        "sigmas": blobs["sigmas"].repeat(len(ops)),
        "amps": blobs["amps"].repeat(len(ops)),
    }
    gen = torch.Generator().manual_seed(5)
    A = random_poses(gen, 300)
    truth = blob_map(sym_blobs, BOX)
    vol = reconstruct(blob_images(sym_blobs, A, BOX), A, None, None, BOX, sym="D2")
    assert min_fsc(vol, truth) > 0.99
    assert half_turn_mismatch(vol) < 1e-5


def test_symmetrising_an_asymmetric_set_gives_a_symmetric_map(blobs):
    gen = torch.Generator().manual_seed(6)
    A = random_poses(gen, 200)
    images = blob_images(blobs, A, BOX)
    assert half_turn_mismatch(reconstruct(images, A, None, None, BOX, sym="C2")) < 1e-5
    assert half_turn_mismatch(reconstruct(images, A, None, None, BOX)) > 0.1


def test_ctf_premultiplied_images(blobs):
    gen = torch.Generator().manual_seed(10)
    A = random_poses(gen, 200)
    ctf = random_ctf(gen, 200, BOX)
    images = blob_images(blobs, A, BOX)
    plain = reconstruct(images, A, None, ctf, BOX)
    premultiplied = reconstruct(apply_ctf(images, ctf), A, None, ctf, BOX, ctf_premultiplied=True)
    assert torch.allclose(premultiplied, plain, atol=1e-5 * float(plain.abs().max()))


def test_batches_and_insertion_chunks_do_not_change_the_map(blobs, monkeypatch):
    """Batches inserted one after the other, and the images inserted at a time, change the map only by
    rounding (the FFT of a batch can depend on the batch's size in the last bit)."""
    gen = torch.Generator().manual_seed(7)
    A = random_poses(gen, 300)
    ctf = random_ctf(gen, 300, BOX)
    origins = torch.rand(300, 2, generator=gen, dtype=torch.float64) * 2 - 1
    images = apply_ctf(blob_images(blobs, A, BOX, origins), ctf)
    whole = reconstruct(images, A, origins, ctf, BOX)  # one insertion
    assert reconstruct_module._SORTED_POINTS // (BOX * BOX // 2) > 300
    monkeypatch.setattr(reconstruct_module, "_SORTED_POINTS", 32 * BOX * BOX // 2)  # about 40 images at a time
    accumulator = FourierAccumulator(BOX)
    for i in range(0, 300, 70):
        accumulator.insert(images[i : i + 70], A[i : i + 70], ctf=ctf[i : i + 70], origins=origins[i : i + 70])
    streamed = accumulator.finalise()
    assert torch.allclose(whole, streamed, atol=1e-5 * float(whole.abs().max()))


@pytest.mark.parametrize("by_row", [False, True])
def test_sums_do_not_depend_on_the_thread_count(blobs, monkeypatch, by_row):
    """The data and weight channels are scattered in parallel threads; each must sum as alone, over
    several scatters in a row, with the points in image order (small grids) or sorted by grid row."""
    monkeypatch.setattr(reconstruct_module, "_SORTED_POINTS", 64 * BOX * BOX // 2)  # 82 images a sort: 3 for 200
    monkeypatch.setattr(reconstruct_module, "_SORTED_GRID_BYTES", 0 if by_row else 1 << 40)
    gen = torch.Generator().manual_seed(11)
    A = random_poses(gen, 200)
    ctf = random_ctf(gen, 200, BOX)
    images = apply_ctf(blob_images(blobs, A, BOX), ctf) + 0.1 * torch.randn(200, BOX, BOX, generator=gen)
    sums = {}
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            acc = FourierAccumulator(BOX)
            acc.insert(images, A, ctf=ctf)
            sums[count] = acc.sums.clone()
    finally:
        torch.set_num_threads(threads)
    assert sums[1].abs().max() > 0
    assert torch.equal(sums[1], sums[3])


def test_sorting_the_points_by_row_changes_the_sums_by_rounding_only(blobs, monkeypatch):
    """Grids above _SORTED_GRID_BYTES take a chunk's points sorted by grid row (`_sort_by_row`): the same
    sums as in image order, but for the order of the float32 additions; images of weight 0 add nothing."""
    gen = torch.Generator().manual_seed(17)
    A = random_poses(gen, 120)
    ctf = random_ctf(gen, 120, BOX)
    f = centred_rfft2(apply_ctf(blob_images(blobs, A, BOX), ctf) + 0.1 * torch.randn(120, BOX, BOX, generator=gen))
    weights = torch.rand(120, generator=gen) * (torch.arange(120) % 5 != 0)
    sums = {}
    for by_row in (False, True):
        monkeypatch.setattr(reconstruct_module, "_SORTED_GRID_BYTES", 0 if by_row else 1 << 40)
        acc = FourierAccumulator(BOX)
        acc.insert_rfft(f, A, ctf=ctf, weights=weights)
        sums[by_row] = acc.sums.clone()
    assert not torch.equal(sums[False], sums[True])  # the other order: the sort did run
    assert torch.allclose(sums[False], sums[True], rtol=0, atol=2e-6 * float(sums[False].abs().max()))
    n_pixels = len(acc._pixels)
    rows = np.empty(120 * n_pixels, np.int32)
    reconstruct_module._point_rows(
        rows, weights.numpy(), acc._kx.numpy(), acc._ky.numpy(), A.float().numpy(), acc.pad, acc.c, True, 0, 120
    )
    order, starts = reconstruct_module._sort_by_row(rows, (2 * acc.c + 1) ** 2)
    assert len(order) == int((weights > 0).sum()) * n_pixels  # images of weight 0 are left out
    assert np.array_equal(np.sort(order), np.flatnonzero(np.repeat(weights.numpy() > 0, n_pixels)))
    position = np.arange(len(order))  # each point lies within its row's range of `order`
    assert np.all(np.diff(rows[order]) >= 0)
    assert np.all(starts[rows[order]] <= position) and np.all(position < starts[rows[order] + 1])


@pytest.mark.parametrize(("box", "sym", "regularised"), [(BOX, "C1", False), (BOX + 1, "D2", True)])
def test_maps_do_not_depend_on_the_thread_count(blobs, box, sym, regularised):
    """The inversion's compiled passes (weight floor, division, soft mask, gridding correction) and
    its transforms run on --j threads; the map must be what one thread makes, bit for bit."""
    gen = torch.Generator().manual_seed(13)
    A = random_poses(gen, 150)
    acc = FourierAccumulator(box)
    acc.insert(blob_images(blobs, A, box) + 0.1 * torch.randn(150, box, box, generator=gen), A)
    prior = torch.linspace(0, 1, box // 2 + 1) ** 2 * float(acc.sums[2].max()) if regularised else None
    maps = {}
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            maps[count] = acc.finalise(sym=sym, regularisation=prior)
    finally:
        torch.set_num_threads(threads)
    assert maps[1].abs().max() > 0
    assert torch.equal(maps[1], maps[3])


@pytest.mark.parametrize(("box", "r_max", "premultiplied"), [(BOX, None, False), (BOX + 1, None, True), (BOX, 9, False)])
def test_compiled_splat_adds_what_torch_scatter_adds(blobs, box, r_max, premultiplied):
    """The CPU's compiled insertion and torch's scatter_add_ (the insertion on other devices) give the
    same sums, to float32 rounding (they add in different orders), with origins, CTF and r_max."""
    gen = torch.Generator().manual_seed(13)
    A = random_poses(gen, 150)
    ctf = random_ctf(gen, 150, box)
    origins = torch.rand(150, 2, generator=gen, dtype=torch.float64) * 2 - 1
    images = apply_ctf(blob_images(blobs, A, box, origins), ctf)
    compiled, scattered = FourierAccumulator(box, r_max=r_max), FourierAccumulator(box, r_max=r_max)
    scattered._splat = scattered._scatter
    for acc in (compiled, scattered):
        acc.insert(images, A, ctf=ctf, origins=origins, ctf_premultiplied=premultiplied)
    expected = scattered.sums
    assert expected[2].max() > 0 and expected[0].abs().max() > 0
    for channel in range(3):
        tolerance = 1e-5 * float(expected[channel].abs().max())
        assert torch.allclose(compiled.sums[channel], expected[channel], rtol=0, atol=tolerance)


def test_maxres_limits_the_radius(blobs):
    gen = torch.Generator().manual_seed(8)
    A = random_poses(gen, 400)
    r_max = radius_for_resolution(BOX, APIX, maxres=10.0)
    assert r_max == math.ceil(BOX * APIX / 10.0)
    acc = FourierAccumulator(BOX, r_max=r_max)
    acc.insert(blob_images(blobs, A, BOX), A)
    # Nothing was inserted beyond pad * r_max (+1 for the trilinear spread) from the origin.
    weight = acc.sums[2]
    c = acc.c
    k = torch.arange(weight.shape[0]) - c
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + torch.arange(weight.shape[2])[None, None, :] ** 2)
    assert weight[r > 2 * r_max + 1.8].abs().max() == 0
    assert weight[r < 2 * r_max].min() > 0
    assert acc.finalise().shape == (BOX, BOX, BOX)


@pytest.mark.parametrize("sym", ["C1", "D2"])
def test_finalise_leaves_the_sums_as_they_were(blobs, sym):
    """finalise works on copies: the same map twice, and the sums unchanged for further insertions."""
    gen = torch.Generator().manual_seed(10)
    A = random_poses(gen, 100)
    acc = FourierAccumulator(BOX + 1)
    acc.insert(blob_images(blobs, A, BOX + 1), A)
    before = acc.sums.clone()
    first = acc.finalise(sym=sym)
    assert torch.equal(acc.sums, before)
    assert torch.equal(acc.finalise(sym=sym), first)


@pytest.mark.parametrize(
    ("box", "sym", "r_max", "regularised"), [(BOX, "C1", None, False), (BOX + 1, "C3", None, True), (BOX, "C1", 10, True)]
)
def test_slabs_of_the_inversion_do_not_change_the_map(blobs, monkeypatch, box, sym, r_max, regularised):
    """The padded transform is inverted a few x planes at a time (in one slab at these boxes, in
    several at large ones): a plane at a time gives the same map, to rounding."""
    gen = torch.Generator().manual_seed(12)
    A = random_poses(gen, 200)
    acc = FourierAccumulator(box, r_max=r_max)
    acc.insert(blob_images(blobs, A, box), A)
    prior = torch.linspace(0, 1, box // 2 + 1) ** 2 * float(acc.sums[2].max()) if regularised else None
    p = 2 * box
    assert reconstruct_module._SLAB_BYTES >= 16 * p * p * (p // 2 + 1)  # one slab
    whole = acc.finalise(sym=sym, regularisation=prior)
    monkeypatch.setattr(reconstruct_module, "_SLAB_BYTES", 16 * p * p)  # one plane a slab
    planes = acc.finalise(sym=sym, regularisation=prior)
    assert whole.abs().max() > 0
    assert torch.allclose(whole, planes, atol=1e-6 * float(whole.abs().max()))


def test_regularisation_damps_high_frequencies(blobs):
    gen = torch.Generator().manual_seed(9)
    A = random_poses(gen, 300)
    acc = FourierAccumulator(BOX)
    acc.insert(blob_images(blobs, A, BOX), A)
    plain = acc.finalise()
    assert torch.equal(acc.finalise(regularisation=torch.zeros(BOX // 2 + 1)), plain)
    prior = torch.linspace(0, 1, BOX // 2 + 1) ** 2 * float(acc.sums[2].max())
    damped = acc.finalise(regularisation=prior)
    power = lambda v: torch.fft.rfftn(v).abs().square()  # noqa: E731
    high = torch.fft.fftfreq(BOX).abs()[:, None, None] > 0.3
    assert float(power(damped)[high.expand(BOX, BOX, BOX // 2 + 1)].sum()) < 0.5 * float(
        power(plain)[high.expand(BOX, BOX, BOX // 2 + 1)].sum()
    )


# ---------------------------------------------------------------------------------------------
# Agreement with RELION on particles made by RELION itself.

needs_relion = pytest.mark.skipif(
    shutil.which("relion_project") is None or shutil.which("relion_reconstruct") is None,
    reason="needs relion_project and relion_reconstruct",
)
RELION_BOX = 48


def relion_reconstruct(workdir: Path, name: str, *extra: str) -> torch.Tensor:
    cmd = ["relion_reconstruct", "--i", "parts.star", "--o", f"{name}.mrc", "--ctf", *extra]
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True)
    return torch.from_numpy(mrcfile.read(workdir / f"{name}.mrc").copy())


@pytest.fixture(scope="module")
def relion_particles(tmp_path_factory) -> dict:
    """1500 noisy CTF-affected particles of a sharp blob map, projected by relion_project."""
    work = tmp_path_factory.mktemp("relion_particles")
    rng = np.random.default_rng(11)
    blobs = random_blobs(torch.Generator().manual_seed(12), n=10, spread=10.0)
    blobs["sigmas"] = blobs["sigmas"] - 0.2
    with mrcfile.new(work / "map.mrc") as m:
        m.set_data(blob_map(blobs, RELION_BOX).numpy())
        m.voxel_size = APIX
    n = 1500
    du = rng.uniform(8000, 25000, n)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [APIX],
            "rlnImageSize": [RELION_BOX],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@poses.mrcs" for i in range(n)],
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginXAngst": rng.uniform(-8, 8, n),
            "rlnOriginYAngst": rng.uniform(-8, 8, n),
            "rlnDefocusU": du,
            "rlnDefocusV": du - rng.uniform(0, 1000, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnOpticsGroup": 1,
        }
    )
    starfile.write({"optics": optics, "particles": parts}, work / "poses.star")
    cmd = ["relion_project", "--i", "map.mrc", "--o", "parts", "--ang", "poses.star", "--ctf"]
    subprocess.run([*cmd, "--add_noise", "--white_noise", "0.5"], cwd=work, check=True, capture_output=True)

    # Read back what relion_project wrote, straight from the STAR file and the stack.
    blocks = starfile.read(work / "parts.star", always_dict=True)
    og, p = blocks["optics"], blocks["particles"]
    apix = float(og["rlnImagePixelSize"].iloc[0])
    names = p["rlnImageName"].str.split("@", expand=True)
    stack = mrcfile.read(work / names[1].iloc[0])
    images = torch.from_numpy(stack[names[0].astype(int).to_numpy() - 1].astype(np.float32))
    col = lambda c: torch.tensor(p[c].to_numpy(), dtype=torch.float64)  # noqa: E731
    const = lambda c: torch.full((len(p),), float(og[c].iloc[0]), dtype=torch.float64)  # noqa: E731
    params = CTFParams(
        col("rlnDefocusU"),
        col("rlnDefocusV"),
        col("rlnDefocusAngle"),
        const("rlnVoltage"),
        const("rlnSphericalAberration"),
        const("rlnAmplitudeContrast"),
        torch.zeros(len(p), dtype=torch.float64),
        torch.zeros(len(p), dtype=torch.float64),
        torch.ones(len(p), dtype=torch.float64),
    )
    return {
        "workdir": work,
        "images": images,
        "rotations": euler_to_matrix(col("rlnAngleRot"), col("rlnAngleTilt"), col("rlnAnglePsi")),
        "origins": torch.stack([col("rlnOriginXAngst"), col("rlnOriginYAngst")], 1) / apix,
        "ctf": ctf_2d(params, RELION_BOX, apix),
    }


def ours(particles: dict, sym: str = "C1", sign: float = 1.0) -> torch.Tensor:
    return reconstruct(
        particles["images"],
        particles["rotations"],
        sign * particles["origins"],
        particles["ctf"],
        RELION_BOX,
        sym=sym,
    )


@pytest.fixture(scope="module")
def relion_skip_gridding(relion_particles) -> torch.Tensor:
    """relion_reconstruct --ctf --skip_gridding: the same algorithm as ours."""
    return relion_reconstruct(relion_particles["workdir"], "relion_skip", "--skip_gridding")


@pytest.mark.relion
@needs_relion
def test_matches_relion_reconstruct(relion_particles, relion_skip_gridding):
    vol = ours(relion_particles)
    default = relion_reconstruct(relion_particles["workdir"], "relion")  # iterative gridding weights
    assert min_fsc(vol, default) > 0.95
    assert min_fsc(vol, relion_skip_gridding) > 0.999
    assert min_fsc(vol, relion_skip_gridding, fraction=1.0) > 0.99
    assert scale(vol, relion_skip_gridding) == pytest.approx(1.0, abs=0.01)


@pytest.mark.relion
@needs_relion
def test_origin_sign_agrees_with_relion(relion_particles, relion_skip_gridding):
    assert min_fsc(ours(relion_particles, sign=-1.0), relion_skip_gridding) < 0.5


@pytest.mark.relion
@needs_relion
@pytest.mark.parametrize("sym", ["D3", "T"])
def test_symmetry_matches_relion(relion_particles, relion_skip_gridding, sym):
    vol = ours(relion_particles, sym=sym)
    theirs = relion_reconstruct(relion_particles["workdir"], f"relion_{sym}", "--skip_gridding", "--sym", sym)
    assert min_fsc(vol, theirs) > 0.99
    assert min_fsc(vol, relion_skip_gridding) < 0.9  # the symmetry did change the map


def test_image_weights_scale_data_and_weight_and_zero_leaves_an_image_out(blobs):
    """insert_rfft's per-image weights: the compiled insertion and torch's scatter agree with them, and
    an image of weight 0 adds exactly what leaving it out adds; the thread count does not change a bit."""
    gen = torch.Generator().manual_seed(21)
    A = random_poses(gen, 120)
    ctf = random_ctf(gen, 120, BOX)
    f = centred_rfft2(blob_images(blobs, A, BOX))
    weights = torch.rand(120, generator=gen, dtype=torch.float64)
    weights[::3] = 0.0
    kept = weights > 0
    compiled, scattered, fewer, one_thread = (FourierAccumulator(BOX) for _ in range(4))
    scattered._splat = scattered._scatter
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for acc in (compiled, scattered):
            acc.insert_rfft(f, A, ctf=ctf, weights=weights)
        fewer.insert_rfft(f[kept], A[kept], ctf=ctf[kept], weights=weights[kept])
        torch.set_num_threads(1)
        one_thread.insert_rfft(f, A, ctf=ctf, weights=weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(compiled.sums, fewer.sums)
    assert torch.equal(compiled.sums, one_thread.sums)
    expected = scattered.sums
    for channel in range(3):
        tolerance = 1e-5 * float(expected[channel].abs().max())
        assert torch.allclose(compiled.sums[channel], expected[channel], rtol=0, atol=tolerance)
    unweighted = FourierAccumulator(BOX)
    unweighted.insert_rfft(f[kept], A[kept], ctf=ctf[kept])
    assert not torch.allclose(unweighted.sums[2], compiled.sums[2], rtol=1e-3)
