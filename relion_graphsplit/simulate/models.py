"""Density maps from atomic models (gemmi's electron-scattering calculator), for simulated data."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import gemmi
import numpy as np
import torch

ADK_CORE_RESIDUES: tuple[tuple[int, int], ...] = ((1, 29), (60, 121), (160, 214))
"""Adenylate kinase's core (inclusive residue ranges); the LID and NMP domains move around it."""

_BIOLOGICAL_ELEMENTS = {"H", "C", "N", "O", "S", "P", "Se"}


def _is_polymer_residue(residue: gemmi.Residue) -> bool:
    info = gemmi.find_tabulated_residue(residue.name)
    if info is not None and (info.is_amino_acid() or info.is_nucleic_acid()):
        return True
    return {"N", "CA", "C"} <= {atom.name for atom in residue}  # e.g. CHARMM's HSD, HSE


def _fix_elements(structure: gemmi.Structure) -> None:
    """Give polymer atoms the element of their name's first letter where gemmi guessed otherwise.

    Files without element columns and with names starting in column 13 (CHARMM style: 'CA', 'HG1')
    make gemmi read two-letter elements (calcium, mercury); in amino acids and nucleotides those are
    carbon, hydrogen, etc.
    """
    for model in structure:
        for chain in model:
            for residue in chain:
                if not _is_polymer_residue(residue):
                    continue
                for atom in residue:
                    if atom.element.name not in _BIOLOGICAL_ELEMENTS:
                        atom.element = gemmi.Element(atom.name.lstrip("0123456789")[0])


def read_model(path: str | os.PathLike, chains: Sequence[str] | None = None) -> gemmi.Structure:
    """First model of a PDB/mmCIF file (gzipped or not), chains `chains` only (all if None).

    Hydrogens, waters and alternative conformations beyond the first are removed, so that maps made
    from deposited models (usually without hydrogens) and from simulation models are alike. Atoms of
    amino acids and nucleotides whose element gemmi read as one other than H, C, N, O, S, P or Se
    (CHARMM-style names without an element column) get the element of their name's first letter.

    Parameters
    ----------
    path : str or os.PathLike
        A PDB or mmCIF file, gzipped or not.
    chains : sequence of str or None
        Names of the chains to keep; None keeps all.

    Returns
    -------
    gemmi.Structure
        The structure with its first model only, empty chains removed.

    Raises
    ------
    ValueError
        If a chain asked for is not in the file.
    """
    structure = gemmi.read_structure(str(path))
    _fix_elements(structure)
    while len(structure) > 1:
        del structure[1]
    structure.remove_alternative_conformations()
    structure.remove_hydrogens()
    structure.remove_waters()
    if chains is not None:
        keep = set(chains)
        missing = keep - {chain.name for chain in structure[0]}
        if missing:
            raise ValueError(f"chains {sorted(missing)} are not in {path}")
        for name in [chain.name for chain in structure[0] if chain.name not in keep]:
            structure[0].remove_chain(name)
    structure.remove_empty_chains()
    return structure


def atom_positions(structure: gemmi.Structure) -> tuple[np.ndarray, np.ndarray]:
    """Positions (n, 3) in Angstrom and masses (n,) of the atoms of the first model.

    Parameters
    ----------
    structure : gemmi.Structure
        The model.

    Returns
    -------
    positions : np.ndarray
        (n, 3) float64 (x, y, z) in A, in the model's frame.
    masses : np.ndarray
        (n,) float64 atomic weights of the elements (gemmi's Element.weight).
    """
    atoms = [cra.atom for cra in structure[0].all()]
    positions = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms], dtype=np.float64)
    masses = np.array([a.element.weight for a in atoms], dtype=np.float64)
    return positions, masses


def center_of_mass(*structures: gemmi.Structure) -> np.ndarray:
    """Centre of mass (x, y, z) in Angstrom of all atoms of the given structures together.

    Parameters
    ----------
    *structures : gemmi.Structure
        One or more models; the first model of each is used (`atom_positions`).

    Returns
    -------
    np.ndarray
        (3,) float64 (x, y, z) in A.
    """
    positions, masses = zip(*(atom_positions(s) for s in structures))
    p, m = np.concatenate(positions), np.concatenate(masses)
    return (p * m[:, None]).sum(0) / m.sum()


def _ca_positions(structure: gemmi.Structure, residues: Sequence[tuple[int, int]]) -> dict:
    out = {}
    for chain in structure[0]:
        for residue in chain:
            if any(lo <= residue.seqid.num <= hi for lo, hi in residues):
                ca = residue.find_atom("CA", "*")
                if ca is not None:
                    out[(chain.name, residue.seqid.num)] = [ca.pos.x, ca.pos.y, ca.pos.z]
    return out


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R and translation t minimising sum |R mobile_i + t - target_i|^2 (points (n, 3)).

    Parameters
    ----------
    mobile, target : np.ndarray
        (n, 3) corresponding points (row i of one matches row i of the other).

    Returns
    -------
    rotation : np.ndarray
        (3, 3) proper rotation (determinant +1), left-multiplying column vectors.
    translation : np.ndarray
        (3,), in the points' units.
    """
    mc, tc = mobile.mean(0), target.mean(0)
    u, _, vt = np.linalg.svd((mobile - mc).T @ (target - tc))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rotation, tc - rotation @ mc


def superpose(
    mobile: gemmi.Structure,
    target: gemmi.Structure,
    residues: Sequence[tuple[int, int]] = ADK_CORE_RESIDUES,
) -> float:
    """Move `mobile` in place onto `target` by its CA atoms in `residues`; return their RMSD (A) after.

    Residues are matched by chain name and number; `residues` are inclusive ranges.

    Parameters
    ----------
    mobile : gemmi.Structure
        The model to move; its first model's atoms are transformed in place.
    target : gemmi.Structure
        The model to superpose onto (not changed).
    residues : sequence of (int, int)
        Inclusive ranges of residue numbers whose CA atoms are superposed (adenylate kinase's core by
        default).

    Returns
    -------
    float
        The RMSD (A) of the matched CA atoms after the superposition.

    Raises
    ------
    ValueError
        If fewer than three CA atoms are common to both models.
    """
    m, t = _ca_positions(mobile, residues), _ca_positions(target, residues)
    common = sorted(m.keys() & t.keys())
    if len(common) < 3:
        raise ValueError("fewer than three common CA atoms to superpose on")
    pm, pt = np.array([m[k] for k in common]), np.array([t[k] for k in common])
    rotation, translation = kabsch(pm, pt)
    mobile[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(rotation.tolist()), gemmi.Vec3(*translation)))
    moved = pm @ rotation.T + translation
    return float(np.sqrt(((moved - pt) ** 2).sum(1).mean()))


def _atom_keys(structure: gemmi.Structure) -> list[tuple[str, int, str, str, str]]:
    """(chain, residue number, insertion code, residue name, atom name) of each atom of the first model."""
    return [
        (chain.name, residue.seqid.num, residue.seqid.icode, residue.name, atom.name)
        for chain in structure[0]
        for residue in chain
        for atom in residue
    ]


def interpolate_models(start: gemmi.Structure, end: gemmi.Structure, t: float) -> gemmi.Structure:
    """A model between two conformations of one molecule: each atom at (1 - t) start + t end.

    Linear interpolation of the atom positions (Cartesian, not along the motion's hinges): superpose
    the two models first (`superpose`), so that only the moving parts move. Halfway between adenylate
    kinase's open and closed states (t = 0.5) the LID and NMP domains lie about half closed, with bond
    lengths in the hinges a few tenths of an Angstrom off: an intermediate state at the resolution of
    simulated particle images, not a physical model.

    Parameters
    ----------
    start, end : gemmi.Structure
        The two conformations (their first models), with the same atoms in the same order (chain,
        residue number and name, atom name).
    t : float
        Where between them: 0 gives `start`'s positions, 1 `end`'s.

    Returns
    -------
    gemmi.Structure
        A copy of `end` with the interpolated positions (A).

    Raises
    ------
    ValueError
        If the two models' atoms differ.
    """
    if _atom_keys(start) != _atom_keys(end):
        raise ValueError("the models have different atoms: interpolation needs one atom list")
    a, _ = atom_positions(start)
    b, _ = atom_positions(end)
    positions = (1.0 - t) * a + t * b
    out = end.clone()
    for cra, (x, y, z) in zip(out[0].all(), positions):
        cra.atom.pos = gemmi.Position(x, y, z)
    return out


def density_from_model(
    structure: gemmi.Structure,
    box: int,
    pixel_size: float,
    bfactor: float | None = 100.0,
    center: Sequence[float] | None = None,
) -> np.ndarray:
    """Coulomb potential (box^3 [z, y, x] float32) of a model, `center` (A) at voxel box // 2.

    Every atom gets B = `bfactor` (its own B if None). The potential is computed with gemmi's
    electron scattering factors on a grid of at most 0.75 A spacing, blurred there against aliasing,
    then Fourier-cropped to the requested pixel size and un-blurred: the result is the model's
    potential band-limited at Nyquist. `center` defaults to the model's centre of mass.

    Parameters
    ----------
    structure : gemmi.Structure
        The model (its first model is used; the structure itself is not changed).
    box : int
        The map's box (pixels).
    pixel_size : float
        The map's pixel size (A).
    bfactor : float or None
        B-factor (A^2) given to every atom; None keeps each atom's own.
    center : sequence of float or None
        The model point (x, y, z) in A placed at voxel (box // 2, box // 2, box // 2); None: the
        model's centre of mass.

    Returns
    -------
    np.ndarray
        (box, box, box) [z, y, x] float32, the model's centre (`center`) at index box // 2.

    Raises
    ------
    ValueError
        If an atom lies farther than half the box's width (box * pixel_size / 2, A) from `center`.
    """
    structure = structure.clone()
    positions, _ = atom_positions(structure)
    c = center_of_mass(structure) if center is None else np.asarray(center, dtype=np.float64)
    extent = box * pixel_size
    radius = np.linalg.norm(positions - c, axis=1).max()
    if radius > extent / 2:
        raise ValueError(f"the model reaches {radius:.1f} A from the centre; the box is {extent:.1f} A wide")
    if bfactor is not None:
        for cra in structure[0].all():
            cra.atom.b_iso = bfactor
    shift = (box // 2) * pixel_size - c
    structure[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*shift)))
    structure.cell = gemmi.UnitCell(extent, extent, extent, 90.0, 90.0, 90.0)
    structure.spacegroup_hm = "P 1"

    oversample = math.ceil(pixel_size / 0.75)
    fine = box * oversample
    fine_pixel = pixel_size / oversample
    blur = 110.0 * fine_pixel**2  # exp(-blur s^2 / 4) < 1e-3 at the fine grid's Nyquist
    calculator = gemmi.DensityCalculatorE()
    calculator.set_grid_cell_and_spacegroup(structure)
    calculator.grid.set_size(fine, fine, fine)
    calculator.blur = blur
    calculator.put_model_density_on_grid(structure[0])
    density = torch.from_numpy(np.array(calculator.grid, copy=True)).permute(2, 1, 0).to(torch.float64)

    ft = torch.fft.rfftn(density)
    keep = (torch.fft.fftfreq(box, d=1.0 / box).long()) % fine
    cropped = ft[keep][:, keep][:, :, : box // 2 + 1]
    k = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=torch.float64)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    cropped = cropped * torch.exp(blur * k2 / 4.0)
    volume = torch.fft.irfftn(cropped, s=(box, box, box)) / oversample**3
    return volume.to(torch.float32).numpy()


def residue_mask(
    models: Sequence[gemmi.Structure],
    residues: Sequence[tuple[int, int]],
    box: int,
    pixel_size: float,
    center: np.ndarray,
    radius: float = 4.0,
) -> np.ndarray:
    """Voxels within `radius` A of an atom of `residues` in any of the models (box^3 [z, y, x], bool).

    Parameters
    ----------
    models : sequence of gemmi.Structure
        The models (the first model of each), in the frame of the map.
    residues : sequence of (int, int)
        Inclusive ranges of residue numbers, in every chain.
    box : int
        The mask's box (pixels).
    pixel_size : float
        Its pixel size (A).
    center : np.ndarray
        (3,) the model point (x, y, z) in A at voxel box // 2, as given to `density_from_model`.
    radius : float
        Distance (A) from an atom within which a voxel centre is kept.

    Returns
    -------
    np.ndarray
        (box, box, box) [z, y, x] bool.
    """
    from scipy.spatial import cKDTree

    coords = (np.arange(box) - box // 2) * pixel_size
    z, y, x = np.meshgrid(coords, coords, coords, indexing="ij")
    grid = np.stack([x, y, z], axis=-1).reshape(-1, 3) + center
    atoms = [
        [a.pos.x, a.pos.y, a.pos.z]
        for model in models
        for chain in model[0]
        for residue in chain
        if any(lo <= residue.seqid.num <= hi for lo, hi in residues)
        for a in residue
    ]
    distance, _ = cKDTree(np.array(atoms)).query(grid, distance_upper_bound=radius)
    return np.isfinite(distance).reshape(box, box, box)
