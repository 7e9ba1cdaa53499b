"""relion_graphsplit_simulate: a two-class particle set with known truth, from two maps or two models.

Example::

    relion_graphsplit_simulate --map1 test_data/adk_open.mrc --map2 test_data/adk_closed.mrc \
        --n 5000 --snr 0.03 --pose_error 1 --o sim/
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import mrcfile
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from relion_graphsplit.cli.graphsplit import PLAIN, run_app
from relion_graphsplit.relion.mrc import read_mrc

console = Console(highlight=False)
app = typer.Typer(**PLAIN)

MODELS_NEED_GEMMI = "reading atomic models needs gemmi: pip install 'relion-graphsplit[models]'"


def _atomic_maps() -> ModuleType:
    """relion_graphsplit.simulate.models, imported only when a model is read: gemmi, which it needs, is the
    optional [models] extra. Without it, BadParameter with the one line that says how to get it."""
    try:
        import gemmi  # noqa: F401
    except ImportError:
        raise typer.BadParameter(MODELS_NEED_GEMMI) from None
    from relion_graphsplit.simulate import models as maps

    return maps


def _ranges(text: str) -> list[tuple[int, int]]:
    """'1-29,60-121' -> [(1, 29), (60, 121)]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def _chains(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def _read_map(path: Path, option: str) -> tuple[np.ndarray, float]:
    """The map given with `option` and its pixel size (A); BadParameter naming the file when it is not
    an MRC map or holds a voxel that is not a finite number (it would spread NaN over every image)."""
    try:
        volume, pixel_size = read_mrc(path)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=option) from None
    bad = np.flatnonzero(~np.isfinite(volume))
    if bad.size:
        first = tuple(int(i) for i in np.unravel_index(bad[0], volume.shape))
        raise typer.BadParameter(
            f"{path}: {bad.size} voxel(s) are not finite numbers (NaN or Inf), the first at (z, y, x) = {first}",
            param_hint=option,
        )
    return volume, pixel_size


def _read_model(path: Path, chains: str | None, option: str):
    """The atomic model given with `option`; BadParameter naming the file when gemmi cannot read it."""
    atomic_maps = _atomic_maps()
    try:
        return atomic_maps.read_model(path, _chains(chains))
    except RuntimeError as error:  # gemmi: "Unknown format of ...", a malformed line
        raise typer.BadParameter(f"{path}: not a readable atomic model ({error})", param_hint=option) from None


def _maps_from_files(map1: Path, map2: Path, box: int | None, angpix: float | None):
    (v1, p1), (v2, p2) = _read_map(map1, "--map1"), _read_map(map2, "--map2")
    if v1.shape != v2.shape or v1.shape[0] != v1.shape[1] or v1.shape[1] != v1.shape[2]:
        raise typer.BadParameter(f"the maps must be cubic and of one size, got {v1.shape} and {v2.shape}")
    if abs(p1 - p2) > 1e-3 * p1:
        raise typer.BadParameter(f"the maps have different pixel sizes ({p1} and {p2} A)")
    if box is not None and box != v1.shape[0]:
        raise typer.BadParameter(f"--box {box} but the maps are {v1.shape[0]}^3 (resample them first)")
    pixel_size = angpix if angpix is not None else p1
    return [v1, v2], pixel_size


def _maps_from_models(
    pdb1: Path,
    pdb2: Path,
    chains1: str | None,
    chains2: str | None,
    superpose_core: bool,
    core_residues: str,
    box: int | None,
    angpix: float | None,
    bfactor: float,
):
    atomic_maps = _atomic_maps()
    if box is None or angpix is None:
        raise typer.BadParameter("--box and --angpix are needed to make maps from atomic models")
    model1 = _read_model(pdb1, chains1, "--pdb1")
    model2 = _read_model(pdb2, chains2, "--pdb2")
    if superpose_core:
        rmsd = atomic_maps.superpose(model1, model2, _ranges(core_residues))
        console.print(f"Superposed model 1 onto model 2 on {core_residues}: CA RMSD {rmsd:.2f} A")
    center = atomic_maps.center_of_mass(model1, model2)
    volumes = [atomic_maps.density_from_model(m, box, angpix, bfactor, center) for m in (model1, model2)]
    return volumes, angpix


@app.command(
    help=(
        "Simulate a RELION 3.1 particle set of two classes with known truth. Give two maps (--map1, --map2) "
        "or two atomic models (--pdb1, --pdb2). Writes particles.mrcs, particles.star (poses with the "
        "given errors, as a consensus refinement would report them), truth.star (true poses and "
        "rlnClassNumber) and class1.mrc, class2.mrc to --o."
    )
)
def main_command(
    o: Path = typer.Option(..., "--o", help="Output directory (created if needed)."),
    map1: Path | None = typer.Option(None, "--map1", exists=True, dir_okay=False, help="Map (MRC) of class 1."),
    map2: Path | None = typer.Option(
        None, "--map2", exists=True, dir_okay=False, help="Map (MRC) of class 2, same box and pixel size."
    ),
    pdb1: Path | None = typer.Option(
        None, "--pdb1", exists=True, dir_okay=False, help="Atomic model (PDB/mmCIF, may be gzipped) of class 1."
    ),
    pdb2: Path | None = typer.Option(
        None, "--pdb2", exists=True, dir_okay=False, help="Atomic model of class 2 (may be the same file as --pdb1)."
    ),
    chains1: str | None = typer.Option(
        None, "--chains1", help="Chains of --pdb1 to keep, comma-separated (default all), e.g. 'A,B,C,D,E'."
    ),
    chains2: str | None = typer.Option(
        None, "--chains2", help="Chains of --pdb2 to keep, e.g. 'A,C,D,E' to leave chain B out (compositional)."
    ),
    superpose_core: bool = typer.Option(
        False, "--superpose_core", "--superpose-core",
        help="Superpose model 1 onto model 2 on the CA atoms of --core_residues first."
    ),
    core_residues: str = typer.Option(
        "1-29,60-121,160-214", "--core_residues", "--core-residues",
        help="Residue ranges for --superpose_core (default: adk's core)."
    ),
    bfactor: float = typer.Option(100.0, "--bfactor", help="B-factor (A^2) given to every atom of the models."),
    box: int | None = typer.Option(
        None, "--box", min=8, help="Box size in pixels (needed with models; maps give it)."
    ),
    angpix: float | None = typer.Option(
        None, "--angpix", min=0.01, help="Pixel size in A (needed with models; default for maps: their header)."
    ),
    n: int = typer.Option(1000, "--n", min=1, help="Number of particles."),
    snr: float = typer.Option(
        0.05, "--snr", min=1e-9,
        help="Signal-to-noise ratio: signal variance inside the 0.75-box circle over noise variance."
    ),
    fraction: float = typer.Option(0.5, "--fraction", min=0.0, max=1.0, help="Fraction of particles in class 1."),
    defocus_min: float = typer.Option(
        10000.0, "--defocus_min", "--defocus-min", min=0.0, help="Smallest mean defocus (A, underfocus)."
    ),
    defocus_max: float = typer.Option(
        30000.0, "--defocus_max", "--defocus-max", min=0.0, help="Largest mean defocus (A)."
    ),
    astigmatism: float = typer.Option(500.0, "--astigmatism", min=0.0, help="DefocusU - DefocusV (A)."),
    ctf_bfactor: float = typer.Option(
        0.0, "--ctf_bfactor", "--ctf-bfactor", help="CTF envelope B-factor (A^2, rlnCtfBfactor)."
    ),
    voltage: float = typer.Option(300.0, "--voltage", min=1.0, help="Acceleration voltage (kV)."),
    cs: float = typer.Option(2.7, "--cs", min=0.0, help="Spherical aberration (mm)."),
    q0: float = typer.Option(0.1, "--q0", min=0.0, max=1.0, help="Amplitude contrast (fraction)."),
    max_shift: float = typer.Option(
        0.0, "--max_shift", "--max-shift", min=0.0, help="True origins are uniform in [-max, max] A per axis."
    ),
    pose_error: float = typer.Option(
        0.0, "--pose_error", "--pose-error", min=0.0,
        help="RMS angle (degrees) of the random rotation between true and written poses."
    ),
    shift_error: float = typer.Option(
        0.0, "--shift_error", "--shift-error", min=0.0, help="RMS length (A) of the error of written origins."
    ),
    noise_excess: float = typer.Option(
        0.0, "--noise_excess", "--noise-excess", min=0.0,
        help="Coloured noise: extra noise power at zero frequency, in units of the white noise (0: white noise).",
    ),
    noise_bfactor: float = typer.Option(
        1000.0, "--noise_bfactor", "--noise-bfactor", min=0.0,
        help="B (A^2) of the extra noise's fall with frequency, exp(-B s^2 / 2) in power.",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same inputs and seed give the same files."),
    batch_size: int = typer.Option(
        256, "--batch_size", "--batch-size", min=1, help="Particles made at a time (memory)."
    ),
    ceiling: bool = typer.Option(
        True, "--ceiling/--no_ceiling", " /--no-ceiling",
        help="Report the accuracy of classifying with the true maps and poses."
    ),
) -> None:
    if (map1 is None) != (map2 is None) or (pdb1 is None) != (pdb2 is None) or (map1 is None) == (pdb1 is None):
        raise typer.BadParameter("give either --map1 and --map2, or --pdb1 and --pdb2")
    if defocus_min > defocus_max:
        raise typer.BadParameter(f"--defocus_min ({defocus_min}) is above --defocus_max ({defocus_max})")
    from relion_graphsplit.simulate.particles import Conditions, ceiling_accuracy, write_simulation  # torch: after the options

    conditions = Conditions(
        defocus_range=(defocus_min, defocus_max), astigmatism=astigmatism, voltage=voltage, cs=cs, q0=q0,
        bfactor=ctf_bfactor, max_shift_A=max_shift, pose_error_deg=pose_error, shift_error_A=shift_error,
        noise_excess=noise_excess, noise_bfactor=noise_bfactor,
    )
    if map1 is not None:
        volumes, pixel_size = _maps_from_files(map1, map2, box, angpix)
    else:
        try:
            volumes, pixel_size = _maps_from_models(
                pdb1, pdb2, chains1, chains2, superpose_core, core_residues, box, angpix, bfactor
            )
        except ValueError as error:  # a chain that is not there, a model larger than the box
            raise typer.BadParameter(str(error)) from None
    if volumes[0].shape[0] % 2:
        raise typer.BadParameter(f"RELION particles have even boxes, got {volumes[0].shape[0]}")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("Simulating particles", total=n)
        _, optics, truth = write_simulation(
            o,
            volumes,
            pixel_size,
            n,
            snr,
            [fraction, 1.0 - fraction],
            progress=lambda done: progress.update(task, completed=done),
            conditions=conditions,
            seed=seed,
            batch_size=batch_size,
        )
    counts = np.bincount(truth["rlnClassNumber"].to_numpy(), minlength=3)[1:]
    console.print(f"Wrote {n} particles ({counts[0]} of class 1, {counts[1]} of class 2) to {o}")
    if ceiling:
        with mrcfile.mmap(o / "particles.mrcs", mode="r") as mrc:
            accuracy = ceiling_accuracy(mrc.data, volumes, truth, optics, batch_size, conditions)
        console.print(f"Ceiling accuracy (true maps, poses, CTF and noise level): {accuracy:.3f}")


def main() -> None:
    """Console entry point."""
    sys.exit(run_app(app, "relion_graphsplit_simulate"))


if __name__ == "__main__":
    main()
