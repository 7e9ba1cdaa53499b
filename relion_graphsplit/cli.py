"""`relion_graphsplit`: one program with RELION-style options, also callable as a RELION External job."""

from __future__ import annotations

import errno
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from threadpoolctl import threadpool_limits
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from relion_graphsplit import __version__, star_io
from relion_graphsplit.classmaps import reconstruct_classes, write_class_maps
from relion_graphsplit.external import ExternalJob
from relion_graphsplit.model_star import MODEL_NAME, next_command, write_model_star
from relion_graphsplit.masks import resample_volume
from relion_graphsplit.mrc_io import read_mrc, write_mrc
from relion_graphsplit.outputs import (
    classified_particles, noise_description, noise_spectrum, write_diagnostics, write_particles, write_summary,
)
from relion_graphsplit.pipeline import SplitOptions, split
from relion_graphsplit.preprocess import MIN_WORKING_BOX, CtfCorrection
from relion_graphsplit.run_folder import FolderBusy, RunFolder, check_inputs_outside
from relion_graphsplit.stack import ImageStacks
from relion_graphsplit.symmetry import symmetry_matrices

MASK_NAME = "run_mask.mrc"  # the 3D mask the split used, at the particles' box
console = Console(stderr=False, highlight=False)
error_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
app = typer.Typer(add_completion=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})


class Aborted(RuntimeError):
    """The run was asked to stop (RELION's RELION_JOB_ABORT_NOW)."""


def _progress_tracker(progress: Progress, job: ExternalJob):
    def track(iterable, description: str = "", total: int | None = None):
        task = progress.add_task(description, total=total)
        done = 0
        for item in iterable:
            if job.abort_requested():
                raise Aborted("RELION asked the job to abort")
            yield item
            done += 1
            progress.advance(task)
        progress.update(task, total=done)  # an iterable that ends early (converged) ends its bar full

    return track


def _read_map(path: Path, box: int, pixel_size: float, what: str) -> torch.Tensor:
    try:
        volume, apix = read_mrc(path)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(f"{what}: {_one_line(err)}") from None
    if volume.shape != (box, box, box):
        raise typer.BadParameter(f"{what} {path} is {volume.shape}, the particles are {box}^3")
    if abs(apix - pixel_size) > 1e-3 * pixel_size and apix > 0:
        raise typer.BadParameter(f"{what} {path} has pixel size {apix:.4f} A, the particles {pixel_size:.4f} A")
    if not np.isfinite(volume).all():
        raise typer.BadParameter(f"{what} {path} holds values that are not finite numbers")
    return torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))


def _read_consensus(path: Path, box: int, pixel_size: float) -> torch.Tensor:
    """A consensus map: not one value everywhere (an empty map gives no projection to work with)."""
    volume = _read_map(path, box, pixel_size, "consensus map")
    if volume.min() == volume.max():
        raise typer.BadParameter(f"consensus map {path} holds the value {float(volume.min()):g} everywhere")
    return volume


def _read_mask(path: Path, box: int, pixel_size: float) -> torch.Tensor:
    """A 3D mask as RELION takes it: values from 0 (ignored) to 1 (kept), some of them above 0."""
    mask = _read_map(path, box, pixel_size, "mask")
    low, high = float(mask.min()), float(mask.max())
    if low < -1e-3 or high > 1.001:
        raise typer.BadParameter(f"mask {path} has values from {low:.3g} to {high:.3g}: a mask runs from 0 to 1")
    if high <= 0:
        raise typer.BadParameter(f"mask {path} is empty (no value above 0)")
    return mask.clamp(0.0, 1.0)


@app.command(help="Split a refined particle set into two classes with the graph method (thesis chapter 4).")
def run(
    ctx: typer.Context,
    i: Optional[Path] = typer.Option(None, "--i", "--in_parts", help="Refined particle STAR file (angles, origins, CTF)."),
    o: str = typer.Option(..., "--o", help="Output directory (created; inputs are never modified; the outputs of an earlier run in it are replaced as a whole when this run succeeds)."),
    mask: Optional[Path] = typer.Option(None, "--mask", "--in_mask", help="3D mask (MRC, values from 0 to 1) to focus on; default: a soft mask drawn around the consensus map. The mask used is written to run_mask.mrc."),
    mask_threshold: float = typer.Option(0.1, "--mask_threshold", min=0.01, max=0.99, help="Default mask for the graph split: threshold as a fraction of the maximum of the consensus map low-passed to 15 A (lower it if the variable part is weak in the consensus)."),
    refine_mask_threshold: float = typer.Option(0.3, "--refine_mask_threshold", min=0.0, max=0.99, help="Default mask for the refinement: the same, drawn around the larger of the two first class maps at each voxel (0: refine with the graph split's mask)."),
    mask_extend: float = typer.Option(3.0, "--mask_extend", min=0.0, help="Default masks: extension (A) beyond the threshold, before a 6 A soft edge."),
    ref: Optional[Path] = typer.Option(None, "--ref", "--in_3dref", help="Consensus map (MRC); default: reconstructed from the particles."),
    sym: str = typer.Option("C1", "--sym", help="Point group of the particle (C1, Cn, Dn, T, O, I)."),
    angular_sampling: Optional[float] = typer.Option(None, "--angular_sampling", min=0.5, max=90.0, help="Degrees between cone axes; default: chosen from the particle count to put about --particles_per_cone particles in each cone."),
    cone_angle: Optional[float] = typer.Option(None, "--cone_angle", min=0.5, max=90.0, help="Cone half-aperture in degrees; default: the sampling (neighbouring cones overlap)."),
    particles_per_cone: int = typer.Option(600, "--particles_per_cone", min=10, help="Target particles per cone for the automatic sampling."),
    maxres: float = typer.Option(10.0, "--maxres", min=0.1, help=f"Resolution (A) the images are downsampled to for the analysis, keeping at least {MIN_WORKING_BOX} pixels (small boxes are analysed at a finer resolution: docs/benchmarks.md)."),
    resize: Optional[int] = typer.Option(None, "--resize", min=8, help="Working box in pixels, any size (overrides --maxres)."),
    ctf_correction: CtfCorrection = typer.Option(CtfCorrection.subtract_multiply, "--ctf_correction", help="CTF correction before the principal component (see docs/method.md)."),
    whiten: bool = typer.Option(True, "--whiten/--no_whiten", help="Whiten images and CTFs by the noise spectrum of their residuals to the consensus before the analysis (real images carry more noise at low frequencies; see docs/method.md). Used with the subtracting CTF corrections."),
    refine_iter: int = typer.Option(30, "--refine_iter", min=0, help="At most this many rounds of fixed-pose classification against the two class maps after the graph split, stopping once fewer than 0.25% of the particles change class (0: the graph split alone; used with --ctf_correction subtract-multiply on particles that are not CTF-premultiplied)."),
    particle_diameter: Optional[float] = typer.Option(None, "--particle_diameter", help="Particle diameter (A) for the printed RELION Class3D command; default 80% of the box."),
    seed: int = typer.Option(0, "--random_seed", "--seed", help="Seed of the max-cut rounding (results are deterministic for a seed)."),
    j: int = typer.Option(1, "--j", min=1, help="Threads (torch, and the BLAS under numpy and scipy)."),
    batch_size: int = typer.Option(256, "--batch_size", min=1, help="Images per batch (bounds the memory used)."),
    scratch_dir: Optional[Path] = typer.Option(None, "--scratch_dir", help="Existing folder for the temporary working-size images, CTFs and transforms (about 10 bytes per particle and working pixel, removed at the end); default: inside --o. On a cluster, a node's local disk (e.g. $TMPDIR) spares the shared file system."),
    pipeline_control: Optional[str] = typer.Option(None, "--pipeline_control", help="Given by RELION to an External job: the run then writes RELION's exit markers and output nodes in --o (as it does in any folder holding default_pipeline.star)."),
) -> None:
    job = ExternalJob(Path(o), active=True if pipeline_control else None)
    start = time.perf_counter()
    try:
        if ctx.args:
            console.print(f"Ignoring unknown arguments: {' '.join(ctx.args)}")
        if i is None:
            raise typer.BadParameter("give the particles with --i (or --in_parts)")
        if not o.strip():
            raise typer.BadParameter("is empty: name the output folder", param_hint="--o")
        o = Path(o)
        if o.exists() and not o.is_dir():
            raise typer.BadParameter(f"{o} exists and is not a directory", param_hint="--o")
        if scratch_dir is not None and not scratch_dir.is_dir():
            raise typer.BadParameter(f"{scratch_dir} is not an existing directory", param_hint="--scratch_dir")
        if particle_diameter is not None and not particle_diameter > 0:
            raise typer.BadParameter(f"{particle_diameter:g} A: a diameter is positive", param_hint="--particle_diameter")
        try:
            symmetry_matrices(sym)
        except ValueError as err:
            raise typer.BadParameter(_one_line(err), param_hint="--sym") from None
        torch.set_num_threads(j)
        threadpool_limits(j)  # the BLAS under numpy and scipy
        ps = star_io.read_particles(i)
        warnings = star_io.check_values(ps)
        box, apix = star_io.image_size(ps), star_io.pixel_size(ps)
        mask_volume = _read_mask(mask, box, apix) if mask else None
        consensus = _read_consensus(ref, box, apix) if ref else None
        options = SplitOptions(
            symmetry=sym, angular_sampling=angular_sampling, cone_angle=cone_angle,
            particles_per_cone=particles_per_cone, maxres=maxres, resize=resize,
            ctf_correction=ctf_correction, whiten=whiten, mask_threshold=mask_threshold,
            refine_mask_threshold=refine_mask_threshold, mask_extend=mask_extend,
            refine_iterations=refine_iter, batch_size=batch_size, seed=seed,
        )
        with ImageStacks(ps) as stacks:
            check_inputs_outside(o, [i, *([ref] if ref else []), *([mask] if mask else []), *stacks.paths])
            with RunFolder(o) as folder:
                job.started()
                run_folder = _run_in(
                    folder, job, ps, stacks, options, mask_volume, consensus, scratch_dir, particle_diameter, j, i,
                    warnings, start,
                )  # fmt: skip
        job.succeed()
        _print_after(o, run_folder)
    except Aborted as err:
        error_console.print(f"{err}")
        job.aborted()
        raise typer.Exit(1)
    except (star_io.StarFileError, ValueError, OSError, FolderBusy) as err:  # bad input, a file that cannot be read or written
        full = " (the disk holding --o or --scratch_dir is full)" if getattr(err, "errno", None) == errno.ENOSPC else ""
        error_console.print(f"error: {_one_line(err)}{full}")
        job.fail()
        raise typer.Exit(1)
    except KeyboardInterrupt:
        error_console.print("interrupted: the output folder is as it was before the run")
        job.fail()
        raise
    except BaseException:
        job.fail()
        raise


def _one_line(err: BaseException) -> str:
    """An error's message on one line (an OSError's names its file)."""
    return " ".join(str(err).split())


def _run_in(folder, job, ps, stacks, options, mask_volume, consensus, scratch_dir, particle_diameter, j, i, warnings, start):
    """The split, the class maps and every output, written into the folder's staging area and
    committed together. Returns what the closing lines print."""
    o, staging = folder.out, folder.staging
    box, apix = stacks.box, star_io.pixel_size(ps)
    scratch = staging
    if scratch_dir is not None:
        scratch = Path(tempfile.mkdtemp(prefix="graphsplit_", dir=scratch_dir))
        folder.use_scratch(scratch)
    console.print(f"relion_graphsplit {__version__}: {len(ps.particles)} particles, box {box}, {apix:.3f} A/px")
    for warning in warnings:
        console.print(f"warning: {warning}", soft_wrap=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        track = _progress_tracker(progress, job)
        result = split(ps, stacks, options, mask=mask_volume, consensus=consensus, scratch_dir=scratch, track=track)
        result.warnings[:0] = warnings
        t = time.perf_counter()
        class_maps = None
        if np.bincount(result.classes, minlength=3)[1:].min() >= 2:
            class_maps = reconstruct_classes(ps, stacks, result.classes, sym=options.symmetry, seed=options.seed, batch_size=options.batch_size, track=track)
        else:
            result.warnings.append("a class holds fewer than 2 particles: no class maps were made")
        result.timings["class maps"] = time.perf_counter() - t
    t = time.perf_counter()
    table = classified_particles(ps, result)
    used_mask = mask_volume if mask_volume is not None else resample_volume(result.mask, box)
    write_mrc(staging / MASK_NAME, used_mask.numpy(), apix)
    nodes = [(o / "run_data.star", "particles"), (o / MASK_NAME, "mask")]
    command = None
    if class_maps is not None:
        table["rlnRandomSubset"] = class_maps.subsets
        nodes += [(o / path.name, kind) for path, kind in write_class_maps(staging, class_maps)]
        write_model_star(
            staging / MODEL_NAME, [path for path, kind in nodes if kind == "map"], class_maps.distribution,
            class_maps.resolution, class_maps.fsc, class_maps.completeness, box, apix,
            average_pmax=float(np.mean(result.probability)),
        )  # fmt: skip
        diameter = particle_diameter or 0.8 * box * apix
        command = next_command(o, o / "run_data.star", diameter, j, class_maps.resolution, sym=options.symmetry)
    write_particles(staging, ps, table)
    write_diagnostics(staging, result)
    result.timings["write"] = time.perf_counter() - t
    summary = {
        "version": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "command": " ".join(sys.argv), "input": str(i), "particles": len(ps.particles),
        "box": box, "pixel_size": apix, "working_box": result.working_box,
        "working_pixel_size": result.working_pixel_size, "sampling": result.sampling,
        "cone_angle": result.cone_angle, "cones": int(result.cones.n_cones),
        "graph_components": len(result.components), "sync_method": result.sync_method,
        "sync_gap": result.sync_gap,
        "noise_contrast": result.noise_contrast,
        "whitened": result.whitened,
        "noise": noise_description(result.noise_contrast, result.whitened),
        "noise_spectrum": noise_spectrum(result),
        "refine_changes": result.refine_changes,
        "class_resolution": [float(r) for r in class_maps.resolution] if class_maps else None,
        "next_command": command,
        "class_sizes": {str(k): int((result.classes == k).sum()) for k in (1, 2)},
        "options": vars(options), "timings": result.timings, "warnings": result.warnings,
        "peak_memory_mb": peak_memory_mb(),
    }  # fmt: skip
    write_summary(staging, summary)
    t = time.perf_counter()
    from relion_graphsplit.report import write_report  # matplotlib and plotly, loaded when needed

    report_warnings = write_report(staging, shown_as=o)
    result.timings["report"] = time.perf_counter() - t
    job.outputs(nodes, staging)
    if job.abort_requested():  # the last moment a run can stop with its folder as it was
        raise Aborted("RELION asked the job to abort")
    folder.commit()
    _print_summary(result, len(ps.particles), time.perf_counter() - start)
    return report_warnings, command


def _print_after(o: Path, run_folder) -> None:
    report_warnings, command = run_folder
    for warning in report_warnings:
        console.print(f"warning: {warning}", soft_wrap=True)
    console.print(f"Report: {o / 'report.html'}")
    if command:
        console.print("Next, a fixed-pose Class3D in RELION seeded with the class maps:")
        console.print(command, soft_wrap=True, markup=False, highlight=False)


def _print_summary(result, n: int, total: float) -> None:
    table = Table(title="Graph split", show_header=False)
    table.add_row("particles", str(n))
    table.add_row("cones", f"{result.cones.n_cones} ({result.sampling:.1f} deg sampling, {result.cone_angle:.1f} deg cones)")
    table.add_row("particles per cone (median)", f"{int(np.median(result.cones.counts().numpy()))}")
    table.add_row("graph components", str(len(result.components)))
    table.add_row("noise", noise_description(result.noise_contrast, result.whitened))
    for k in (1, 2):
        count = int((result.classes == k).sum())
        table.add_row(f"class {k}", f"{count} ({100 * count / max(n, 1):.1f}%)")
    for step, seconds in result.timings.items():
        table.add_row(f"time: {step}", f"{seconds:.1f} s")
    table.add_row("time: total", f"{total:.1f} s")
    console.print(table)


def run_command(args: list[str] | None = None) -> int:
    """Run the program on `args` (default the command line) and return its exit code: 0 done, 1 an
    error (one line on stderr), 2 a usage error (one line), 130 interrupted."""
    try:
        code = app(args=args, standalone_mode=False)  # a typer.Exit's code, else None
    except typer.TyperException as err:  # click's usage errors
        error_console.print(f"error: {_one_line(err.format_message())}")
        code = 2
    except (KeyboardInterrupt, typer.Abort):
        error_console.print("interrupted")
        code = 130
    except SystemExit as exit_:
        code = exit_.code
    if code is not None and not isinstance(code, int):
        error_console.print(str(code))
        code = 1
    return code or 0


def main() -> None:
    """Console entry point."""
    sys.exit(run_command())


def peak_memory_mb() -> float:
    """This process's peak resident memory (MiB): VmHWM where Linux gives it. getrusage's ru_maxrss
    is not used there: a process started by fork and exec inherits the parent's peak in it, so a run
    started from a large process (a benchmark, a notebook) reported that process's memory."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
