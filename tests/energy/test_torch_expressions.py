"""Custom expressions that once broke the torch energy (issue 24): each compiles to OpenMM's
Reference energies and forces (1e-9 relative) or is refused in one sentence, and ``make_energy``
falls back to OpenMM on any failure to build or verify the torch energy.

Negative controls, run once by hand: with static scalars passed to every function as Python floats
again (``_ARITHMETIC`` in energy/torch/lepton.py covering every operation),
test_select_on_a_global_parameter and test_a_table_called_with_a_constant failed with
"TypeError: where() received an invalid combination of arguments" and "TypeError: floor():
argument 'input' (position 1) must be Tensor, not float"; with ``make_energy`` catching only
CMTInputError again, test_auto_falls_back_on_any_exception failed with the ZeroDivisionError.
"""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch

from cmt_openmm.energy import OpenMMEnergy
from cmt_openmm.energy.select import make_energy
from cmt_openmm.energy.torch import custom
from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.systems import get_target
from cmt_openmm.target import Target

from test_torch_energy import openmm_reference, structures, with_forces

RTOL = 1e-9  # energies relative to max(|E|, 1 kJ/mol), forces to the largest atomic force


@pytest.fixture(scope="module")
def aldp() -> Target:
    return get_target("aldp-vacuum")


def assert_matches(target: Target, n: int = 6) -> np.ndarray:
    """Torch (float64, unverified) against OpenMM Reference on ``n`` perturbed structures; the
    OpenMM energies (kJ/mol)."""
    x = structures(target.positions, n)
    u, f = TorchEnergy(target, verify=False, compile=False).energy_and_forces(x)
    e_ref, f_ref = openmm_reference(target.system, x)
    assert np.abs(u * target.kT - e_ref).max() <= RTOL * max(np.abs(e_ref).max(), 1.0), (u * target.kT, e_ref)
    assert np.abs(f * target.kT - f_ref).max() <= RTOL * max(np.abs(f_ref).max(), 1.0)
    return e_ref


def per_particle_force(expression: str, values: np.ndarray, cutoff: float | None = None) -> openmm.CustomNonbondedForce:
    force = openmm.CustomNonbondedForce(expression)
    force.addPerParticleParameter("a")
    for value in values:
        force.addParticle([value])
    if cutoff is not None:
        force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
        force.setCutoffDistance(cutoff)
    return force


# -- item 1: static scalars in every function, and the fallback --------------------------------------
@pytest.mark.parametrize("restrain", [0.0, 1.0])
def test_select_on_a_global_parameter(aldp, restrain):
    force = openmm.CustomBondForce("select(restrain, k*(r-r0)^2, 0) + min(r, 0.1) + atan2(1, r) + max(k, r)")
    force.addGlobalParameter("restrain", restrain)
    force.addGlobalParameter("k", 1000.0)
    force.addPerBondParameter("r0")
    for i, j in [(0, 1), (1, 4), (4, 6), (6, 8)]:
        force.addBond(i, j, [0.12])
    e_ref = assert_matches(with_forces(aldp, force, name="restraint"))
    assert (np.abs(e_ref) > 1.0).all()


def test_a_table_called_with_a_constant(aldp):
    force = openmm.CustomNonbondedForce("tab(floor(r/0.2), 1) + tab(0, 1)*delta(floor(r/0.3))/r")
    force.addTabulatedFunction("tab", openmm.Discrete2DFunction(2, 2, [1.0, 0.5, 0.25, 2.0]))
    for _ in range(aldp.n_atoms):
        force.addParticle([])
    assert_matches(with_forces(aldp, force, name="table"))


@pytest.mark.parametrize("where", ["_compile", "__call__"])
def test_auto_falls_back_on_any_exception(aldp, monkeypatch, where):
    """An exception while building (``_compile``) or verifying (``__call__``) a term: ``auto``
    warns in one line naming the force and the cause and uses OpenMM; ``torch`` says the same."""
    force = openmm.CustomBondForce("k*r^2")
    force.addGlobalParameter("k", 1.0)
    force.addBond(0, 1, [])
    target = with_forces(aldp, force, name="broken")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(custom.CustomBondedTerm, where, broken)
    with pytest.warns(UserWarning) as caught:
        energy = make_energy(target, compile=False)
    assert isinstance(energy, OpenMMEnergy) and energy.selection == "openmm: torch cannot evaluate it"
    message = str(caught[0].message)
    assert "CustomBondForce #0" in message and "ZeroDivisionError: float division by zero" in message
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    with pytest.raises(Exception, match="CustomBondForce #0"):
        make_energy(target, backend="torch", compile=False)

