"""The simulator streams: the stack is written batch by batch, the same file whatever the batches, in
memory that does not grow with the number of particles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from relion_graphsplit.relion.mrc import read_mrc, write_stack
from relion_graphsplit.simulate.particles import Conditions, class_log_likelihoods, simulate, write_simulation

REPO = Path(__file__).resolve().parents[1]
LABEL_TIME = slice(224, 304)
"""Header bytes of the first label, which ends with the time the file was made."""


def without_time(path: Path) -> bytes:
    """The file's bytes, the creation time in the label of an MRC file left out (two runs a second
    apart write otherwise identical files)."""
    data = path.read_bytes()
    if path.suffix not in (".mrc", ".mrcs"):
        return data
    return data[: LABEL_TIME.start] + data[LABEL_TIME.stop :]


@pytest.fixture(scope="module")
def adk_maps() -> tuple[list[np.ndarray], float]:
    read = [read_mrc(REPO / "test_data" / f"adk_{state}.mrc") for state in ("open", "closed")]
    return [volume for volume, _ in read], read[0][1]


def _write_in_batches(path: Path, images: np.ndarray, sizes: list[int], pixel_size: float) -> None:
    with write_stack(path, len(images), images.shape[-1], pixel_size) as stack:
        start = 0
        for size in sizes:
            stack.append(images[start : start + size])
            start += size


@pytest.mark.parametrize(
    ("count", "box", "batches"),
    [(37, 10, [5, 1, 20, 11]), (300, 64, [256, 44]), (513, 34, [100] * 5 + [13]), (9, 6, [1] * 9)],
)
def test_streamed_stack_is_the_file_mrcfile_writes(tmp_path, count, box, batches):
    """However the images are cut into batches: the data byte for byte, the header field for field,
    its mean and standard deviation (summed as the batches pass) to float32 rounding."""
    images = (np.random.default_rng(count).standard_normal((count, box, box)) * 3 + 0.01).astype(np.float32)
    with mrcfile.new_mmap(tmp_path / "whole.mrcs", shape=images.shape, mrc_mode=2) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = 1.7
        mrc.data[:] = images
        mrc.update_header_stats()
    _write_in_batches(tmp_path / "streamed.mrcs", images, batches, 1.7)
    expected = without_time(tmp_path / "whole.mrcs")
    streamed = without_time(tmp_path / "streamed.mrcs")
    assert streamed[1024 - 80 :] == expected[1024 - 80 :]  # the data (the label's time is left out)
    with mrcfile.open(tmp_path / "whole.mrcs") as whole, mrcfile.open(tmp_path / "streamed.mrcs") as ours:
        for field in whole.header.dtype.names:
            if field in ("dmean", "rms", "label"):
                continue
            assert np.array_equal(whole.header[field], ours.header[field]), field
        np.testing.assert_allclose(ours.header.dmean, whole.header.dmean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.header.rms, whole.header.rms, rtol=1e-5)
        assert ours.voxel_size.x == pytest.approx(1.7) and ours.is_image_stack()


def test_a_stack_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "stack.mrcs"
    path.write_bytes(b"an earlier stack")
    images = np.zeros((4, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="3 of the stack's 4 images"):
        with write_stack(path, 4, 8, 1.0) as stack:
            stack.append(images[:3])
    with pytest.raises(RuntimeError, match="killed"):
        with write_stack(path, 4, 8, 1.0) as stack:
            stack.append(images[:2])
            raise RuntimeError("killed")
    for wrong, message in ((np.zeros((5, 8, 8)), "more than the 4 images"), (np.zeros((4, 6, 6)), "8 x 8")):
        with pytest.raises(ValueError, match=message):
            with write_stack(path, 4, 8, 1.0) as stack:
                stack.append(wrong)
    assert path.read_bytes() == b"an earlier stack"
    assert [p.name for p in tmp_path.iterdir()] == ["stack.mrcs"]


def test_simulation_streams_the_same_files_for_any_batch_size(adk_maps, tmp_path):
    volumes, pixel_size = adk_maps
    kwargs = dict(conditions=Conditions(max_shift_A=3.0, pose_error_deg=1.0, noise_excess=2.0), seed=4)
    for batch_size in (7, 32):
        write_simulation(tmp_path / str(batch_size), volumes, pixel_size, 40, 0.1, [0.6, 0.4], batch_size=batch_size, **kwargs)
    for name in ("particles.mrcs", "particles.star", "truth.star"):
        assert without_time(tmp_path / "7" / name) == without_time(tmp_path / "32" / name), name
    images, *_ = simulate(volumes, pixel_size, 40, 0.1, [0.6, 0.4], batch_size=40, **kwargs)
    np.testing.assert_array_equal(mrcfile.read(tmp_path / "7" / "particles.mrcs"), images)


def test_likelihoods_taken_while_simulating_are_those_of_the_images(adk_maps):
    """The ceiling taken as the images are made equals the ceiling of the images read back."""
    volumes, pixel_size = adk_maps
    conditions = Conditions(max_shift_A=4.0, noise_excess=3.0)
    during = np.empty((30, 2))
    images, _, optics, truth = simulate(
        volumes, pixel_size, 30, 0.05, [0.5, 0.5], conditions, seed=2, batch_size=16, log_likelihoods=during
    )
    after = class_log_likelihoods(images, volumes, truth, optics, batch_size=16, conditions=conditions)
    np.testing.assert_allclose(during, after, rtol=1e-12)


def _peak_memory_mb(out: Path, n: int) -> float:
    """VmHWM (MB) of relion_graphsplit_simulate making n particles of box 64 (with the ceiling)."""
    code = (
        "import sys\n"
        "from relion_graphsplit.cli.simulate import main\n"
        "sys.argv = ['relion_graphsplit_simulate'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit as end:\n    assert not end.code, end.code\n"
        "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')))\n"
    )
    maps = ["--map1", str(REPO / "test_data/adk_open.mrc"), "--map2", str(REPO / "test_data/adk_closed.mrc")]
    args = [*maps, "--n", str(n), "--snr", "0.05", "--max_shift", "3", "--batch_size", "125", "--o", str(out)]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(result.stdout.split("VmHWM:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is read from Linux's /proc")
def test_peak_memory_does_not_grow_with_the_number_of_particles(tmp_path):
    """Sixteen times the particles: the peak grows by their tables only, far less than the stack
    (66 MB), which the simulator never holds; the larger stack keeps the allocator's own noise (a few
    MB either way) well inside the margin."""
    small, large = (_peak_memory_mb(tmp_path / str(n), n) for n in (250, 4000))
    stack_mb = (tmp_path / "4000" / "particles.mrcs").stat().st_size / 2**20
    assert large - small < 0.4 * stack_mb, (small, large, stack_mb)
