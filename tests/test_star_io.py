"""Particle STAR reading and writing: real files from the wild, pre-3.1 conversion, round trips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from relion_graphsplit.geometry import euler_to_matrix
from relion_graphsplit.star_io import (
    ANGLE_COLUMNS,
    StarFileError,
    ctf_params,
    ctf_premultiplied,
    image_size,
    make_particle_set,
    pixel_size,
    poses,
    read_particles,
    write_particles,
)

SAMPLES = Path(__file__).resolve().parents[1] / "test_data" / "star-samples"


def sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"sample STAR file {path} not available")
    return path


def refusal(path, **kwargs) -> str:
    """The message of the StarFileError that reading `path` raises; it must be one line."""
    with pytest.raises(StarFileError) as info:
        read_particles(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def particle_table(n: int, seed: int = 0, groups=(1,)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@Extract/stack.mrcs" for i in range(n)],
            "rlnMicrographName": [f"{i % 3}" for i in range(n)],
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": rng.uniform(0, 180, n),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginXAngst": rng.normal(0, 3, n),
            "rlnOriginYAngst": rng.normal(0, 3, n),
            "rlnDefocusU": rng.uniform(5000, 30000, n),
            "rlnDefocusV": rng.uniform(5000, 30000, n),
            "rlnDefocusAngle": rng.uniform(-180, 180, n),
            "rlnOpticsGroup": np.resize(np.asarray(groups), n),
        }
    )


def optics_table(groups=(1,), pixel=1.5, box=64, **extra) -> pd.DataFrame:
    table = {
        "rlnOpticsGroup": list(groups),
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups],
        "rlnImagePixelSize": [pixel] * len(groups),
        "rlnImageSize": [box] * len(groups),
        "rlnVoltage": [300.0] * len(groups),
        "rlnSphericalAberration": [2.7] * len(groups),
        "rlnAmplitudeContrast": [0.1] * len(groups),
    }
    table.update(extra)
    return pd.DataFrame(table)


def write_legacy(path: Path, columns: dict[str, list]) -> None:
    """A pre-3.1 STAR file (one data_ block, no optics, no version tag) written as plain text."""
    lines = ["", "data_", "", "loop_"] + [f"_{c} #{i}" for i, c in enumerate(columns, 1)]
    lines += [" ".join(str(v) for v in row) for row in zip(*columns.values())]
    path.write_text("\n".join(lines) + "\n")


# --- the sample files -------------------------------------------------------------------------


def test_relion31_six_optics_groups_with_two_pixel_sizes_is_refused():
    path = sample("relion31.6opticsgroups.star")
    blocks = starfile.read(path, always_dict=True)
    used = blocks["optics"].set_index("rlnOpticsGroup").loc[blocks["particles"]["rlnOpticsGroup"].unique()]
    sizes = sorted(set(used["rlnImagePixelSize"]))
    assert len(sizes) == 2  # the groups in use really differ: refusal is the right answer
    message = refusal(path)
    assert "different pixel sizes" in message
    assert all(f"{s:g}" in message for s in sizes)
    assert "re-extract" in message
    refusal(path, require_poses=False)


def test_relion31_six_optics_groups_at_one_pixel_size(tmp_path):
    """The same file with its pixel sizes made equal reads, and each group's optics reach its particles."""
    blocks = starfile.read(sample("relion31.6opticsgroups.star"), always_dict=True)
    blocks["optics"]["rlnImagePixelSize"] = 1.25
    path = tmp_path / "one_pixel_size.star"
    starfile.write(blocks, path)
    ps = read_particles(path)
    assert len(ps.optics) == 6
    assert len(ps.particles) == len(blocks["particles"])
    assert pixel_size(ps) == 1.25
    assert image_size(ps) == 196
    assert ps.optics["rlnOddZernike"].str.startswith("[").all()
    assert ps.particles["rlnImageName"].str.contains("@").all()

    ctf = ctf_params(ps)
    optics = blocks["optics"].set_index("rlnOpticsGroup")
    group = blocks["particles"]["rlnOpticsGroup"].to_numpy()
    assert len(set(optics["rlnSphericalAberration"])) > 1  # group 4 has another Cs
    np.testing.assert_allclose(ctf.cs.numpy(), optics.loc[group, "rlnSphericalAberration"].to_numpy())
    np.testing.assert_allclose(ctf.voltage.numpy(), optics.loc[group, "rlnVoltage"].to_numpy())
    np.testing.assert_allclose(ctf.defocus_u.numpy(), blocks["particles"]["rlnDefocusU"].to_numpy())

    A, origins = poses(ps)
    p = blocks["particles"]
    np.testing.assert_allclose(origins[:, 0].numpy(), p["rlnOriginXAngst"] / 1.25)
    np.testing.assert_allclose(origins[:, 1].numpy(), p["rlnOriginYAngst"] / 1.25)
    expected = euler_to_matrix(*(torch.tensor(p[c].to_numpy()) for c in ANGLE_COLUMNS))
    torch.testing.assert_close(A, expected)


def test_relion5_file():
    path = sample("relion5.star")
    blocks = starfile.read(path, always_dict=True)
    ps = read_particles(path)
    assert ps.version == 50001
    assert len(ps.optics) == 1
    assert list(ps.particles.columns) == list(blocks["particles"].columns)
    assert pixel_size(ps) == blocks["optics"]["rlnImagePixelSize"].iloc[0]
    assert image_size(ps) == blocks["optics"]["rlnImageSize"].iloc[0]
    assert not ctf_premultiplied(ps)
    assert ps.particles["rlnMicrographName"].str.endswith("_EER.mrc").all()

    A, origins = poses(ps)
    assert A.shape == (len(ps.particles), 3, 3) and A.dtype == torch.float64
    assert origins.shape == (len(ps.particles), 2) and origins.dtype == torch.float64
    np.testing.assert_allclose(origins[:, 1].numpy(), blocks["particles"]["rlnOriginYAngst"] / pixel_size(ps))
    ctf = ctf_params(ps)
    np.testing.assert_allclose(ctf.defocus_v.numpy(), blocks["particles"]["rlnDefocusV"])
    np.testing.assert_allclose(ctf.scale.numpy(), blocks["particles"]["rlnCtfScalefactor"])
    np.testing.assert_allclose(ctf.amplitude_contrast.numpy(), blocks["optics"]["rlnAmplitudeContrast"][0])


def test_empiar_10076_without_angles_is_refused_and_converts_without_poses():
    path = sample("empiar_10076_7.star")
    message = refusal(path)
    assert "rlnAngleRot, rlnAngleTilt, rlnAnglePsi" in message
    assert "rlnDefocusU" not in message and "rlnVoltage" not in message

    raw = starfile.read(path)
    ps = read_particles(path, require_poses=False)
    assert ps.version == 30000
    assert len(ps.optics) == 1
    expected = 1e4 * raw["rlnDetectorPixelSize"].iloc[0] / raw["rlnMagnification"].iloc[0]
    assert pixel_size(ps) == pytest.approx(expected, rel=1e-12)
    # micrograph names "1".."7" stay strings
    assert ps.particles["rlnMicrographName"].tolist() == [str(v) for v in raw["rlnMicrographName"]]
    assert "rlnMagnification" not in ps.particles and "rlnVoltage" not in ps.particles
    assert ps.particles["rlnOpticsGroup"].eq(1).all()
    with pytest.raises(StarFileError, match="image size unknown"):
        image_size(ps)  # the stack is not shipped with the sample


def test_toy_projections_without_angles_or_pixel_size():
    path = sample("toy_projections.star")
    message = refusal(path)
    assert "rlnAngleRot, rlnAngleTilt, rlnAnglePsi" in message
    assert "rlnDetectorPixelSize + rlnMagnification" in message

    raw = starfile.read(path)
    ps = read_particles(path, require_poses=False)
    assert ps.particles["dummyVariable"].tolist() == raw["dummyVariable"].tolist()  # unknown column kept
    assert "rlnPhaseShift" in ps.particles  # not an optics column in RELION's conversion
    assert ps.optics["rlnSphericalAberration"].tolist() == [raw["rlnSphericalAberration"].iloc[0]]
    with pytest.raises(StarFileError, match="pixel size unknown"):
        pixel_size(ps)
    ctf = ctf_params(ps)
    np.testing.assert_allclose(ctf.phase_shift.numpy(), raw["rlnPhaseShift"])
    np.testing.assert_allclose(ctf.cs.numpy(), raw["rlnSphericalAberration"])


def test_sta_testing_bin8_legacy_with_angles():
    path = sample("sta_testing_bin8.star")
    raw = starfile.read(path)
    ps = read_particles(path)
    optics = ["rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage", "rlnDetectorPixelSize", "rlnMagnification"]
    assert len(ps.optics) == len(raw[optics].drop_duplicates())
    assert pixel_size(ps) == pytest.approx(1e4 * raw["rlnDetectorPixelSize"][0] / raw["rlnMagnification"][0])
    assert ps.particles["rlnGroupName"].tolist() == raw["rlnGroupName"].tolist()
    assert isinstance(ps.particles["rlnImageName"].iloc[0], str)
    A, origins = poses(ps)
    assert torch.count_nonzero(origins) == 0  # no origin columns: zero shifts
    torch.testing.assert_close(
        A[5], euler_to_matrix(*(torch.tensor(raw[c].iloc[5]) for c in ANGLE_COLUMNS))
    )
    ctf = ctf_params(ps)
    np.testing.assert_allclose(ctf.bfactor.numpy(), raw["rlnCtfBfactor"])
    np.testing.assert_allclose(ctf.scale.numpy(), raw["rlnCtfScalefactor"])


# --- pre-3.1 conversion ------------------------------------------------------------------------


def legacy_columns() -> dict[str, list]:
    """Five particles in two optics groups (voltage, detector pixel and magnification differ, the
    pixel size does not), origins in pixels."""
    return {
        "rlnImageName": [f"{i}@Extract/{s}.mrcs" for i, s in ((1, "a"), (2, "a"), (1, "b"), (3, "a"), (2, "b"))],
        "rlnMicrographName": ["10", "10", "11", "10", "11"],
        "rlnVoltage": [300, 300, 200, 300, 200],
        "rlnSphericalAberration": [2.7] * 5,
        "rlnAmplitudeContrast": [0.1] * 5,
        "rlnMagnification": [10000, 10000, 20000, 10000, 20000],
        "rlnDetectorPixelSize": [1.5, 1.5, 3.0, 1.5, 3.0],
        "rlnDefocusU": [10000.5, 11000.25, 12000.0, 13000.0, 14000.0],
        "rlnAngleRot": [10.0, 20.0, 30.0, 40.0, 50.0],
        "rlnAngleTilt": [15.0, 25.0, 35.0, 45.0, 55.0],
        "rlnAnglePsi": [-5.0, -15.0, -25.0, -35.0, -45.0],
        "rlnOriginX": [1.5, -2.0, 3.0, 0.0, 4.0],
        "rlnOriginY": [-1.0, 0.5, 2.0, 1.0, -3.0],
    }


def test_legacy_conversion_groups_pixel_sizes_and_origins(tmp_path):
    columns = legacy_columns()
    write_legacy(tmp_path / "old.star", columns)
    ps = read_particles(tmp_path / "old.star", require_poses=False)
    # groups numbered by first appearance; the particle-level optics columns moved to data_optics
    assert ps.particles["rlnOpticsGroup"].tolist() == [1, 1, 2, 1, 2]
    assert ps.optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    assert ps.optics["rlnVoltage"].tolist() == [300, 200]
    apix = 1e4 * np.array(columns["rlnDetectorPixelSize"]) / np.array(columns["rlnMagnification"])
    np.testing.assert_allclose(ps.optics["rlnImagePixelSize"], apix[[0, 2]])
    assert list(ps.optics.columns) == [
        "rlnOpticsGroup", "rlnOpticsGroupName", "rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage",
        "rlnImagePixelSize",
    ]
    for column in ("rlnVoltage", "rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX", "rlnOriginY"):
        assert column not in ps.particles
    assert list(ps.particles.columns[-3:]) == ["rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst"]
    np.testing.assert_allclose(ps.particles["rlnOriginXAngst"], np.array(columns["rlnOriginX"]) * apix)
    np.testing.assert_allclose(ps.particles["rlnOriginYAngst"], np.array(columns["rlnOriginY"]) * apix)
    assert ps.particles["rlnMicrographName"].tolist() == columns["rlnMicrographName"]
    np.testing.assert_allclose(ctf_params(ps).voltage.numpy(), columns["rlnVoltage"])
    _, origins = poses(ps)
    np.testing.assert_allclose(origins.numpy(), np.stack([columns["rlnOriginX"], columns["rlnOriginY"]], 1))


def test_legacy_file_with_two_pixel_sizes_is_refused(tmp_path):
    columns = legacy_columns()
    columns["rlnDetectorPixelSize"] = [1.5] * 5
    write_legacy(tmp_path / "old.star", columns)
    assert "different pixel sizes (0.75, 1.5 A)" in refusal(tmp_path / "old.star", require_poses=False)


def test_legacy_image_size_from_the_stack_header(tmp_path, monkeypatch):
    columns = {k: v[:3] for k, v in legacy_columns().items()}
    star_dir = tmp_path / "Select"
    star_dir.mkdir()
    write_legacy(star_dir / "old.star", columns)
    monkeypatch.chdir(tmp_path)

    ps = read_particles(star_dir / "old.star")
    with pytest.raises(StarFileError, match="image size unknown"):
        image_size(ps)

    for name in ("a", "b"):
        (tmp_path / "Extract").mkdir(exist_ok=True)
        mrcfile.new(tmp_path / "Extract" / f"{name}.mrcs", data=np.zeros((3, 24, 24), np.float32)).close()
    ps = read_particles(star_dir / "old.star")
    assert image_size(ps) == 24
    assert ps.optics["rlnImageSize"].tolist() == [24, 24]
    assert ps.optics["rlnImageDimensionality"].tolist() == [2, 2]
    A, origins = poses(ps)
    np.testing.assert_allclose(origins.numpy(), np.stack([columns["rlnOriginX"], columns["rlnOriginY"]], 1))


def test_legacy_origins_without_pixel_size_are_refused(tmp_path):
    columns = legacy_columns()
    del columns["rlnMagnification"]
    write_legacy(tmp_path / "old.star", columns)
    message = refusal(tmp_path / "old.star", require_poses=False)
    assert "rlnOriginX" in message and "pixel size is unknown" in message


@pytest.mark.relion
def test_legacy_conversion_matches_relion_convert_star(tmp_path):
    exe = shutil.which("relion_convert_star")
    if exe is None:
        pytest.skip("relion_convert_star not installed")
    write_legacy(tmp_path / "old.star", legacy_columns())
    command = [exe, "--i", "old.star", "--o", "relion.star"]
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    ours = read_particles(tmp_path / "old.star", require_poses=False)
    theirs = read_particles(tmp_path / "relion.star", require_poses=False)
    assert list(ours.optics.columns) == list(theirs.optics.columns)
    assert list(ours.particles.columns) == list(theirs.particles.columns)
    pd.testing.assert_frame_equal(ours.optics, theirs.optics, check_dtype=False, atol=1e-6)
    pd.testing.assert_frame_equal(ours.particles, theirs.particles, check_dtype=False, atol=1e-6)


# --- 3.1 files built here: fallbacks, checks, refusals ------------------------------------------


def test_ctf_fallbacks_particle_then_optics_then_defaults():
    particles = particle_table(6, groups=(1, 2)).drop(columns=["rlnDefocusV"])
    particles["rlnVoltage"] = [np.nan, 200.0, np.nan, np.nan, np.nan, 100.0]  # overrides where given
    optics = optics_table(groups=(1, 2), rlnSphericalAberration=[2.7, 1.4], rlnCtfBfactor=[0.0, 50.0])
    optics = optics.drop(columns=["rlnAmplitudeContrast"])
    ps = make_particle_set(particles, optics)
    ctf = ctf_params(ps)
    np.testing.assert_array_equal(ctf.defocus_v.numpy(), particles["rlnDefocusU"])
    np.testing.assert_array_equal(ctf.voltage.numpy(), [300, 200, 300, 300, 300, 100])
    np.testing.assert_array_equal(ctf.cs.numpy(), [2.7, 1.4] * 3)
    np.testing.assert_array_equal(ctf.bfactor.numpy(), [0, 50] * 3)
    np.testing.assert_array_equal(ctf.amplitude_contrast.numpy(), np.zeros(6))
    np.testing.assert_array_equal(ctf.phase_shift.numpy(), np.zeros(6))
    np.testing.assert_array_equal(ctf.scale.numpy(), np.ones(6))
    assert all(getattr(ctf, f).dtype == torch.float64 for f in ("defocus_u", "scale", "cs"))


def test_missing_columns_are_named(tmp_path):
    ps = make_particle_set(particle_table(4), optics_table())
    path = tmp_path / "p.star"
    write_particles(path, ps, ps.particles.drop(columns=["rlnAngleTilt", "rlnDefocusU"]))
    message = refusal(path)
    assert message.endswith("missing rlnAngleTilt, rlnDefocusU")
    assert read_particles(path, require_poses=False).particles.shape == (4, len(ps.particles.columns) - 2)

    optics = optics_table().drop(columns=["rlnVoltage", "rlnImagePixelSize"])
    ps = make_particle_set(particle_table(4), optics)
    write_particles(path, ps)
    assert refusal(path).endswith("missing rlnVoltage, rlnImagePixelSize")


def test_other_refusals(tmp_path):
    assert "no such file" in refusal(tmp_path / "absent.star")
    assert "a folder, not a STAR file" in refusal(tmp_path)

    only_optics = tmp_path / "optics_only.star"
    micrographs = pd.DataFrame({"rlnMicrographName": ["a.mrc"]})
    starfile.write({"optics": optics_table(), "micrographs": micrographs}, only_optics)
    assert "no data_particles" in refusal(only_optics)

    unknown_group = {"optics": optics_table(), "particles": particle_table(4, groups=(1, 2))}
    starfile.write(unknown_group, tmp_path / "p.star")
    assert "optics groups [2] missing" in refusal(tmp_path / "p.star")

    with pytest.raises(StarFileError, match=r"different image sizes \(64, 96\)"):
        make_particle_set(particle_table(4, groups=(1, 2)), optics_table((1, 2), rlnImageSize=[64, 96]))
    with pytest.raises(StarFileError, match="CTF-premultiplied"):
        make_particle_set(
            particle_table(4, groups=(1, 2)), optics_table(groups=(1, 2), rlnCtfDataAreCtfPremultiplied=[0, 1])
        )


@pytest.mark.parametrize("column, value", [("rlnAngleRot", "nan"), ("rlnOriginXAngst", "inf"), ("rlnDefocusU", "abc")])
def test_poses_and_defocus_that_are_not_finite_numbers_are_refused(tmp_path, column, value):
    table = particle_table(4)
    table[column] = table[column].astype(object)
    table.loc[2, column] = value
    path = tmp_path / "p.star"
    starfile.write({"optics": optics_table(), "particles": table}, path)
    assert refusal(path).endswith(f"{column} is not a finite number for 1 particle(s), the first in row 3")


def test_unused_optics_groups_do_not_count():
    """A subset that keeps its parent's optics table is judged on the groups it uses."""
    optics = optics_table(groups=(1, 2), rlnImagePixelSize=[1.5, 1.1], rlnImageSize=[64, 80])
    ps = make_particle_set(particle_table(5, groups=(2,)), optics)
    assert pixel_size(ps) == 1.1 and image_size(ps) == 80


def test_premultiplied_flag_is_kept(tmp_path):
    ps = make_particle_set(particle_table(3), optics_table(rlnCtfDataAreCtfPremultiplied=[1]))
    assert ctf_premultiplied(ps)
    write_particles(tmp_path / "p.star", ps)
    assert ctf_premultiplied(read_particles(tmp_path / "p.star"))
    assert not ctf_premultiplied(make_particle_set(particle_table(3), optics_table()))


# --- writing ----------------------------------------------------------------------------------


def test_round_trip_of_every_sample(tmp_path):
    for name in ("relion5.star", "sta_testing_bin8.star", "empiar_10076_7.star", "toy_projections.star"):
        ps = read_particles(sample(name), require_poses=False)
        write_particles(tmp_path / name, ps)
        again = read_particles(tmp_path / name, require_poses=False)
        pd.testing.assert_frame_equal(again.particles, ps.particles)
        pd.testing.assert_frame_equal(again.optics, ps.optics)
        assert again.version == (50001 if ps.version == 50001 else 30001)


def test_written_layout_and_precision(tmp_path):
    particles = particle_table(5)
    particles.loc[1, "rlnMicrographName"] = "Movies/with space.mrc"
    particles.loc[2, "rlnDefocusU"] = 12345.678901234567
    particles.loc[3, "rlnAngleRot"] = 1.0 / 3.0
    particles["rlnClassNumber"] = np.arange(1, 6)
    ps = make_particle_set(particles, optics_table())
    assert ps.version == 30001
    path = tmp_path / "out" / "particles.star"
    write_particles(path, ps)

    lines = path.read_text().splitlines()
    assert lines[:6] == ["", "# version 30001", "", "data_optics", "", "loop_ "]
    assert lines[6] == "_rlnOpticsGroup #1 "
    assert "data_particles" in lines
    assert '"Movies/with space.mrc"' in path.read_text()
    assert not list(path.parent.glob(".*partial*"))  # written through a temporary, renamed

    again = read_particles(path)
    pd.testing.assert_frame_equal(again.particles, ps.particles)
    pd.testing.assert_frame_equal(again.optics, ps.optics)
    assert again.particles["rlnMicrographName"].iloc[0] == "0"
    for a, b in zip(poses(again), poses(ps)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_write_refuses_particles_of_unknown_optics_groups(tmp_path):
    ps = make_particle_set(particle_table(3), optics_table())
    with pytest.raises(StarFileError, match=r"optics groups \[7\]"):
        write_particles(tmp_path / "p.star", ps, ps.particles.assign(rlnOpticsGroup=7))
    assert not (tmp_path / "p.star").exists()


@pytest.mark.relion
def test_relion_reads_what_we_write(tmp_path):
    exe = shutil.which("relion_star_handler")
    if exe is None:
        pytest.skip("relion_star_handler not installed")
    particles = particle_table(20, groups=(1, 2))
    particles["rlnRandomSubset"] = np.resize([1, 2], 20)
    particles.loc[3, "rlnMicrographName"] = "Movies/with space.mrc"
    ps = make_particle_set(particles, optics_table(groups=(1, 2), rlnVoltage=[300.0, 200.0]))
    write_particles(tmp_path / "ours.star", ps)
    subprocess.run(
        [exe, "--i", "ours.star", "--o", "relion.star"]
        + ["--select", "rlnRandomSubset", "--minval", "1", "--maxval", "1"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    theirs = read_particles(tmp_path / "relion.star")
    selected = ps.particles[ps.particles["rlnRandomSubset"] == 1].reset_index(drop=True)
    assert theirs.particles["rlnImageName"].tolist() == selected["rlnImageName"].tolist()
    assert theirs.particles["rlnMicrographName"].tolist() == selected["rlnMicrographName"].tolist()
    np.testing.assert_allclose(theirs.particles["rlnAngleRot"], selected["rlnAngleRot"], atol=1e-5)
    voltage = np.where(selected["rlnOpticsGroup"] == 1, 300, 200)
    np.testing.assert_allclose(ctf_params(theirs).voltage.numpy(), voltage)
