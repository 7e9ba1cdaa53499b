"""The torch twins of the compiled (numba) loops, run on CPU tensors and forced where the CPU would
take the compiled loop: each gives what its compiled loop gives, to rounding (float64 sums to about
1e-10 relative, float32 results to about 1e-5), so that a run on a GPU classifies as one on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from relion_graphsplit.fourier import ctf as ctf_module
from relion_graphsplit.fourier import fsc as fsc_module
from relion_graphsplit.fourier import projection, reconstruct
from relion_graphsplit.fourier.ctf import CTFParams, ctf_2d
from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.fourier.reconstruct import FourierAccumulator, centred_rfft2
from relion_graphsplit.method import alignment, pca, refine


def random_rotations(count: int, seed: int) -> torch.Tensor:
    """RELION matrices (count, 3, 3) float64 of uniformly drawn angles."""
    rng = np.random.default_rng(seed)
    rot, psi = rng.uniform(-180, 180, (2, count))
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, count)))
    return euler_to_matrix(*(torch.from_numpy(a) for a in (rot, tilt, psi)))


def blob_maps(box: int, count: int, seed: int) -> torch.Tensor:
    """(count, box, box, box) float64 maps of a few random Gaussian blobs each."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    maps = torch.zeros((count, box, box, box), dtype=torch.float64)
    for volume in maps:
        for _ in range(4):
            (x0, y0, z0), sigma = (torch.rand(3, generator=gen) - 0.5) * box / 2, 1.5 + 2 * torch.rand(1, generator=gen)
            volume += torch.exp(-((x - x0) ** 2 + (y - y0) ** 2 + (z - z0) ** 2) / (2 * sigma**2))
    return maps


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def test_central_slices_are_the_compiled_slices():
    """`central_slices` times the centre phase is the compiled `project_rfft`, for one map and a stack,
    float32 and float64, even and odd boxes."""
    for box, dtype in [(24, torch.float32), (23, torch.float64)]:
        maps = blob_maps(box, 2, seed=1).to(dtype)
        rotations = random_rotations(40, seed=2)
        for volume in (projection.prepare_volume(maps), projection.prepare_volume(maps[0]).to("cpu")):
            compiled = projection.project_rfft(volume, rotations)
            slices = projection.central_slices(volume, rotations) * projection.centre_phase(box, torch.complex128)
            assert slices.shape == compiled.shape and slices.dtype == torch.complex128
            assert relative_error(slices, compiled) < (1e-6 if dtype == torch.float32 else 1e-13)


def test_torch_gather_is_the_compiled_gather(monkeypatch):
    """`project_rfft`'s torch path (on devices other than the CPU), forced on the CPU, gives the
    compiled `_gather_kernel`'s slices in their dtype, to rounding."""
    for box, dtype, tolerance in [(24, torch.float32, 1e-6), (25, torch.float64, 1e-13)]:
        volume = projection.prepare_volume(blob_maps(box, 3, seed=3).to(dtype))
        rotations = random_rotations(30, seed=4)
        compiled = projection.project_rfft(volume, rotations)
        monkeypatch.setattr(projection, "_gather", projection._gather_torch)
        sampled = projection.project_rfft(volume, rotations)
        monkeypatch.undo()
        assert sampled.dtype == compiled.dtype and sampled.shape == (3, 30, box, box // 2 + 1)
        assert relative_error(sampled, compiled) < tolerance


def test_likelihood_terms_from_central_slices_are_the_compiled_terms():
    """L_k, U_k and sum w CTF^2 from `central_slices` in torch (`refine.likelihood_terms`) match
    `refine._likelihood_kernel`, called as `refine._pair_terms` calls it (float32 maps, float64 sums),
    to about 1e-10 relative."""
    box, count = 24, 50
    gen = torch.Generator().manual_seed(5)
    maps = blob_maps(box, 2, seed=6).to(torch.float32)
    volume = projection.prepare_volume(maps)
    rotations = random_rotations(count, seed=7)
    shape = (count, box, box // 2 + 1)
    s = torch.complex(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))  # complex64
    ctf = torch.randn(shape, generator=gen)  # float32
    relative = 0.5 + torch.rand(count, generator=gen, dtype=torch.float64)

    kx, ky, inside = projection.rfft_frequencies(box)
    weights = refine._half_plane_weights(box)
    terms = np.zeros((count, 5))
    args = (
        terms, s.numpy(), ctf.numpy(), relative.numpy(), rotations.numpy(), weights.numpy(), kx.numpy(),
        ky.numpy(), inside.numpy(), volume.data.numpy(), volume.pad, volume.padded_box // 2 + 1,
    )  # fmt: skip
    refine._likelihood_kernel(*args, 0, count)

    ours = refine.likelihood_terms(volume, s, ctf, relative, rotations, weights)
    expected = torch.from_numpy(terms)
    assert float(expected[:, :4].abs().min()) > 0
    for column in range(5):
        assert relative_error(ours[:, column], expected[:, column]) < 1e-10


def inserted(box: int, r_max: int | None, count: int, seed: int) -> FourierAccumulator:
    """An accumulator with `count` CTF-weighted projections of blob maps inserted by the compiled loop."""
    gen = torch.Generator().manual_seed(seed)
    rotations = random_rotations(count, seed)
    images = projection.project(blob_maps(box, 1, seed)[0].to(torch.float32), rotations)
    images += 0.1 * torch.randn(images.shape, generator=gen)
    ctf = 2 * torch.rand((count, box, box // 2 + 1), generator=gen) - 1
    acc = FourierAccumulator(box, r_max=r_max)
    acc.insert_rfft(centred_rfft2(images), rotations, ctf=ctf)
    return acc


def test_torch_scatter_with_weights_adds_what_the_compiled_splat_adds():
    """`FourierAccumulator._scatter` (the insertion on other devices), forced on the CPU, adds what the
    compiled `_splat_kernel` adds with image weights (some 0) and a CTF, to float32 rounding."""
    gen = torch.Generator().manual_seed(8)
    box, count = 20, 60
    rotations = random_rotations(count, seed=9)
    f = centred_rfft2(torch.randn((count, box, box), generator=gen))
    ctf = 2 * torch.rand((count, box, box // 2 + 1), generator=gen) - 1
    weights = torch.rand(count, generator=gen).masked_fill(torch.arange(count) % 4 == 0, 0)
    compiled, scattered = FourierAccumulator(box), FourierAccumulator(box)
    scattered._splat = scattered._scatter
    for acc in (compiled, scattered):
        acc.insert_rfft(f, rotations, ctf=ctf, weights=weights)
    for channel in range(3):
        assert relative_error(scattered.sums[channel], compiled.sums[channel]) < 1e-5


def test_torch_inversion_is_the_compiled_inversion():
    """`_invert_torch` (the finished map on other devices) gives `_invert`'s map, to float32 rounding of
    the same float64 computation, for even and odd boxes, a smaller r_max and a regularisation."""
    for box, r_max, regularised in [(20, None, False), (21, None, True), (20, 6, True)]:
        acc = inserted(box, r_max, 80, seed=box)
        fields, plane = acc.sums, reconstruct._friedel_plane(acc.sums)
        before = fields.clone()
        prior = torch.linspace(0, 1, box // 2 + 1) ** 2 * float(fields[2].max()) if regularised else None
        compiled = reconstruct._invert(fields, plane, acc.box, acc.pad, acc.r_max, prior)
        ours = reconstruct._invert_torch(fields, plane, acc.box, acc.pad, acc.r_max, prior)
        assert torch.equal(fields, before)
        assert ours.dtype == compiled.dtype == torch.float32 and ours.shape == (box, box, box)
        assert relative_error(ours, compiled) < 1e-6


def test_finalise_on_torch_with_symmetry(monkeypatch):
    """`finalise` through the torch inversion, as on a GPU, gives the compiled one's map with C4 symmetry."""
    acc = inserted(20, None, 60, seed=3)
    compiled = acc.finalise(sym="C4")
    monkeypatch.setattr(reconstruct, "_invert", reconstruct._invert_torch)
    assert relative_error(acc.finalise(sym="C4"), compiled) < 1e-6


def test_torch_ctf_is_the_compiled_ctf():
    """`_ctf_torch` (the CTF on other devices) gives `ctf_2d`'s compiled values, with and without a
    B-factor, even and odd boxes, to float32 rounding."""
    gen = torch.Generator().manual_seed(10)

    def draw(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(12, generator=gen, dtype=torch.float64)

    for box, bfactor in [(32, 0.0), (31, 80.0)]:
        params = CTFParams(
            defocus_u=draw(5000, 30000), defocus_v=draw(5000, 30000), defocus_angle=draw(-180, 180),
            voltage=draw(200, 300), cs=draw(0.01, 2.7), amplitude_contrast=draw(0.05, 0.1),
            phase_shift=draw(0, 90), bfactor=bfactor * draw(0.5, 1.5), scale=draw(0.8, 1.2),
        )  # fmt: skip
        compiled = ctf_2d(params, box, 1.3)
        ky = torch.fft.fftfreq(box, d=1.3, dtype=torch.float64)
        kx = torch.fft.rfftfreq(box, d=1.3, dtype=torch.float64)
        ours = ctf_module._ctf_torch(ctf_module._ctf_terms(params), ky, kx)
        assert ours.dtype == torch.float32 and ours.shape == compiled.shape
        assert relative_error(ours, compiled) < 1e-6


def test_torch_fsc_sums_are_the_compiled_sums():
    """`_fsc_sums_torch` (the FSC on other devices) gives the compiled shell sums, and so `fsc`'s
    curve, to about 1e-10 relative, for even and odd boxes."""
    for box in (24, 25):
        maps = blob_maps(box, 2, seed=box)
        gen = torch.Generator().manual_seed(box)
        noisy = maps + 0.2 * torch.randn(maps.shape, generator=gen, dtype=torch.float64)
        f1, f2 = (np.fft.rfftn(v.numpy()) for v in noisy)
        sums = np.zeros((box, box // 2 + 1, 3))
        fsc_module._fsc_sums_kernel(sums, f1, f2, 0, box)
        expected = torch.from_numpy(sums.sum(0)).T
        ours = fsc_module._fsc_sums_torch(*noisy)
        assert relative_error(ours, expected) < 1e-12
        num, den1, den2 = ours
        assert float((num / torch.sqrt(den1 * den2) - fsc_module.fsc(*noisy)).abs().max()) < 1e-12


def test_torch_rotation_is_the_compiled_rotation():
    """`alignment._grid_sample` (the alignment on other devices) gives `_rotate_kernel`'s images, mirrored
    or not, taps outside the image counted as 0, to about 1e-10 relative (float64 images) and to
    float32 rounding (float32 images)."""
    gen = torch.Generator().manual_seed(11)
    for n, dtype, tolerance in [(24, torch.float64, 1e-10), (25, torch.float32, 1e-6)]:
        images = torch.randn(20, n, n, generator=gen, dtype=torch.float64).to(dtype)
        phi = torch.rand(20, generator=gen, dtype=torch.float64) * 2 * np.pi
        flip = torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0).to(torch.float64)
        c, s = torch.cos(phi), torch.sin(phi)
        matrix = torch.stack([torch.stack([c, -s], dim=-1), torch.stack([flip * s, flip * c], dim=-1)], dim=-2)
        compiled = alignment._sample(images, matrix)
        ours = alignment._grid_sample(images, matrix)
        assert ours.dtype == dtype
        assert relative_error(ours, compiled) < tolerance


def test_torch_eigenpairs_are_scipys(monkeypatch):
    """`_top_eigenpairs_torch` (the PCA on other devices) gives scipy's top eigenpair of each cone's
    block, and `first_component` through it the same components, Gram and covariance branches."""
    gen = torch.Generator().manual_seed(12)
    for cones, rows, pixels in [(4, 30, 50), (3, 40, 12)]:
        images = torch.randn(cones, rows, pixels, generator=gen, dtype=torch.float64)
        images[..., : pixels // 3] += 3 * torch.randn(cones, rows, 1, generator=gen, dtype=torch.float64)
        valid = torch.arange(rows) < torch.tensor([rows, rows - 7, rows // 2, rows - 1][:cones])[:, None]
        gram = images @ images.transpose(1, 2)
        values, vectors = pca._top_eigenpairs(gram, valid)
        ours, our_vectors = pca._top_eigenpairs_torch(gram, valid)
        assert relative_error(ours, values) < 1e-12
        signs = torch.sign((our_vectors * vectors).sum(dim=1, keepdim=True))
        assert float((our_vectors * signs - vectors).abs().max()) < 1e-10
        assert not our_vectors[~valid].any()

        expected = pca.first_component(images, valid)
        monkeypatch.setattr(pca, "_top_eigenpairs", pca._top_eigenpairs_torch)
        forced = pca.first_component(images, valid)
        monkeypatch.undo()
        for name in ("scores", "eigenimage", "mean", "explained"):
            assert relative_error(getattr(forced, name), getattr(expected, name)) < 1e-10
