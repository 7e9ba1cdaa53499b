"""Make the bundled adenylate kinase maps test_data/adk_open.mrc and test_data/adk_closed.mrc.

The open model (4AKE) is superposed onto the closed one (1AKE) on the core's CA atoms and both maps
share one centre, so they differ only where the LID and NMP domains close over the core. Prints how
much of the difference lies near those domains.

    python scripts/make_test_data.py [--out test_data] [--structures DIR]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from relion_graphsplit.relion.mrc import write_mrc
from relion_graphsplit.simulate import models as maps

STRUCTURES = Path(__file__).resolve().parents[1] / "test_data" / "structures"
BOX = 64
PIXEL_SIZE = 2.0
BFACTOR = 100.0


def main(
    out: Path = typer.Option(Path("test_data"), help="Output folder."),
    structures: Path = typer.Option(STRUCTURES, help="Folder with adk_open.pdb and adk_closed.pdb."),
) -> None:
    open_model = maps.read_model(structures / "adk_open.pdb")
    closed_model = maps.read_model(structures / "adk_closed.pdb")
    rmsd = maps.superpose(open_model, closed_model, maps.ADK_CORE_RESIDUES)
    center = maps.center_of_mass(open_model, closed_model)
    volumes = {
        name: maps.density_from_model(model, BOX, PIXEL_SIZE, bfactor=BFACTOR, center=center)
        for name, model in (("adk_open", open_model), ("adk_closed", closed_model))
    }
    for name, volume in volumes.items():
        write_mrc(out / f"{name}.mrc", volume, PIXEL_SIZE)

    diff = volumes["adk_open"] - volumes["adk_closed"]
    moving = ((30, 59), (122, 159))  # NMP and LID domains
    near_moving = maps.residue_mask((open_model, closed_model), moving, BOX, PIXEL_SIZE, center)
    near_core = maps.residue_mask((open_model, closed_model), maps.ADK_CORE_RESIDUES, BOX, PIXEL_SIZE, center)
    energy = (diff**2).sum()
    total = np.abs(volumes["adk_closed"]).sum()
    print(f"core CA RMSD after superposition: {rmsd:.2f} A")
    print(f"difference energy near LID/NMP only: {(diff[near_moving & ~near_core] ** 2).sum() / energy:.3f}")
    print(f"difference energy near the core only: {(diff[near_core & ~near_moving] ** 2).sum() / energy:.3f}")
    print(f"relative mass difference: {abs(volumes['adk_open'].sum() - volumes['adk_closed'].sum()) / total:.2e}")
    print(f"|difference| / |map| (L2): {np.sqrt(energy / (volumes['adk_closed'] ** 2).sum()):.3f}")


if __name__ == "__main__":
    typer.run(main)
