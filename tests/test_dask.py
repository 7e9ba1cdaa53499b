"""The passes over the particles on a Dask cluster (engine.py, --dask_scheduler): results in submission
order, partial sums reduced in task order, and the same working files and classes, bit for bit, as in
one process; the class maps the same whoever runs their tasks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from relion_graphsplit.cli.graphsplit import run_command
from relion_graphsplit.engine import LOCAL, TASK_BATCHES, DaskEngine, LocalEngine, connect, ordered_sum, tasks_of
from relion_graphsplit.method import classmaps
from relion_graphsplit.method.options import SplitOptions
from relion_graphsplit.method.pipeline import prepare
from relion_graphsplit.method.refine import class_log_likelihoods, class_sums, residual_sums
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.scratch import row_batches
from relion_graphsplit.simulate.particles import uniform_rotations
from tests.test_catalogue import FAST
from tests.test_continue import assert_same_outputs
from tests.test_refine import _smooth_map, _spectra

distributed = pytest.importorskip("distributed", reason="dask's distributed is not installed (the dask extra)")
DASK = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")


def _late_square(delay: float, x: int) -> int:
    """x squared after `delay` seconds (tasks that finish out of order)."""
    time.sleep(delay)
    return x * x


@pytest.fixture(scope="module")
def dask_engine():
    """A DaskEngine on an in-process cluster of two single-threaded workers."""
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield DaskEngine(client)


def test_results_come_in_submission_order(dask_engine):
    """The first task finishes last, yet both engines give the results in the order of the tasks,
    with the common arguments first."""
    tasks = [(x,) for x in range(6)]
    delays = iter([0.3, 0.0, 0.0, 0.0, 0.0, 0.0])
    late = [(next(delays), *task) for task in tasks]
    assert list(LOCAL.map(_late_square, late)) == [x * x for x in range(6)]
    assert list(dask_engine.map(_late_square, late)) == [x * x for x in range(6)]
    assert list(dask_engine.map(_late_square, tasks, (0.0,))) == [x * x for x in range(6)]


def test_tasks_do_not_depend_on_who_runs_them():
    """Batches are grouped TASK_BATCHES at a time, in order, the last group shorter."""
    batches = [np.arange(2 * i, 2 * i + 2) for i in range(2 * TASK_BATCHES + 1)]
    groups = tasks_of(batches)
    assert [len(group) for group in groups] == [TASK_BATCHES, TASK_BATCHES, 1]
    assert np.array_equal(np.concatenate([np.concatenate(g) for g in groups]), np.arange(2 * len(batches)))


def test_ordered_sum_adds_left_to_right():
    """Float addition in the order given: (1e8 + 1) - 1e8 loses the 1 in float32, as the order says;
    the parts are left as they were."""
    parts = [np.float32([1e8]), np.float32([1.0]), np.float32([-1e8])]
    assert ordered_sum(parts)[0] == np.float32(0.0)
    assert ordered_sum([parts[0], parts[2], parts[1]])[0] == np.float32(1.0)
    assert parts[0][0] == np.float32(1e8)


@pytest.fixture(scope="module")
def stored_set(tmp_path_factory):
    """80 residual images of two classes at box 12, their CTFs and transforms in ScratchArray files,
    in batches of 2 rows: more than two tasks' worth."""
    folder = tmp_path_factory.mktemp("stored")
    rng = np.random.default_rng(3)
    n, box = 80, 12
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    filters = rng.uniform(0.2, 1.0, (n, box, box // 2 + 1)).astype(np.float32)
    batches = [np.arange(start, start + 2) for start in range(0, n, 2)]
    spectra, stored_filters = _spectra(folder, images, filters, batches)
    first = rng.uniform(0.0, 1.0, n)
    probability = np.stack([first, 1.0 - first], axis=1)
    rotations = torch.from_numpy(uniform_rotations(n, rng))
    yield spectra, stored_filters, rotations, probability, batches
    spectra.close()
    stored_filters.close()


def test_fourier_sums_and_likelihoods_are_the_same_bits_on_workers(stored_set, dask_engine):
    """residual_sums, class_sums and class_log_likelihoods over three tasks: the local engine's and
    two workers' agree bit for bit."""
    spectra, filters, rotations, probability, batches = stored_set
    assert len(tasks_of(batches)) == 3
    box = spectra.shape[1]
    sums = {}
    for name, engine in [("local", LOCAL), ("dask", dask_engine)]:
        totals = residual_sums(spectra, rotations, filters, batches, engine)
        halves = class_sums(spectra, probability, totals, rotations, filters, batches, engine)
        maps = [_smooth_map(np.random.default_rng(7 + k), box).to(torch.float32) for k in range(2)]
        scale = torch.ones(spectra.shape[0], dtype=torch.float64)
        likelihoods = class_log_likelihoods(spectra, maps, torch.ones(box, box, box), rotations, scale, filters, batches, engine)
        sums[name] = ([a.sums for a in totals], [a.sums for h in halves for a in h], likelihoods)
    local, dask = sums["local"], sums["dask"]
    for a, b in zip(local[0] + local[1], dask[0] + dask[1]):
        assert torch.equal(a, b)
    assert np.array_equal(local[2], dask[2])
    assert local[1][0].abs().max() > 0


def test_the_preparation_writes_the_same_working_files_on_workers(simulated_set, dask_engine, tmp_path):
    """pipeline.prepare on 600 particles with coloured noise in batches of 16, three tasks per pass
    (reading and centring with the consensus reconstruction's partial sums, the CTF correction of the
    whitened images, their transforms), in one process and on two workers: the same working files, bit
    for bit, and the same scales, consensus map and whitening filter."""
    folder = simulated_set(
        600, 0.3, [0.6, 0.4], seed=5, pose_error_deg=1.0, max_shift_A=6.0, noise_excess=8.0, noise_bfactor=1000.0
    )
    ps = star_io.read_particles(folder / "particles.star")
    particles = star_io.particles(ps)
    options = SplitOptions(batch_size=16, refine_iterations=2)
    assert len(tasks_of(row_batches(len(particles), options.batch_size))) == 3
    prepared = {}
    for name, engine in [("local", LOCAL), ("dask", dask_engine)]:
        (tmp_path / name).mkdir()
        with ImageStacks(ps) as stacks:
            prepared[name] = prepare(particles, stacks, options, tmp_path / name, engine=engine)
    local, dask = prepared["local"], prepared["dask"]
    assert local.whitening.applied and local.consensus is not None
    for file in ("images.f32", "filters.f32", "spectra.f32"):
        written = (tmp_path / "local" / file).read_bytes()
        assert (tmp_path / "dask" / file).read_bytes() == written, file
        assert np.frombuffer(written, np.float32).reshape(len(particles), -1).any(axis=1).all(), file  # every row
    assert torch.equal(dask.scale, local.scale) and torch.equal(dask.consensus, local.consensus)
    assert torch.equal(dask.whitening.filter, local.whitening.filter)
    assert not torch.all(local.scale == 1.0)


class _InProcess:
    """Runs the Dask path's tasks one after the other in this process (an engine that is not LOCAL)."""

    map = LocalEngine.map


def test_class_maps_on_workers_are_the_same_whoever_runs_the_tasks(simulated_set, dask_engine, monkeypatch):
    """reconstruct_classes of 600 particles in tasks of at least 100 images: two workers give the maps
    of the same tasks run in this process bit for bit, and those of the one-process insertion to the
    rounding of float32 sums."""
    folder = simulated_set(600, 0.3, [0.6, 0.4], seed=5, pose_error_deg=1.0, max_shift_A=6.0)
    ps = star_io.read_particles(folder / "particles.star")
    particles = star_io.particles(ps)
    classes = np.arange(len(particles)) % 2 + 1
    monkeypatch.setattr(classmaps, "TASK_IMAGES", 100)
    maps = {}
    for name, engine in [("local", LOCAL), ("in process", _InProcess()), ("dask", dask_engine)]:
        with ImageStacks(ps) as stacks:
            maps[name] = classmaps.reconstruct_classes(particles, stacks, classes, batch_size=32, engine=engine)
    assert torch.equal(maps["dask"].maps, maps["in process"].maps)
    assert torch.equal(maps["dask"].half_maps, maps["in process"].half_maps)
    local, dask = maps["local"], maps["dask"]
    scale = float(local.maps.abs().max())
    assert scale > 0 and not torch.equal(dask.maps, local.maps)  # summed task by task
    assert float((dask.maps - local.maps).abs().max()) < 1e-5 * scale
    assert float((dask.half_maps - local.half_maps).abs().max()) < 1e-5 * scale
    assert np.array_equal(dask.subsets, local.subsets) and np.array_equal(dask.counts, local.counts)


def test_an_unreachable_scheduler_is_one_line():
    with pytest.raises(ValueError, match=r"^cannot reach the Dask scheduler tcp://127\.0\.0\.1:9: "), connect(
        "tcp://127.0.0.1:9", timeout=1.0
    ):
        pass


def test_a_missing_scheduler_file_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="no such scheduler file, nor an address"), connect(str(tmp_path / "none.json")):
        pass


def test_without_a_scheduler_the_run_is_local():
    with connect(None) as engine:
        assert engine is LOCAL


@pytest.fixture
def scheduler_file(tmp_path):
    """A scheduler and two single-threaded worker processes on localhost, started with the dask CLI
    (`dask scheduler --scheduler-file`, `dask worker`); their scheduler file. Stopped afterwards."""
    if DASK is None:
        pytest.skip("the dask command (dask's distributed) is not installed")
    file = tmp_path / "scheduler.json"
    logs = tmp_path / "dask_logs"
    logs.mkdir()
    quiet = ["--no-dashboard"]
    commands = [
        [DASK, "scheduler", "--scheduler-file", str(file), "--host", "127.0.0.1", "--port", "0", *quiet],
        *[
            [DASK, "worker", "--scheduler-file", str(file), "--nworkers", "1", "--nthreads", "1", *quiet]
            for _ in range(2)
        ],
    ]
    processes = []
    try:
        for k, command in enumerate(commands):
            log = open(logs / f"{k}.log", "w")  # closed with the process, below
            processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path), log))
            while k == 0 and not file.is_file():  # the workers need the scheduler's file
                assert processes[0][0].poll() is None, (logs / "0.log").read_text()
                time.sleep(0.1)
        with distributed.Client(scheduler_file=str(file), timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        yield file
    finally:
        for process, _ in processes:
            process.terminate()
        for process, log in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def test_two_dask_workers_give_the_one_process_classes(small_set, scheduler_file, tmp_path, monkeypatch, capsys):
    """relion_graphsplit on 600 particles in batches of 16 (several tasks per pass), in one process
    and with --dask_scheduler on a scheduler and two worker processes started with the dask CLI: the
    same outputs, classes, posteriors and maps alike, the images read and prepared on the workers."""
    runs = {}
    for name, extra in [("local", []), ("dask", ["--dask_scheduler", str(scheduler_file)])]:
        project = tmp_path / name
        shutil.copytree(small_set, project / "data")
        monkeypatch.chdir(project)
        args = ["--i", "data/particles.star", "--o", "split", *FAST, "--batch_size", "16", *extra]
        assert run_command(args) == 0, capsys.readouterr().err
        runs[name] = project / "split"
    assert_same_outputs(runs["dask"], runs["local"])
    with distributed.Client(scheduler_file=str(scheduler_file), timeout=30, set_as_default=False) as client:
        done = client.run_on_scheduler(
            lambda dask_scheduler: {name: p.state_counts["memory"] for name, p in dask_scheduler.task_prefixes.items()}
        )
    # Every kind of task ran on the workers (a prefix is the function's name without its leading _):
    # the preparation's, the classification's, the refinement's and the class maps'.
    ran = {name for name, count in done.items() if count}
    assert {"read_task", "correct_task", "spectra_task", "classify_batch", "halves_task", "terms_task", "maps_task"} <= ran, done
