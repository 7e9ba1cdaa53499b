"""Forward projection: geometry against analytic projections of Gaussian blobs, and against relion_project."""

from __future__ import annotations

import functools
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

import relion_graphsplit.fourier.projection as projection_module
from relion_graphsplit.fourier.ctf import CTFParams, ctf_2d
from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.fourier.projection import (
    gridding_correction,
    prepare_volume,
    project,
    project_rfft,
    shift_images,
)
from relion_graphsplit.relion.star import make_particle_set, write_particles

BOX = 48
PIXEL_SIZE = 2.0
# (x, y, z) centre in voxels from the box centre, sigma in voxels, amplitude
BLOBS = [
    ((5.0, 0.0, 0.0), 3.0, 1.0),
    ((-4.0, 6.0, 2.0), 2.5, 0.5),
    ((0.0, -5.0, -6.0), 3.0, 0.8),
    ((8.0, 8.0, -3.0), 2.0, 0.6),
]


@functools.lru_cache
def _blob_map(box: int) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    v = torch.zeros((box, box, box), dtype=torch.float64)
    for (x0, y0, z0), s, a in BLOBS:
        v += a * torch.exp(-((x - x0) ** 2 + (y - y0) ** 2 + (z - z0) ** 2) / (2 * s * s))
    return v


def blob_map(box: int = BOX) -> torch.Tensor:
    """An asymmetric map of four Gaussian blobs (box^3, float64)."""
    return _blob_map(box).clone()


def analytic_projection(A: torch.Tensor, box: int = BOX) -> torch.Tensor:
    """Line integrals of the blobs: a blob at r lands at (A r)_xy as a 2D Gaussian of weight a s sqrt(2 pi)."""
    c = torch.arange(box, dtype=torch.float64) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    out = torch.zeros((len(A), box, box), dtype=torch.float64)
    for r, s, a in BLOBS:
        p = A @ torch.tensor(r, dtype=torch.float64)
        out += a * s * np.sqrt(2 * np.pi) * torch.exp(
            -((x - p[:, 0, None, None]) ** 2 + (y - p[:, 1, None, None]) ** 2) / (2 * s * s)
        )
    return out


def random_angles(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def test_projection_matches_line_integrals():
    rot, tilt, psi = random_angles(8, seed=1)
    A = euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi))
    ours = project(blob_map(), A).numpy()
    expected = analytic_projection(A).numpy()
    assert correlations(ours, expected).min() > 0.999
    # RELION's scale: sums over voxels along rays, of the map divided by the gridding correction.
    corrected_mass = (blob_map() / gridding_correction(BOX, 2 * BOX)).sum().item()
    np.testing.assert_allclose(ours.sum((1, 2)), corrected_mass, rtol=1e-4)


def test_project_rfft_is_rfft_of_projection_with_origin_at_centre():
    A = euler_to_matrix(*(torch.tensor(a) for a in random_angles(3, seed=2)))
    volume = blob_map().to(torch.float32)
    slices = project_rfft(prepare_volume(volume), A)
    assert slices.shape == (3, BOX, BOX // 2 + 1)
    torch.testing.assert_close(torch.fft.irfft2(slices, s=(BOX, BOX)), project(volume, A))
    # Identity view: the real-space sum along z.
    identity = project(blob_map(), torch.eye(3, dtype=torch.float64)[None])[0]
    assert correlations(identity[None].numpy(), blob_map().sum(0)[None].numpy())[0] > 0.9999


def test_stack_of_maps_projects_as_each_map_alone():
    A = euler_to_matrix(*(torch.tensor(a) for a in random_angles(4, seed=5)))
    maps = torch.stack([blob_map(), 2.0 * blob_map().flip(0)])
    stacked = project_rfft(prepare_volume(maps), A)
    assert stacked.shape == (2, 4, BOX, BOX // 2 + 1)
    for k in range(2):
        torch.testing.assert_close(stacked[k], project_rfft(prepare_volume(maps[k]), A), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="cubic"):
        prepare_volume(torch.zeros(2, BOX, BOX, BOX - 1))


def test_shift_images_moves_content_towards_higher_indices():
    image = torch.zeros((1, 32, 32))
    image[0, 16, 16] = 1.0
    shifted = torch.fft.irfft2(shift_images(torch.fft.rfft2(image), torch.tensor([[3.0, -2.0]])), s=(32, 32))
    assert tuple(np.unravel_index(int(shifted[0].argmax()), (32, 32))) == (14, 19)
    torch.testing.assert_close(shifted, torch.roll(image, shifts=(-2, 3), dims=(1, 2)), atol=1e-5, rtol=0)


relion = pytest.mark.relion
needs_relion_project = pytest.mark.skipif(shutil.which("relion_project") is None, reason="relion_project not on PATH")

ORIGINS_A = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [-5.0, 1.5], [2.5, -7.0], [6.2, 3.1]])


def _relion_inputs(tmp_path, origins: np.ndarray, ctf: bool) -> pd.DataFrame:
    with mrcfile.new(tmp_path / "map.mrc") as mrc:
        mrc.set_data(blob_map().numpy().astype(np.float32))
        mrc.voxel_size = PIXEL_SIZE
    n = len(origins)
    rot, tilt, psi = random_angles(n, seed=3)
    rng = np.random.default_rng(4)
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@unused.mrcs" for i in range(n)],
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnOriginXAngst": origins[:, 0],
            "rlnOriginYAngst": origins[:, 1],
            "rlnOpticsGroup": 1,
        }
    )
    if ctf:
        particles["rlnDefocusU"] = rng.uniform(8000, 25000, n)
        particles["rlnDefocusV"] = particles["rlnDefocusU"] - rng.uniform(0, 1500, n)
        particles["rlnDefocusAngle"] = rng.uniform(0, 180, n)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnAmplitudeContrast": [0.1],
            "rlnSphericalAberration": [2.7],
            "rlnVoltage": [300.0],
            "rlnImagePixelSize": [PIXEL_SIZE],
            "rlnImageSize": [BOX],
            "rlnImageDimensionality": [2],
        }
    )
    write_particles(tmp_path / "poses.star", make_particle_set(particles, optics))
    command = ["relion_project", "--i", "map.mrc", "--o", "proj", "--ang", "poses.star"] + (["--ctf"] if ctf else [])
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    return particles


def _ours(particles: pd.DataFrame, origin_sign: float = -1.0, ctf: bool = False) -> np.ndarray:
    angles = (torch.tensor(particles[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    A = euler_to_matrix(*angles)
    slices = project_rfft(prepare_volume(blob_map().to(torch.float32)), A)
    if ctf:
        n = len(particles)
        params = CTFParams(
            defocus_u=torch.tensor(particles["rlnDefocusU"].to_numpy()),
            defocus_v=torch.tensor(particles["rlnDefocusV"].to_numpy()),
            defocus_angle=torch.tensor(particles["rlnDefocusAngle"].to_numpy()),
            voltage=torch.full((n,), 300.0, dtype=torch.float64),
            cs=torch.full((n,), 2.7, dtype=torch.float64),
            amplitude_contrast=torch.full((n,), 0.1, dtype=torch.float64),
            phase_shift=torch.zeros(n, dtype=torch.float64),
            bfactor=torch.zeros(n, dtype=torch.float64),
            scale=torch.ones(n, dtype=torch.float64),
        )
        slices = slices * ctf_2d(params, BOX, PIXEL_SIZE)
    origins_px = torch.tensor(particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()) / PIXEL_SIZE
    return torch.fft.irfft2(shift_images(slices, origin_sign * origins_px), s=(BOX, BOX)).numpy()


@relion
@needs_relion_project
def test_matches_relion_project(tmp_path):
    particles = _relion_inputs(tmp_path, np.zeros((6, 2)), ctf=False)
    theirs = mrcfile.read(tmp_path / "proj.mrcs")
    ours = _ours(particles)
    assert correlations(ours, theirs).min() > 0.99
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


@relion
@needs_relion_project
def test_matches_relion_project_with_origins(tmp_path):
    """relion_project applies rlnOriginX/YAngst: the image is the projection shifted by -origin."""
    particles = _relion_inputs(tmp_path, ORIGINS_A, ctf=False)
    theirs = mrcfile.read(tmp_path / "proj.mrcs")
    assert correlations(_ours(particles, origin_sign=-1.0), theirs).min() > 0.99
    assert correlations(_ours(particles, origin_sign=+1.0)[1:], theirs[1:]).max() < 0.99


@relion
@needs_relion_project
def test_matches_relion_project_with_ctf(tmp_path):
    particles = _relion_inputs(tmp_path, ORIGINS_A, ctf=True)
    theirs = mrcfile.read(tmp_path / "proj.mrcs")
    ours = _ours(particles, ctf=True)
    assert correlations(ours, theirs).min() > 0.99
    np.testing.assert_allclose(ours, theirs, atol=1e-3 * np.abs(theirs).max())


@pytest.mark.parametrize(("box", "dtype"), [(BOX, torch.float32), (BOX - 1, torch.float64)])
def test_compiled_gather_samples_what_the_torch_gather_samples(monkeypatch, box, dtype):
    """The CPU's compiled sampling and its torch twin (the sampling on other devices) give the same
    slices of a stack of maps, to rounding."""
    maps = torch.stack([blob_map(box), blob_map(box).flip(0)]).to(dtype)
    prepared = prepare_volume(maps)
    A = euler_to_matrix(*(torch.from_numpy(a) for a in random_angles(60, seed=5)))
    compiled = project_rfft(prepared, A)
    monkeypatch.setattr(projection_module, "_gather", projection_module._gather_torch)
    sampled = project_rfft(prepared, A)
    assert compiled.shape == sampled.shape == (2, 60, box, box // 2 + 1)
    scale = float(sampled.abs().max())
    assert scale > 0 and not torch.allclose(compiled[0], compiled[1], atol=1e-2 * scale)
    tolerance = (1e-5 if dtype == torch.float32 else 1e-12) * scale
    assert torch.allclose(compiled, sampled, rtol=0, atol=tolerance)
