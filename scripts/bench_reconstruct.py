"""Time our reconstruction against `relion_reconstruct --ctf` on the same particles, and compare the maps.

Particles are made by RELION itself (relion_project --ctf --add_noise) from a map of sharp Gaussian
blobs, with random poses, defocus and origins. Both programs read the images from the same stack; our
time includes reading the STAR file and the stack, computing the CTFs and writing the map.

    python scripts/bench_reconstruct.py                       # 6000 particles of 80^2
    python scripts/bench_reconstruct.py --n 2000 --box 64 --sym D2

Each program runs --repeats times, in rounds; the best and median wall times and the CPU time of the
best run are printed (on a shared machine the best run is the least disturbed one).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from relion_graphsplit.cli.launch import THREAD_WAITING

# The console commands' thread waiting (relion_graphsplit/cli/launch.py), before numpy and torch load: the
# times are those of the program. A setting of your own wins.
os.environ.update({name: value for name, value in THREAD_WAITING.items() if name not in os.environ})

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from relion_graphsplit.fourier.ctf import CTFParams, ctf_2d
from relion_graphsplit.fourier.fsc import fsc
from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.fourier.reconstruct import FourierAccumulator


def blob_map(box: int, rng: np.random.Generator, n_blobs: int = 12) -> np.ndarray:
    """An asymmetric map (box^3, float32) of sharp Gaussian blobs, so that it has signal up to Nyquist."""
    k = np.arange(box) - box // 2
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    vol = np.zeros((box, box, box), np.float32)
    for _ in range(n_blobs):
        cx, cy, cz = rng.uniform(-box / 4, box / 4, 3)
        s = rng.uniform(1.0, 2.0)
        vol += rng.uniform(0.5, 1.0) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return vol


def write_poses(path: Path, n: int, box: int, apix: float, rng: np.random.Generator) -> None:
    """A RELION 3.1 particle STAR file with random poses, defocus and origins (images named later)."""
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [apix],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    du = rng.uniform(8000, 30000, n)
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@poses.mrcs" for i in range(n)],
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginXAngst": rng.uniform(-5, 5, n) * apix,
            "rlnOriginYAngst": rng.uniform(-5, 5, n) * apix,
            "rlnDefocusU": du,
            "rlnDefocusV": du - rng.uniform(0, 1500, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnOpticsGroup": 1,
        }
    )
    starfile.write({"optics": optics, "particles": parts}, path, overwrite=True)


def reconstruct_star(star_path: Path, batch_size: int, sym: str) -> np.ndarray:
    """Our reconstruction of a RELION particle STAR file, reading the stack batch by batch."""
    blocks = starfile.read(star_path, always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    box = int(optics["rlnImageSize"].iloc[0])
    names = parts["rlnImageName"].str.split("@", expand=True)
    index = names[0].astype(int).to_numpy() - 1
    col = lambda c: torch.tensor(parts[c].to_numpy(), dtype=torch.float64)  # noqa: E731
    rotations = euler_to_matrix(col("rlnAngleRot"), col("rlnAngleTilt"), col("rlnAnglePsi"))
    origins = torch.stack([col("rlnOriginXAngst"), col("rlnOriginYAngst")], dim=1) / apix
    n = len(parts)
    const = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    params = CTFParams(
        col("rlnDefocusU"),
        col("rlnDefocusV"),
        col("rlnDefocusAngle"),
        const(optics["rlnVoltage"].iloc[0]),
        const(optics["rlnSphericalAberration"].iloc[0]),
        const(optics["rlnAmplitudeContrast"].iloc[0]),
        const(0.0),
        const(0.0),
        const(1.0),
    )
    acc = FourierAccumulator(box)
    with mrcfile.mmap(star_path.parent / names[1].iloc[0], mode="r") as stack:
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            images = torch.from_numpy(np.asarray(stack.data[index[sl]], dtype=np.float32))
            acc.insert(images, rotations[sl], ctf=ctf_2d(params[sl], box, apix), origins=origins[sl])
    return acc.finalise(sym=sym).numpy()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6000, help="number of particles")
    parser.add_argument("--box", type=int, default=80, help="box size (pixels)")
    parser.add_argument("--apix", type=float, default=1.5, help="pixel size (A)")
    parser.add_argument("--noise", type=float, default=0.5, help="relion_project --white_noise")
    parser.add_argument("--sym", default="C1", help="point group for both reconstructions")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--j", type=int, default=2, help="relion_reconstruct --j")
    parser.add_argument(
        "--torch-threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time ours with"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each program")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep the particles and maps here (default: a temp dir)")
    args = parser.parse_args()

    if shutil.which("relion_project") is None or shutil.which("relion_reconstruct") is None:
        raise SystemExit("needs relion_project and relion_reconstruct on PATH")
    rng = np.random.default_rng(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_reconstruct_"))
    work.mkdir(parents=True, exist_ok=True)

    with mrcfile.new(work / "map.mrc", overwrite=True) as m:
        m.set_data(blob_map(args.box, rng))
        m.voxel_size = args.apix
    write_poses(work / "poses.star", args.n, args.box, args.apix, rng)
    project = ["relion_project", "--i", "map.mrc", "--o", "parts", "--ang", "poses.star", "--ctf"]
    if args.noise > 0:
        project += ["--add_noise", "--white_noise", str(args.noise)]
    subprocess.run(project, cwd=work, check=True, capture_output=True)

    def run_ours(threads: int) -> None:
        torch.set_num_threads(threads)
        vol = reconstruct_star(work / "parts.star", args.batch_size, args.sym)
        with mrcfile.new(work / "ours.mrc", overwrite=True) as m:
            m.set_data(vol)
            m.voxel_size = args.apix

    programs: dict[str, Callable[[], object]] = {}
    for name, extra in (("relion", []), ("relion_skip_gridding", ["--skip_gridding"])):
        cmd = ["relion_reconstruct", "--i", "parts.star", "--o", f"{name}.mrc", "--ctf", "--sym", args.sym]
        cmd += ["--j", str(args.j), *extra]
        programs[name] = lambda cmd=cmd: subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    for threads in args.torch_threads:
        programs[f"ours_{threads}"] = lambda threads=threads: run_ours(threads)

    # Rounds of one run of each program, so that a busy spell of a shared machine hits all of them.
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in programs.items():
            cpu0 = time.process_time() + _children_cpu()
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
            timings[name].append((wall, time.process_time() + _children_cpu() - cpu0))
    ours = mrcfile.read(work / "ours.mrc")

    print(
        f"{args.n} particles of {args.box}^2, sym {args.sym}, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after"
    )
    labels = {
        "relion": f"relion_reconstruct --ctf --j {args.j}",
        "relion_skip_gridding": f"relion_reconstruct --ctf --j {args.j} --skip_gridding",
    }
    for threads in args.torch_threads:
        labels[f"ours_{threads}"] = f"ours, {threads} torch thread(s) (read+CTF+insert+finalise+write)"
    for name, label in labels.items():
        walls = [w for w, _ in timings[name]]
        best = min(timings[name])
        print(
            f"{label:62s} best {best[0]:6.2f} s (CPU {best[1]:6.2f} s), "
            f"median {statistics.median(walls):6.2f} s over {len(walls)} runs"
        )
    cut = int(0.8 * (args.box // 2))
    for name in ("relion", "relion_skip_gridding"):
        curve = fsc(torch.from_numpy(ours), torch.from_numpy(mrcfile.read(work / f"{name}.mrc"))).numpy()
        shells = " ".join(f"{v:.4f}" for v in curve[:: max(1, len(curve) // 10)])
        print(f"FSC(ours, {name}): min to 0.8 Nyquist {curve[1 : cut + 1].min():.4f}; every few shells: {shells}")
    print(f"files in {work}")


if __name__ == "__main__":
    main()
