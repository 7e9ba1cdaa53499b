"""One run of relion_graphsplit: the inputs read and checked, the split and the class maps, every
output written into the run folder's staging area and moved into place together (run_files.folder), the
RELION markers; the command line itself is cli.graphsplit.

The long steps are stages saved in the staging folder as each finishes (run_files.stages): the images
prepared at the working size, the classification, the class maps. A run with --continue keeps those of
the run that died in the folder and does the rest; the outputs, cheap, are always written anew.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from threadpoolctl import threadpool_limits

from relion_graphsplit import __version__
from relion_graphsplit.engine import CPU, Compute, Engine, connect
from relion_graphsplit.fourier.symmetry import symmetry_matrices
from relion_graphsplit.method.classmaps import ClassMaps, reconstruct_classes, write_class_maps
from relion_graphsplit.method.masks import resample_volume
from relion_graphsplit.method.options import FLAGS, SplitOptions
from relion_graphsplit.method.pipeline import SplitResult, prepare, split_prepared
from relion_graphsplit.method.progress import Track
from relion_graphsplit.relion import star as star_io
from relion_graphsplit.relion.external import ExternalJob
from relion_graphsplit.relion.model_star import MODEL_NAME, next_command, write_model_star
from relion_graphsplit.relion.mrc import read_mrc, write_mrc
from relion_graphsplit.relion.stacks import ImageStacks
from relion_graphsplit.run_files.folder import STAGING_NAME, FolderBusy, RunFolder, check_inputs_outside
from relion_graphsplit.run_files.stages import FINGERPRINT_NAME, Fingerprint, fingerprint
from relion_graphsplit.run_files.write import (
    classified_particles,
    noise_description,
    noise_spectrum,
    write_diagnostics,
    write_particles,
    write_summary,
)

MASK_NAME = "run_mask.mrc"  # the 3D mask the split used, at the particles' box
# The stages a run saves (run_files.stages), by name, as a continued run names those it kept.
STAGES = {"images": "the images prepared", "classes": "the classification", "class_maps": "the class maps"}
console = Console(stderr=False, highlight=False)
error_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


@dataclass
class _Inputs:
    """What a run reads before it writes anything: the particles, their warnings, the maps given."""

    ps: star_io.ParticleSet  # as read, with its path
    particles: star_io.Particles  # parsed once from `ps`
    warnings: list[str]
    mask: torch.Tensor | None  # (N, N, N) at the particles' box and pixel size
    consensus: torch.Tensor | None


def run(
    i: Path, o: Path, options: SplitOptions, mask: Path | None, ref: Path | None, particle_diameter: float | None,
    j: int, scratch_dir: Path | None, pipeline_control: str | None, resume: bool = False,
    dask_scheduler: str | None = None, device: str | None = None,
) -> None:
    """Split the particles `i` into the folder `o` (cli.graphsplit has checked the options' ranges).

    The inputs are read and checked before anything is written; an output folder that would replace an
    input is refused; the split and the class maps run with the folder's lock held, each saved in its
    staging folder as it finishes, every output goes there too and all are committed into `o`
    together. Raises typer.Exit(1) after one line on stderr for bad input, a failed write or a run
    that cannot be continued, typer.BadParameter for an unusable map or point group; where the run is
    a RELION job, exactly one exit marker is left.

    Parameters
    ----------
    i : Path
        The refined particle STAR file (RELION 3.0 to 5.0).
    o : Path
        The output folder.
    options : SplitOptions
        The split's parameters.
    mask : Path or None
        3D mask (MRC, values from 0 to 1) at the particles' box and pixel size; None: drawn around the
        consensus map.
    ref : Path or None
        Consensus map (MRC) at the particles' box and pixel size; None: reconstructed from the particles.
    particle_diameter : float or None
        Particle diameter (A) for the printed RELION Class3D command; None: 80% of the box.
    j : int
        Threads for torch and for the BLAS under numpy and scipy.
    scratch_dir : Path or None
        Existing folder in which the working files get a folder of their own; None: the staging folder.
    pipeline_control : str or None
        RELION's --pipeline_control: given, RELION's markers and output nodes are written; None, they
        are where default_pipeline.star is in the current directory.
    resume : bool
        --continue: keep the stages finished by the run that died in `o`, whose inputs and options
        must be these (run_files.folder.RunFolder).
    dask_scheduler : str or None
        --dask_scheduler: a Dask scheduler's address or scheduler file, whose workers take the passes
        over the particles (`engine.connect`; the same result); None: this process alone. The workers
        read the working files, so these must be on a file system they see.
    device : str or None
        --gpu: the torch device the heavy steps compute on ("cuda:1"; `engine.Compute`), or
        "cpu-torch", the GPU's way on the CPU (for tests); None: the CPU. Like the thread count, not
        part of the fingerprint: a continued run may change it.

    Raises
    ------
    typer.Exit
        Code 1, after one line on stderr (error: ..., noting a full disk), for a STAR file error, a
        ValueError (a run that cannot be continued, or a Dask scheduler that cannot be reached, included:
        run_files.folder.FolderError, engine.connect), an OSError
        or a busy folder (FolderBusy), or after RELION asked the job to abort (`Aborted`; the aborted
        marker instead of the failure marker).
    typer.BadParameter
        For a point group (--sym) or map (--mask, --ref) that cannot be used, or a GPU (--gpu) that
        torch does not see.
    KeyboardInterrupt
        Ctrl-C or SIGTERM; re-raised, as is any other exception, after the failure marker.
    """
    job = ExternalJob(o, active=True if pipeline_control else None)
    start = time.perf_counter()
    try:
        compute = _compute(device)
        inputs = _read_inputs(i, mask, ref, options.symmetry, j)
        return_free_memory()
        with ImageStacks(inputs.ps) as stacks, connect(dask_scheduler) as engine:
            check_inputs_outside(o, [path for path in (i, ref, mask) if path] + stacks.paths)
            with RunFolder(o, _fingerprint(i, mask, ref, options, stacks.paths), resume) as folder:
                job.started()
                result, class_maps = _classify(inputs, stacks, options, folder, scratch_dir, job, engine, compute)
                nodes, command, table = _write_outputs(folder, inputs, result, class_maps, options, particle_diameter, j)
                # The report reads the run back from its files: the particle table, the memberships and
                # the maps are let go first (about 0.5 GB at a million particles).
                del inputs, result, class_maps
                return_free_memory()
                report_warnings = _report_and_commit(folder, job, nodes, table, start)
        job.succeed()
        _print_after(o, report_warnings, command)
    except Aborted as err:
        error_console.print(f"{err}")
        job.aborted()
        raise typer.Exit(1) from None
    except (star_io.StarFileError, ValueError, OSError, FolderBusy) as err:  # bad input, a file that cannot be read or written
        full = " (the disk holding --o or --scratch_dir is full)" if getattr(err, "errno", None) == errno.ENOSPC else ""
        error_console.print(f"error: {one_line(err)}{full}")
        job.fail()
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: cli.graphsplit says so
        job.fail()
        if (o / STAGING_NAME / FINGERPRINT_NAME).is_file():
            error_console.print("the steps finished are kept: the same command with --continue resumes after them")
        raise
    except BaseException:
        job.fail()
        raise


def one_line(err: BaseException | str) -> str:
    """An error's message on one line (an OSError's names its file).

    Parameters
    ----------
    err : BaseException or str
        The error, or its message.

    Returns
    -------
    str
        str(err) with every run of whitespace (line breaks included) made one space, ends stripped.
    """
    return " ".join(str(err).split())


def return_free_memory() -> bool:
    """Hand the memory that the C heap holds free back to the system, between a run's steps.

    glibc keeps what the libraries free for reuse, so after reading the STAR file and classifying
    100000 particles the process held 0.28 GB of free heap (its resident memory grew with the particle
    count; docs/notes/speed-history.md, "Free heap returned between steps"). malloc_trim(0) returns it
    (a few milliseconds). Elsewhere than glibc nothing is done.

    Returns
    -------
    bool
        Whether malloc_trim was called (glibc only).
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def _compute(device: str | None) -> Compute:
    """The Compute of a run's device (`run`): the CPU for None; a GPU only where torch sees it."""
    if device is None:
        return CPU
    compute = Compute.named(device)
    if compute.device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if compute.device.index >= count:
            seen = f"sees {count} GPU{'s' if count != 1 else ''}" if count else "sees no GPU (a build without CUDA, or no driver)"
            message = f"GPU {compute.device.index} asked for, but torch {torch.__version__} {seen}"
            raise typer.BadParameter(message, param_hint="--gpu")
    return compute


def _read_inputs(i: Path, mask: Path | None, ref: Path | None, symmetry: str, j: int) -> _Inputs:
    """Read and check everything the run needs before it writes anything."""
    try:
        symmetry_matrices(symmetry)
    except ValueError as err:
        raise typer.BadParameter(one_line(err), param_hint="--sym") from None
    torch.set_num_threads(j)
    threadpool_limits(j)  # the BLAS under numpy and scipy
    ps = star_io.read_particles(i)
    warnings = star_io.check_values(ps)
    particles = star_io.particles(ps)
    mask_volume = _read_mask(mask, particles.box, particles.pixel_size) if mask else None
    consensus = _read_consensus(ref, particles.box, particles.pixel_size) if ref else None
    return _Inputs(ps, particles, warnings, mask_volume, consensus)


def _fingerprint(i: Path, mask: Path | None, ref: Path | None, options: SplitOptions, stacks: list[Path]) -> Fingerprint:
    """The run's fingerprint (run_files.stages.fingerprint): the split's options by their flags, shown
    as typed ("default" where left to the program)."""

    def shown(value) -> str:
        return "default" if value is None else str(value.value if isinstance(value, enum.Enum) else value)

    settings = {FLAGS.get(name, name): shown(value) for name, value in vars(options).items()}
    return fingerprint(settings, i, mask, ref, stacks)


def _classify(
    inputs: _Inputs, stacks: ImageStacks, options: SplitOptions, folder: RunFolder, scratch_dir: Path | None,
    job: ExternalJob, engine: Engine, compute: Compute,
) -> tuple[SplitResult, ClassMaps | None]:
    """The split and the class maps, with progress bars, each a stage of the run: kept where a
    continued run finds it finished, else done and saved; the split's passes over the particles on
    `engine`, the heavy steps on `compute`'s device."""
    ps = inputs.ps
    apix = inputs.particles.pixel_size
    console.print(f"relion_graphsplit {__version__}: {len(ps.particles)} particles, box {stacks.box}, {apix:.3f} A/px")
    for warning in inputs.warnings:
        console.print(f"warning: {warning}", soft_wrap=True)
    work = folder.work_folder(scratch_dir)  # the prepared images' stage is saved beside their files
    if folder.resume:
        kept = [words for name, words in STAGES.items() if folder.stages.finished(name, work if name == "images" else None)]
        console.print(f"continuing the interrupted run in {folder.out}: keeping {', '.join(kept) or 'nothing'}", soft_wrap=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        track = _progress_tracker(progress, job)
        result = folder.stages.run("classes", lambda: _split(inputs, stacks, options, folder, work, track, engine, compute))
        return_free_memory()
        start = time.perf_counter()
        class_maps = folder.stages.run(
            "class_maps", lambda: _class_maps(inputs, stacks, result, options, track, engine, compute)
        )
        result.timings["class maps"] = time.perf_counter() - start
    result.warnings[:0] = inputs.warnings
    if class_maps is None:
        result.warnings.append("a class holds fewer than 2 particles: no class maps were made")
    return result, class_maps


def _split(
    inputs: _Inputs, stacks: ImageStacks, options: SplitOptions, folder: RunFolder, work: Path, track: Track,
    engine: Engine, compute: Compute,
) -> SplitResult:
    """The images prepared and classified (pipeline.prepare, split_prepared, on `engine` and `compute`);
    the prepared images a stage saved in `work` beside their files (a stage whose files are lost is not
    finished)."""
    prepared = folder.stages.run(
        "images",
        lambda: prepare(inputs.particles, stacks, options, work, inputs.mask, inputs.consensus, track, engine, compute),
        where=work,
    )
    return_free_memory()
    return split_prepared(inputs.particles, prepared, work, options, track, engine, compute)


def _class_maps(
    inputs: _Inputs, stacks: ImageStacks, result: SplitResult, options: SplitOptions, track: Track, engine: Engine,
    compute: Compute,
) -> ClassMaps | None:
    """The class and half maps at the particles' box, inserted on `engine`; None where a class holds
    fewer than 2 particles."""
    if np.bincount(result.classes, minlength=result.n_classes + 1)[1:].min() < 2:
        return None
    return reconstruct_classes(
        inputs.particles, stacks, result.classes, sym=options.symmetry, seed=options.seed,
        batch_size=options.batch_size, compute=compute, track=track, engine=engine,
    )  # fmt: skip


def _write_outputs(
    folder: RunFolder, inputs: _Inputs, result, class_maps, options: SplitOptions, particle_diameter, j: int
) -> tuple[list[tuple[Path, str]], str | None, Table]:
    """Every output but the report into the staging folder, named by its final path where one file
    names another. Returns RELION's output nodes, the RELION command to print (None for one class) and
    the summary table to print."""
    o, staging, ps = folder.out, folder.staging, inputs.ps
    box, apix = inputs.particles.box, inputs.particles.pixel_size
    t = time.perf_counter()
    table = classified_particles(ps, result)
    used_mask = inputs.mask if inputs.mask is not None else resample_volume(result.mask, box)
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
        if result.n_classes >= 2:  # one class: nothing for a Class3D to do
            command = next_command(o, o / "run_data.star", diameter, j, class_maps.resolution, sym=options.symmetry)
    write_particles(staging, ps, table)
    del table  # a copy of the particle table (0.3 GB a million particles): not held while the report runs
    write_diagnostics(staging, result)
    result.timings["write"] = time.perf_counter() - t
    summary = {
        "version": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "command": " ".join(sys.argv), "input": str(inputs.ps.path), "particles": len(ps.particles),
        "box": box, "pixel_size": apix, "working_box": result.working_box,
        "working_pixel_size": result.working_pixel_size, "sampling": result.sampling,
        "cone_angle": result.cone_angle, "cones": len(result.cone_table),
        "graph_components": len(result.components), "sync_method": result.sync_method,
        "sync_gap": result.sync_gap,
        "noise_contrast": result.noise_contrast,
        "whitened": result.whitened,
        "noise": noise_description(result.noise_contrast, result.whitened),
        "noise_spectrum": noise_spectrum(result),
        "refine_changes": result.refine_changes,
        "class_resolution": [float(r) for r in class_maps.resolution] if class_maps else None,
        "next_command": command,
        "K": result.n_classes,
        "K_requested": options.n_classes or "auto",
        "max_K": options.max_classes,
        "verdict": result.verdict,
        "split_tests": [test.as_dict() for test in result.split_tests],
        "classes": [
            {"class": k, "node": node, "particles": int((result.classes == k).sum())}
            for k, node in enumerate(result.class_nodes, start=1)
        ],
        "class_sizes": {str(k): int((result.classes == k).sum()) for k in range(1, result.n_classes + 1)},
        "options": vars(options), "timings": result.timings, "warnings": result.warnings,
        "peak_memory_mb": peak_memory_mb(),
    }  # fmt: skip
    write_summary(staging, summary)
    return nodes, command, _summary_table(result, len(ps.particles))


def _report_and_commit(folder: RunFolder, job, nodes: list[tuple[Path, str]], table: Table, start: float) -> list[str]:
    """The report from the staged files, RELION's output nodes, then the commit; prints the summary
    table with the report's time and the total. Returns the report's warnings."""
    t = time.perf_counter()
    from relion_graphsplit.report import write_report  # matplotlib and plotly, loaded when needed

    report_warnings = write_report(folder.staging, shown_as=folder.out)
    table.add_row("time: report", f"{time.perf_counter() - t:.1f} s")
    job.outputs(nodes, folder.staging)
    if job.abort_requested():  # the last moment a run can stop with its folder as it was
        raise Aborted("RELION asked the job to abort")
    folder.commit()
    table.add_row("time: total", f"{time.perf_counter() - start:.1f} s")
    console.print(table)
    return report_warnings


def _print_after(o: Path, report_warnings: list[str], command: str | None) -> None:
    for warning in report_warnings:
        console.print(f"warning: {warning}", soft_wrap=True)
    console.print(f"Report: {o / 'report.html'}")
    if command:
        console.print("Next, a fixed-pose Class3D in RELION seeded with the class maps:")
        console.print(command, soft_wrap=True, markup=False, highlight=False)


def _summary_table(result, n: int) -> Table:
    """The run's summary for the terminal, its steps' times so far."""
    table = Table(title="Graph split", show_header=False)
    table.add_row("particles", str(n))
    table.add_row("cones", f"{len(result.cone_table)} ({result.sampling:.1f} deg sampling, {result.cone_angle:.1f} deg cones)")
    table.add_row("particles per cone (median)", f"{int(result.cone_table['particles'].median())}")
    table.add_row("graph components", str(len(result.components)))
    table.add_row("noise", noise_description(result.noise_contrast, result.whitened))
    table.add_row("classes", result.verdict)
    for test in result.split_tests:
        gain = ", ".join(f"{g:.3f}" if np.isfinite(g) else "not measured" for g in test.gain)
        verdict = "kept" if test.kept else "not kept"
        table.add_row(f"split of {test.node}", f"{verdict}: {test.reason} (gain {gain}; threshold {test.threshold:.3f})")
    for k in range(1, result.n_classes + 1):
        count = int((result.classes == k).sum())
        table.add_row(f"class {k}", f"{count} ({100 * count / max(n, 1):.1f}%)")
    for step, seconds in result.timings.items():
        table.add_row(f"time: {step}", f"{seconds:.1f} s")
    return table


class Aborted(RuntimeError):
    """The run was asked to stop (RELION's RELION_JOB_ABORT_NOW).

    Raised by the progress bars before each item and once more just before the commit, the last
    moment a run can stop with its folder as it was; `run` prints its message, leaves RELION's aborted
    marker and raises typer.Exit(1).
    """


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
        raise typer.BadParameter(f"{what}: {one_line(err)}") from None
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


def peak_memory_mb() -> float:
    """This process's peak resident memory (MiB): VmHWM where Linux gives it.

    getrusage's ru_maxrss is not used there: a process started by fork and exec inherits the parent's
    peak in it, so a run started from a large process (a benchmark, a notebook) reported that
    process's memory.

    Returns
    -------
    float
        VmHWM of /proc/self/status (kB) / 1024; where it cannot be read, ru_maxrss / 1024 (ru_maxrss
        is in kB on Linux, in bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
