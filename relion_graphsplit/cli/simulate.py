"""relion_graphsplit_simulate: a particle set of K >= 1 states with known truth, from maps or atomic models.

Examples::

    relion_graphsplit_simulate --map1 test_data/adk_open.mrc --map2 test_data/adk_closed.mrc \
        --n 5000 --snr 0.03 --pose_error 1 --o sim/

    # three states of one model, by the chains present, in shares 50/30/20:
    relion_graphsplit_simulate --pdb test_data/structures/1BD2.pdb.gz --chains all --chains A,C,D,E \
        --chains A,B,C --fractions 0.5,0.3,0.2 --box 64 --angpix 3 --n 6000 --snr 0.05 --o sim3/

    # a homogeneous set (K = 1):
    relion_graphsplit_simulate --map test_data/adk_open.mrc --n 4000 --snr 0.05 --o sim1/
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from relion_graphsplit.cli.graphsplit import PLAIN, run_app
from relion_graphsplit.relion.mrc import read_mrc

console = Console(highlight=False)
app = typer.Typer(**PLAIN)

MODELS_NEED_GEMMI = "reading atomic models needs gemmi: pip install 'relion-graphsplit[models]'"
ALL_CHAINS = "all"
"""The --chains value that keeps every chain of the model."""
STATES_HOW = "give the states as --map1 and --map2, as --pdb1 and --pdb2, or as repeated --map or --pdb"


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
    """'A,C,D' -> ['A', 'C', 'D']; None or 'all' -> None (every chain)."""
    if text is None or text.strip().lower() == ALL_CHAINS:
        return None
    return [c.strip() for c in text.split(",") if c.strip()]


def _fractions(text: str | None, fraction: float | None, states: int) -> list[float]:
    """Each state's share (K,), summing to 1: from --fractions, from --fraction (two states), or equal.

    Parameters
    ----------
    text : str or None
        --fractions, comma-separated shares of classes 1..K, non-negative, summing to 1 within 0.01
        (then normalised).
    fraction : float or None
        --fraction, the share of class 1 of two states.
    states : int
        K, the number of states given.

    Returns
    -------
    list of float
        K shares summing to 1.
    """
    if text is not None and fraction is not None:
        raise typer.BadParameter("give --fraction (two states) or --fractions, not both", param_hint="--fractions")
    if fraction is not None:
        if states != 2:
            raise typer.BadParameter(f"--fraction is for two states, got {states}: use --fractions", param_hint="--fraction")
        return [fraction, 1.0 - fraction]
    if text is None:
        return [1.0 / states] * states
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of numbers", param_hint="--fractions") from None
    if len(shares) != states:
        raise typer.BadParameter(f"{len(shares)} fraction(s) for {states} state(s)", param_hint="--fractions")
    if not all(np.isfinite(shares)) or min(shares) < 0 or abs(sum(shares) - 1.0) > 0.01:
        raise typer.BadParameter(f"'{text}': the fractions are non-negative and sum to 1", param_hint="--fractions")
    return [s / sum(shares) for s in shares]


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


def _maps_from_files(
    paths: list[Path], options: list[str], box: int | None, angpix: float | None
) -> tuple[list[np.ndarray], float]:
    """The K maps (N, N, N) [z, y, x] and their pixel size (A; `angpix` if given, else the first header's).

    Parameters
    ----------
    paths : list of Path
        One MRC map per state, in class order.
    options : list of str
        The option that gave each (for the messages).
    box : int or None
        --box, which must be the maps' size when given.
    angpix : float or None
        --angpix, which overrides the headers' pixel size.
    """
    read = [_read_map(path, option) for path, option in zip(paths, options)]
    shapes = [v.shape for v, _ in read]
    first = shapes[0]
    if any(s != first for s in shapes) or len(first) != 3 or first[0] != first[1] or first[1] != first[2]:
        raise typer.BadParameter(f"the maps must be cubic and of one size, got {', '.join(map(str, shapes))}")
    sizes = [p for _, p in read]
    if any(abs(p - sizes[0]) > 1e-3 * sizes[0] for p in sizes):
        raise typer.BadParameter(f"the maps have different pixel sizes ({', '.join(f'{p:g}' for p in sizes)} A)")
    if box is not None and box != first[0]:
        raise typer.BadParameter(f"--box {box} but the maps are {first[0]}^3 (resample them first)")
    return [v for v, _ in read], angpix if angpix is not None else sizes[0]


def _maps_from_models(
    paths: list[Path],
    chains: list[str | None],
    options: list[str],
    superpose_core: bool,
    core_residues: str,
    box: int | None,
    angpix: float | None,
    bfactor: float,
) -> tuple[list[np.ndarray], float]:
    """The K maps (box, box, box) [z, y, x] of atomic models, all centred on the centre of mass of the
    K models together (so that they share one frame), and `angpix`.

    Parameters
    ----------
    paths, chains, options : list
        Per state: the model file, the chains kept ('A,C,D', or None / 'all' for all) and the option
        that gave the file (for the messages).
    superpose_core : bool
        Superpose every model but the last onto the last by the CA atoms of `core_residues` first.
    core_residues : str
        Residue ranges, '1-29,60-121'.
    box, angpix : int, float
        The maps' box (pixels) and pixel size (A); both needed.
    bfactor : float
        B-factor (A^2) of every atom.
    """
    atomic_maps = _atomic_maps()
    if box is None or angpix is None:
        raise typer.BadParameter("--box and --angpix are needed to make maps from atomic models")
    models = [_read_model(path, c, option) for path, c, option in zip(paths, chains, options)]
    if superpose_core:
        if len(models) < 2:
            raise typer.BadParameter("--superpose_core needs two models or more")
        for k, model in enumerate(models[:-1], start=1):
            rmsd = atomic_maps.superpose(model, models[-1], _ranges(core_residues))
            console.print(f"Superposed model {k} onto model {len(models)} on {core_residues}: CA RMSD {rmsd:.2f} A")
    center = atomic_maps.center_of_mass(*models)
    volumes = [atomic_maps.density_from_model(m, box, angpix, bfactor, center) for m in models]
    return volumes, angpix


def _states(
    map1: Path | None,
    map2: Path | None,
    maps: list[Path],
    pdb1: Path | None,
    pdb2: Path | None,
    chains1: str | None,
    chains2: str | None,
    pdbs: list[Path],
    chains: list[str],
) -> tuple[str, list[Path], list[str | None], list[str]]:
    """The states asked for: ('maps' or 'models', a file per state, chains per state, option names).

    One --pdb with several --chains makes one state per --chains, all from that file; several --pdb
    take one --chains each (or none: all chains).
    """
    forms = [
        map1 is not None or map2 is not None,
        bool(maps),
        pdb1 is not None or pdb2 is not None,
        bool(pdbs),
    ]
    if sum(forms) != 1:
        raise typer.BadParameter(STATES_HOW)
    if chains and not pdbs:
        raise typer.BadParameter("--chains goes with --pdb (--chains1 and --chains2 with --pdb1 and --pdb2)")
    if forms[0]:
        if map1 is None or map2 is None:
            raise typer.BadParameter("give --map1 and --map2 (or one --map for a homogeneous set)")
        return "maps", [map1, map2], [None, None], ["--map1", "--map2"]
    if forms[1]:
        return "maps", list(maps), [None] * len(maps), ["--map"] * len(maps)
    if forms[2]:
        if pdb1 is None or pdb2 is None:
            raise typer.BadParameter("give --pdb1 and --pdb2 (or one --pdb for a homogeneous set)")
        return "models", [pdb1, pdb2], [chains1, chains2], ["--pdb1", "--pdb2"]
    if len(pdbs) == 1 and len(chains) > 1:
        pdbs = pdbs * len(chains)
    if chains and len(chains) != len(pdbs):
        raise typer.BadParameter(
            f"{len(pdbs)} --pdb and {len(chains)} --chains: give one --chains per --pdb, or one --pdb and a --chains per state"
        )
    return "models", list(pdbs), list(chains) if chains else [None] * len(pdbs), ["--pdb"] * len(pdbs)


@app.command(
    help=(
        "Simulate a RELION 3.1 particle set of K >= 1 states (classes) with known truth. Give two maps "
        "(--map1, --map2) or two atomic models (--pdb1, --pdb2), or any number of states with repeated "
        "--map, or repeated --pdb (or one --pdb with a --chains per state), and their shares with "
        "--fractions. Writes particles.mrcs, particles.star (poses with the given errors, as a consensus "
        "refinement would report them), truth.star (true poses and rlnClassNumber 1..K) and class1.mrc "
        "... classK.mrc to --o."
    )
)
def main_command(
    o: Path = typer.Option(..., "--o", help="Output directory (created if needed)."),
    map1: Path | None = typer.Option(None, "--map1", exists=True, dir_okay=False, help="Map (MRC) of class 1 (of two)."),
    map2: Path | None = typer.Option(
        None, "--map2", exists=True, dir_okay=False, help="Map (MRC) of class 2, same box and pixel size."
    ),
    maps: list[Path] = typer.Option(
        [], "--map", exists=True, dir_okay=False, metavar="<file>",
        help="Map (MRC) of one state; repeat for each, in class order (one --map: a homogeneous set). Same box and pixel size."
    ),
    pdb1: Path | None = typer.Option(
        None, "--pdb1", exists=True, dir_okay=False, help="Atomic model (PDB/mmCIF, may be gzipped) of class 1 (of two)."
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
    pdbs: list[Path] = typer.Option(
        [], "--pdb", exists=True, dir_okay=False, metavar="<file>",
        help="Atomic model of one state; repeat for each, in class order, or give one --pdb and a --chains per state."
    ),
    chains: list[str] = typer.Option(
        [], "--chains", metavar="<str>",
        help="Chains to keep of each --pdb state, in order, comma-separated, or 'all': e.g. --chains all --chains A,C,D,E --chains A,B,C."
    ),
    superpose_core: bool = typer.Option(
        False, "--superpose_core", "--superpose-core",
        help="Superpose every model but the last onto the last on the CA atoms of --core_residues first."
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
    fraction: float | None = typer.Option(
        None, "--fraction", min=0.0, max=1.0, show_default="0.5",
        help="Fraction of particles in class 1, with two states."
    ),
    fractions: str | None = typer.Option(
        None, "--fractions", show_default="equal shares",
        help="Share of each state, comma-separated in class order, summing to 1: e.g. 0.5,0.3,0.2."
    ),
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
    kind, paths, state_chains, options = _states(map1, map2, maps, pdb1, pdb2, chains1, chains2, pdbs, chains)
    shares = _fractions(fractions, fraction, len(paths))
    if defocus_min > defocus_max:
        raise typer.BadParameter(f"--defocus_min ({defocus_min}) is above --defocus_max ({defocus_max})")
    from relion_graphsplit.simulate.particles import Conditions, bayes_accuracy, write_simulation  # torch: after the options

    conditions = Conditions(
        defocus_range=(defocus_min, defocus_max), astigmatism=astigmatism, voltage=voltage, cs=cs, q0=q0,
        bfactor=ctf_bfactor, max_shift_A=max_shift, pose_error_deg=pose_error, shift_error_A=shift_error,
        noise_excess=noise_excess, noise_bfactor=noise_bfactor,
    )
    if kind == "maps":
        volumes, pixel_size = _maps_from_files(paths, options, box, angpix)
    else:
        try:
            volumes, pixel_size = _maps_from_models(
                paths, state_chains, options, superpose_core, core_residues, box, angpix, bfactor
            )
        except ValueError as error:  # a chain that is not there, a model larger than the box
            raise typer.BadParameter(str(error)) from None
    if volumes[0].shape[0] % 2:
        raise typer.BadParameter(f"RELION particles have even boxes, got {volumes[0].shape[0]}")

    # The ceiling's likelihoods are taken as the images are made: the stack is never read back.
    log_likelihoods = np.empty((n, len(volumes))) if ceiling else None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("Simulating particles", total=n)
        _, _, truth = write_simulation(
            o,
            volumes,
            pixel_size,
            n,
            snr,
            shares,
            progress=lambda done: progress.update(task, completed=done),
            conditions=conditions,
            seed=seed,
            batch_size=batch_size,
            log_likelihoods=log_likelihoods,
        )
    counts = np.bincount(truth["rlnClassNumber"].to_numpy(), minlength=len(volumes) + 1)[1:]
    per_class = ", ".join(f"{c} of class {k}" for k, c in enumerate(counts, start=1))
    console.print(f"Wrote {n} particles ({per_class}) to {o}")
    if log_likelihoods is not None:
        accuracy = bayes_accuracy(log_likelihoods, truth)
        console.print(f"Ceiling accuracy (true maps, poses, CTF and noise level): {accuracy:.3f}")


def main() -> None:
    """Console entry point."""
    sys.exit(run_app(app, "relion_graphsplit_simulate"))


if __name__ == "__main__":
    main()
