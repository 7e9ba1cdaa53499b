"""Class maps, half maps and the model.star: one pass over the images, RELION's files and layout."""

from __future__ import annotations

import shlex

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from relion_graphsplit.engine import Compute
from relion_graphsplit.fourier.ctf import ctf_2d
from relion_graphsplit.fourier.fsc import fsc
from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.fourier.reconstruct import FourierAccumulator, reconstruct
from relion_graphsplit.method import classmaps
from relion_graphsplit.method.classmaps import _completeness, half_sets, reconstruct_classes, write_class_maps
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.model_star import MODEL_NAME, ini_high, next_command, ssnr_from_fsc, write_model_star
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.relion.stacks import ImageStacks

BOX, APIX = 32, 4.0


@pytest.fixture(scope="module")
def simulated(small_set) -> dict:
    """conftest's small set: 600 particles of the two adenylate kinase states (box 32, 4 A), SNR 0.3,
    60/40, pose errors of 1 degree (the maps are reconstructed from the poses the file gives)."""
    ps = star_io.read_particles(small_set / "particles.star")
    classes = star_io.read_particles(small_set / "truth.star").particles["rlnClassNumber"].to_numpy()
    truth = [torch.from_numpy(read_mrc(small_set / f"class{k}.mrc")[0]) for k in (1, 2)]
    return {"dir": small_set, "ps": ps, "classes": classes, "truth": truth}


@pytest.fixture(scope="module")
def class_maps(simulated):
    with ImageStacks(simulated["ps"]) as stacks:
        return reconstruct_classes(star_io.particles(simulated["ps"]), stacks, simulated["classes"], seed=1)


class CountingStacks(ImageStacks):
    """ImageStacks that records every particle row it reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[int] = []

    def read(self, indices):
        self.rows += list(np.asarray(indices).ravel())
        return super().read(indices)


def test_each_image_is_read_once(simulated):
    with CountingStacks(simulated["ps"]) as stacks:
        reconstruct_classes(star_io.particles(simulated["ps"]), stacks, simulated["classes"], batch_size=100)
    assert sorted(stacks.rows) == list(range(len(simulated["classes"])))


def test_classes_taken_one_at_a_time_read_each_image_once_and_give_the_same_maps(simulated, class_maps, monkeypatch):
    """Where the padded grids of all classes do not fit in GRID_MEMORY (large boxes), each pass holds
    one class's: every image is still read once, and the maps are the one pass's to rounding (each
    accumulator gets its images in other chunks, and a chunk's points are added in grid-row order)."""
    monkeypatch.setattr(classmaps, "GRID_MEMORY", 2 * FourierAccumulator.grid_bytes(32))
    with CountingStacks(simulated["ps"]) as stacks:
        passes = reconstruct_classes(star_io.particles(simulated["ps"]), stacks, simulated["classes"], seed=1)
    assert sorted(stacks.rows) == list(range(len(simulated["classes"])))
    first = np.flatnonzero(simulated["classes"] == 1)
    assert stacks.rows[: len(first)] == list(first)  # class 1's pass came first
    for ours, theirs in ((passes.maps, class_maps.maps), (passes.half_maps, class_maps.half_maps)):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))
    assert torch.allclose(passes.fsc, class_maps.fsc, rtol=0, atol=1e-4)


def test_both_stages_report_progress(simulated):
    """The insertion (batches) and the inversion (classes, three maps each) each advance a bar: at
    large boxes the inversion takes seconds per map."""
    seen: dict[str, int] = {}

    def track(iterable, description="", total=None):
        for item in iterable:
            seen[description] = seen.get(description, 0) + 1
            yield item

    with ImageStacks(simulated["ps"]) as stacks:
        reconstruct_classes(star_io.particles(simulated["ps"]), stacks, simulated["classes"], batch_size=200, track=track)
    assert seen == {"Reconstructing class maps": 3, "Inverting class maps (classes)": 2}


@pytest.mark.parametrize("sym", ["C1", "C2"])
def test_maps_are_the_reconstructions_of_each_class_and_half(simulated, sym):
    ps, classes = simulated["ps"], simulated["classes"]
    with ImageStacks(ps) as stacks:
        maps = reconstruct_classes(star_io.particles(ps), stacks, classes, sym=sym, seed=2, batch_size=128)
        images = stacks.read(np.arange(len(classes)))
    rotations, origins = star_io.poses(ps)
    ctf = ctf_2d(star_io.ctf_params(ps), BOX, APIX)

    def direct(rows: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(rows)
        return reconstruct(images[rows], rotations[rows], origins[rows], ctf[rows], BOX, sym=sym)

    for k in (1, 2):
        expected = direct(np.flatnonzero(classes == k))
        assert torch.allclose(maps.maps[k - 1], expected, atol=1e-4 * float(expected.abs().max()))
        for h in (1, 2):
            half = direct(np.flatnonzero((classes == k) & (maps.subsets == h)))
            assert torch.allclose(maps.half_maps[k - 1, h - 1], half, atol=1e-4 * float(half.abs().max()))


def test_each_map_resembles_its_own_class(simulated, class_maps):
    def low_res_fsc(a, b):
        return float(fsc(a, b)[1:9].mean())

    truth = simulated["truth"]
    for k, other in ((0, 1), (1, 0)):
        assert low_res_fsc(class_maps.maps[k], truth[k]) > low_res_fsc(class_maps.maps[k], truth[other])
    assert class_maps.counts.tolist() == [int((simulated["classes"] == k).sum()) for k in (1, 2)]
    assert class_maps.distribution.sum() == pytest.approx(1.0)


def test_fsc_and_resolution_of_the_halves(class_maps):
    assert class_maps.fsc.shape == (2, BOX // 2 + 1)
    assert (class_maps.fsc[:, 1] > 0.9).all()
    assert (class_maps.fsc[:, -1] < class_maps.fsc[:, 1]).all()
    for r in class_maps.resolution:
        assert 2 * APIX <= r < BOX * APIX / 2
    assert class_maps.completeness.shape == (2, BOX // 2 + 1)
    assert ((class_maps.completeness >= 0) & (class_maps.completeness <= 1)).all()
    assert (class_maps.completeness[:, 1:8] == 1).all()  # 600 random views fill the low shells


@pytest.mark.parametrize("r_max", [None, 6])
def test_completeness_counts_the_filled_voxels_of_each_shell(r_max):
    """The compiled count against a direct one: voxels of the padded half grid in each shell
    round(r / pad) of the box, and the share of them with weight > 0 (a few views, so many are empty)."""
    gen = torch.Generator().manual_seed(3)
    acc = FourierAccumulator(BOX + 1, r_max=r_max)
    rotations = euler_to_matrix(*(torch.rand(3, 5, generator=gen, dtype=torch.float64) * 360))
    acc.insert(torch.randn(5, BOX + 1, BOX + 1, generator=gen), rotations)
    weight = acc.sums[2]
    k = torch.arange(weight.shape[0], dtype=torch.float64) - weight.shape[0] // 2
    x = torch.arange(weight.shape[2], dtype=torch.float64)
    shell = torch.round(torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + x**2) / acc.pad).long()
    inside = shell <= (BOX + 1) // 2
    total = torch.bincount(shell[inside], minlength=(BOX + 1) // 2 + 1)
    filled = torch.bincount(shell[inside & (weight > 0)], minlength=(BOX + 1) // 2 + 1)
    expected = filled.double() / total.clamp(min=1).double()
    measured = _completeness(acc)
    assert int(((expected > 0) & (expected < 1)).sum()) >= 5  # partly filled shells: the count matters
    assert torch.allclose(measured, expected, rtol=0, atol=1e-12)


def test_half_sets_are_drawn_balanced_and_seeded_when_the_file_has_none(simulated):
    ps, classes = simulated["ps"], simulated["classes"]
    assert "rlnRandomSubset" in ps.particles  # the simulator writes one
    assert np.array_equal(half_sets(star_io.particles(ps), classes), ps.particles["rlnRandomSubset"].to_numpy())

    bare = star_io.make_particle_set(ps.particles.drop(columns="rlnRandomSubset"), ps.optics)
    drawn = half_sets(star_io.particles(bare), classes, seed=4)
    assert set(np.unique(drawn)) == {1, 2}
    for k in (1, 2):
        counts = np.bincount(drawn[classes == k], minlength=3)[1:]
        assert abs(counts[0] - counts[1]) <= 1
    assert np.array_equal(drawn, half_sets(star_io.particles(bare), classes, seed=4))
    assert not np.array_equal(drawn, half_sets(star_io.particles(bare), classes, seed=5))

    bad = star_io.make_particle_set(ps.particles.assign(rlnRandomSubset=3), ps.optics)
    with pytest.raises(ValueError, match="rlnRandomSubset"):
        half_sets(star_io.particles(bad), classes)


def test_a_class_without_a_half_set_is_refused(simulated):
    ps = simulated["ps"]
    classes = np.ones(len(ps.particles), dtype=np.int64)
    classes[np.flatnonzero(ps.particles["rlnRandomSubset"].to_numpy() == 1)[0]] = 2
    with ImageStacks(ps) as stacks, pytest.raises(ValueError, match="class 2 has no particle in half set 2"):
        reconstruct_classes(star_io.particles(ps), stacks, classes)


def test_maps_are_written_with_relion_headers(tmp_path, class_maps):
    nodes = write_class_maps(tmp_path, class_maps)
    assert nodes == [
        (tmp_path / "run_class001.mrc", "map"),
        (tmp_path / "run_half1_class001_unfil.mrc", "halfmap"),
        (tmp_path / "run_class002.mrc", "map"),
        (tmp_path / "run_half1_class002_unfil.mrc", "halfmap"),
    ]
    for k in (1, 2):
        for name, volume in (
            (f"run_class{k:03d}.mrc", class_maps.maps[k - 1]),
            (f"run_half1_class{k:03d}_unfil.mrc", class_maps.half_maps[k - 1, 0]),
            (f"run_half2_class{k:03d}_unfil.mrc", class_maps.half_maps[k - 1, 1]),
        ):
            with mrcfile.open(tmp_path / name) as mrc:
                header = mrc.header
                assert int(header.mode) == 2 and (int(header.nx), int(header.ny), int(header.nz)) == (BOX,) * 3
                assert (int(header.mapc), int(header.mapr), int(header.maps)) == (1, 2, 3)
                assert float(header.cella.x) == pytest.approx(BOX * APIX)
                assert float(mrc.voxel_size.x) == pytest.approx(APIX)
                assert tuple(float(v) for v in header.origin.item()) == (0.0, 0.0, 0.0)
                np.testing.assert_array_equal(mrc.data, volume.numpy())
    assert not list(tmp_path.glob(".*partial*"))


def test_model_star_has_relion_layout(tmp_path, class_maps):
    refs = [f"External/job005/run_class{k:03d}.mrc" for k in (1, 2)]
    path = tmp_path / MODEL_NAME
    write_model_star(
        path, refs, class_maps.distribution, class_maps.resolution, class_maps.fsc, class_maps.completeness,
        BOX, APIX, average_pmax=0.9,
    )  # fmt: skip
    blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnReferenceImage"])
    assert list(blocks) == ["model_general", "model_classes", "model_class_1", "model_class_2"]
    general = blocks["model_general"]  # a key-value block
    assert general["rlnNrClasses"] == 2 and general["rlnPixelSize"] == APIX
    assert general["rlnOriginalImageSize"] == BOX and general["rlnReferenceDimensionality"] == 3
    assert general["rlnCurrentResolution"] == pytest.approx(min(class_maps.resolution), rel=1e-6)
    assert general["rlnAveragePmax"] == pytest.approx(0.9)
    classes = blocks["model_classes"]
    assert classes["rlnReferenceImage"].tolist() == refs
    np.testing.assert_allclose(classes["rlnClassDistribution"], class_maps.distribution, atol=1e-6)
    np.testing.assert_allclose(classes["rlnEstimatedResolution"], class_maps.resolution, rtol=1e-5)
    assert classes["rlnOverallFourierCompleteness"].between(0.9, 1.0).all()
    for k in (1, 2):
        table = blocks[f"model_class_{k}"]
        assert table["rlnSpectralIndex"].tolist() == list(range(BOX // 2 + 1))
        np.testing.assert_allclose(table["rlnGoldStandardFsc"], class_maps.fsc[k - 1].numpy(), atol=1e-6)
        np.testing.assert_allclose(table["rlnAngstromResolution"].iloc[1:], BOX * APIX / np.arange(1, BOX // 2 + 1), rtol=1e-6)
        np.testing.assert_allclose(table["rlnResolution"].iloc[4], 4 / (BOX * APIX), rtol=1e-6)
        np.testing.assert_allclose(table["rlnSsnrMap"], ssnr_from_fsc(class_maps.fsc[k - 1]), rtol=1e-5)


def test_ssnr_from_fsc():
    np.testing.assert_allclose(ssnr_from_fsc(np.array([-0.2, 0.0, 1 / 3, 0.5, 1.0])), [0, 0, 1, 2, 1998])


def test_next_command_seeds_class3d_with_ctf_corrected_references():
    line = next_command("External/job005/", "External/job005/run_data.star", 150, 4, [7.93, 9.01], sym="D2")
    mkdir, _, command = line.partition(" && ")
    assert mkdir == "mkdir -p External/job005/Class3D"
    args = shlex.split(command)
    options = dict(zip(args[1::2], args[2::2]))
    assert args[0] == "relion_refine"
    assert options["--o"] == "External/job005/Class3D/run"
    assert options["--ref"] == "External/job005/run_model.star"
    assert options["--i"] == "External/job005/run_data.star"
    assert "--ctf_corrected_ref" in args and "--skip_align" in args and "--ctf" in args
    assert args[args.index("--K") + 1] == "2" and args[args.index("--sym") + 1] == "D2"
    assert args[args.index("--ini_high") + 1] == "9.1" and args[args.index("--j") + 1] == "4"
    assert args[args.index("--particle_diameter") + 1] == "150"
    assert ini_high([float("inf"), 8.0]) == 60.0 and ini_high([75.0, 8.0]) == 60.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_gives_the_cpu_maps(simulated, class_maps):
    with ImageStacks(simulated["ps"]) as stacks:
        particles = star_io.particles(simulated["ps"])
        gpu = reconstruct_classes(particles, stacks, simulated["classes"], seed=1, compute=Compute.named("cuda"))
    scale = float(class_maps.maps.abs().max())
    assert torch.allclose(gpu.maps, class_maps.maps, atol=1e-4 * scale)
    assert torch.allclose(gpu.half_maps, class_maps.half_maps, atol=1e-4 * scale)
