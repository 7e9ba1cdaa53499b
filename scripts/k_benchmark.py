"""How many classes: the graph split's K (--K auto) against the truth, and its accuracy against RELION's
Class3D given the true K, on simulated sets of 1 to 4 states. Run on demand, not in CI.

For each set: simulate it with relion_graphsplit_simulate (the set's flags in SETS below), reconstruct
the consensus map with relion_reconstruct (the input both programs get), then in the same run
- the graph split (`relion_graphsplit --i particles.star --o graphsplit/ --ref consensus.mrc`, K found
  by the program), timed;
- RELION Class3D with fixed poses and the TRUE K (scripts/benchmark.py's command, `--K <true K>
  --skip_align --iter 25`, fixed --random_seed), timed, unless --no-relion;
- the ceiling: the accuracy of the Bayes classifier that knows the true maps, poses, CTF and noise
  (argmax over the K classes).
One JSON line per set is appended to OUT/results.jsonl: the set, true K, the K the graph split found
(run_summary.json's "K" and "split_tests"; before the program reports them, the number of classes in
its run_data.star), accuracy (best one-to-one matching of labels, unmatched classes wrong) and ARI of
both programs, the ceiling, both wall times, and calibration: among the particles whose
rlnMaxValueProbDistribution lies in [0.85, 0.95], the fraction labelled right (for both programs). A
Markdown table of all the sets in results.jsonl ends the run.

    python scripts/k_benchmark.py --out kbench_out --j 2                      # every set (1-1.5 h on 2 cores)
    python scripts/k_benchmark.py --out kbench_out --homogeneous-only --no-relion
    python scripts/k_benchmark.py --out kbench_out --sets adk-3state-snr0.05,homo01-adk_open-snr0.1-err1 \\
        --n 600 --box 32 --iter 2 --j 2                                        # a quick check that it runs
    python scripts/k_benchmark.py --list                                       # the sets and their flags

The sets (SETS; --sets picks them by name, --list prints them with their simulator flags):
- `homoNN-*`: 20 homogeneous sets (K = 1) of adenylate kinase open, closed (test_data/adk_*.mrc) and
  1BD2 (all chains), SNR 0.02-0.1, RMS pose errors of 1, 2 and 3 degrees with shift errors of 0.5, 1
  and 1.5 A, each with its own seed: "K = 1 in at least 19 of 20" is the test.
- scripts/benchmark.py's twelve two-class sets under their names there (`adk-snr0.1-50`, ...), the same
  particles as that script makes with its default seed at the same --n (6000).
- `adk-3state-*`: adenylate kinase open, intermediate and closed. There is no model of an intermediate:
  it is made by interpolating the atom positions halfway between the open model (4AKE), superposed on
  the closed one (1AKE) by the core's CA atoms, and the closed model (simulate.models.interpolate_models),
  its map made as the bundled ones are (scripts/make_test_data.py: B 100, the two models' centre).
- `1bd2-3state-*`: 1BD2 whole, without chain B (beta-2 microglobulin, 12 kDa), without chains D and E
  (the T-cell receptor, 50 kDa); `1bd2-4state-*`: the four combinations of B and D+E present or absent.
- `1bd2-noDE-80-*`: 1BD2 whole in 80% of the particles, without chains D and E in 20%.
- `1bd2-noC-50-*`: a subtle difference, the Tax peptide (chain C, 9 residues, 1 kDa of 95) absent in
  half the particles, classified without a mask (the program's default). Here "right" is judged from
  the ceiling, not the true K: K = 2 is right when the ceiling is well above chance (at least halfway
  from chance to 1: 0.75 at 50/50), K = 1 when it is near chance (within a fifth of the way: 0.6 at
  50/50); in between both are right. A split of noise (K = 2 where K = 1 is the answer) is wrong.
Every set but the homogeneous ones has RMS pose errors of 1 degree and 0.5 A and shifts up to 4 A
(scripts/benchmark.py's CONDITIONS). Maps: adenylate kinase on a 128 A box (64 pixels of 2 A), 1BD2 on
192 A (64 pixels of 3 A; scripts/benchmark.py's sets keep its 80 pixels of 2.4 A); --box B keeps the
box's width in A and changes the pixel size. --n sets every set's particle count (default 6000).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (scripts/benchmark.py: its sets, maps, RELION command and helpers)

from relion_graphsplit.relion import star as star_io  # noqa: E402
from relion_graphsplit.relion.mrc import read_mrc, write_mrc  # noqa: E402
from relion_graphsplit.simulate.metrics import accuracy, adjusted_rand_index, matched_correct  # noqa: E402

# ---------------------------------------------------------------- the sets

COMMON = "--max_shift 4 --pose_error 1 --shift_error 0.5"
"""scripts/benchmark.py's CONDITIONS as simulator flags: shifts up to 4 A, pose errors 1 degree and 0.5 A."""
HOMOGENEOUS_MAPS = ("adk_open", "adk_closed", "1bd2")
HOMOGENEOUS_SNRS = (0.1, 0.05, 0.03, 0.02)
POSE_ERRORS = ((1.0, 0.5), (2.0, 1.0), (3.0, 1.5))
"""(RMS angle in degrees, RMS shift in A) of the homogeneous sets' pose errors."""
CALIBRATION_BAND = (0.85, 0.95)


@dataclass(frozen=True)
class KSet:
    """A simulated set: its name, relion_graphsplit_simulate's flags for it (maps as {placeholders},
    see MAP_MAKERS), how its right K is judged ("true": the number of maps; "ceiling": see the module
    docstring) and its default box (pixels)."""

    name: str
    flags: str
    judge: str = "true"
    box: int = 64

    @property
    def maps(self) -> list[str]:
        """The placeholders of the states' maps, in class order."""
        return re.findall(r"\{(\w+)\}", self.flags)

    @property
    def true_k(self) -> int:
        return len(self.maps)

    @property
    def group(self) -> str:
        if self.true_k == 1:
            return "homogeneous"
        return "subtle" if self.judge == "ceiling" else f"K={self.true_k}"


def _homogeneous_sets() -> list[KSet]:
    out = []
    for i in range(20):
        state, snr = HOMOGENEOUS_MAPS[i % 3], HOMOGENEOUS_SNRS[i % 4]
        degrees, shift = POSE_ERRORS[(i // 3) % 3]
        flags = f"--map {{{state}}} --snr {snr:g} --max_shift 4 --pose_error {degrees:g} --shift_error {shift:g} --seed {101 + i}"
        out.append(KSet(f"homo{i + 1:02d}-{state}-snr{snr:g}-err{degrees:g}", flags))
    return out


def _two_class_sets() -> list[KSet]:
    """scripts/benchmark.py's scenarios, as flags that make the same particles (its maps, its seed 1)."""
    out = []
    for sc in benchmark.scenarios():
        maps = "--map1 {adk_open} --map2 {adk_closed}" if sc.structure == "adk" else "--map1 {1bd2} --map2 {1bd2_noB}"
        box = 64 if sc.structure == "adk" else benchmark.BOX_1BD2
        out.append(KSet(sc.name, f"{maps} --fraction {sc.fraction:g} --snr {sc.snr:g} {COMMON} --seed 1", box=box))
    return out


ADK3 = "--map {adk_open} --map {adk_mid} --map {adk_closed} --fractions 0.4,0.3,0.3"
BD3 = "--map {1bd2} --map {1bd2_noB} --map {1bd2_noDE} --fractions 0.4,0.3,0.3"
BD4 = "--map {1bd2} --map {1bd2_noB} --map {1bd2_noDE} --map {1bd2_noBDE} --fractions 0.3,0.3,0.2,0.2"
NO_DE = "--map {1bd2} --map {1bd2_noDE}"
NO_C = "--map {1bd2} --map {1bd2_noC}"
SETS: dict[str, KSet] = {
    s.name: s
    for s in [
        *_homogeneous_sets(),
        *_two_class_sets(),
        KSet("adk-3state-snr0.05", f"{ADK3} --snr 0.05 {COMMON} --seed 1"),
        KSet("adk-3state-snr0.02", f"{ADK3} --snr 0.02 {COMMON} --seed 2"),
        KSet("1bd2-3state-snr0.05", f"{BD3} --snr 0.05 {COMMON} --seed 1"),
        KSet("1bd2-3state-snr0.02", f"{BD3} --snr 0.02 {COMMON} --seed 2"),
        KSet("1bd2-4state-snr0.05", f"{BD4} --snr 0.05 {COMMON} --seed 1"),
        KSet("1bd2-4state-snr0.02", f"{BD4} --snr 0.02 {COMMON} --seed 2"),
        KSet("1bd2-noDE-80-snr0.03", f"{NO_DE} --fractions 0.8,0.2 --snr 0.03 {COMMON} --seed 1"),
        KSet("1bd2-noC-50-snr0.3", f"{NO_C} --fractions 0.5,0.5 --snr 0.3 {COMMON} --seed 1", "ceiling"),
        KSet("1bd2-noC-50-snr0.03", f"{NO_C} --fractions 0.5,0.5 --snr 0.03 {COMMON} --seed 2", "ceiling"),
    ]
}
"""Every set by name. Map placeholders: adk_open, adk_closed, adk_mid; 1bd2 and 1bd2_noX (chains X absent)."""

# ---------------------------------------------------------------- the maps

ADK_WIDTH, BD2_WIDTH = 128.0, benchmark.BOX_1BD2 * benchmark.APIX_1BD2
"""Widths (A) of the adenylate kinase box (the bundled maps: 64 pixels of 2 A) and of the 1BD2 box (192 A)."""
BD2_CHAINS = {"1bd2": None, "1bd2_noB": "ACDE", "1bd2_noC": "ABDE", "1bd2_noDE": "ABC", "1bd2_noBDE": "AC"}
BD2_FILES = {"1bd2": "1bd2_full", "1bd2_noB": "1bd2_noB"}
"""File names shared with scripts/benchmark.py's class_maps (the same maps, made the same way)."""


def pixel_size_of(kset: KSet, box: int) -> float:
    """The set's pixel size (A) at `box` pixels: its structure's box width over the box."""
    return (ADK_WIDTH if kset.maps[0].startswith("adk") else BD2_WIDTH) / box


def make_map(key: str, cache: Path, box: int) -> Path:
    """The file of map `key` (a placeholder of SETS) at `box` pixels, made once in `cache`.

    Adenylate kinase: at 64 pixels the bundled open and closed maps; otherwise, and for the intermediate,
    made from the models as scripts/make_test_data.py makes the bundled ones (open superposed on closed
    by the core, B 100, both models' centre of mass at the box centre). 1BD2: the chains of BD2_CHAINS
    as scripts/benchmark.py's class_maps makes them (B 50, the whole model's centre of mass).
    """
    from relion_graphsplit.simulate import models  # gemmi, the [models] extra

    tag = "" if box == 64 else f"_box{box}"
    if key.startswith("adk"):
        if key in ("adk_open", "adk_closed") and box == 64:
            return benchmark.ROOT / "test_data" / f"{key}.mrc"
        path = cache / f"{key}{tag}.mrc"
        if not path.exists():
            open_model = models.read_model(benchmark.STRUCTURES / "adk_open.pdb")
            closed_model = models.read_model(benchmark.STRUCTURES / "adk_closed.pdb")
            models.superpose(open_model, closed_model, models.ADK_CORE_RESIDUES)
            centre = models.center_of_mass(open_model, closed_model)
            model = {"adk_open": open_model, "adk_closed": closed_model}.get(key)
            if model is None:
                model = models.interpolate_models(open_model, closed_model, 0.5)
            write_mrc(path, models.density_from_model(model, box, ADK_WIDTH / box, bfactor=100.0, center=centre), ADK_WIDTH / box)
        return path
    pixel_size = BD2_WIDTH / box
    tag = "" if (box, pixel_size) == (benchmark.BOX_1BD2, benchmark.APIX_1BD2) else f"_box{box}_{pixel_size:g}A"
    path = cache / f"{BD2_FILES.get(key, key)}{tag}.mrc"
    if not path.exists():
        full = models.read_model(benchmark.STRUCTURES / "1BD2.pdb.gz")
        chains = BD2_CHAINS[key]
        model = models.read_model(benchmark.STRUCTURES / "1BD2.pdb.gz", chains=None if chains is None else list(chains))
        volume = models.density_from_model(model, box, pixel_size, bfactor=50.0, center=models.center_of_mass(full))
        write_mrc(path, volume, pixel_size)
    return path


def simulator_flags(kset: KSet, cache: Path, box: int) -> list[str]:
    """relion_graphsplit_simulate's arguments for the set, its placeholders replaced by map files, and
    the pixel size (--angpix: not the maps' headers, which hold it as float32)."""
    flags = re.sub(r"\{(\w+)\}", lambda m: str(make_map(m.group(1), cache, box)), kset.flags)
    return [*shlex.split(flags), "--angpix", repr(pixel_size_of(kset, box))]


# ---------------------------------------------------------------- one set


def expected_k(kset: KSet, ceiling: float, chance: float) -> list[int]:
    """The answers judged right: [true K], or for a "ceiling" set [2], [1] or [1, 2] (module docstring)."""
    if kset.judge == "true":
        return [kset.true_k]
    gain = (ceiling - chance) / (1.0 - chance)
    return [2] if gain >= 0.5 else [1] if gain <= 0.2 else [1, 2]


def calibration(pred: np.ndarray, truth: np.ndarray, probability: np.ndarray) -> dict:
    """Among the particles whose probability lies in CALIBRATION_BAND: how many, and the fraction right
    (best matching of labels, metrics.matched_correct; None when there are none)."""
    band = (probability >= CALIBRATION_BAND[0]) & (probability <= CALIBRATION_BAND[1])
    right = matched_correct(pred, truth)[band]
    return {"n": int(band.sum()), "right": float(right.mean()) if band.any() else None}


def classification(star: Path, names: np.ndarray, truth: np.ndarray) -> dict:
    """Classes (and their probabilities) of a run_data.star, by image name, scored against the truth."""
    table = star_io.read_particles(star).particles.set_index("rlnImageName").loc[names]
    pred = table["rlnClassNumber"].to_numpy()
    out = {"accuracy": accuracy(pred, truth), "ari": adjusted_rand_index(pred, truth),
           "classes": int(len(np.unique(pred))), "class_sizes": np.bincount(pred).tolist()[1:]}  # fmt: skip
    if "rlnMaxValueProbDistribution" in table:
        out["calibration"] = calibration(pred, truth, table["rlnMaxValueProbDistribution"].to_numpy())
    return out


def timed(cmd: list[str], log: Path, cwd: Path) -> tuple[float | None, str | None]:
    """benchmark.run, which raises on failure: here (seconds, None), or (None, the error) for the row."""
    try:
        return benchmark.run(cmd, log, cwd=cwd), None
    except subprocess.CalledProcessError as error:
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        return None, f"exit code {error.returncode}: {' '.join(tail)}"


def run_set(kset: KSet, out: Path, n: int, box: int, j: int, iterations: int, relion: bool, relion_seed: int,
            graphsplit_args: list[str]) -> dict:  # fmt: skip
    """Simulate (once: kept while its flags, n and box stay), run both programs, return the row."""
    work = out / kset.name
    pixel_size = pixel_size_of(kset, box)
    spec = {"flags": kset.flags, "n": n, "box": box}
    spec_file = work / "set.json"
    if not spec_file.exists() or json.loads(spec_file.read_text()) != spec:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        sim = ["relion_graphsplit_simulate", *simulator_flags(kset, out, box), "--n", str(n), "--no_ceiling", "--o", str(work)]
        benchmark.run(sim, work / "simulate.log")
        spec_file.write_text(json.dumps(spec))
    truth_set = star_io.read_particles(work / "truth.star")
    names = truth_set.particles["rlnImageName"].to_numpy()
    truth = truth_set.particles["rlnClassNumber"].to_numpy()
    volumes = [read_mrc(work / f"class{k}.mrc")[0] for k in range(1, kset.true_k + 1)]
    conditions = dataclasses.replace(benchmark.CONDITIONS, noise_excess=0.0)  # the ceiling needs the noise colour only
    ceiling = benchmark.cached(work / "ceiling.json", lambda: benchmark.scenario_ceiling(work, volumes, truth_set, conditions))
    chance = float(np.bincount(truth).max() / len(truth))
    benchmark.consensus_map(work, j)
    row = {"set": kset.name, "group": kset.group, "flags": kset.flags, "n": n, "box": box, "pixel_size": pixel_size,
           "true_K": kset.true_k, "expected_K": expected_k(kset, ceiling, chance), "ceiling": ceiling,
           "chance": chance}  # fmt: skip

    split_dir = work / "graphsplit"
    shutil.rmtree(split_dir, ignore_errors=True)
    cmd = ["relion_graphsplit", "--i", "particles.star", "--o", "graphsplit/", "--ref", "consensus.mrc", "--j", str(j)]
    row["graphsplit_time"], row["graphsplit_error"] = timed([*cmd, *graphsplit_args], work / "graphsplit.log", work)
    if row["graphsplit_error"] is None:
        ours = classification(split_dir / "run_data.star", names, truth)
        summary = json.loads((split_dir / "run_summary.json").read_text())
        row["found_K"] = int(summary.get("K", ours["classes"]))
        row["found_K_from"] = "run_summary.json" if "K" in summary else "run_data.star"
        row["K_right"] = row["found_K"] in row["expected_K"]
        row["split_tests"] = summary.get("split_tests")
        row["graphsplit_peak_memory_mb"] = summary.get("peak_memory_mb")
        row.update({f"graphsplit_{key}": value for key, value in ours.items()})

    if relion:
        class3d = work / "class3d"
        shutil.rmtree(class3d, ignore_errors=True)
        class3d.mkdir()
        cmd = benchmark.class3d_command(box, pixel_size, iterations, j, relion_seed, k=kset.true_k)
        row["relion_time"], row["relion_error"] = timed(cmd, work / "class3d.log", work)
        if row["relion_error"] is None:
            theirs = classification(class3d / f"run_it{iterations:03d}_data.star", names, truth)
            row.update({f"relion_{key}": value for key, value in theirs.items()})
            row["relion_iterations"] = iterations
    row["machine"] = f"{platform.machine()}, j={j}"
    row["date"] = time.strftime("%Y-%m-%d")
    return row


# ---------------------------------------------------------------- the command


def main(
    out: Path = typer.Option(Path("kbench_out"), help="Working folder (maps, simulations, runs, results.jsonl)."),
    sets: str = typer.Option("", help="Comma-separated set names (default: all; --list shows them)."),
    homogeneous_only: bool = typer.Option(False, help="Only the homogeneous sets (K = 1)."),
    n: int = typer.Option(6000, help="Particles per set."),
    box: int | None = typer.Option(None, help="Box (pixels) of every set, the same width in A (default: each set's)."),
    j: int = typer.Option(2, help="Threads for both programs."),
    iterations: int = typer.Option(25, "--iter", help="RELION Class3D iterations."),
    relion: bool = typer.Option(True, "--relion/--no-relion", help="Run RELION Class3D with the true K."),
    relion_seed: int = typer.Option(1, help="RELION's --random_seed."),
    graphsplit_args: str = typer.Option("", help="More options for relion_graphsplit, e.g. '--max_K 4'."),
    list_sets: bool = typer.Option(False, "--list", help="Print the sets and their simulator flags, and stop."),
) -> None:
    chosen = [s for s in SETS.values() if (not sets or s.name in sets.split(",")) and (not homogeneous_only or s.true_k == 1)]
    unknown = set(filter(None, sets.split(","))) - set(SETS)
    if unknown:
        raise typer.BadParameter(f"unknown sets {sorted(unknown)}; --list shows them", param_hint="--sets")
    if list_sets:
        print("| set | true K | judged by | box | simulator flags |\n|---|---|---|---|---|")
        for s in chosen:
            print(f"| {s.name} | {s.true_k} | {s.judge} | {box or s.box} | `{s.flags}` |")
        return
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    for kset in chosen:
        row = run_set(kset, out, n, box or kset.box, j, iterations, relion, relion_seed, shlex.split(graphsplit_args))
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print_table(results)


def print_table(results: Path) -> None:
    """The latest row of each set in results.jsonl as a Markdown table, and the counts of right K."""
    rows = list({r["set"]: r for r in map(json.loads, filter(str.strip, results.read_text().splitlines()))}.values())

    def score(r: dict, who: str) -> str:
        if f"{who}_accuracy" not in r:
            return r.get(f"{who}_error") or "-"
        return f"{r[f'{who}_accuracy']:.3f} / {r[f'{who}_ari']:.3f}"

    def calib(r: dict, who: str) -> str:
        c = r.get(f"{who}_calibration")
        return "-" if c is None or c["right"] is None else f"{c['right']:.2f} ({c['n']})"

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    print("| set | true K | right K | found K | ceiling | graph split acc / ARI | time (s) | calib. (n) "
          "| RELION (true K) acc / ARI | time (s) | RELION calib. (n) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['true_K']} | {' or '.join(map(str, r['expected_K']))} | {r.get('found_K', '-')} | "
              f"{r['ceiling']:.3f} | {score(r, 'graphsplit')} | {seconds(r.get('graphsplit_time'))} | {calib(r, 'graphsplit')} | "
              f"{score(r, 'relion')} | {seconds(r.get('relion_time'))} | {calib(r, 'relion')} |")  # fmt: skip
    print(f"\nCalibration: among the particles with rlnMaxValueProbDistribution in {list(CALIBRATION_BAND)}, the "
          "fraction right (best matching of labels) and their number.")  # fmt: skip
    for group in ("homogeneous", "K=2", "K=3", "K=4", "subtle"):
        found = [r for r in rows if r["group"] == group and "K_right" in r]
        if found:
            right = sum(r["K_right"] for r in found)
            test = " (the test: at least 19 of 20)" if group == "homogeneous" else ""
            print(f"- {group}: K right in {right} of {len(found)}{test}")


if __name__ == "__main__":
    typer.run(main)
