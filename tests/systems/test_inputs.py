"""Every OpenMM input as a ``system`` entry (systems/inputs.py), in Python and in run files."""
from __future__ import annotations

import openmm
import pytest
import yaml
from openmm import app, unit
from openmmtools.testsystems import get_data_filename

from cmt_openmm.cli import main
from cmt_openmm.runs.run_files import parse_run_config
from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems import aldp_pdb_path, get_target
from cmt_openmm.systems.inputs import resolve_entry, target_from_entry

PRMTOP = get_data_filename("data/alanine-dipeptide-gbsa/alanine-dipeptide.prmtop")
INPCRD = get_data_filename("data/alanine-dipeptide-gbsa/alanine-dipeptide.crd")

GROMACS_TOP = """[ defaults ]
1 2 yes 0.5 0.8333
[ atomtypes ]
CT 6 12.011 0.0 A 0.34 0.45
[ moleculetype ]
TRI 3
[ atoms ]
1 CT 1 TRI C1 1 0.0 12.011
2 CT 1 TRI C2 2 0.0 12.011
3 CT 1 TRI C3 3 0.0 12.011
[ bonds ]
1 2 1 0.15 200000
2 3 1 0.15 200000
[ angles ]
1 2 3 1 109.0 300
[ system ]
triatomic
[ molecules ]
TRI 1
"""
GROMACS_GRO = """triatomic
3
    1TRI     C1    1   0.000   0.000   0.000
    1TRI     C2    2   0.150   0.000   0.000
    1TRI     C3    3   0.200   0.140   0.000
   1.00000   1.00000   1.00000
"""


def _energy(target) -> float:
    context = openmm.Context(target.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(target.positions)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def test_pdb_with_force_field_options():
    target = target_from_entry({"pdb": str(aldp_pdb_path()), "forcefield": ["amber99sbildn.xml", "amber99_obc.xml"],
                                "constraints": "HBonds", "hydrogenMass": 1.5, "removeCMMotion": False}, 310.0)
    assert len(target.constraints) == 12 and target.temperature == 310.0
    assert not any(isinstance(f, openmm.CMMotionRemover) for f in target.system.getForces())
    hydrogen = next(a.index for a in target.topology.atoms() if a.element.symbol == "H")
    assert target.system.getParticleMass(hydrogen).value_in_unit(unit.dalton) == pytest.approx(1.5)
    bonds = next(f for f in target.system.getForces() if isinstance(f, openmm.HarmonicBondForce))
    assert bonds.getNumBonds() == 21 - 12  # OpenMM drops the bond terms of constrained X-H bonds


def test_amber_prmtop_is_the_openmmtools_system():
    target = target_from_entry({"prmtop": PRMTOP, "inpcrd": INPCRD, "implicitSolvent": "OBC1"})
    assert target.n_atoms == 22 and target.name == "alanine-dipeptide"
    reference = get_target("aldp-implicit").with_temperature(300.0)  # AlanineDipeptideImplicit: the same files
    reference.positions = target.positions
    assert _energy(target) == pytest.approx(_energy(reference), rel=1e-6)


def test_gromacs_top_and_gro(tmp_path):
    (tmp_path / "tri.top").write_text(GROMACS_TOP)
    (tmp_path / "tri.gro").write_text(GROMACS_GRO)
    target = target_from_entry({"top": "tri.top", "gro": "tri.gro", "constraints": "AllBonds"}, base_dir=tmp_path)
    assert target.n_atoms == 3 and len(target.constraints) == 2 and target.has_molecule


def test_serialised_system_with_pdb(tmp_path):
    source = get_target("aldp-vacuum")
    (tmp_path / "system.xml").write_text(openmm.XmlSerializer.serialize(source.system))
    target = target_from_entry({"xml": "system.xml", "pdb": str(aldp_pdb_path()), "name": "mine"}, base_dir=tmp_path)
    assert target.name == "mine" and target.system_fingerprint() == source.system_fingerprint()


def test_openmmtools_test_system_and_sequence(tmp_path, monkeypatch):
    toluene = target_from_entry({"openmmtools": "TolueneImplicit"})
    assert toluene.n_atoms == 15 and toluene.name == "TolueneImplicit"
    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    peptide = target_from_entry({"sequence": "AA", "constraints": "HBonds"})
    assert [r.name for r in peptide.topology.residues()] == ["ACE", "ALA", "ALA", "NME"] and peptide.constraints


def test_openmm_objects_stand_for_their_names():
    entry = resolve_entry({"prmtop": PRMTOP, "inpcrd": INPCRD, "constraints": app.HBonds, "implicitSolvent": app.OBC2})
    assert entry["constraints"] == "HBonds" and entry["implicitSolvent"] == "OBC2"  # names, as in a run file
    target = target_from_entry({"pdb": str(aldp_pdb_path()), "forcefield": ["amber99sbildn.xml"],
                                "constraints": app.HBonds})
    assert len(target.constraints) == 12


@pytest.mark.parametrize("entry, words", [
    ({"pdb": "x.pdb", "forcefield": ["a.xml"], "constraint": "HBonds"}, "system.constraint is not a key"),
    ({"prmtop": PRMTOP}, "system.inpcrd"),
    ({"prmtop": PRMTOP, "inpcrd": "missing.crd"}, "missing.crd does not exist"),
    ({"pdb": str(aldp_pdb_path()), "forcefield": ["amber99sbildn.xml"], "constraints": "Hbonds"}, "system.constraints"),
    ({"pdb": str(aldp_pdb_path()), "forcefield": ["amber14-all.xml", "implicit/gbn3.xml"]},
     "force-field file implicit/gbn3.xml was not found"),
    ({"openmmtools": "NoSuchSystem"}, "not an openmmtools test system"),
    ({"sequence": "AA", "pdb": "x.pdb"}, "system.pdb is not a key of a sequence system"),
    ({"name": "x"}, "exactly one of"),
    ({"openmmtools": "WaterBox", "kwargs": {"box_edge": 1.5 * unit.nanometer}}, "explicit solvent"),
    ("aldp-vaccum", "unknown system"),
])
def test_bad_entries_are_refused_in_one_sentence(entry, words, tmp_path):
    with pytest.raises(CMTInputError, match=words) as error:
        target_from_entry(entry, base_dir=tmp_path)
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_run_files_take_the_same_entries_with_paths_relative_to_the_file(tmp_path, capsys):
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "tri.top").write_text(GROMACS_TOP)
    (tmp_path / "inputs" / "tri.gro").write_text(GROMACS_GRO)
    spec = parse_run_config({"system": {"top": "inputs/tri.top", "gro": "inputs/tri.gro"}}, tmp_path)
    assert spec.system["top"] == str((tmp_path / "inputs" / "tri.top").resolve())
    assert resolve_entry(spec.system, "/") == spec.system  # a stored run file reads back from anywhere
    run_file = tmp_path / "bad.yaml"
    run_file.write_text(yaml.safe_dump({"system": {"prmtop": PRMTOP, "inpcrd": INPCRD, "implicit": "OBC2"}}))
    assert main(["train", str(run_file), "--out", str(tmp_path / "out")]) == 2
    assert "system.implicit is not a key of a prmtop system" in capsys.readouterr().err


def test_solvated_pdb_is_refused_naming_explicit_solvent(tmp_path):
    pdb = app.PDBFile(get_data_filename("data/alanine-dipeptide-explicit/alanine-dipeptide.pdb"))
    with open(tmp_path / "solvated.pdb", "w") as handle:
        app.PDBFile.writeFile(pdb.topology, pdb.positions, handle)
    with pytest.raises(CMTInputError, match="water molecules: explicit solvent"):
        target_from_entry({"pdb": "solvated.pdb", "forcefield": ["amber99sbildn.xml", "tip3p.xml"]}, base_dir=tmp_path)
