"""Particle STAR files: read RELION 3.0 to 5.0 particle sets, write them back in 3.1 layout.

A ParticleSet always looks like a RELION 3.1 file: a `data_particles` table with an rlnOpticsGroup
column and a `data_optics` table. Pre-3.1 files (no optics block) are converted on reading exactly as
RELION's StarConverter does. Per-particle CTF values override their optics group's, which override
RELION's defaults (ctf.cpp, CTF::readByGroup).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from relion_graphsplit.files import atomic_path
from relion_graphsplit.fourier.ctf import CTFParams
from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.relion.stack_files import parse_image_name, resolve_stack, split_image_names, stack_shape
from relion_graphsplit.relion.star_tables import StarParseError, read_star, write_block


class StarFileError(ValueError):
    """A STAR file that cannot be used, with one line naming the file and what is wrong."""


@dataclass
class ParticleSet:
    """A particle STAR file in RELION 3.1 layout; rows of `particles` are the particle indices.

    Attributes
    ----------
    particles : pd.DataFrame
        data_particles, one row per particle (index 0..n-1), with an rlnOpticsGroup column; RELION's
        units (angles in degrees, origins and defocus in A).
    optics : pd.DataFrame
        data_optics, one row per optics group.
    version : int
        30001 or 50001 as tagged; 30000 for a converted pre-3.1 file.
    path : Path
        The STAR file, for messages; image stacks are looked for beside it last.
    """

    particles: pd.DataFrame
    optics: pd.DataFrame
    version: int  # 30001 or 50001 as tagged; 30000 for a converted pre-3.1 file
    path: Path


# Columns that must stay strings even when every value looks like a number.
STRING_COLUMNS = (
    "rlnImageName",
    "rlnImageOriginalName",
    "rlnMicrographName",
    "rlnMicrographMovieName",
    "rlnCtfImage",
    "rlnOpticsGroupName",
    "rlnGroupName",
)
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst")
REQUIRED_CTF_COLUMNS = ("rlnDefocusU", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")

# CTFParams field -> (column, default); None: no default (DefocusV falls back to DefocusU).
_CTF_COLUMNS = {
    "defocus_u": ("rlnDefocusU", None),
    "defocus_v": ("rlnDefocusV", None),
    "defocus_angle": ("rlnDefocusAngle", 0.0),
    "voltage": ("rlnVoltage", None),
    "cs": ("rlnSphericalAberration", 0.0),
    "amplitude_contrast": ("rlnAmplitudeContrast", 0.0),
    "phase_shift": ("rlnPhaseShift", 0.0),
    "bfactor": ("rlnCtfBfactor", 0.0),
    "scale": ("rlnCtfScalefactor", 1.0),
}

# StarConverter (RELION 3.1): per-particle columns of a pre-3.1 file that define its optics groups,
# in RELION's order. rlnImagePixelSize is not among RELION's; when a file gives it, it is used as is.
_LEGACY_OPTICS_COLUMNS = (
    "rlnAmplitudeContrast",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnSphericalAberration",
    "rlnVoltage",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    "rlnImagePixelSize",
)
# StarConverter::translateOffsets: pixel columns of a pre-3.1 file and their Angstrom successors.
_LEGACY_PIXEL_COLUMNS = {
    "rlnOriginX": "rlnOriginXAngst",
    "rlnOriginY": "rlnOriginYAngst",
    "rlnOriginZ": "rlnOriginZAngst",
    "rlnOriginXPrior": "rlnOriginXPriorAngst",
    "rlnOriginYPrior": "rlnOriginYPriorAngst",
    "rlnOriginZPrior": "rlnOriginZPriorAngst",
    "rlnHelicalTrackLength": "rlnHelicalTrackLengthAngst",
}

_VERSION_TAG = re.compile(r"^#\s*version\s+(\d+)")

# check_values: column, unit, the values accepted besides being finite (None: any finite number), and
# why others make no sense. Cs may be 0 or slightly negative (corrected microscopes), as RELION takes.
_REFUSED_VALUES = (
    ("rlnImagePixelSize", "A", lambda v: v > 0, "a pixel size is a positive length"),
    ("rlnVoltage", "kV", lambda v: v > 0, "the acceleration voltage is a positive number of kV"),
    (
        "rlnAmplitudeContrast", "", lambda v: (v >= 0) & (v < 1),
        "the amplitude contrast is a fraction in [0, 1) (the CTF's atan(Q0 / sqrt(1 - Q0^2)) has no value at 1)",
    ),
    ("rlnSphericalAberration", "mm", None, "the CTF needs a number"),
    ("rlnDefocusU", "A", None, "the CTF needs a number"),
    ("rlnDefocusV", "A", None, "the CTF needs a number"),
    ("rlnDefocusAngle", "deg", None, "the CTF needs a number"),
    ("rlnPhaseShift", "deg", None, "the CTF needs a number"),
    ("rlnCtfBfactor", "A^2", None, "the CTF needs a number"),
    (
        "rlnCtfScalefactor", "", lambda v: v > 0,
        "the CTF scale factor is positive (0 erases the signal of the images, a negative one inverts it)",
    ),
    ("rlnImageDimensionality", "", lambda v: v == 2, "this program classifies 2D particle images"),
)  # fmt: skip
USUAL_VOLTAGE_KV = (60.0, 400.0)
"""Acceleration voltages of cryo-electron microscopes; others are taken, with a warning."""
USUAL_MAX_DEFOCUS_A = 100_000.0
"""10 um: larger defoci are taken, with a warning (often a value in nm or um read as A)."""
MAX_ROWS_PER_IMAGE = 60
"""Order of the icosahedral group, the largest symmetry expansion: more rows naming one image is an error."""


def read_particles(path: str | os.PathLike, require_poses: bool = True) -> ParticleSet:
    """Read a RELION particle STAR file (3.0 to 5.0) into 3.1 layout.

    With `require_poses` the file must be a refined set: rlnImageName, Euler angles, CTF values
    (DefocusU, voltage, Cs, Q0) and a pixel size, or StarFileError names what is missing.
    For a pre-3.1 file rlnImageSize is read from the first stack of each optics group; when a stack
    cannot be found it is left out of the optics table and `image_size` raises.

    Parameters
    ----------
    path : str or os.PathLike
        The particle STAR file.
    require_poses : bool
        Refuse a set that is not refined or lacks CTF values, and Euler angles, origins, DefocusU/V
        and DefocusAngle of data_particles that are not finite numbers.

    Returns
    -------
    ParticleSet
        The tables in 3.1 layout: a pre-3.1 file converted as RELION's StarConverter does (optics
        groups from unique optics values, pixel size = 1e4 * rlnDetectorPixelSize / rlnMagnification,
        origins in pixels times the pixel size as rlnOrigin*Angst).

    Raises
    ------
    StarFileError
        In one line naming the file: missing, a folder, not a readable STAR file (or cut short), no
        particle table or an empty one, no rlnOpticsGroup column, optics groups missing or listed
        twice, optics groups in use with different pixel sizes, image sizes or CTF-premultiplied
        flags, a pre-3.1 file with origins in pixels and no pixel size or with non-square images,
        or, with `require_poses`, what is missing.
    StackError
        For a pre-3.1 file whose stack read for rlnImageSize is not an MRC file.
    """
    path = Path(path)
    if path.is_dir():
        raise StarFileError(f"{path}: a folder, not a STAR file")
    if not path.is_file():
        raise StarFileError(f"{path}: no such file")
    tables = _read_tables(path)
    if "optics" in tables:
        if "particles" not in tables:
            raise StarFileError(f"{path}: has data_optics but no data_particles block (not a particle file)")
        particles, optics = tables["particles"], tables["optics"]
        version = _version_tag(path) or 30001
    else:
        particles, optics = _convert_legacy(path, _legacy_table(path, tables))
        version = 30000
    ps = _checked(particles, optics, version, path)
    if require_poses:
        _require_poses(ps)
    return ps


def make_particle_set(
    particles: pd.DataFrame, optics: pd.DataFrame, path: str | os.PathLike = "<in memory>"
) -> ParticleSet:
    """A ParticleSet (version 30001) from tables built in code; `path` names it in messages and
    its directory is where image stacks are looked for last.

    Parameters
    ----------
    particles, optics : pd.DataFrame
        data_particles and data_optics in RELION 3.1 layout, each with an rlnOpticsGroup column.
    path : str or os.PathLike
        A name for messages.

    Returns
    -------
    ParticleSet
        The tables (rows renumbered 0..n-1), checked as `read_particles` checks them (without
        `require_poses`).

    Raises
    ------
    StarFileError
        As `read_particles` for an empty particle table or inconsistent optics groups.
    """
    return _checked(particles, optics, 30001, Path(path))


def write_particles(path: str | os.PathLike, ps: ParticleSet, particles: pd.DataFrame | None = None) -> None:
    """Write `ps.optics` and `particles` (default `ps.particles`) as a RELION 3.1 particle file.

    Tagged `# version 30001`, or 50001 when `ps` came from a RELION 5 file. Floats are written with
    the shortest text that reads back to the same double, so a read-write-read round trip is exact.
    Strings with spaces (or empty) are quoted. The file is written whole or not at all.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write.
    ps : ParticleSet
        Gives data_optics and the version.
    particles : pd.DataFrame or None
        data_particles to write, with an rlnOpticsGroup column; None: `ps.particles`.

    Raises
    ------
    StarFileError
        If the particles have no rlnOpticsGroup column or refer to optics groups missing from
        `ps.optics`.
    """
    particles = ps.particles if particles is None else particles
    if "rlnOpticsGroup" not in particles:
        raise StarFileError(f"{path}: particles to write have no rlnOpticsGroup column")
    unknown = sorted(set(particles["rlnOpticsGroup"]) - set(ps.optics["rlnOpticsGroup"]))
    if unknown:
        raise StarFileError(f"{path}: particles refer to optics groups {unknown} missing from data_optics")
    version = 50001 if ps.version >= 50000 else 30001
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        write_block(f, "optics", ps.optics, version)
        write_block(f, "particles", particles, version)


@dataclass(frozen=True)
class Particles:
    """A refined particle set as the method uses it, parsed once from its STAR file (`particles`).

    RELION's conventions throughout: rotations are A = Rz(psi) Ry(tilt) Rz(rot), matrices that
    left-multiply xyz column vectors of the map; a particle's centre lies at the image centre minus
    its origin; defocus is in A, positive for underfocus.

    Attributes
    ----------
    path : Path
        The STAR file, for messages.
    rotations : torch.Tensor
        (n, 3, 3) float64 RELION matrices A.
    origins : torch.Tensor
        (n, 2) float64 rlnOriginX/YAngst as (x, y) in pixels.
    ctf : CTFParams
        (n,) float64 per field.
    subsets : np.ndarray or None
        (n,) rlnRandomSubset (1 or 2), where the file gives it.
    box : int
        Image size N (pixels).
    pixel_size : float
        Pixel size (A).
    premultiplied : bool
        The images already carry one CTF factor (rlnCtfDataAreCtfPremultiplied).

    len() is the number of particles n.
    """

    path: Path  # the STAR file, for messages
    rotations: torch.Tensor  # (n, 3, 3) float64
    origins: torch.Tensor  # (n, 2) float64, (x, y) in pixels
    ctf: CTFParams  # (n,) float64 per field
    subsets: np.ndarray | None  # (n,) rlnRandomSubset (1 or 2), where the file gives it
    box: int  # pixels
    pixel_size: float  # A
    premultiplied: bool  # the images already carry one CTF factor

    def __len__(self) -> int:
        return len(self.rotations)


def particles(ps: ParticleSet) -> Particles:
    """The poses, CTFs, half sets, box and pixel size of a set read with `read_particles`.

    Parameters
    ----------
    ps : ParticleSet
        A refined set (`read_particles` with require_poses).

    Returns
    -------
    Particles
        From `poses`, `ctf_params`, `image_size`, `pixel_size` and `ctf_premultiplied`.

    Raises
    ------
    StarFileError
        When the Euler angles, the box, the pixel size, rlnDefocusU or rlnVoltage are unknown.
    """
    rotations, origins = poses(ps)
    subsets = ps.particles["rlnRandomSubset"].to_numpy() if "rlnRandomSubset" in ps.particles else None
    return Particles(
        ps.path, rotations, origins, ctf_params(ps), subsets, image_size(ps), pixel_size(ps), ctf_premultiplied(ps)
    )


def pixel_size(ps: ParticleSet) -> float:
    """The pixel size (A) shared by the optics groups in use.

    Parameters
    ----------
    ps : ParticleSet
        The set.

    Returns
    -------
    float
        rlnImagePixelSize (A) of the first optics group in use (a set whose groups in use differ is
        refused when it is read).

    Raises
    ------
    StarFileError
        If data_optics has no rlnImagePixelSize.
    """
    optics = _used_optics(ps)
    if "rlnImagePixelSize" not in optics:
        raise StarFileError(f"{ps.path}: pixel size unknown (no rlnImagePixelSize in data_optics)")
    return float(optics["rlnImagePixelSize"].iloc[0])


def image_size(ps: ParticleSet) -> int:
    """The box size (pixels) shared by the optics groups in use.

    Parameters
    ----------
    ps : ParticleSet
        The set.

    Returns
    -------
    int
        rlnImageSize (pixels) of the first optics group in use (a set whose groups in use differ is
        refused when it is read).

    Raises
    ------
    StarFileError
        If data_optics has no rlnImageSize (a pre-3.1 file whose first stack was not found).
    """
    optics = _used_optics(ps)
    if "rlnImageSize" not in optics:
        raise StarFileError(
            f"{ps.path}: image size unknown (no rlnImageSize in data_optics; a pre-3.1 file takes it "
            "from the header of its first particle stack, which was not found)"
        )
    return int(optics["rlnImageSize"].iloc[0])


def ctf_premultiplied(ps: ParticleSet) -> bool:
    """Whether the images already carry one CTF factor (rlnCtfDataAreCtfPremultiplied = 1).

    Parameters
    ----------
    ps : ParticleSet
        The set.

    Returns
    -------
    bool
        True if an optics group in use sets the flag (all in use agree); False without the column.
    """
    optics = _used_optics(ps)
    column = "rlnCtfDataAreCtfPremultiplied"
    return column in optics and bool(optics[column].astype(int).any())


def poses(ps: ParticleSet) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION rotation matrices A (n, 3, 3) and origins (n, 2) as (x, y) in pixels, both float64.

    Parameters
    ----------
    ps : ParticleSet
        A set with rlnAngleRot/Tilt/Psi.

    Returns
    -------
    rotations : torch.Tensor
        (n, 3, 3) float64 A = Rz(psi) Ry(tilt) Rz(rot) from the angles (degrees), which left-multiply
        xyz column vectors of the map: a map point r lands in the projection at (A r)_xy.
    origins : torch.Tensor
        (n, 2) float64 rlnOriginXAngst/YAngst divided by the pixel size, (x, y) in pixels; 0 where a
        column is missing. The particle's centre lies at the image centre minus its origin.

    Raises
    ------
    StarFileError
        If an angle column is missing, or origins are nonzero and the pixel size is unknown.
    """
    missing = [c for c in ANGLE_COLUMNS if c not in ps.particles]
    if missing:
        raise StarFileError(f"{ps.path}: no poses (missing {', '.join(missing)})")
    angles = (torch.tensor(ps.particles[c].to_numpy(np.float64)) for c in ANGLE_COLUMNS)
    A = euler_to_matrix(*angles)
    n = len(ps.particles)
    origins = np.zeros((n, 2))
    for axis, column in enumerate(("rlnOriginXAngst", "rlnOriginYAngst")):
        if column in ps.particles:
            origins[:, axis] = ps.particles[column].to_numpy(np.float64)
    if origins.any():
        origins /= pixel_size(ps)
    return A, torch.from_numpy(origins)


def ctf_params(ps: ParticleSet) -> CTFParams:
    """Per-particle CTF parameters: particle value, else optics group value, else RELION's default.

    The defaults: DefocusAngle 0, Cs 0, Q0 0, phase shift 0, B-factor 0, scale 1, DefocusV =
    DefocusU. A particle value that is not a number falls back to its optics group's, where
    data_optics has the column.

    Parameters
    ----------
    ps : ParticleSet
        The set.

    Returns
    -------
    CTFParams
        (n,) float64 per field, in RELION's units: defocus in A (positive is underfocus), angles in
        degrees, voltage in kV, Cs in mm, B-factor in A^2.

    Raises
    ------
    StarFileError
        If rlnDefocusU or rlnVoltage is in neither table.
    """
    values = {}
    for field, (column, default) in _CTF_COLUMNS.items():
        value = _per_particle(ps, column)
        if value is None and field == "defocus_v":
            value = values["defocus_u"]
        elif value is None and default is None:
            raise StarFileError(f"{ps.path}: no CTF {column} in data_particles or data_optics")
        elif value is None:
            value = np.full(len(ps.particles), default)
        values[field] = value
    return CTFParams(**{field: torch.tensor(value, dtype=torch.float64) for field, value in values.items()})


def check_values(ps: ParticleSet) -> list[str]:
    """Refuse values that make no sense for a particle set; return warnings for odd but usable data.

    Meant for a set read with `read_particles(path)` (require_poses), which has already refused
    missing columns and angles, origins and defocus of data_particles that are not finite numbers.
    Values are judged per particle as they are used (the particle's own, else its optics group's;
    see `_per_particle`), so an optics group that no particle uses does not count, and messages name
    the block the first bad value came from.

    Parameters
    ----------
    ps : ParticleSet
        A set read with `read_particles(path)`.

    Returns
    -------
    list of str
        Warnings, one line each starting with the file name, for data that are odd but usable: no
        origin columns (every particle is taken as centred, which costs accuracy where the refinement
        did shift them); images named by several rows with different poses (a symmetry-expanded set:
        each row is classified on its own); a voltage outside 60..400 kV (USUAL_VOLTAGE_KV); a
        defocus above 100000 A (USUAL_MAX_DEFOCUS_A); defocus <= 0 A on particles with a nonzero
        rlnPhaseShift (phase-plate data are recorded near focus).

    Raises
    ------
    StarFileError
        In one line naming the file, the column, the first bad row (1-based) and how many are bad,
        for values that no imaging gives or that would make the model of the images meaningless:
        CTF and optics values that are not finite numbers; rlnImagePixelSize or rlnVoltage <= 0;
        rlnAmplitudeContrast outside [0, 1); rlnCtfScalefactor <= 0; rlnImageDimensionality not 2;
        rlnDefocusU or rlnDefocusV <= 0 (RELION's defocus is positive for underfocus) without a
        phase shift; an origin (rlnOriginXAngst, rlnOriginYAngst) more than half the box from the
        centre (the particle's centre lies outside its image); rows that repeat an earlier row's
        image, Euler angles and origins (the same particle twice, which would weigh it double); one
        image named by more than MAX_ROWS_PER_IMAGE rows (more than any symmetry expansion gives).
    """
    warnings: list[str] = []
    _check_ctf_values(ps, warnings)
    _check_defocus(ps, warnings)
    _check_origins(ps, warnings)
    _check_repeated_images(ps, warnings)
    return warnings


def _check_ctf_values(ps: ParticleSet, warnings: list[str]) -> None:
    """Refuse the CTF and optics values in _REFUSED_VALUES; warn of a voltage outside USUAL_VOLTAGE_KV."""
    for column, unit, accepted, why in _REFUSED_VALUES:
        values = _per_particle(ps, column)
        if values is not None:
            ok = np.isfinite(values) if accepted is None else np.isfinite(values) & accepted(values)
            _refuse(ps, column, values, ~ok, unit, why)
    voltage = _per_particle(ps, "rlnVoltage")
    if voltage is not None:
        low, high = USUAL_VOLTAGE_KV
        odd = (voltage < low) | (voltage > high)
        _warn(warnings, ps, "rlnVoltage", voltage, odd, "kV", f"unusual (microscopes run at {low:g} to {high:g} kV)")


def _check_defocus(ps: ParticleSet, warnings: list[str]) -> None:
    """Refuse defocus at or past focus (<= 0 A) unless the particle has a phase shift; warn of it
    then, and of defocus above USUAL_MAX_DEFOCUS_A."""
    phase_shift = _per_particle(ps, "rlnPhaseShift")
    phase_plate = np.zeros(len(ps.particles), bool) if phase_shift is None else phase_shift != 0
    for column in ("rlnDefocusU", "rlnDefocusV"):
        values = _per_particle(ps, column)
        if values is None:
            continue  # DefocusV falls back to DefocusU
        at_focus = values <= 0
        _refuse(
            ps, column, values, at_focus & ~phase_plate, "A",
            "RELION's defocus is positive for underfocus; at or past focus only phase-plate data "
            "(a nonzero rlnPhaseShift) make sense",
        )  # fmt: skip
        why = "at or past focus, taken as phase-plate data (nonzero rlnPhaseShift)"
        _warn(warnings, ps, column, values, at_focus, "A", why)
        far = values > USUAL_MAX_DEFOCUS_A
        _warn(warnings, ps, column, values, far, "A", f"unusual (above {USUAL_MAX_DEFOCUS_A:g} A, 10 um)")


def _check_origins(ps: ParticleSet, warnings: list[str]) -> None:
    """Warn of missing origin columns; refuse origins that put the particle's centre outside its image.

    The centre of a particle lies at the box centre minus its origin (see `poses`), so it leaves the
    image when |origin| exceeds half the box along x or y.
    """
    origins = {column: _per_particle(ps, column) for column in ORIGIN_COLUMNS}
    missing = [column for column, values in origins.items() if values is None]
    if missing:
        where = "in its image" if len(missing) == 2 else f"along {'x' if 'X' in missing[0] else 'y'}"
        listed = ", ".join(missing)
        warnings.append(f"{ps.path}: has no origins ({listed}): every particle is taken as centred {where}")
    if "rlnImageSize" not in ps.optics:
        return  # a pre-3.1 set whose stacks were not found; the box is checked when they are read
    box, apix = image_size(ps), pixel_size(ps)
    half = box * apix / 2
    for column, values in origins.items():
        if values is not None:
            why = (
                f"more than half the box ({box} px * {apix:g} A / 2 = {half:g} A): the particle's centre lies "
                "outside its image"
            )
            _refuse(ps, column, values, np.abs(values) > half, "A", why)


def _check_repeated_images(ps: ParticleSet, warnings: list[str]) -> None:
    """Refuse rows that repeat an earlier row's image and pose, and images named by more than
    MAX_ROWS_PER_IMAGE rows; warn of images named by several rows (a symmetry-expanded set)."""
    image = _image_numbers(ps)
    pose = [column for column in (*ANGLE_COLUMNS, *ORIGIN_COLUMNS) if column in ps.particles]
    key = ps.particles[pose].assign(image=image)
    repeated = key.duplicated().to_numpy()
    if repeated.any():
        later = np.flatnonzero(repeated)[0]
        earlier = np.flatnonzero((key == key.iloc[later]).all(axis=1).to_numpy())[0]
        raise StarFileError(
            f"{ps.path}: rows {earlier + 1} and {later + 1} are the same particle (same image in rlnImageName, "
            f"Euler angles and origins), and {repeated.sum()} row(s) repeat an earlier one: remove the duplicated "
            "rows"
        )
    rows_per_image = np.bincount(image)[image]
    names = ps.particles["rlnImageName"]
    crowded = np.flatnonzero(rows_per_image > MAX_ROWS_PER_IMAGE)
    if crowded.size:
        first = crowded[0]
        images = len(np.unique(image[crowded]))
        raise StarFileError(
            f"{ps.path}: rlnImageName {names.iloc[first]} is named by {rows_per_image[first]} rows, the first "
            f"row {first + 1} ({images} image(s) named by more than {MAX_ROWS_PER_IMAGE} rows, {crowded.size} rows "
            f"in all): more than a symmetry expansion gives ({MAX_ROWS_PER_IMAGE}, the order of the icosahedral "
            "group)"
        )
    shared = np.flatnonzero(rows_per_image > 1)
    if shared.size:
        images = len(np.unique(image[shared]))
        warnings.append(
            f"{ps.path}: {images} images are named by several rows of rlnImageName with different poses "
            f"({shared.size} rows, up to {rows_per_image.max()} per image, the first in row {shared[0] + 1}), "
            "as in a symmetry-expanded set: each row is classified on its own"
        )


def _image_numbers(ps: ParticleSet) -> np.ndarray:
    """One integer per row naming its image, the same however the name is zero-padded
    ('1@a.mrcs', '000001@a.mrcs')."""
    try:
        index, stacks = split_image_names(ps.particles["rlnImageName"])
    except ValueError as err:
        raise StarFileError(f"{ps.path}: rlnImageName: {err}") from None
    images = pd.DataFrame({"stack": stacks, "index": index})
    return images.groupby(["stack", "index"], sort=False).ngroup().to_numpy()


def _refuse(ps: ParticleSet, column: str, values: np.ndarray, bad: np.ndarray, unit: str, why: str) -> None:
    """Raise StarFileError naming where `column` is bad (see `_where`) and why, if any value is."""
    if bad.any():
        raise StarFileError(f"{ps.path}: {_where(ps, column, values, bad, unit)}: {why}")


def _warn(
    warnings: list[str], ps: ParticleSet, column: str, values: np.ndarray, odd: np.ndarray, unit: str, why: str
) -> None:
    """Append a warning naming where `column` is odd (see `_where`) and why, if any value is."""
    if odd.any():
        warnings.append(f"{ps.path}: {_where(ps, column, values, odd, unit)}: {why}")


def _where(ps: ParticleSet, column: str, values: np.ndarray, bad: np.ndarray, unit: str) -> str:
    """'COLUMN is VALUE for N particle(s), the first in row R of data_particles' for the particles whose
    own value is bad, else the same for the optics groups whose value the bad particles take."""
    own = np.flatnonzero(bad & _own_values(ps, column))
    if own.size:
        first = own[0]
        value = _value_text(values[first], unit)
        return f"{column} is {value} for {own.size} particle(s), the first in row {first + 1} of data_particles"
    groups = ps.particles["rlnOpticsGroup"].to_numpy()[bad]
    rows = np.flatnonzero(ps.optics["rlnOpticsGroup"].isin(groups).to_numpy())
    value = _value_text(pd.to_numeric(ps.optics[column], errors="coerce").iloc[rows[0]], unit)
    return f"{column} is {value} for {rows.size} optics group(s), the first in row {rows[0] + 1} of data_optics"


def _own_values(ps: ParticleSet, column: str) -> np.ndarray:
    """Whether each particle's value of `column` is its own, not its optics group's (see `_per_particle`)."""
    if column not in ps.particles:
        return np.zeros(len(ps.particles), bool)
    if column not in ps.optics:
        return np.ones(len(ps.particles), bool)
    return pd.to_numeric(ps.particles[column], errors="coerce").notna().to_numpy()


def _value_text(value: float, unit: str) -> str:
    """'300 kV'; 'nan', 'inf' without a unit."""
    return f"{value:g} {unit}" if unit and np.isfinite(value) else f"{value:g}"


def _per_particle(ps: ParticleSet, column: str) -> np.ndarray | None:
    """A column for every particle: its own value where given, else its optics group's; None if neither.

    Text that is not a number counts as not given (NaN), as a column of numbers reads it.
    """
    value = None
    if column in ps.optics:
        by_group = pd.to_numeric(ps.optics.set_index("rlnOpticsGroup")[column], errors="coerce").astype(float)
        value = by_group.reindex(ps.particles["rlnOpticsGroup"]).to_numpy()
    if column in ps.particles:
        own = pd.to_numeric(ps.particles[column], errors="coerce").to_numpy(np.float64)
        value = own if value is None else np.where(np.isnan(own), value, own)
    return value


def _read_tables(path: Path) -> dict[str, pd.DataFrame]:
    """The loop tables of a STAR file by block name, in file order; StarFileError for malformed text.

    A loop whose rows hold fewer or more values than its columns is refused; a last row cut short
    reads with missing values: a file truncated in a copy ends inside its last row, without a newline,
    where a "nan" that RELION wrote ends with one.
    """
    try:
        blocks = read_star(path, string_columns=STRING_COLUMNS)
    except StarParseError as err:
        raise StarFileError(
            f"{path}: not a readable STAR file (a row of a table holds fewer or more values than the table has "
            f"columns: is the file cut short? In {err})"
        ) from err
    except UnicodeDecodeError as err:
        raise StarFileError(f"{path}: not a readable STAR file ({err})") from err
    tables = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    if tables:
        name, last = list(tables.items())[-1]
        if len(last) and pd.isna(last.iloc[-1, -1]) and not _ends_with_newline(path):
            raise StarFileError(
                f"{path}: not a readable STAR file (the last row of data_{name}, row {len(last)}, has no value "
                f"for {last.columns[-1]}: the file ends inside a row; is it cut short?)"
            )
    return tables


def _ends_with_newline(path: Path) -> bool:
    """Whether a non-empty file's last byte ends a line."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) in (b"\n", b"\r")


def _version_tag(path: Path) -> int | None:
    """The `# version NNNNN` tag before the first data block, if any."""
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("data_"):
                return None
            match = _VERSION_TAG.match(line)
            if match:
                return int(match.group(1))
    return None


def _legacy_table(path: Path, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The particle table of a file without optics: data_particles, else the first with rlnImageName."""
    if "particles" in tables:
        return tables["particles"]
    for table in tables.values():
        if "rlnImageName" in table:
            return table
    if len(tables) == 1:
        return next(iter(tables.values()))
    raise StarFileError(f"{path}: no particle table (no data block with rlnImageName)")


def _convert_legacy(path: Path, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pre-3.1 particles -> (particles, optics) as RELION's StarConverter makes them.

    Optics groups are the unique combinations of the optics columns, numbered by first appearance;
    those columns move to the optics table, pixel size = 1e4 * DetectorPixelSize / Magnification,
    and origins in pixels become rlnOrigin*Angst (appended, as RELION does).
    """
    particles = table.reset_index(drop=True)
    keys = [c for c in _LEGACY_OPTICS_COLUMNS if c in particles]
    if keys:
        group = particles.groupby(keys, sort=False, dropna=False).ngroup().to_numpy() + 1
    else:
        group = np.ones(len(particles), dtype=np.int64)
    first_rows = np.unique(group, return_index=True)[1]
    optics = particles.iloc[first_rows][keys].reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    if "rlnImagePixelSize" not in optics and {"rlnDetectorPixelSize", "rlnMagnification"} <= set(optics):
        detector = optics.pop("rlnDetectorPixelSize").astype(np.float64)
        optics["rlnImagePixelSize"] = 1e4 * detector / optics.pop("rlnMagnification").astype(np.float64)
    elif "rlnImagePixelSize" in optics:
        optics["rlnImagePixelSize"] = optics.pop("rlnImagePixelSize")  # RELION's place: last
    particles = particles.drop(columns=keys)
    particles["rlnOpticsGroup"] = group

    for pixels, angstrom in _LEGACY_PIXEL_COLUMNS.items():
        if pixels not in particles:
            continue
        if "rlnImagePixelSize" not in optics:
            raise StarFileError(
                f"{path}: {pixels} is in pixels but the pixel size is unknown "
                "(no rlnDetectorPixelSize and rlnMagnification, nor rlnImagePixelSize)"
            )
        apix = optics["rlnImagePixelSize"].to_numpy(np.float64)[group - 1]
        particles[angstrom] = particles.pop(pixels).to_numpy(np.float64) * apix

    sizes = _stack_image_sizes(path, particles, first_rows)
    if sizes is not None:
        optics["rlnImageSize"] = sizes
        optics["rlnImageDimensionality"] = 2
    return particles, optics


def _stack_image_sizes(path: Path, particles: pd.DataFrame, rows: np.ndarray) -> list[int] | None:
    """Box size of the stack holding each given particle, or None unless every one can be read."""

    if "rlnImageName" not in particles:
        return None
    sizes = []
    for row in rows:
        stack_path = resolve_stack(parse_image_name(particles["rlnImageName"].iloc[row])[1], path.parent)
        if stack_path is None:
            return None
        _, ny, nx = stack_shape(stack_path)
        if nx != ny:
            raise StarFileError(f"{path}: images in {stack_path} are not square ({nx} x {ny})")
        sizes.append(nx)
    return sizes


def _checked(particles: pd.DataFrame, optics: pd.DataFrame, version: int, path: Path) -> ParticleSet:
    """Copy and validate the two tables: optics groups consistent, one pixel size and box in use."""
    particles = particles.reset_index(drop=True)
    optics = optics.reset_index(drop=True)
    if len(particles) == 0:
        raise StarFileError(f"{path}: the particle table is empty")
    for name, table in (("data_particles", particles), ("data_optics", optics)):
        if "rlnOpticsGroup" not in table:
            raise StarFileError(f"{path}: no rlnOpticsGroup column in {name}")
        for column in STRING_COLUMNS:
            if column in table:
                table[column] = table[column].astype(str)
    if optics["rlnOpticsGroup"].duplicated().any():
        raise StarFileError(f"{path}: data_optics lists an optics group more than once")
    unknown = sorted(set(particles["rlnOpticsGroup"]) - set(optics["rlnOpticsGroup"]))
    if unknown:
        raise StarFileError(f"{path}: particles refer to optics groups {unknown} missing from data_optics")

    ps = ParticleSet(particles=particles, optics=optics, version=version, path=path)
    used = _used_optics(ps)
    for column, what, advice in (
        ("rlnImagePixelSize", "pixel sizes", "re-extract them at one pixel size"),
        ("rlnImageSize", "image sizes", "re-extract them at one box size"),
        ("rlnCtfDataAreCtfPremultiplied", "CTF-premultiplied flags", "process them separately"),
    ):
        if column in used:
            values = np.unique(used[column].to_numpy(np.float64))
            if len(values) > 1 and values.max() - values.min() > 1e-6 * max(abs(values.max()), 1.0):
                listed = ", ".join(f"{v:g}" for v in values)
                unit = " A" if column == "rlnImagePixelSize" else ""
                raise StarFileError(f"{path}: optics groups have different {what} ({listed}{unit}): {advice}")
    return ps


def _used_optics(ps: ParticleSet) -> pd.DataFrame:
    """The optics rows of the groups that particles belong to."""
    return ps.optics[ps.optics["rlnOpticsGroup"].isin(ps.particles["rlnOpticsGroup"])]


def _require_poses(ps: ParticleSet) -> None:
    """Refuse, naming every missing column, a set that is not refined or lacks CTF values."""
    missing = [c for c in ("rlnImageName", *ANGLE_COLUMNS) if c not in ps.particles]
    missing += [c for c in REQUIRED_CTF_COLUMNS if c not in ps.particles and c not in ps.optics]
    if "rlnImagePixelSize" not in ps.optics:
        legacy = ps.version == 30000
        missing.append("rlnDetectorPixelSize + rlnMagnification" if legacy else "rlnImagePixelSize")
    if missing:
        raise StarFileError(
            f"{ps.path}: not a refined particle set with CTF values: missing {', '.join(missing)}"
        )
    per_particle = (*ANGLE_COLUMNS, "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
    for column in (c for c in per_particle if c in ps.particles):
        values = pd.to_numeric(ps.particles[column], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise StarFileError(
                f"{ps.path}: {column} is not a finite number for {bad.size} particle(s), the first in row {bad[0] + 1}"
            )
