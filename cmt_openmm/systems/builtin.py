"""Named benchmark targets: alanine dipeptide in three solvent models, and the toy targets.

All alanine dipeptide targets use openmmtools' ``alanine-dipeptide-gbsa`` structure (22 atoms,
ACE-ALA-NME) as reference positions and share one topology (same atoms, bonds, no
constraints), so a generator trained on one can be evaluated on another. No cutoffs, no
constraints, no periodic box:

- ``aldp-vacuum``: amber99sbildn.xml in vacuum (NonbondedForce).
- ``aldp-obc``: amber99sbildn.xml + amber99_obc.xml (native GBSAOBCForce).
- ``aldp-implicit``: openmmtools ``AlanineDipeptideImplicit(constraints=None)`` (AMBER ff96 with
  OBC1 as a CustomGBForce, ~20x slower per energy than GBSAOBCForce on CPUs).
- ``ala4`` (Ace-Ala3-Nme, 42 atoms), ``ala6`` (Ace-Ala5-Nme, 62 atoms), ``elil`` (ELIL, charged
  termini, 75 atoms): peptides built offline by `cmt_openmm.systems.peptides.peptide` with
  amber99sbildn.xml + amber99_obc.xml, no cutoff, no constraints; ``ala4-hbonds``,
  ``ala6-hbonds``, ``elil-hbonds``: the same with HBonds constraints.
- ``toy-double-well``, ``toy-gaussian-mixture``: see `cmt_openmm.systems.toys`.

Example (one topology, two force fields; the temperature sets kT):
    >>> import cmt_openmm
    >>> vacuum = cmt_openmm.get_target("aldp-vacuum")
    >>> obc = cmt_openmm.get_target("aldp-obc", temperature=350.0)
    >>> obc.n_atoms, round(obc.kT, 4)                  # kT in kJ/mol at 350 K
    (22, 2.9101)
    >>> obc.topology_fingerprint() == vacuum.topology_fingerprint()
    True
    >>> obc.system_fingerprint() == vacuum.system_fingerprint()
    False
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from typing import Any, Callable

import openmm.app as app

from ..errors import CMTInputError
from ..target import Target
from . import toys
from .peptides import peptide


def aldp_pdb_path() -> Path:
    """Path of openmmtools' alanine dipeptide PDB (found without importing openmmtools, which is slow)."""
    spec = importlib.util.find_spec("openmmtools")
    if spec is None or not spec.submodule_search_locations:
        raise CMTInputError("the alanine dipeptide targets need openmmtools: install the project's pinned environment.")
    return Path(spec.submodule_search_locations[0]) / "data" / "alanine-dipeptide-gbsa" / "alanine-dipeptide.pdb"


def _aldp_from_xmls(temperature: Any, xmls: list[str], name: str) -> Target:
    return Target.from_pdb(aldp_pdb_path(), xmls, temperature, name=name)


def _aldp_implicit(temperature: Any) -> Target:
    from openmmtools.testsystems import AlanineDipeptideImplicit

    testsystem = AlanineDipeptideImplicit(constraints=None)
    positions = app.PDBFile(str(aldp_pdb_path())).positions  # the same reference structure as the other aldp targets
    return Target(testsystem.system, testsystem.topology, positions, temperature, name="aldp-implicit")


def _peptide(temperature: Any, sequence: str, termini: str, constraints: str | None, name: str) -> Target:
    return peptide(sequence, termini=termini, constraints=constraints, temperature=temperature, name=name)


_BUILDERS: dict[str, Callable[[Any], Target]] = {
    "aldp-vacuum": partial(_aldp_from_xmls, xmls=["amber99sbildn.xml"], name="aldp-vacuum"),
    "aldp-obc": partial(_aldp_from_xmls, xmls=["amber99sbildn.xml", "amber99_obc.xml"], name="aldp-obc"),
    "aldp-implicit": _aldp_implicit,
    "ala4": partial(_peptide, sequence="AAA", termini="capped", constraints=None, name="ala4"),
    "ala4-hbonds": partial(_peptide, sequence="AAA", termini="capped", constraints="HBonds", name="ala4-hbonds"),
    "ala6": partial(_peptide, sequence="AAAAA", termini="capped", constraints=None, name="ala6"),
    "ala6-hbonds": partial(_peptide, sequence="AAAAA", termini="capped", constraints="HBonds", name="ala6-hbonds"),
    "elil": partial(_peptide, sequence="ELIL", termini="zwitterion", constraints=None, name="elil"),
    "elil-hbonds": partial(_peptide, sequence="ELIL", termini="zwitterion", constraints="HBonds", name="elil-hbonds"),
    "toy-double-well": toys.double_well_3d,
    "toy-gaussian-mixture": toys.gaussian_mixture,
}


def list_targets() -> list[str]:
    """Names accepted by `get_target`."""
    return list(_BUILDERS)


def get_target(name: str, temperature: Any = 300.0) -> Target:
    """The built-in target ``name`` at ``temperature`` (K or an `openmm.unit` temperature)."""
    if name not in _BUILDERS:
        raise CMTInputError(f"unknown target {name!r}: choose one of {', '.join(list_targets())}.")
    return _BUILDERS[name](temperature)
