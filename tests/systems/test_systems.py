"""Named targets: the three alanine dipeptide systems and the toys."""

import numpy as np
import openmm
import openmm.unit as unit
import pytest

from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems import get_target, list_targets
from cmt_openmm.systems.toys import ToyTarget

ALDP = {
    "aldp-vacuum": {"NonbondedForce"},
    "aldp-obc": {"NonbondedForce", "GBSAOBCForce"},
    "aldp-implicit": {"NonbondedForce", "CustomGBForce"},
}

REFERENCE = openmm.Platform.getPlatformByName("Reference")


@pytest.fixture(scope="module")
def aldp():
    return {name: get_target(name) for name in ALDP}


def test_list_targets():
    assert list_targets() == ["aldp-vacuum", "aldp-obc", "aldp-implicit", "ala4", "ala4-hbonds", "ala6", "ala6-hbonds",
                              "elil", "elil-hbonds", "toy-double-well", "toy-gaussian-mixture"]


@pytest.mark.parametrize("name", list(ALDP))
def test_aldp_targets(aldp, name):
    target = aldp[name]
    assert target.name == name and target.n_atoms == 22 and target.temperature == 300.0
    assert target.constraints == [] and target.has_molecule and target.box is None
    assert not target.system.usesPeriodicBoundaryConditions()
    forces = {type(f).__name__ for f in target.system.getForces()}
    assert ALDP[name] <= forces and {"HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce"} <= forces
    assert not ({"GBSAOBCForce", "CustomGBForce"} - ALDP[name]) & forces  # no other solvent model
    for force in target.system.getForces():
        if isinstance(force, (openmm.NonbondedForce, openmm.GBSAOBCForce)):
            assert force.getNonbondedMethod() == 0  # NoCutoff
        if isinstance(force, openmm.CustomGBForce):
            assert force.getNonbondedMethod() == openmm.CustomGBForce.NoCutoff
    u = target.reduced_potential(target.positions)
    assert np.isfinite(u) and abs(u) < 1e3


def test_aldp_targets_share_topology_and_reference_structure(aldp):
    vacuum = aldp["aldp-vacuum"]
    assert len({t.topology_fingerprint() for t in aldp.values()}) == 1
    assert len({t.system_fingerprint() for t in aldp.values()}) == 3
    for target in aldp.values():
        np.testing.assert_array_equal(target.positions, vacuum.positions)


def test_aldp_implicit_energy_matches_openmmtools(aldp):
    from openmmtools.testsystems import AlanineDipeptideImplicit

    testsystem = AlanineDipeptideImplicit(constraints=None)
    context = openmm.Context(testsystem.system, openmm.VerletIntegrator(0.001), REFERENCE)
    target = aldp["aldp-implicit"]
    context.setPositions(target.positions)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert target.reduced_potential(target.positions) == pytest.approx(energy / target.kT, rel=1e-12)


def test_solvent_changes_the_energy(aldp):
    u = {name: t.reduced_potential(t.positions) for name, t in aldp.items()}
    assert u["aldp-obc"] < u["aldp-vacuum"]  # solvation lowers the energy of a polar peptide
    assert len(set(u.values())) == 3


def test_temperature_and_toys():
    target = get_target("aldp-vacuum", temperature=400.0 * unit.kelvin)
    assert target.temperature == 400.0
    for name in ("toy-double-well", "toy-gaussian-mixture"):
        toy = get_target(name, 350.0)
        assert isinstance(toy, ToyTarget) and toy.name == name and toy.temperature == 350.0


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(CMTInputError) as error:
        get_target("aldp-explicit")
    message = str(error.value)
    assert "aldp-explicit" in message and all(name in message for name in list_targets())
    assert "\n" not in message and message.endswith(".")
