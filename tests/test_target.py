"""Target: unit handling, recorded constraints, reduced potential, fingerprints and every refusal."""

import math
import pickle

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems import aldp_pdb_path
from cmt_openmm.target import Target

R = 0.00831446261815324  # kJ/(mol K)
POSITIONS = np.array([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.14, 0.0]])

REFERENCE = openmm.Platform.getPlatformByName("Reference")


def tiny_system(n=3, mass=12.0):
    """A bent 3-atom chain with harmonic bonds: system + topology."""
    system = openmm.System()
    topology = app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    atoms = []
    bonds = openmm.HarmonicBondForce()
    for i in range(n):
        system.addParticle(mass)
        atoms.append(topology.addAtom(f"C{i}", app.element.carbon, residue))
    for i in range(n - 1):
        bonds.addBond(i, i + 1, 0.15, 1000.0)
        topology.addBond(atoms[i], atoms[i + 1])
    system.addForce(bonds)
    return system, topology


def tiny_target(**kwargs):
    system, topology = tiny_system()
    return Target(system, topology, POSITIONS, 300.0, **kwargs)


def assert_one_sentence(error):
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")


def test_floats_and_quantities_agree():
    system, topology = tiny_system()
    plain = Target(system, topology, POSITIONS, 300.0)
    quantity = Target(system, topology, (POSITIONS * 10.0) * unit.angstrom, 300.0 * unit.kelvin)
    vec3 = Target(system, topology, [openmm.Vec3(*p) for p in POSITIONS] * unit.nanometer, 300)
    for target in (quantity, vec3):
        np.testing.assert_allclose(target.positions, plain.positions, rtol=0, atol=1e-12)
        assert target.temperature == 300.0 and target.positions.dtype == np.float64
    assert plain.kT == pytest.approx(R * 300.0, rel=1e-9)
    assert plain.n_atoms == 3 and plain.name == "custom" and plain.box is None and plain.constraints == []


def test_constraints_recorded():
    system, topology = tiny_system()
    system.addConstraint(0, 1, 0.15 * unit.nanometer)
    system.addConstraint(1, 2, 0.16)
    target = Target(system, topology, POSITIONS, 300.0)
    assert target.constraints == [(0, 1, pytest.approx(0.15)), (1, 2, pytest.approx(0.16))]
    assert all(isinstance(i, int) and isinstance(j, int) for i, j, _ in target.constraints)


def test_reduced_potential_matches_openmm_and_scales_with_temperature():
    target = tiny_target()
    x = POSITIONS + 0.01
    context = openmm.Context(target.system, openmm.VerletIntegrator(0.001), REFERENCE)
    context.setPositions(x)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert target.reduced_potential(x) == pytest.approx(energy / target.kT, rel=1e-12)
    assert target.reduced_potential(x * unit.nanometer) == pytest.approx(energy / target.kT, rel=1e-12)
    hot = target.with_temperature(600.0 * unit.kelvin)
    assert hot.temperature == 600.0 and hot.system is target.system
    assert hot.reduced_potential(x) == pytest.approx(0.5 * target.reduced_potential(x), rel=1e-12)


def test_reduced_potential_failures_are_inf_and_bad_shapes_refused():
    target = tiny_target()
    bad = POSITIONS.copy()
    bad[1, 0] = np.nan
    assert target.reduced_potential(bad) == math.inf
    with pytest.raises(CMTInputError) as error:
        target.reduced_potential(POSITIONS[:2])
    assert_one_sentence(error)


def test_fingerprints():
    target = tiny_target()
    same = tiny_target()
    assert target.topology_fingerprint() == same.topology_fingerprint()
    assert target.system_fingerprint() == same.system_fingerprint()
    assert len(target.topology_fingerprint()) == 64

    system, topology = tiny_system()
    system.addConstraint(0, 1, 0.15)
    constrained = Target(system, topology, POSITIONS, 300.0)
    assert constrained.topology_fingerprint() != target.topology_fingerprint()

    system, topology = tiny_system()
    system.getForce(0).setBondParameters(0, 0, 1, 0.15, 2000.0)
    assert Target(system, topology, POSITIONS, 300.0).system_fingerprint() != target.system_fingerprint()
    assert Target(system, topology, POSITIONS, 300.0).topology_fingerprint() == target.topology_fingerprint()


def test_pickle_round_trip_keeps_energy_and_fingerprints():
    target = tiny_target(name="chain")
    u = target.reduced_potential(POSITIONS + 0.01)  # builds the cached Context, which must not be pickled
    copy = pickle.loads(pickle.dumps(target))
    assert copy.name == "chain"
    assert copy.reduced_potential(POSITIONS + 0.01) == pytest.approx(u, rel=1e-12)
    assert copy.system_fingerprint() == target.system_fingerprint()
    assert copy.topology_fingerprint() == target.topology_fingerprint()


def test_has_molecule_and_repr():
    target = tiny_target(name="chain")
    assert target.has_molecule
    system, topology = tiny_system(n=2)
    assert not Target(system, topology, POSITIONS[:2], 300.0).has_molecule
    text = repr(target)
    assert "chain" in text and "n_atoms=3" in text and "HarmonicBondForce" in text


def test_box_is_checked():
    box = np.tile([-1.0, 1.0], (9, 1))
    assert tiny_target(box=box).box.shape == (9, 2)
    with pytest.raises(CMTInputError) as error:
        tiny_target(box=box[:3])
    assert_one_sentence(error)


def test_from_pdb_defaults_to_no_cutoff_and_no_constraints():
    target = Target.from_pdb(aldp_pdb_path(), ["amber99sbildn.xml"], 300.0)
    assert target.name == "alanine-dipeptide" and target.n_atoms == 22 and target.constraints == []
    nonbonded = next(f for f in target.system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert nonbonded.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    assert np.isfinite(target.reduced_potential(target.positions))
    constrained = Target.from_pdb(aldp_pdb_path(), "amber99sbildn.xml", 300.0, name="c", constraints=app.HBonds)
    assert len(constrained.constraints) == 12 and constrained.name == "c"


def test_from_openmmtools_uses_its_objects():
    class FakeTestSystem:
        def __init__(self):
            self.system, self.topology = tiny_system()
            self.positions = POSITIONS * unit.nanometer

    target = Target.from_openmmtools(FakeTestSystem(), 250.0 * unit.kelvin)
    assert target.name == "FakeTestSystem" and target.temperature == 250.0 and target.n_atoms == 3


# ----------------------------------------------------------------- refusals -------------------------------------------


def test_refuses_periodic_system():
    system, topology = tiny_system()
    nonbonded = openmm.NonbondedForce()
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    for _ in range(3):
        nonbonded.addParticle(0.0, 0.3, 0.5)
    system.addForce(nonbonded)
    with pytest.raises(CMTInputError, match=r"NonbondedForce #\d uses periodic .* a non-periodic method") as error:
        Target(system, topology, POSITIONS, 300.0)
    assert_one_sentence(error)
    assert "solvent" not in str(error.value)  # no water to strip: the setting that fits the force
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.NoCutoff)
    bond = openmm.CustomBondForce("r^2")
    bond.setUsesPeriodicBoundaryConditions(True)
    system.addForce(bond)
    with pytest.raises(CMTInputError, match=r"CustomBondForce #\d uses .* setUsesPeriodicBoundaryConditions\(False\)"):
        Target(system, topology, POSITIONS, 300.0)


def test_refuses_virtual_sites():
    system, topology = tiny_system()
    system.addParticle(0.0)
    system.setVirtualSite(3, openmm.TwoParticleAverageSite(0, 1, 0.5, 0.5))
    topology.addAtom("V", None, next(topology.residues()))
    with pytest.raises(CMTInputError, match="virtual site") as error:
        Target(system, topology, np.vstack([POSITIONS, [0.07, 0, 0]]), 300.0)
    assert_one_sentence(error)


def test_refuses_count_mismatch():
    system, topology = tiny_system()
    system.addParticle(12.0)
    with pytest.raises(CMTInputError, match="4 particles but the Topology has 3 atoms") as error:
        Target(system, topology, POSITIONS, 300.0)
    assert_one_sentence(error)


def test_refuses_zero_mass():
    system, topology = tiny_system()
    system.setParticleMass(1, 0.0)
    with pytest.raises(CMTInputError, match="particle 1 has zero mass") as error:
        Target(system, topology, POSITIONS, 300.0)
    assert_one_sentence(error)


@pytest.mark.parametrize("temperature", [0.0, -10.0, float("nan"), float("inf"), "hot", 300.0 * unit.nanometer])
def test_refuses_bad_temperature(temperature):
    system, topology = tiny_system()
    with pytest.raises(CMTInputError, match="temperature") as error:
        Target(system, topology, POSITIONS, temperature)
    assert_one_sentence(error)
    with pytest.raises(CMTInputError):
        tiny_target().with_temperature(temperature)


@pytest.mark.parametrize(
    "positions",
    [POSITIONS[:2], POSITIONS.ravel(), POSITIONS[None], np.where(np.eye(3, dtype=bool), np.nan, POSITIONS),
     np.where(np.eye(3, dtype=bool), np.inf, POSITIONS), POSITIONS * unit.kelvin, [["a", "b", "c"]] * 3],
    ids=["too-few", "flat", "batched", "nan", "inf", "wrong-unit", "not-numbers"],
)
def test_refuses_bad_positions(positions):
    system, topology = tiny_system()
    with pytest.raises(CMTInputError, match="positions") as error:
        Target(system, topology, positions, 300.0)
    assert_one_sentence(error)


def test_from_pdb_refuses_missing_file_and_unbuildable_system(tmp_path):
    with pytest.raises(CMTInputError, match="does not exist") as error:
        Target.from_pdb(tmp_path / "missing.pdb", ["amber99sbildn.xml"], 300.0)
    assert_one_sentence(error)
    with pytest.raises(CMTInputError, match="could not build a System") as error:
        Target.from_pdb(aldp_pdb_path(), ["tip3p.xml"], 300.0)  # no templates for the peptide
    assert_one_sentence(error)


def test_from_pdb_keeps_openmm_advice_and_names_a_missing_force_field(tmp_path):
    pdb = app.PDBFile(str(aldp_pdb_path()))
    heavy = app.Modeller(pdb.topology, pdb.positions)
    heavy.delete([a for a in heavy.topology.atoms() if a.element.symbol == "H"])
    with open(tmp_path / "heavy.pdb", "w") as handle:
        app.PDBFile.writeFile(heavy.topology, heavy.positions, handle)
    with pytest.raises(CMTInputError, match=r"missing 3 H atoms\. You may be able to add them with "
                                            r"Modeller\.addHydrogens\(\).*pdbfixer") as error:
        Target.from_pdb(tmp_path / "heavy.pdb", ["amber14-all.xml"], 300.0)
    assert_one_sentence(error)
    with pytest.raises(CMTInputError, match="force-field file implicit/gbn3.xml was not found") as error:
        Target.from_pdb(aldp_pdb_path(), ["amber14-all.xml", "implicit/gbn3.xml"], 300.0)
    assert_one_sentence(error)
    assert "pdbfixer" not in str(error.value) and "hydrogens" not in str(error.value)
