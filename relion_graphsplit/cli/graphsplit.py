"""relion_graphsplit: split a refined particle set into two classes with the graph method.

Example (from the RELION project directory)::

    relion_graphsplit --i Refine3D/job012/run_data.star --o GraphSplit/ --j 4

As a RELION External job the same options come with RELION's names (--in_parts, --in_3dref,
--in_mask, --pipeline_control). This module only reads the command line, so that --help comes at
once; the run itself is job.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

from relion_graphsplit.method.options import MIN_WORKING_BOX, CtfCorrection, SplitOptions

PLAIN = {"add_completion": False, "rich_markup_mode": None, "pretty_exceptions_enable": False}
"""Plain-text help and errors, as RELION's programs print them: the same for every command."""
app = typer.Typer(**PLAIN, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
DEFAULTS = SplitOptions()


@app.command(help="Classify a refined particle set with the graph method (thesis chapter 4): how many classes it supports, and which particle is which.", epilog="Files, conventions and what the program promises about them: README.md.")
def graphsplit(
    ctx: typer.Context,
    i: Path = typer.Option(..., "--i", "--in_parts", help="Refined particle STAR file (RELION 3.0 to 5.0: angles, origins, CTF)."),
    o: str = typer.Option(..., "--o", help="Output folder; made if needed. Inputs are never written; the outputs of an earlier run in it are replaced as a whole when this run succeeds."),
    mask: Path | None = typer.Option(None, "--mask", "--in_mask", help="3D mask (MRC, values from 0 to 1) to focus on. Default: a soft mask drawn around the consensus map; the graph split's mask is written to run_mask.mrc."),
    ref: Path | None = typer.Option(None, "--ref", "--in_3dref", help="Consensus map (MRC). Default: reconstructed from the particles."),
    sym: str = typer.Option(DEFAULTS.symmetry, "--sym", help="Point group of the particle (C1, Cn, Dn, T, O, I)."),
    angular_sampling: float | None = typer.Option(None, "--angular_sampling", min=0.5, max=90.0, show_default="from the particle count", help="Degrees between cone axes; by default about --particles_per_cone particles per cone, 5 to 25 degrees."),
    cone_angle: float | None = typer.Option(None, "--cone_angle", min=0.5, max=90.0, show_default="the sampling", help="Cone half-aperture in degrees (neighbouring cones overlap)."),
    particles_per_cone: int = typer.Option(DEFAULTS.particles_per_cone, "--particles_per_cone", min=10, help="Target particles per cone of the default sampling."),
    maxres: float = typer.Option(DEFAULTS.maxres, "--maxres", min=0.1, help=f"Resolution (A) the images are downsampled to for the analysis, keeping at least {MIN_WORKING_BOX} pixels (docs/benchmarks.md, 'The working box')."),
    resize: int | None = typer.Option(None, "--resize", min=8, help="Working box in pixels, any size (overrides --maxres)."),
    ctf_correction: CtfCorrection = typer.Option(DEFAULTS.ctf_correction.value, "--ctf_correction", help="CTF correction before the principal component (docs/method.md)."),
    whiten: bool = typer.Option(DEFAULTS.whiten, "--whiten/--no_whiten", help="Whiten images and CTFs by the noise spectrum of their residuals to the consensus (real images carry more noise at low frequencies; used with the subtracting CTF corrections)."),
    mask_threshold: float = typer.Option(DEFAULTS.mask_threshold, "--mask_threshold", min=0.01, max=0.99, help="Default mask of the graph split: threshold as a fraction of the maximum of the consensus map low-passed to 15 A (lower it if the variable part is weak in the consensus)."),
    refine_mask_threshold: float = typer.Option(DEFAULTS.refine_mask_threshold, "--refine_mask_threshold", min=0.0, max=0.99, help="Default mask of the refinement: the same, around the larger of the two first class maps at each voxel (0: the graph split's mask)."),
    mask_extend: float = typer.Option(DEFAULTS.mask_extend, "--mask_extend", min=0.0, help="Default masks: extension (A) beyond the threshold, before a 6 A soft edge."),
    n_classes: str = typer.Option("auto", "--K", help="Number of classes: 'auto' keeps every split that, learnt on one half-set, shows two modes or more in the other (docs/method.md, 'How many classes'); a number N splits the largest class, untested, until there are N."),
    max_classes: int = typer.Option(DEFAULTS.max_classes, "--max_K", min=1, help="Most classes --K auto may find."),
    refine_iter: int = typer.Option(DEFAULTS.refine_iterations, "--refine_iter", min=0, help="At most this many rounds of fixed-pose classification against the class maps after each graph split, stopping once fewer than 0.25% of the particles change class (0: the graph split alone)."),
    particle_diameter: float | None = typer.Option(None, "--particle_diameter", show_default="80% of the box", help="Particle diameter (A) for the printed RELION Class3D command."),
    seed: int = typer.Option(DEFAULTS.seed, "--random_seed", "--seed", help="Seed of the max-cut rounding and of the half sets drawn where rlnRandomSubset is absent; the result depends on it alone."),
    j: int = typer.Option(1, "--j", min=1, help="Threads (torch, and the BLAS under numpy and scipy); the result does not depend on them."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch_size", min=1, help="Images per batch at the particles' box (bounds the memory used); the passes over the downsampled images take batches of as many pixels."),
    scratch_dir: Path | None = typer.Option(None, "--scratch_dir", show_default="inside --o", help="Existing folder for the temporary working-size images, CTFs and transforms (about 10 bytes per particle and working pixel, removed at the end); on a cluster, a node's local disk ($TMPDIR) spares the shared file system, except with --dask_scheduler, whose workers write and read them: then it must be on a file system every worker sees."),
    gpu: str | None = typer.Option(None, "--gpu", show_default="the CPU", help="Run the heavy steps (the images' preparation, the per-cone classification, the refinement, the class maps) on a GPU through torch, a batch of --batch_size images at a time: --gpu alone the first GPU, --gpu 1 the GPU of id 1. One GPU is used: of RELION's lists (\"0:1\", \"0,1\") the first id; with --dask_scheduler each worker uses the GPU of that id on its own node. The classes are the CPU run's, the posteriors the same to rounding. Needs torch with CUDA."),
    dask_scheduler: str | None = typer.Option(None, "--dask_scheduler", show_default="this process alone", help="Run the passes over the particles (the images' reading, centring and CTF correction, the per-cone classification, the refinement's sums and likelihoods, the class maps' insertions) on the workers of an existing Dask cluster: its scheduler's address (tcp://host:8786) or scheduler file (dask scheduler --scheduler-file, dask-jobqueue, dask-mpi). The workers need relion_graphsplit installed and must see the particle stacks and --o (or --scratch_dir); the classes are the same as in one process, the class maps the same to the last bits of their sums. Needs the dask extra (pip install 'relion-graphsplit[dask]')."),
    pipeline_control: str | None = typer.Option(None, "--pipeline_control", help="Given by RELION to an External job: the run then leaves RELION's exit marker and output nodes in --o (as it does in any directory holding default_pipeline.star)."),
    resume: bool = typer.Option(False, "--continue", help="Continue the run in --o that was killed or interrupted (Ctrl-C, SIGTERM) before it finished: the stages it finished (the working-size images, the classification, the class maps) are kept, and the result is an uninterrupted run's. Refused, with one line saying what changed, where an input or an option that changes the result differs (--j, --scratch_dir, --dask_scheduler, --gpu and --pipeline_control may); without --continue a run starts afresh."),
) -> None:
    if not o.strip():
        raise typer.BadParameter("is empty: name the output folder", param_hint="--o")
    if Path(o).exists() and not Path(o).is_dir():
        raise typer.BadParameter(f"{o} exists and is not a directory", param_hint="--o")
    if scratch_dir is not None and not scratch_dir.is_dir():
        raise typer.BadParameter(f"{scratch_dir} is not an existing directory", param_hint="--scratch_dir")
    if particle_diameter is not None and not particle_diameter > 0:
        raise typer.BadParameter(f"{particle_diameter:g} A: a diameter is positive", param_hint="--particle_diameter")
    if n_classes != "auto" and not (n_classes.isdigit() and int(n_classes) >= 1):
        raise typer.BadParameter(f"{n_classes!r}: 'auto' or a whole number of classes, at least 1", param_hint="--K")
    if ctx.args:
        print(f"Ignoring unknown arguments: {' '.join(ctx.args)}")
    device = None if gpu is None else gpu_device(gpu)
    options = SplitOptions(
        symmetry=sym, angular_sampling=angular_sampling, cone_angle=cone_angle,
        particles_per_cone=particles_per_cone, maxres=maxres, resize=resize,
        ctf_correction=ctf_correction, whiten=whiten, mask_threshold=mask_threshold,
        refine_mask_threshold=refine_mask_threshold, mask_extend=mask_extend,
        refine_iterations=refine_iter, batch_size=batch_size, seed=seed,
        n_classes=None if n_classes == "auto" else int(n_classes), max_classes=max_classes,
    )  # fmt: skip
    from relion_graphsplit.cli import job  # torch and the rest, once the options are known to be good

    job.run(
        i, Path(o), options, mask, ref, particle_diameter, j, scratch_dir, pipeline_control, resume, dask_scheduler,
        device,
    )  # fmt: skip


def gpu_device(ids: str) -> str:
    """The torch device of RELION's --gpu ids: "" (--gpu alone) the first GPU, else the first id of a
    list such as "1", "0:1" or "0,1" (ranks are separated by colons, threads by commas).

    Parameters
    ----------
    ids : str
        --gpu's value.

    Returns
    -------
    str
        "cuda:N".

    Raises
    ------
    typer.BadParameter
        Where the first id is not a whole number.
    """
    first = re.split("[:,]", ids.strip())[0].strip() or "0"
    if not first.isdigit():
        raise typer.BadParameter(f"{ids!r}: GPU ids are whole numbers, as in --gpu 0 or --gpu \"0:1\"", param_hint="--gpu")
    return f"cuda:{int(first)}"


def _bare_gpu(args: list[str]) -> list[str]:
    """`args` with an empty value after a --gpu given none (last, or followed by an option), as RELION
    takes --gpu alone: the parser wants a value for every option that takes one."""
    out = []
    for index, arg in enumerate(args):
        out.append(arg)
        if arg == "--gpu" and (index + 1 == len(args) or args[index + 1].startswith("-")):
            out.append("")
    return out


def run_app(command: typer.Typer, name: str, args: list[str] | None = None, interrupted: str = "interrupted") -> int:
    """Run a command on `args` (default the command line) and return its exit code.

    Errors come as one line each, as RELION's programs print them; the process is not exited here.

    Parameters
    ----------
    command : typer.Typer
        The command's app.
    name : str
        The program's name, as usage and help show it.
    args : list of str or None
        The arguments, without the program's name; None: sys.argv[1:].
    interrupted : str
        The line printed on stderr when the command is interrupted.

    Returns
    -------
    int
        0 done, 1 an error (one line on stderr), 2 a usage error (one line, 'error: ...'), 130
        interrupted (the line `interrupted`).
    """
    try:
        code = command(args=args, prog_name=name, standalone_mode=False)  # a typer.Exit's code, else None
    except typer.TyperException as err:  # click's usage errors
        print(f"error: {' '.join(err.format_message().split())}", file=sys.stderr)
        code = 2
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    if code == 130:  # typer turns a KeyboardInterrupt into this code, silently
        print(interrupted, file=sys.stderr)
    return code or 0


def run_command(args: list[str] | None = None) -> int:
    """relion_graphsplit on `args` (default the command line); its exit code (run_app).

    A usage error (code 2) in a RELION External job still leaves RELION_JOB_EXIT_FAILURE in --o, or
    the job would seem to run for ever.

    Parameters
    ----------
    args : list of str or None
        The arguments, without the program's name; None: sys.argv[1:].

    Returns
    -------
    int
        The exit code: 0, 1, 2 or 130 (`run_app`).
    """
    args = _bare_gpu(sys.argv[1:] if args is None else args)
    code = run_app(app, "relion_graphsplit", args)
    if code == 2:
        _mark_failed(args)
    return code


def _mark_failed(args: list[str] | None) -> None:
    """A usage error in a RELION External job still leaves RELION_JOB_EXIT_FAILURE, or the job would
    seem to run for ever."""
    args = sys.argv[1:] if args is None else args
    if "--o" in args[:-1] and ("--pipeline_control" in args or Path("default_pipeline.star").exists()):
        from relion_graphsplit.relion.external import ExternalJob

        out = args[args.index("--o") + 1]
        if out.strip() and not Path(out).is_file():
            ExternalJob(Path(out), active=True).fail()


def main() -> None:
    """Console entry point: relion_graphsplit on the command line.

    Raises
    ------
    SystemExit
        Always, with `run_command`'s exit code.
    """
    sys.exit(run_command())
