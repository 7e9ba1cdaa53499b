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

from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.relion.star import (
    ANGLE_COLUMNS,
    StarFileError,
    check_values,
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


def test_a_file_cut_inside_its_first_row_is_named(tmp_path):
    path = tmp_path / "p.star"
    write_particles(path, make_particle_set(particle_table(1), optics_table()))
    text = path.read_text()
    path.write_text(text[: text.index("000001@Extract") + 30])
    message = refusal(path)
    assert "not a readable STAR file" in message and "cut short" in message and "Length mismatch" not in message


def test_a_first_row_shorter_than_the_next_is_named(tmp_path):
    path = tmp_path / "p.star"
    write_particles(path, make_particle_set(particle_table(2), optics_table()))
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("000001@"))
    lines[first] = lines[first].rsplit(" ", 1)[0]
    path.write_text("\n".join(lines) + "\n")
    message = refusal(path)
    assert "not a readable STAR file (a row of a table holds fewer or more values" in message


def test_a_file_cut_inside_its_last_row_is_named(tmp_path):
    path = tmp_path / "p.star"
    write_particles(path, make_particle_set(particle_table(3), optics_table()))
    text = path.read_text().rstrip()
    path.write_text(text[: text.rindex(" ")])  # the last row loses its rlnOpticsGroup
    message = refusal(path)
    assert message.endswith(
        "not a readable STAR file (the last row of data_particles, row 3, has no value for rlnOpticsGroup: "
        "the file ends inside a row; is it cut short?)"
    )
    scores = particle_table(3).assign(rlnLogLikeliContribution=[1.0, 2.0, np.nan])  # a "nan" RELION wrote
    write_particles(path, make_particle_set(scores, optics_table()))
    assert read_particles(path).particles["rlnLogLikeliContribution"].isna().tolist() == [False, False, True]


# --- values: check_values ---------------------------------------------------------------------

STAR = "Select/job005/particles.star"


def value_refusal(particles: pd.DataFrame, optics: pd.DataFrame) -> str:
    """The message of the StarFileError that check_values raises; one line, naming the file."""
    with pytest.raises(StarFileError) as info:
        check_values(make_particle_set(particles, optics, path=STAR))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{STAR}: ")
    return message[len(STAR) + 2 :]


def value_warnings(particles: pd.DataFrame, optics: pd.DataFrame) -> list[str]:
    warnings = check_values(make_particle_set(particles, optics, path=STAR))
    assert all("\n" not in w and w.startswith(f"{STAR}: ") for w in warnings)
    return [w[len(STAR) + 2 :] for w in warnings]


def test_a_refined_set_passes_without_warnings():
    assert value_warnings(particle_table(50), optics_table()) == []


@pytest.mark.parametrize(
    "column, value, expected",
    [
        (
            "rlnImagePixelSize",
            0.0,
            "rlnImagePixelSize is 0 A for 1 optics group(s), the first in row 1 of data_optics: a"
            " pixel size is a positive length",
        ),
        ("rlnImagePixelSize", np.inf, "rlnImagePixelSize is inf for 1 optics group(s), the first in row 1 of data_optics"),
        (
            "rlnVoltage",
            -300.0,
            "rlnVoltage is -300 kV for 1 optics group(s), the first in row 1 of data_optics: the"
            " acceleration",
        ),
        ("rlnVoltage", np.nan, "rlnVoltage is nan for 1 optics group(s), the first in row 1 of data_optics"),
        (
            "rlnAmplitudeContrast",
            1.0,
            "rlnAmplitudeContrast is 1 for 1 optics group(s), the first in row 1 of data_optics: the"
            " amplitude contrast is a fraction in [0, 1)",
        ),
        ("rlnAmplitudeContrast", -0.07, "rlnAmplitudeContrast is -0.07 for 1 optics group(s)"),
        (
            "rlnSphericalAberration",
            np.nan,
            "rlnSphericalAberration is nan for 1 optics group(s), the first in row 1 of data_optics:"
            " the CTF needs a number",
        ),
        (
            "rlnCtfScalefactor",
            0.0,
            "rlnCtfScalefactor is 0 for 1 optics group(s), the first in row 1 of data_optics: the CTF"
            " scale factor is positive",
        ),
        (
            "rlnImageDimensionality",
            3,
            "rlnImageDimensionality is 3 for 1 optics group(s), the first in row 1 of data_optics:"
            " this program classifies 2D particle images",
        ),
    ],
)  # fmt: skip
def test_nonsense_optics_values_are_refused(column, value, expected):
    assert value_refusal(particle_table(4), optics_table(**{column: [value]})).startswith(expected)


def test_the_block_and_count_of_bad_values_are_named():
    particles = particle_table(6, groups=(1, 2, 3))
    optics = optics_table(groups=(1, 2, 3, 4), rlnAmplitudeContrast=[0.1, 1.2, 1.5, 2.0])
    assert value_refusal(particles, optics).startswith(
        "rlnAmplitudeContrast is 1.2 for 2 optics group(s), the first in row 2 of data_optics"
    )  # group 4 is used by no particle
    particles = particle_table(6).assign(rlnCtfScalefactor=[1.0, 1.0, -1.0, 1.0, 0.0, 1.0])
    assert value_refusal(particles, optics_table()).startswith(
        "rlnCtfScalefactor is -1 for 2 particle(s), the first in row 3 of data_particles"
    )
    # a particle's own value overrides its group's, so a bad group value it does not use is no error
    particles = particle_table(4).assign(rlnVoltage=300.0)
    assert value_warnings(particles, optics_table(rlnVoltage=[0.0])) == []


@pytest.mark.parametrize("column", ["rlnDefocusU", "rlnDefocusV"])
def test_defocus_at_or_past_focus_is_refused(column):
    particles = particle_table(5)
    particles.loc[[1, 3], column] = [-2000.0, 0.0]
    assert value_refusal(particles, optics_table()) == (
        f"{column} is -2000 A for 2 particle(s), the first in row 2 of data_particles: RELION's defocus is "
        "positive for underfocus; at or past focus only phase-plate data (a nonzero rlnPhaseShift) make sense"
    )
    particles["rlnPhaseShift"] = [90.0, 0.0, 90.0, 90.0, 90.0]  # row 2 has no phase shift
    assert "first in row 2 of data_particles" in value_refusal(particles, optics_table())


def test_defocus_near_focus_with_a_phase_shift_is_a_warning():
    particles = particle_table(5).assign(rlnPhaseShift=60.0)
    particles.loc[3, "rlnDefocusU"] = -500.0
    assert value_warnings(particles, optics_table()) == [
        "rlnDefocusU is -500 A for 1 particle(s), the first in row 4 of data_particles: at or past focus, taken "
        "as phase-plate data (nonzero rlnPhaseShift)"
    ]


def test_unusual_voltage_and_defocus_are_warnings():
    particles = particle_table(5)
    particles.loc[[2, 4], "rlnDefocusV"] = 150000.0
    warnings = value_warnings(particles, optics_table(rlnVoltage=[30.0]))
    assert warnings == [
        "rlnVoltage is 30 kV for 1 optics group(s), the first in row 1 of data_optics: unusual (microscopes run at "
        "60 to 400 kV)",
        "rlnDefocusV is 150000 A for 2 particle(s), the first in row 3 of data_particles: unusual (above 100000 A, "
        "10 um)",
    ]


def test_origins_outside_the_image_are_refused():
    particles = particle_table(6)
    particles.loc[2, "rlnOriginYAngst"] = 48.0  # half of 64 px * 1.5 A: on the edge, still inside
    assert value_warnings(particles, optics_table()) == []
    particles.loc[[4, 5], "rlnOriginYAngst"] = [-48.5, 300.0]
    assert value_refusal(particles, optics_table()) == (
        "rlnOriginYAngst is -48.5 A for 2 particle(s), the first in row 5 of data_particles: more than half the box "
        "(64 px * 1.5 A / 2 = 48 A): the particle's centre lies outside its image"
    )


def test_missing_origins_are_a_warning():
    particles = particle_table(4)
    assert value_warnings(particles.drop(columns=["rlnOriginXAngst", "rlnOriginYAngst"]), optics_table()) == [
        "has no origins (rlnOriginXAngst, rlnOriginYAngst): every particle is taken as centred in its image"
    ]
    assert value_warnings(particles.drop(columns=["rlnOriginYAngst"]), optics_table()) == [
        "has no origins (rlnOriginYAngst): every particle is taken as centred along y"
    ]


def test_duplicated_rows_are_refused():
    particles = particle_table(6)
    twice = pd.concat([particles, particles.iloc[[1, 3]]], ignore_index=True)
    twice.loc[6, "rlnImageName"] = "2@Extract/stack.mrcs"  # the same image as 000002@, padded otherwise
    assert value_refusal(twice, optics_table()) == (
        "rows 2 and 7 are the same particle (same image in rlnImageName, Euler angles and origins), and 2 row(s) "
        "repeat an earlier one: remove the duplicated rows"
    )


def test_symmetry_expanded_set_is_a_warning_and_too_many_copies_are_refused():
    particles = particle_table(6)
    particles["rlnImageName"] = ["1@a.mrcs", "2@a.mrcs", "1@a.mrcs", "3@a.mrcs", "2@a.mrcs", "000001@a.mrcs"]
    assert value_warnings(particles, optics_table()) == [
        "2 images are named by several rows of rlnImageName with different poses (5 rows, up to 3 per image, the "
        "first in row 1), as in a symmetry-expanded set: each row is classified on its own"
    ]
    icosahedral = particle_table(62).assign(rlnImageName=["7@a.mrcs"] + ["1@a.mrcs"] * 61)
    assert value_refusal(icosahedral, optics_table()) == (
        "rlnImageName 1@a.mrcs is named by 61 rows, the first row 2 (1 image(s) named by more than 60 rows, 61 rows "
        "in all): more than a symmetry expansion gives (60, the order of the icosahedral group)"
    )
    assert len(value_warnings(icosahedral.iloc[:61], optics_table())) == 1  # 60 copies: a warning


def test_check_values_after_reading_a_file(tmp_path):
    """As the command line uses it: values given in data_optics of a written file are judged too."""
    path = tmp_path / "p.star"
    write_particles(path, make_particle_set(particle_table(3), optics_table(rlnImagePixelSize=[-1.5])))
    with pytest.raises(StarFileError) as info:
        check_values(read_particles(path))
    assert str(info.value).startswith(f"{path}: rlnImagePixelSize is -1.5 A for 1 optics group(s), the first in row 1")


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
