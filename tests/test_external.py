"""The program run as RELION's External job runs it: from the project directory, with RELION's options,
markers and declared output nodes (relion-conventions.md, The External job type)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import starfile
from typer.testing import CliRunner

from relion_graphsplit.cli.graphsplit import app
from relion_graphsplit.relion.external import ExternalJob

TEST_DATA = Path(__file__).resolve().parents[1] / "test_data"
JOB = "External/job005/"
PARTICLES = "Refine3D/job004/run_data.star"
ARGS = ["--o", JOB, "--in_parts", PARTICLES, "--j", "2", "--sym", "C1", "--refine_iter", "1", "--pipeline_control", JOB]
LABELS = {30001: "ParticlesData.star.relion", 50001: "ParticleGroupMetadata.star.relion"}

# A RELION 3.1 pipeline in which the External job is running (status 0, type 99) on a Refine3D output.
PIPELINE_31 = """
# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       6

# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessType #3
_rlnPipeLineProcessStatus #4
Refine3D/job004/ None 2 2
External/job005/ None 99 0

# version 30001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeType #2
Refine3D/job004/run_data.star 3

# version 30001

data_pipeline_input_edges

loop_
_rlnPipeLineEdgeFromNode #1
_rlnPipeLineEdgeProcess #2
Refine3D/job004/run_data.star External/job005/

# version 30001

data_pipeline_output_edges

loop_
_rlnPipeLineEdgeProcess #1
_rlnPipeLineEdgeToNode #2
Refine3D/job004/ Refine3D/job004/run_data.star
"""
PIPELINE_50 = "\n# version 50001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       6\n"


@pytest.fixture(scope="module")
def refine3d(simulated_set, tmp_path_factory) -> Path:
    """400 simulated particles laid out as Refine3D/job004 of a project (image names from the project)."""
    root = tmp_path_factory.mktemp("refined")
    job = root / "Refine3D" / "job004"
    simulated = simulated_set(400, 0.3, [0.6, 0.4], seed=3, max_shift_A=6.0, stack_name="Refine3D/job004/particles.mrcs")
    shutil.copytree(simulated, job)
    (job / "particles.star").rename(job / "run_data.star")
    return root / "Refine3D"


def make_project(root: Path, refine3d: Path, version: int) -> Path:
    """A project directory: default_pipeline.star of the given RELION version, the Refine3D job, and
    the External job's directory (RELION makes it before starting the program)."""
    shutil.copytree(refine3d, root / "Refine3D")
    (root / "default_pipeline.star").write_text(PIPELINE_31 if version < 50000 else PIPELINE_50)
    (root / JOB).mkdir(parents=True)
    return root


def run_job(project: Path, monkeypatch, args: list[str] = ARGS):
    monkeypatch.chdir(project)
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module", params=[30001, 50001])
def finished(request, refine3d, tmp_path_factory) -> tuple[Path, int]:
    """A project in which the External job ran to the end, for each RELION version."""
    project = make_project(tmp_path_factory.mktemp(f"project{request.param}"), refine3d, request.param)
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = run_job(project, monkeypatch)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return project, request.param


def test_success_marker_and_output_nodes(finished):
    project, version = finished
    job = project / JOB
    assert (job / "RELION_JOB_EXIT_SUCCESS").is_file()
    assert not (job / "RELION_JOB_EXIT_FAILURE").exists()
    nodes = starfile.read(job / "RELION_OUTPUT_NODES.star", always_dict=True)["output_nodes"]
    declared = dict(zip(nodes["rlnPipeLineNodeName"], zip(nodes["rlnPipeLineNodeType"], nodes["rlnPipeLineNodeTypeLabel"])))
    assert declared[JOB + "run_data.star"] == (3, LABELS[version])
    for name in declared:
        assert (project / name).is_file(), f"declared node {name} does not exist"
    # Maps the job wrote are declared as maps and half maps (half 1; RELION finds half 2 by name).
    for path in job.glob("run_class[0-9][0-9][0-9].mrc"):
        assert declared[JOB + path.name] == (6, "DensityMap.mrc")
    for path in job.glob("run_half1_class[0-9][0-9][0-9]_unfil.mrc"):
        assert declared[JOB + path.name] == (10, "DensityMap.mrc.halfmap")
    assert declared[JOB + "run_mask.mrc"] == (7, "Mask3D.mrc")


def test_bad_input_marks_failure(tmp_path, refine3d, monkeypatch):
    project = make_project(tmp_path, refine3d, 30001)
    shutil.copy(TEST_DATA / "star-samples" / "empiar_10076_7.star", project / PARTICLES)  # no angles
    result = run_job(project, monkeypatch)
    assert result.exit_code == 1
    assert (project / JOB / "RELION_JOB_EXIT_FAILURE").is_file()
    assert not (project / JOB / "RELION_JOB_EXIT_SUCCESS").exists()
    assert "rlnAngleRot" in result.output


def test_a_marker_that_cannot_be_written_does_not_hide_the_failure(tmp_path):
    """An output directory that cannot be made: the failure marker is skipped, the success one is not."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    job = ExternalJob(blocker / "job", active=True)
    job.fail()  # nothing raised: the run's own error is the one to report
    job.aborted()
    with pytest.raises(OSError):
        job.succeed()


def test_abort_request_stops_the_job(tmp_path, refine3d, monkeypatch):
    project = make_project(tmp_path, refine3d, 30001)
    (project / JOB / "RELION_JOB_ABORT_NOW").touch()
    result = run_job(project, monkeypatch)
    assert result.exit_code == 1
    assert (project / JOB / "RELION_JOB_EXIT_ABORTED").is_file()
    assert not (project / JOB / "RELION_JOB_ABORT_NOW").exists()
    assert not (project / JOB / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (project / JOB / "run_data.star").exists()


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_pipeliner") is None, reason="needs relion_pipeliner")
@pytest.mark.parametrize("finished", [30001], indirect=True)  # Debian's pipeliner is RELION 3.1's
def test_relion_pipeliner_takes_the_finished_job(finished):
    project, _ = finished
    subprocess.run(["relion_pipeliner", "--check_job_completion"], cwd=project, check=True, capture_output=True)
    pipeline = starfile.read(project / "default_pipeline.star", always_dict=True)
    processes = pipeline["pipeline_processes"].set_index("rlnPipeLineProcessName")
    assert processes.loc[JOB, "rlnPipeLineProcessStatus"] == 2  # finished successfully
    nodes = dict(zip(pipeline["pipeline_nodes"]["rlnPipeLineNodeName"], pipeline["pipeline_nodes"]["rlnPipeLineNodeType"]))
    assert nodes[JOB + "run_data.star"] == 3
    edges = pipeline["pipeline_output_edges"]
    assert JOB + "run_data.star" in set(edges.loc[edges["rlnPipeLineEdgeProcess"] == JOB, "rlnPipeLineEdgeToNode"])


def test_progress_bar_of_a_converged_loop_ends_full(tmp_path):
    """A loop that stops before its announced total (the refinement converging) ends with a full bar."""
    from rich.progress import Progress

    from relion_graphsplit.cli.job import _progress_tracker
    from relion_graphsplit.relion.external import ExternalJob

    progress = Progress(disable=True)
    track = _progress_tracker(progress, ExternalJob(tmp_path, active=False))
    assert list(track(iter(range(3)), description="rounds", total=30)) == [0, 1, 2]
    (task,) = progress.tasks
    assert task.completed == 3 and task.total == 3 and task.finished
