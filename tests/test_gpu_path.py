"""The GPU's way (--gpu) against the CPU's: every heavy step through the torch twins of the compiled
loops, run here on CPU tensors (`engine.Compute.named("cpu-torch")`) and, where CUDA is available, on
the GPU. The classes are the CPU run's; the posteriors, the graph's scores and the class maps agree to
rounding (measured on CPU tensors: log odds within 3e-5 of values up to 133, the graph's scores within
3e-6 of values up to 55, the split tests' gains within 1e-7, the class maps within 1e-7 of their
largest value)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from relion_graphsplit.cli import job
from relion_graphsplit.cli.graphsplit import _bare_gpu, gpu_device, run_command
from relion_graphsplit.engine import Compute
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.method.pipeline import split
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.relion.stacks import ImageStacks

DEVICES = [
    "cpu-torch",
    pytest.param("cuda:0", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA)")),
]
OPTIONS = SplitOptions(refine_iterations=2, n_classes=2)  # two classes, untested: the small set's run


def run_program(small_set: Path, out: Path, device: str | None) -> Path:
    """relion_graphsplit on the small set into `out` with OPTIONS, the heavy steps on `device`."""
    job.run(small_set / "particles.star", out, OPTIONS, None, None, None, 1, None, None, device=device)
    return out


@pytest.fixture(scope="module")
def cpu_run(small_set: Path, tmp_path_factory) -> Path:
    return run_program(small_set, tmp_path_factory.mktemp("cpu"), None)


@pytest.mark.parametrize("device", DEVICES)
def test_the_program_gives_the_cpus_classes(small_set: Path, cpu_run: Path, tmp_path: Path, device: str):
    """The whole program (preparation, classification, refinement, class maps) the GPU's way gives the
    CPU's classes, their log odds to 1e-3 and the class maps to 1e-4 of their largest value."""
    ours = run_program(small_set, tmp_path / "out", device)
    expected, found = (star_io.read_particles(run / "run_data.star").particles for run in (cpu_run, ours))
    assert np.array_equal(found["rlnClassNumber"], expected["rlnClassNumber"])
    assert set(np.unique(expected["rlnClassNumber"])) == {1, 2}
    for column in ("rlnGraphSplitLogOdds1", "rlnGraphSplitLogOdds2"):
        assert np.abs(found[column] - expected[column]).max() < 1e-3
    for name in ("run_class001.mrc", "run_class002.mrc", "run_half1_class001_unfil.mrc"):
        (map_cpu, _), (map_ours, _) = read_mrc(cpu_run / name), read_mrc(ours / name)
        assert np.abs(map_ours - map_cpu).max() < 1e-4 * np.abs(map_cpu).max()


@pytest.mark.parametrize("device", DEVICES)
def test_the_split_tests_give_the_cpus_classes(simulated_set, device: str):
    """On a set large enough to test its splits (--K auto: refinement, projection scores, difference
    maps of the half-sets), the GPU's way keeps the same splits with the same classes, the gains and
    the log posteriors to rounding."""
    folder = simulated_set(1500, 0.3, [0.6, 0.4], seed=3, pose_error_deg=1.0, max_shift_A=6.0)  # test_pipeline's
    ps = star_io.read_particles(folder / "particles.star")
    results = []
    for compute in (Compute.named("cpu"), Compute.named(device)):
        with ImageStacks(ps) as stacks:
            results.append(split(star_io.particles(ps), stacks, SplitOptions(), compute=compute))
    expected, found = results
    assert expected.n_classes == 2
    assert np.array_equal(found.classes, expected.classes)
    assert np.abs(found.log_posterior - expected.log_posterior).max() < 1e-3
    assert np.abs(found.graph_score - expected.graph_score).max() < 1e-4
    assert [test.kept for test in found.split_tests] == [test.kept for test in expected.split_tests]
    gains = [(a, b) for f, e in zip(found.split_tests, expected.split_tests) for a, b in zip(f.gain, e.gain)]
    assert all(abs(a - b) < 1e-6 or (np.isnan(a) and np.isnan(b)) for a, b in gains)


def test_gpu_ids_are_relions():
    """--gpu alone is the first GPU; of a list the first id; anything else is refused."""
    assert _bare_gpu(["--gpu", "--o", "x"]) == ["--gpu", "", "--o", "x"]
    assert _bare_gpu(["--o", "x", "--gpu"]) == ["--o", "x", "--gpu", ""]
    assert _bare_gpu(["--gpu", "1"]) == ["--gpu", "1"]
    assert [gpu_device(ids) for ids in ("", "1", "0:1", " 2,3 ")] == ["cuda:0", "cuda:1", "cuda:0", "cuda:2"]
    assert Compute.named("cuda:1") == Compute(torch.device("cuda", 1), True)
    assert Compute.named("cpu-torch") == Compute(torch.device("cpu"), True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_gpu_without_cuda_is_one_line(small_set: Path, tmp_path: Path, capsys):
    """--gpu where torch sees no GPU: a usage error in one line, before any output is made."""
    code = run_command(["--i", str(small_set / "particles.star"), "--o", str(tmp_path / "out"), "--gpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--gpu" in err and "no GPU" in err
    assert not (tmp_path / "out").exists()
