"""The target distribution: an OpenMM System + Topology + reference positions + temperature.

`Target` is the single source of truth for the reduced potential u(x) = U(x) / kT that every
other layer (energy bridge, coordinates, training, reweighting) works with. It checks its
inputs once, at the boundary, and strips units: positions in nm, energies in kJ/mol, kT in
kJ/mol, temperature in K. Inputs the library cannot handle yet (periodic boxes, virtual sites)
are refused with a one-sentence `CMTInputError` instead of failing later in a flow.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from .errors import CMTInputError
from .units import kT, kelvin, nanometers

class Target:
    """An OpenMM System at a temperature, with its topology and a reference structure.

    Attributes: ``system`` (openmm.System), ``topology`` (openmm.app.Topology), ``positions``
    ((n_atoms, 3) float64, nm), ``temperature`` (K), ``kT`` (kJ/mol), ``n_atoms``,
    ``constraints`` (list of (i, j, length_nm)), ``name`` and ``box`` ((3 n_atoms, 2) lower/upper
    bounds in nm for Cartesian toy targets, else None).

    Example:
        >>> import cmt_openmm, tempfile
        >>> from openmmtools.testsystems import AlanineDipeptideVacuum
        >>> target = cmt_openmm.Target.from_openmmtools(AlanineDipeptideVacuum(constraints=None), 300.0)
        >>> target.n_atoms, target.positions.shape, round(target.kT, 4)   # kT in kJ/mol
        (22, (22, 3), 2.4943)
        >>> u = target.reduced_potential(target.positions)   # dimensionless, U / kT
        >>> round(u, 3)
        -35.315
        >>> round(target.with_temperature(600.0).reduced_potential(target.positions) / u, 12)
        0.5
        >>> folder = tempfile.mkdtemp()
        >>> again = cmt_openmm.Target.load(target.save(folder))      # System XML, PDB, temperature
        >>> again.system_fingerprint() == target.system_fingerprint(), again.reduced_potential(again.positions) == u
        (True, True)
    """

    def __init__(
        self,
        system: openmm.System,
        topology: app.Topology,
        positions: Any,
        temperature: Any,
        name: str = "custom",
        box: np.ndarray | None = None,
    ) -> None:
        _check_system(system, topology)
        self.system = system
        self.topology = topology
        self.n_atoms = system.getNumParticles()
        self.positions = _check_positions(nanometers(positions), self.n_atoms)
        self.temperature = kelvin(temperature)
        self.kT = kT(self.temperature)
        self.name = str(name)
        self.box = None if box is None else _check_box(box, self.n_atoms)
        self.constraints = [_constraint(system, k) for k in range(system.getNumConstraints())]
        self._context: openmm.Context | None = None

    @classmethod
    def from_openmmtools(cls, testsystem: Any, temperature: Any, name: str | None = None) -> Target:
        """Target from an openmmtools `TestSystem` (its system, topology and positions)."""
        return cls(
            testsystem.system,
            testsystem.topology,
            testsystem.positions,
            temperature,
            name=type(testsystem).__name__ if name is None else name,
        )

    @classmethod
    def from_pdb(
        cls,
        pdb_path: str | Path,
        forcefield_xmls: list[str] | str,
        temperature: Any,
        name: str | None = None,
        **create_system_kwargs: Any,
    ) -> Target:
        """Target from a PDB (or PDBx/mmCIF) file and OpenMM force-field XML files.

        ``create_system_kwargs`` go to `ForceField.createSystem`; the defaults here are
        ``nonbondedMethod=NoCutoff``, ``constraints=None`` and ``rigidWater=False`` (no
        constraints unless asked for).
        """
        path = Path(pdb_path)
        if not path.is_file():
            raise CMTInputError(f"structure file {path} does not exist: pass the path of a PDB or PDBx/mmCIF file.")
        xmls = [forcefield_xmls] if isinstance(forcefield_xmls, str) else list(forcefield_xmls)
        structure = app.PDBxFile(str(path)) if path.suffix.lower() in (".cif", ".pdbx") else app.PDBFile(str(path))
        kwargs = {"nonbondedMethod": app.NoCutoff, "constraints": None, "rigidWater": False}
        kwargs.update(create_system_kwargs)
        forcefield = load_forcefield(xmls)
        try:
            system = forcefield.createSystem(structure.topology, **kwargs)
        except (ValueError, OSError) as error:
            text = openmm_message(error)
            hint = ("add any missing atoms (Modeller.addHydrogens() or pdbfixer) or use force fields with templates "
                    "for every residue" if "No template found" in text else "check the structure and the force field")
            raise CMTInputError(
                f"OpenMM could not build a System for {path.name} with {xmls} (OpenMM: {text}); {hint}."
            ) from error
        name = path.stem if name is None else name
        return cls(system, structure.topology, structure.positions, temperature, name=name)

    def with_temperature(self, temperature: Any) -> Target:
        """The same system (shared, not copied) at another temperature."""
        return Target(self.system, self.topology, self.positions, temperature, name=self.name, box=self.box)

    def reduced_potential(self, positions: Any) -> float:
        """u = U / kT of one configuration ((n_atoms, 3), nm) on a Reference Context; +inf on failure.

        Meant for checks and single structures; use `cmt_openmm.OpenMMEnergy` for batches.
        """
        x = nanometers(positions)
        if x.shape != (self.n_atoms, 3):
            raise CMTInputError(f"positions have shape {x.shape}, expected ({self.n_atoms}, 3) for {self.name}.")
        if not np.all(np.isfinite(x)):
            return math.inf
        if self._context is None:
            platform = openmm.Platform.getPlatformByName("Reference")
            self._context = openmm.Context(self.system, openmm.VerletIntegrator(0.001), platform)
        try:
            self._context.setPositions(x)
            energy = self._context.getState(getEnergy=True).getPotentialEnergy()
        except openmm.OpenMMException:
            return math.inf
        u = energy.value_in_unit(unit.kilojoule_per_mole) / self.kT
        return u if math.isfinite(u) else math.inf

    def topology_fingerprint(self) -> str:
        """sha256 of the atoms (name, element, residue), the bonds and the constraints."""
        atoms = [
            [a.name, a.element.symbol if a.element is not None else "", a.residue.name, a.residue.index]
            for a in self.topology.atoms()
        ]
        bonds = sorted(sorted((b[0].index, b[1].index)) for b in self.topology.bonds())
        constraints = sorted([min(i, j), max(i, j), f"{d:.6f}"] for i, j, d in self.constraints)
        blob = json.dumps({"atoms": atoms, "bonds": bonds, "constraints": constraints}, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def system_fingerprint(self) -> str:
        """sha256 of the serialised System (without the OpenMM version stamp)."""
        xml = re.sub(r' openmmVersion="[^"]*"', "", openmm.XmlSerializer.serialize(self.system), count=1)
        return hashlib.sha256(xml.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The target as JSON-able data: System XML, PDB text (topology), positions in full
        precision (nm), temperature (K), name, box and topology fingerprint."""
        text = io.StringIO()
        app.PDBFile.writeFile(self.topology, self.positions * 10.0 * unit.angstrom, text, keepIds=True)
        return {"name": self.name, "temperature": self.temperature, "system_xml": openmm.XmlSerializer.serialize(self.system),
                "pdb": text.getvalue(), "positions_nm": self.positions.tolist(),
                "box": None if self.box is None else self.box.tolist(),
                "topology_fingerprint": self.topology_fingerprint()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the saved target") -> Target:
        """The target of :meth:`to_dict` data (refused in one sentence when damaged)."""
        try:
            system = openmm.XmlSerializer.deserialize(data["system_xml"])
            topology = app.PDBFile(io.StringIO(data["pdb"])).topology
            target = cls(system, topology, data["positions_nm"], data["temperature"], name=data["name"], box=data["box"])
        except CMTInputError:
            raise
        except Exception as error:  # missing keys, bad XML or PDB
            raise CMTInputError(f"{where} cannot be read ({type(error).__name__}); it is damaged: rebuild it "
                                "from its inputs.") from None
        if target.topology_fingerprint() != data["topology_fingerprint"]:
            raise CMTInputError(f"the topology read back from {where} differs from the saved one (bonds or names "
                                "changed); rebuild the target from its inputs.")
        return target

    def save(self, directory: str | Path) -> Path:
        """Write the target into ``directory``: ``system.xml``, ``structure.pdb`` (for people and
        other tools) and ``target.json`` (:meth:`to_dict`, what :meth:`load` reads). Atomic per file."""
        from .files import atomic_write

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        atomic_write(directory / "system.xml", data["system_xml"])
        atomic_write(directory / "structure.pdb", data["pdb"])
        atomic_write(directory / "target.json", json.dumps(data))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Target:
        """The target :meth:`save` wrote into ``directory``."""
        path = Path(directory) / "target.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            raise CMTInputError(f"{path} cannot be read; it is missing or damaged: rebuild the target from its "
                                "inputs.") from None
        return cls.from_dict(data, str(path))

    @property
    def has_molecule(self) -> bool:
        """True when the topology has bonds and at least 3 atoms (internal coordinates apply)."""
        return self.n_atoms >= 3 and self.topology.getNumBonds() > 0

    @property
    def langevin_timestep_fs(self) -> float:
        """The Langevin timestep (fs) MD of this System takes by default: 2 where it constrains every
        bond to hydrogen (HBonds or more), else 1."""
        constrained = {(min(i, j), max(i, j)) for i, j, _ in self.constraints}
        to_hydrogen = [(min(a.index, b.index), max(a.index, b.index)) for a, b in self.topology.bonds()
                       if "H" in (getattr(a.element, "symbol", None), getattr(b.element, "symbol", None))]
        return 2.0 if to_hydrogen and all(bond in constrained for bond in to_hydrogen) else 1.0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_context"] = None  # a Context cannot be pickled; rebuilt lazily
        return state

    def __repr__(self) -> str:
        forces = sorted({type(f).__name__ for f in self.system.getForces()} - {"CMMotionRemover"})
        return (
            f"{type(self).__name__}(name={self.name!r}, n_atoms={self.n_atoms}, "
            f"temperature={self.temperature:g} K, forces={forces}, constraints={len(self.constraints)})"
        )


def openmm_message(error: BaseException) -> str:
    """OpenMM's whole message of ``error`` on one line, without a final period (or the error's type)."""
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__


def load_forcefield(xmls: list[str]) -> app.ForceField:
    """OpenMM's ``ForceField(*xmls)``; a file OpenMM cannot find or read is refused, naming it."""
    try:
        return app.ForceField(*xmls)
    except (ValueError, OSError) as error:
        missing = re.search(r'Could not locate file "(.+?)"', str(error))
        what = (f"the force-field file {missing.group(1)} was not found" if missing
                else f"OpenMM could not read the force field {xmls} (OpenMM: {openmm_message(error)})")
        raise CMTInputError(f"{what}; pass a path that exists or the name of a force field OpenMM ships "
                            "(e.g. amber14-all.xml, implicit/gbn2.xml).") from error


_WATER = {"HOH", "WAT", "SOL", "TIP3", "TIP4", "TIP5", "SPC", "T3P", "T4P"}


def _check_system(system: openmm.System, topology: app.Topology) -> None:
    waters = sum(residue.name.upper() in _WATER for residue in topology.residues())
    if waters:
        raise CMTInputError(
            f"the input holds {waters} water molecules: explicit solvent and periodic systems are not supported; "
            "strip the solvent and ions and use implicit solvent without a cutoff (e.g. forcefield "
            "[amber14-all.xml, implicit/gbn2.xml] or implicitSolvent OBC2 for a prmtop)."
        )
    periodic = [(f"{type(f).__name__} #{k}", hasattr(f, "getNonbondedMethod"))
                for k, f in enumerate(system.getForces()) if f.usesPeriodicBoundaryConditions()]
    if periodic:  # no solvent to strip: name the periodic forces and the setting that fits each
        nonbonded = ", ".join(label for label, has_method in periodic if has_method)
        other = ", ".join(label for label, has_method in periodic if not has_method)
        remedies = [f"give {nonbonded} a non-periodic method (NoCutoff or CutoffNonPeriodic)"] if nonbonded else []
        remedies += [f"call setUsesPeriodicBoundaryConditions(False) on {other}"] if other else []
        raise CMTInputError(f"{', '.join(label for label, _ in periodic)} {'uses' if len(periodic) == 1 else 'use'} "
                            f"periodic boundary conditions, which are not supported: {' and '.join(remedies)}.")
    n = system.getNumParticles()
    if n != topology.getNumAtoms():
        raise CMTInputError(
            f"the System has {n} particles but the Topology has {topology.getNumAtoms()} atoms: "
            "pass the topology the System was built from."
        )
    for i in range(n):
        if system.isVirtualSite(i):
            raise CMTInputError(
                f"particle {i} is a virtual site, which is not supported: use a force field without virtual sites."
            )
        if system.getParticleMass(i).value_in_unit(unit.dalton) <= 0.0:
            raise CMTInputError(
                f"particle {i} has zero mass (fixed in OpenMM), which is not supported: give every particle a mass."
            )


def _check_positions(x: np.ndarray, n_atoms: int) -> np.ndarray:
    if x.shape != (n_atoms, 3):
        raise CMTInputError(f"reference positions have shape {x.shape}, expected ({n_atoms}, 3) in nm.")
    if not np.all(np.isfinite(x)):
        raise CMTInputError("reference positions contain NaN or inf: pass a finite structure in nm.")
    return x


def _check_box(box: Any, n_atoms: int) -> np.ndarray:
    b = nanometers(box)
    if b.shape != (3 * n_atoms, 2) or not np.all(np.isfinite(b)) or not np.all(b[:, 0] < b[:, 1]):
        raise CMTInputError(f"box must be a finite ({3 * n_atoms}, 2) array of lower < upper bounds in nm.")
    return b


def _constraint(system: openmm.System, k: int) -> tuple[int, int, float]:
    i, j, d = system.getConstraintParameters(k)
    return int(i), int(j), float(d.value_in_unit(unit.nanometer) if unit.is_quantity(d) else d)
