"""Reading particle images from MRC stacks by particle row."""

from __future__ import annotations

import copy
import pickle
import threading
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from relion_graphsplit.relion.stack_files import StackError, parse_image_name, split_image_names
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.relion.star import make_particle_set, read_particles, write_particles

BOX = 16


def make_stack(path: Path, n: int, seed: int, dtype=np.float32) -> np.ndarray:
    """Write n random BOX x BOX images to `path` and return them."""
    images = np.random.default_rng(seed).normal(size=(n, BOX, BOX)).astype(np.float32)
    if dtype != np.float32:
        images = np.round(images * 100).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, data=images) as mrc:
        mrc.set_image_stack()
    return images.astype(np.float32)


def particle_set(names: list[str], star_path: Path, box: int = BOX):
    n = len(names)
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnAngleRot": np.zeros(n),
            "rlnAngleTilt": np.zeros(n),
            "rlnAnglePsi": np.zeros(n),
            "rlnDefocusU": np.full(n, 10000.0),
            "rlnOpticsGroup": np.ones(n, dtype=int),
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [2.0],
            "rlnImageSize": [box],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    return make_particle_set(particles, optics, path=star_path)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION-like project: two stacks under Extract/, a STAR file in Select/, run from the project."""
    stacks = {
        "Extract/a.mrcs": make_stack(tmp_path / "Extract/a.mrcs", 5, seed=1),
        "Extract/b.mrcs": make_stack(tmp_path / "Extract/b.mrcs", 4, seed=2),
    }
    # mixed order, both stacks interleaved, zero padding as RELION 3.1 and 5.0 write it
    refs = [("Extract/b.mrcs", 3), ("Extract/a.mrcs", 0), ("Extract/a.mrcs", 4), ("Extract/b.mrcs", 0),
            ("Extract/a.mrcs", 2), ("Extract/b.mrcs", 1), ("Extract/a.mrcs", 1)]
    names = [f"{i + 1:06d}@{s}" if k % 2 else f"{i + 1:08d}@{s}" for k, (s, i) in enumerate(refs)]
    expected = np.stack([stacks[s][i] for s, i in refs])
    star = tmp_path / "Select" / "particles.star"
    write_particles(star, particle_set(names, star))
    monkeypatch.chdir(tmp_path)
    return star, expected


def test_parse_image_name():
    assert parse_image_name("000012@Particles/x.mrcs") == (11, "Particles/x.mrcs")
    assert parse_image_name("1@a.mrcs") == (0, "a.mrcs")
    assert parse_image_name("single.mrc") == (0, "single.mrc")
    for bad in ("0@x.mrcs", "abc@x.mrcs", "-3@x.mrcs"):
        with pytest.raises(ValueError):
            parse_image_name(bad)


def test_split_image_names_agrees_with_parse_image_name():
    names = pd.Series(["000012@Particles/x.mrcs", "3@y.mrcs", "single.mrc", "00000001@dir with space/z.mrcs"])
    index, stacks = split_image_names(names)
    assert list(zip(index.tolist(), stacks.tolist())) == [parse_image_name(n) for n in names]
    with pytest.raises(ValueError):
        split_image_names(pd.Series(["1@a.mrcs", "0@a.mrcs"]))


def test_reads_the_right_images_from_the_project_directory(project):
    star, expected = project
    ps = read_particles(star)
    with ImageStacks(ps) as stacks:
        assert len(stacks) == len(expected) and stacks.box == BOX
        images = stacks.read(np.arange(len(expected)))
        assert images.dtype == torch.float32 and images.shape == (len(expected), BOX, BOX)
        np.testing.assert_array_equal(images.numpy(), expected)
        # any order, repeats, torch indices
        rows = torch.tensor([6, 0, 6, 3, 1, 5])
        np.testing.assert_array_equal(stacks.read(rows).numpy(), expected[rows.numpy()])
        assert stacks.read(np.array([], dtype=int)).shape == (0, BOX, BOX)
        with pytest.raises(IndexError):
            stacks.read([len(expected)])


def test_falls_back_to_the_star_file_directory(tmp_path, monkeypatch):
    images = make_stack(tmp_path / "data" / "parts.mrcs", 3, seed=3)
    star = tmp_path / "data" / "particles.star"
    write_particles(star, particle_set(["2@parts.mrcs", "3@parts.mrcs", "1@parts.mrcs"], star))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with ImageStacks(read_particles(star)) as stacks:
        np.testing.assert_array_equal(stacks.read([0, 1, 2]).numpy(), images[[1, 2, 0]])


def test_workdir_replaces_the_current_directory(project, tmp_path, monkeypatch):
    star, expected = project
    monkeypatch.chdir(tmp_path / "Select")  # Extract/ is not reachable from here nor from the STAR dir
    ps = read_particles(star)
    with pytest.raises(StackError):
        ImageStacks(ps)
    with ImageStacks(ps, workdir=tmp_path) as stacks:
        np.testing.assert_array_equal(stacks.read([2, 0]).numpy(), expected[[2, 0]])


def test_a_copy_or_unpickled_instance_opens_the_stacks_for_itself(project, tmp_path, monkeypatch):
    """What a task gets (copy.copy on a worker's thread, pickle on a worker elsewhere): the stacks by
    absolute path, read from any directory, and none of the original's open files, which closing the
    copy leaves open."""
    star, expected = project
    with ImageStacks(read_particles(star), workdir=".") as stacks:
        assert not stacks.paths[0].is_absolute()
        stacks.read([0])
        for other in (copy.copy(stacks), pickle.loads(pickle.dumps(stacks))):
            assert all(path.is_absolute() for path in other.paths) and not other._open
            monkeypatch.chdir(tmp_path / "Select")
            with other:
                np.testing.assert_array_equal(other.read(np.arange(len(expected))).numpy(), expected)
            monkeypatch.chdir(tmp_path)
        assert [file.closed for file in stacks._open.values()] == [False]


def test_few_open_stacks_at_a_time(project):
    star, expected = project
    with ImageStacks(read_particles(star), max_open=1) as stacks:
        for _ in range(2):
            np.testing.assert_array_equal(stacks.read(np.arange(len(expected))).numpy(), expected)
        assert len(stacks._open) == 1


def test_read_ahead_reads_the_next_batch_while_this_one_is_used(project):
    star, expected = project
    batches = [np.array([0, 1, 2]), np.array([6, 3]), np.array([5])]
    second_asked = threading.Event()

    class Logged(ImageStacks):
        def read(self, indices):
            self.asked.append(list(np.asarray(indices)))
            if len(self.asked) == 2:
                second_asked.set()
            return super().read(indices)

    with Logged(read_particles(star)) as stacks:
        stacks.asked = []
        got = []
        for rows, images in stacks.read_ahead(batches):
            if not got:  # the second batch is being read while the first is in use
                assert second_asked.wait(timeout=10)
            got.append((rows, images))
        assert [list(rows) for rows, _ in got] == [list(b) for b in batches]
        for rows, images in got:
            np.testing.assert_array_equal(images.numpy(), expected[rows])
        assert stacks.asked == [list(b) for b in batches]  # each batch read once, in order
        assert list(stacks.read_ahead([])) == []


def test_integer_stacks_and_single_images(tmp_path):
    stack = make_stack(tmp_path / "ints.mrcs", 2, seed=4, dtype=np.int16)
    single = np.random.default_rng(5).normal(size=(BOX, BOX)).astype(np.float32)
    mrcfile.new(tmp_path / "one.mrc", data=single).close()  # a 2D image, not a stack
    star = tmp_path / "particles.star"
    ps = particle_set(["2@ints.mrcs", "one.mrc", "1@ints.mrcs"], star)
    with ImageStacks(ps, workdir=tmp_path) as stacks:
        np.testing.assert_array_equal(stacks.read([0, 1, 2]).numpy(), np.stack([stack[1], single, stack[0]]))


def write_mrcs(path: Path, images: np.ndarray, extended_header: int = 0) -> None:
    """Write `images` as an MRC image stack in their dtype and byte order."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
        if extended_header:
            mrc.set_extended_header(np.zeros(extended_header, dtype="V1"))


def test_reads_every_mode_and_byte_order_in_the_order_asked(tmp_path):
    rng = np.random.default_rng(8)
    stored = {
        "f32.mrcs": rng.normal(size=(9, BOX, BOX)).astype(np.float32),
        "i16.mrcs": rng.integers(-3000, 3000, size=(7, BOX, BOX)).astype(np.int16),
        "u16.mrcs": rng.integers(0, 60000, size=(3, BOX, BOX)).astype(np.uint16),
        "f16.mrcs": rng.normal(size=(4, BOX, BOX)).astype(np.float16),
        "i8.mrcs": rng.integers(-100, 100, size=(3, BOX, BOX)).astype(np.int8),
        "big.mrcs": rng.normal(size=(5, BOX, BOX)).astype(">f4"),
        "bigint.mrcs": rng.integers(-3000, 3000, size=(4, BOX, BOX)).astype(">i2"),
    }
    for k, (name, images) in enumerate(stored.items()):
        write_mrcs(tmp_path / name, images, extended_header=97 * k)
    refs = [(name, i) for name, images in stored.items() for i in range(len(images))]
    ps = particle_set([f"{i + 1}@{name}" for name, i in refs], tmp_path / "particles.star")
    expected = np.stack([stored[name][i].astype(np.float32) for name, i in refs])
    rows = np.random.default_rng(9).permutation(len(refs))
    rows = np.concatenate([rows, rows[:5], [3, 4, 5, 1, 8]])  # repeats and runs of neighbours
    with ImageStacks(ps, workdir=tmp_path, max_open=3) as stacks:
        np.testing.assert_array_equal(stacks.read(rows).numpy(), expected[rows])
        np.testing.assert_array_equal(stacks.read(rows[::-1]).numpy(), expected[rows[::-1]])
        np.testing.assert_array_equal(stacks.read(np.arange(0, len(refs), 3)).numpy(), expected[::3])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_stacks_are_read_not_memory_mapped(project):
    star, expected = project
    with ImageStacks(read_particles(star)) as stacks:
        stacks.read(np.arange(len(expected)))
        assert "Extract/" not in Path("/proc/self/maps").read_text()


def test_truncated_and_unsupported_stacks_are_refused(tmp_path):
    make_stack(tmp_path / "a.mrcs", 3, seed=10)
    star = tmp_path / "particles.star"
    with open(tmp_path / "a.mrcs", "r+b") as f:
        f.truncate(1024 + 3 * BOX * BOX * 4 - 1)
    with pytest.raises(StackError, match=r"1 image stacks cannot be read, first .*a.mrcs \(.* bytes"):
        ImageStacks(particle_set(["1@a.mrcs"], star), workdir=tmp_path)
    make_stack(tmp_path / "c.mrcs", 2, seed=11)
    with mrcfile.open(tmp_path / "c.mrcs", "r+") as mrc:
        mrc.header.mode = 4  # complex
    with pytest.raises(StackError, match="MRC mode 4 is not supported"):
        ImageStacks(particle_set(["1@c.mrcs"], star), workdir=tmp_path)


def test_missing_stacks_are_reported_in_one_line(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2, seed=6)
    star = tmp_path / "particles.star"
    ps = particle_set(["1@a.mrcs", "1@missing1.mrcs", "2@missing2.mrcs", "1@missing1.mrcs"], star)
    with pytest.raises(StackError) as info:
        ImageStacks(ps, workdir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "2 of 3 image stacks not found" in message and "first missing1.mrcs" in message


def test_short_stack_and_wrong_box_are_refused(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2, seed=7)
    star = tmp_path / "particles.star"
    with pytest.raises(StackError, match=r"a.mrcs \(2 images, image 3 asked for\)"):
        ImageStacks(particle_set(["1@a.mrcs", "3@a.mrcs"], star), workdir=tmp_path)
    with pytest.raises(StackError, match="rlnImageSize is 32"):
        ImageStacks(particle_set(["1@a.mrcs"], star, box=32), workdir=tmp_path)


@pytest.mark.parametrize(
    "content, why",
    [(b"", "an empty file"), (b"data_particles\n" * 100, "no MRC header"), (b"MAP ", "shorter than an MRC header")],
)
def test_a_stack_that_is_not_mrc_is_named(tmp_path, content, why):
    (tmp_path / "a.mrcs").write_bytes(content)
    with pytest.raises(StackError) as info:
        ImageStacks(particle_set(["1@a.mrcs"], tmp_path / "particles.star"), workdir=tmp_path)
    assert str(info.value) == f"{tmp_path / 'a.mrcs'}: not a readable MRC stack ({why})"


def test_images_with_nan_or_inf_are_named_when_read(tmp_path):
    images = make_stack(tmp_path / "Particles/a.mrcs", 20, seed=12)
    images[16, 3, 4], images[18, 0, 0] = np.nan, -np.inf
    with mrcfile.open(tmp_path / "Particles/a.mrcs", "r+") as mrc:
        mrc.data[:] = images
    names = [f"{i + 1:06d}@Particles/a.mrcs" for i in range(20)]
    with ImageStacks(particle_set(names, tmp_path / "particles.star"), workdir=tmp_path) as stacks:
        np.testing.assert_array_equal(stacks.read(np.arange(16)).numpy(), images[:16])
        with pytest.raises(StackError) as info:
            stacks.read(np.array([19, 2, 18, 16]))
    message = str(info.value)
    assert message == f"{tmp_path / 'Particles/a.mrcs'}: image 19 holds pixels that are not finite numbers (NaN or Inf)"


def test_paths_are_the_stacks_found(project):
    star, _ = project
    with ImageStacks(read_particles(star)) as stacks:
        assert sorted(stacks.paths) == [star.parents[1] / "Extract/a.mrcs", star.parents[1] / "Extract/b.mrcs"]
