"""Every OpenMM input a user has, as one ``system`` entry: the same keys in run files and in Python.

An entry is a built-in name (``aldp-vacuum``, ``ala4``, ...) or a mapping of one of these kinds
(paths relative to ``base_dir``, the run file's folder; ``name`` is optional everywhere):

- ``{pdb: F, forcefield: [a.xml, ...], constraints: HBonds, hydrogenMass: 1.5, removeCMMotion: true}``
  (OpenMM ``ForceField``; implicit solvent by its XML, e.g. ``implicit/obc2.xml``; no cutoff);
- ``{prmtop: F, inpcrd: F, constraints: HBonds, implicitSolvent: OBC2, ...}`` (Amber files);
- ``{top: F, gro: F, includeDir: D, constraints: ...}`` (GROMACS files, where OpenMM reads them);
- ``{xml: system.xml, pdb: F}`` (a serialised OpenMM ``System`` and a PDB for topology/positions);
- ``{openmmtools: TolueneImplicit, kwargs: {...}}`` (an openmmtools test system by class name);
- ``{sequence: AAA, termini: capped, forcefield: [...], implicit: amber99_obc.xml, constraints: HBonds}``
  (:func:`cmt_openmm.systems.peptides.peptide`).

:func:`resolve_entry` checks an entry (unknown keys named in one sentence) and makes its paths
absolute, so a stored run file can be read from anywhere; :func:`target_from_entry` builds the
:class:`~cmt_openmm.target.Target`. Periodic inputs (explicit solvent) are refused by ``Target``.

Example (a PDB path relative to ``base_dir``, as in a run file next to its structure):

>>> import cmt_openmm
>>> from cmt_openmm.systems import aldp_pdb_path
>>> entry = {"pdb": "alanine-dipeptide.pdb", "forcefield": ["amber14-all.xml"], "constraints": "HBonds"}
>>> target = cmt_openmm.target_from_entry(entry, 300.0, base_dir=aldp_pdb_path().parent)
>>> target.name, target.n_atoms, len(target.constraints)     # the 12 X-H bonds are constrained
('alanine-dipeptide', 22, 12)
>>> cmt_openmm.target_from_entry("aldp-vacuum", 350.0).temperature   # a built-in name
350.0
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

import openmm
import openmm.app as app

from ..errors import CMTInputError
from ..target import Target, openmm_message
from .builtin import get_target, list_targets

CONSTRAINTS = {"None": None, "none": None, None: None, "HBonds": app.HBonds, "AllBonds": app.AllBonds,
               "HAngles": app.HAngles}
# OpenMM's own objects stand for their names (app.HBonds for "HBonds", app.OBC2 for "OBC2")
_OPENMM_OBJECTS = {"constraints": (app.HBonds, app.AllBonds, app.HAngles),
                   "implicitSolvent": (app.HCT, app.OBC1, app.OBC2, app.GBn, app.GBn2)}
_OPTIONS = {"constraints", "hydrogenMass", "removeCMMotion", "name"}
KINDS: dict[str, tuple[set[str], set[str]]] = {  # kind (its first key): (required keys, optional keys)
    "pdb": ({"pdb", "forcefield"}, _OPTIONS),
    "prmtop": ({"prmtop", "inpcrd"}, _OPTIONS | {"implicitSolvent"}),
    "top": ({"top", "gro"}, _OPTIONS | {"includeDir"}),
    "xml": ({"xml", "pdb"}, {"name"}),
    "openmmtools": ({"openmmtools"}, {"kwargs", "name"}),
    "sequence": ({"sequence"}, {"termini", "forcefield", "implicit", "constraints", "name"}),
}
_FILES = {"pdb": "PDB", "prmtop": "prmtop", "inpcrd": "inpcrd", "top": "GROMACS top", "gro": "GROMACS gro",
          "xml": "System XML", "includeDir": "GROMACS include directory"}


def _kind(entry: Mapping) -> str:
    kinds = [k for k in ("prmtop", "top", "xml", "openmmtools", "sequence") if k in entry] or (["pdb"] if "pdb" in entry else [])
    if len(kinds) != 1:
        raise CMTInputError("a system mapping needs exactly one of the keys pdb (with forcefield), prmtop, top, "
                            f"xml, openmmtools or sequence, got {sorted(entry)}.")
    return kinds[0]


def _path(value: Any, base_dir: Path, key: str) -> str:
    path = Path(os.path.expanduser(str(value)))
    path = path if path.is_absolute() else base_dir / path
    if not (path.is_dir() if key == "includeDir" else path.is_file()):
        raise CMTInputError(f"system.{key}: the {_FILES[key]} {path} does not exist; fix the path "
                            "(relative paths are relative to the run file).")
    return str(path.resolve())


def resolve_entry(entry: Any, base_dir: str | os.PathLike = ".") -> Any:
    """A checked copy of a ``system`` entry with absolute paths (see the module docstring)."""
    base_dir = Path(base_dir)
    if isinstance(entry, str):
        if entry not in list_targets():
            raise CMTInputError(f"unknown system {entry!r}; use one of {', '.join(list_targets())} or a mapping "
                                "with pdb, prmtop, top, xml, openmmtools or sequence.")
        return entry
    if not isinstance(entry, Mapping):
        raise CMTInputError(f"system must be a built-in name or a mapping, got {entry!r}.")
    kind = _kind(entry)
    required, optional = KINDS[kind]
    unknown = sorted(set(entry) - required - optional)
    if unknown:
        raise CMTInputError(f"system.{unknown[0]} is not a key of a {kind} system; use {', '.join(sorted(required | optional))}.")
    missing = sorted(required - set(entry))
    if missing:
        raise CMTInputError(f"a {kind} system also needs system.{missing[0]}.")
    out = dict(entry)
    for key in set(out) & set(_FILES):
        out[key] = _path(out[key], base_dir, key)
    if "forcefield" in out:
        xmls = [out["forcefield"]] if isinstance(out["forcefield"], str) else list(out["forcefield"])
        if not xmls or not all(isinstance(x, str) for x in xmls):
            raise CMTInputError("system.forcefield must list force-field XML files, e.g. [amber14-all.xml].")
        # OpenMM's bundled force fields are given by name; a file that exists beside the run file by path
        out["forcefield"] = [str((base_dir / x).resolve()) if (base_dir / x).is_file() else x for x in xmls]
    for key, objects in _OPENMM_OBJECTS.items():
        if any(out.get(key) is o for o in objects):
            out[key] = str(out[key])
    if out.get("constraints") not in CONSTRAINTS:
        raise CMTInputError(f"system.constraints must be None, HBonds, AllBonds or HAngles, got {out['constraints']!r}.")
    if "kwargs" in out and not isinstance(out["kwargs"], Mapping):
        raise CMTInputError("system.kwargs must be a mapping of the openmmtools test system's arguments.")
    return out


def target_from_entry(entry: Any, temperature: Any = 300.0, base_dir: str | os.PathLike = ".") -> Target:
    """The :class:`Target` of a ``system`` entry at ``temperature`` (K)."""
    entry = resolve_entry(entry, base_dir)
    if isinstance(entry, str):
        return get_target(entry, temperature)
    kind = _kind(entry)
    options = {"constraints": CONSTRAINTS[entry.get("constraints")]}
    if "hydrogenMass" in entry:
        options["hydrogenMass"] = float(entry["hydrogenMass"]) * openmm.unit.amu
    if "removeCMMotion" in entry:
        options["removeCMMotion"] = bool(entry["removeCMMotion"])
    name = entry.get("name")
    try:
        if kind == "pdb":
            return Target.from_pdb(entry["pdb"], entry["forcefield"], temperature, name=name, **options)
        if kind == "sequence":
            from .peptides import peptide

            keys = {k: entry[k] for k in ("termini", "forcefield", "implicit") if k in entry}
            return peptide(entry["sequence"], constraints=entry.get("constraints"), temperature=temperature,
                           name=name, **keys)
        if kind == "openmmtools":
            return _openmmtools(entry["openmmtools"], entry.get("kwargs") or {}, temperature, name)
        if kind == "xml":
            system = openmm.XmlSerializer.deserialize(Path(entry["xml"]).read_text())
            pdb = app.PDBFile(entry["pdb"])
            return Target(system, pdb.topology, pdb.positions, temperature, name=name or Path(entry["xml"]).stem)
        if kind == "prmtop":
            prmtop, inpcrd = app.AmberPrmtopFile(entry["prmtop"]), app.AmberInpcrdFile(entry["inpcrd"])
            if "implicitSolvent" in entry:
                options["implicitSolvent"] = getattr(app, str(entry["implicitSolvent"]), None)
                if options["implicitSolvent"] is None:
                    raise CMTInputError(f"system.implicitSolvent {entry['implicitSolvent']!r} is not an OpenMM "
                                        "model; use HCT, OBC1, OBC2, GBn or GBn2.")
            system = prmtop.createSystem(nonbondedMethod=app.NoCutoff, **options)
            return Target(system, prmtop.topology, inpcrd.positions, temperature, name=name or Path(entry["prmtop"]).stem)
        gro = app.GromacsGroFile(entry["gro"])
        top = app.GromacsTopFile(entry["top"], includeDir=entry.get("includeDir"))
        system = top.createSystem(nonbondedMethod=app.NoCutoff, **options)
        return Target(system, top.topology, gro.positions, temperature, name=name or Path(entry["top"]).stem)
    except CMTInputError:
        raise
    except Exception as error:  # OpenMM's readers raise ValueError, KeyError, OSError, OpenMMException, ...
        raise CMTInputError(f"OpenMM cannot build the {kind} system {entry.get(kind)} (OpenMM: "
                            f"{openmm_message(error)}); check the files and the force field.") from None


def _openmmtools(class_name: str, kwargs: Mapping, temperature: Any, name: str | None) -> Target:
    testsystems = importlib.import_module("openmmtools.testsystems")
    cls = getattr(testsystems, str(class_name), None)
    if not isinstance(cls, type) or not issubclass(cls, testsystems.TestSystem):
        raise CMTInputError(f"system.openmmtools {class_name!r} is not an openmmtools test system; use a class name "
                            "from openmmtools.testsystems such as TolueneImplicit.")
    try:
        testsystem = cls(**dict(kwargs))
    except TypeError as error:
        raise CMTInputError(f"system.kwargs do not fit {class_name} ({error}); pass its constructor's arguments.") from None
    return Target.from_openmmtools(testsystem, temperature, name=name or class_name)
