"""Verification that follows the flow (issue 24): structures spread as training sees them, every
force compared also above 32 forces, and the compiled path checked when it is first built.

Negative controls, run once by hand: with verification_structures back to the reference and its
small and large perturbations (no far, scaled or cutoff-stretched structures),
test_an_ignored_cutoff_is_caught failed ("DID NOT RAISE"); with per-force references only up to
32 forces (as before), test_a_fault_in_force_40_is_named failed (no per-force record of its 41
forces); with TorchEnergy._check_compiled returning None,
test_a_wrong_compiled_path_stays_eager failed ("DID NOT WARN"); without torsion_grid_structures in
verify_against_openmm, test_a_wrong_cmap_patch_is_caught failed ("DID NOT RAISE").
"""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch

from cmt_openmm.energy.torch import energy as energy_module
from cmt_openmm.energy.torch.custom import CustomBondedTerm, CustomNonbondedTerm
from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.energy.torch.lepton import LeptonExpression, parse_lepton
from cmt_openmm.energy.torch.verification import (
    VerificationError,
    torsion_grid_structures,
    verification_structures,
    verify_against_openmm,
)
from cmt_openmm.systems import get_target
from cmt_openmm.units import dihedral_angles

from test_torch_energy import with_forces


@pytest.fixture(scope="module")
def aldp():
    return get_target("aldp-vacuum")


def test_structures_reach_beyond_every_cutoff_and_are_compressed(aldp):
    x = verification_structures(aldp.positions, distances=(1.0, 1.2))
    extent = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1).max()  # noqa: E731
    extents = np.array([extent(p) for p in x])
    assert extents.max() > 1.2 * 1.4 and extents.min() < 0.9 * extent(aldp.positions)
    assert len(x) == 1 + 24 + 8 + 8 + 4 + 2


def test_an_ignored_cutoff_is_caught(aldp):
    """The fault issue 24 injected: a cutoff ignored passes structures near the reference when no
    pair of them reaches it (their largest pair distance was 1.007 nm)."""
    force = openmm.CustomNonbondedForce("exp(-r)")
    for _ in range(aldp.n_atoms):
        force.addParticle([])
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
    force.setCutoffDistance(1.2)  # beyond every pair of the structures near the reference
    energy = TorchEnergy(with_forces(aldp, force, name="cutoff"), verify=False)
    (term,) = [t for t in energy.terms if isinstance(t, CustomNonbondedTerm)]
    term.cutoff = None  # the fault
    with pytest.raises(VerificationError, match="CustomNonbondedForce #0"):
        verify_against_openmm(energy)


def test_a_fault_in_force_40_is_named(aldp):
    forces = []
    for k in range(41):
        force = openmm.CustomBondForce(f"{0.1 * (k + 1)}*(r-0.15)^2")
        force.addBond(k % 20, k % 20 + 1, [])
        forces.append(force)
    energy = TorchEnergy(with_forces(aldp, *forces, name="many"), verify=False)
    record = verify_against_openmm(energy)
    assert len(record["per_force"]) == 41 and record["passed"]
    (term,) = [t for t in energy.terms if isinstance(t, CustomBondedTerm) and t.label.endswith("#40")]
    term.expression = LeptonExpression(parse_lepton("4.2*(r-0.15)^2"), {}, {"r"}, derivatives=["r"])  # the fault
    with pytest.raises(VerificationError, match="CustomBondForce #40"):
        verify_against_openmm(energy)


def test_a_wrong_compiled_path_stays_eager(aldp, monkeypatch):
    def fake_compile(function, **kwargs):  # "compiles" to a function that is off by 1 kT
        def compiled(X):
            u, g, ok = function(X)
            return u + 1.0, g, ok
        return compiled

    monkeypatch.setattr(energy_module.torch, "compile", fake_compile)
    energy = TorchEnergy(aldp, verify=False, compile=True)
    x = torch.as_tensor(verification_structures(aldp.positions)[:6])
    with pytest.warns(UserWarning, match="stays eager: its compiled path disagrees with the verified eager one"):
        u = energy(x)
    assert energy.compile is False and energy.compiled_check["energy"]["max_relative_energy_error"] > 1e-3
    assert torch.allclose(u, TorchEnergy(aldp, verify=False)(x), rtol=1e-12)


def cmap_target(aldp):
    """ALDP's backbone (phi 4-6-8-14, psi 6-8-14-16) under a random 24 x 24 CMAP map."""
    force = openmm.CMAPTorsionForce()
    force.addMap(24, list(np.random.default_rng(0).normal(0.0, 5.0, 24 * 24)))
    force.addTorsion(0, 4, 6, 8, 14, 6, 8, 14, 16)
    return with_forces(aldp, force, name="cmap")


def test_cmap_torsions_visit_every_patch(aldp):
    target = cmap_target(aldp)
    bonds = [(a.index, b.index) for a, b in target.topology.bonds()]
    x = torsion_grid_structures(target.positions, target.system, bonds)
    angles = np.remainder(dihedral_angles(x, [(4, 6, 8, 14), (6, 8, 14, 16)]) + 2 * np.pi, 2 * np.pi)
    patches = {(int(a // (np.pi / 12)), int(b // (np.pi / 12))) for a, b in angles}
    assert len(x) == 576 and len(patches) == 576
    bond_lengths = lambda p: np.array([np.linalg.norm(p[i] - p[j]) for i, j in bonds])  # noqa: E731
    assert np.allclose(bond_lengths(x[100]), bond_lengths(target.positions))  # rigid rotations only


def test_a_wrong_cmap_patch_is_caught(aldp):
    """The fault issue 24 injected: a CMAP patch off by 5 kJ/mol where structures near the
    reference never go (here the patch opposite the reference's on both angles)."""
    energy = TorchEnergy(cmap_target(aldp), verify=False)
    (term,) = energy.terms
    phi, psi = np.remainder(dihedral_angles(aldp.positions, [(4, 6, 8, 14), (6, 8, 14, 16)])[0] + 2 * np.pi, 2 * np.pi)
    s, t = (int(phi // (np.pi / 12)) + 12) % 24, (int(psi // (np.pi / 12)) + 12) % 24
    term.coeff[s + 24 * t, 0] += 5.0  # the fault
    with pytest.raises(VerificationError, match="CMAPTorsionForce #0"):
        verify_against_openmm(energy)
