"""RELION 3.1 takes our class maps, model.star and run_data.star as they are.

A simulated set is written out as a split from its TRUE classes would be (run_data.star with classes
and half sets, class maps, run_model.star); RELION's own programs then run on those files from the
project directory, as a user would run the command the program prints.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from relion_graphsplit.fourier.fsc import fsc
from relion_graphsplit.method.classmaps import reconstruct_classes, write_class_maps
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.model_star import MODEL_NAME, next_command, write_model_star
from relion_graphsplit.relion.mrc import read_mrc
from relion_graphsplit.relion.stacks import ImageStacks

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        shutil.which("relion_refine") is None or shutil.which("relion_reconstruct") is None,
        reason="needs relion_refine and relion_reconstruct",
    ),
]

BOX, APIX, DIAMETER = 32, 4.0, 100
OUT = Path("GraphSplit")  # the job directory, relative to the project directory


@pytest.fixture(scope="module")
def project(simulated_set, tmp_path_factory) -> Path:
    """A project directory holding 800 simulated particles and the outputs of a split into their true classes."""
    root = tmp_path_factory.mktemp("project")
    simulated = simulated_set(800, 0.3, [0.6, 0.4], seed=3, pose_error_deg=1.0, max_shift_A=6.0)
    shutil.copytree(simulated, root, dirs_exist_ok=True)  # read only: the project is a copy
    ps = star_io.read_particles(root / "particles.star")
    classes = star_io.read_particles(root / "truth.star").particles["rlnClassNumber"].to_numpy()
    table = ps.particles.drop(columns="rlnRandomSubset").assign(rlnClassNumber=classes)
    ps = star_io.make_particle_set(table, ps.optics, root / "particles.star")  # half sets to be drawn
    with ImageStacks(ps) as stacks:
        class_maps = reconstruct_classes(star_io.particles(ps), stacks, classes, seed=0)
    star_io.write_particles(root / OUT / "run_data.star", ps, table.assign(rlnRandomSubset=class_maps.subsets))
    nodes = write_class_maps(root / OUT, class_maps)
    write_model_star(
        root / OUT / MODEL_NAME, [OUT / p.name for p, kind in nodes if kind == "map"], class_maps.distribution,
        class_maps.resolution, class_maps.fsc, class_maps.completeness, BOX, APIX,
    )  # fmt: skip
    (root / "resolutions.txt").write_text(" ".join(str(r) for r in class_maps.resolution))
    return root


def resolutions(project: Path) -> list[float]:
    return [float(r) for r in (project / "resolutions.txt").read_text().split()]


def kept(project: Path, star: Path) -> float:
    """Fraction of particles that relion_refine left in their seed class, matched on rlnImageName."""
    seed = star_io.read_particles(project / OUT / "run_data.star").particles.set_index("rlnImageName")
    after = star_io.read_particles(project / star).particles.set_index("rlnImageName")
    assert len(after) == len(seed)
    return float(np.mean(after.loc[seed.index, "rlnClassNumber"].to_numpy() == seed["rlnClassNumber"].to_numpy()))


def relion_major_version() -> int:
    text = subprocess.run(["relion_refine", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"RELION version:\s*(\d+)", text)
    return int(match.group(1)) if match else 0


def test_class3d_seeded_with_our_model_keeps_the_split(project):
    line = next_command(OUT, OUT / "run_data.star", DIAMETER, 2, resolutions(project), iterations=2)
    subprocess.run(["bash", "-c", line], cwd=project, check=True, capture_output=True)
    assert kept(project, OUT / "Class3D" / "run_it001_data.star") >= 0.95  # iteration 1 already
    assert kept(project, OUT / "Class3D" / "run_it002_data.star") >= 0.95


@pytest.mark.skipif(relion_major_version() >= 5, reason="RELION 5 assumes CTF-corrected references")
def test_without_ctf_corrected_ref_iteration_1_loses_the_split(project):
    """The trap the printed command avoids: references taken as not CTF-corrected in iteration 1."""
    line = next_command(OUT, OUT / "run_data.star", DIAMETER, 2, resolutions(project), iterations=1)
    line = line.replace(" --ctf_corrected_ref", "").replace("Class3D", "Class3D_uncorrected")
    subprocess.run(["bash", "-c", line], cwd=project, check=True, capture_output=True)
    assert kept(project, OUT / "Class3D_uncorrected" / "run_it001_data.star") < 0.9


@pytest.mark.parametrize("k", [1, 2])
def test_relion_reconstruct_reads_our_particles_and_agrees_with_our_maps(project, k):
    cmd = ["relion_reconstruct", "--i", str(OUT / "run_data.star"), "--o", f"relion_class{k}.mrc", "--ctf", "--class", str(k)]
    subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    theirs = torch.from_numpy(read_mrc(project / f"relion_class{k}.mrc")[0])
    ours = torch.from_numpy(read_mrc(project / OUT / f"run_class{k:03d}.mrc")[0])
    curve = fsc(ours, theirs)
    assert float(curve[1 : int(0.8 * BOX // 2) + 1].min()) >= 0.95


def test_printed_command_runs_verbatim_where_the_program_ran(small_set: Path, tmp_path: Path):
    """The README's example: particles in a folder of their own (stacks named relative to it), the
    program run from another directory. The relion_refine command it prints runs there as printed."""
    shutil.copytree(small_set, tmp_path / "sim")
    program = [sys.executable, "-c", "from relion_graphsplit.cli.launch import graphsplit; graphsplit()"]
    done = subprocess.run(
        [*program, "--i", "sim/particles.star", "--o", "split/", "--refine_iter", "2", "--j", "2", "--K", "2"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    printed = done.stdout.rstrip().splitlines()[-1]
    assert printed.startswith("mkdir -p split/Class3D && relion_refine ")
    subprocess.run(["bash", "-c", printed.replace("--iter 25", "--iter 1")], cwd=tmp_path, check=True, capture_output=True)
    after = star_io.read_particles(tmp_path / "split" / "Class3D" / "run_it001_data.star").particles
    assert len(after) == 600
    assert set(after["rlnClassNumber"]) <= {1, 2}
