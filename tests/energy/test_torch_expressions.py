"""Custom expressions that once broke the torch energy (issue 24): each compiles to OpenMM's
Reference energies and forces (1e-9 relative) or is refused in one sentence, and ``make_energy``
falls back to OpenMM on any failure to build or verify the torch energy.

Negative controls, run once by hand: with static scalars passed to every function as Python floats
again (``_ARITHMETIC`` in energy/torch/lepton.py covering every operation),
test_select_on_a_global_parameter and test_a_table_called_with_a_constant failed with
"TypeError: where() received an invalid combination of arguments" and "TypeError: floor():
argument 'input' (position 1) must be Tensor, not float"; with ``make_energy`` catching only
CMTInputError again, test_auto_falls_back_on_any_exception failed with the ZeroDivisionError;
with interaction-group pairs taken lower index first again,
test_interaction_groups_take_particle_1_from_set1 failed for both cutoffs (torch 639.9 kJ/mol
against OpenMM's 567.4); with :func:`~cmt_openmm.energy.torch.lepton.pair_symmetric` always true,
test_asymmetric_pair_energies_without_an_order_are_refused failed ("DID NOT RAISE").

The slow fuzz's findings (seeds 1-10), negative controls run once by hand: without
lepton_optimize (expressions evaluated as written), test_expressions_are_simplified_as_lepton_does
failed (inf against OpenMM's -0.41 kJ/mol); with literal min/max folded as the compiled code
compares (not std::min/max), it failed with OpenMMWouldHangError; with the NaN check of the
optimizer off, test_a_nan_constant_is_refused_as_openmm_would_hang failed ("DID NOT RAISE");
with forces by autograd again, test_forces_are_openmm_derivatives_not_autograd failed (inf
against 5.13 kJ/mol); with table indices only clamped, test_tables_and_signed_zeros_as_openmm_
evaluates_them failed (IndexError on a NaN index), and with -(x) as -x (591.6 kJ/mol off).
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
from cmt_openmm.energy.torch.term import UnsupportedForceError
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


def gb_force(pair_energy: str, values: np.ndarray, cutoff: float | None = None) -> openmm.CustomGBForce:
    """A CustomGBForce with parameter s, a pair-sum value B and the pair energy ``pair_energy``."""
    force = openmm.CustomGBForce()
    force.addPerParticleParameter("s")
    force.addComputedValue("B", "s2*exp(-r)", openmm.CustomGBForce.ParticlePair)
    force.addEnergyTerm(pair_energy, openmm.CustomGBForce.ParticlePair)
    for value in values:
        force.addParticle([value])
    if cutoff is not None:
        force.setNonbondedMethod(openmm.CustomGBForce.CutoffNonPeriodic)
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


def test_min_and_max_treat_nan_as_lepton_does(aldp):
    """Lepton's max(a, b) is a > b ? a : b (and min alike): a NaN first argument gives the second
    (max(log(-1), r) = r), unlike IEEE maximum. (OpenMM's force for min(NaN, r) is 0 while its
    energy is r, so only max is compared with a NaN.) Negative control, run once by hand: with
    torch.maximum / torch.minimum every energy came out +inf (failed) where OpenMM's is finite."""
    force = openmm.CustomBondForce("max(log(p), r) + min(r, 0.1)")
    force.addGlobalParameter("p", -1.0)
    for i, j in [(0, 1), (1, 4), (4, 6), (6, 8)]:
        force.addBond(i, j, [])
    assert np.isfinite(assert_matches(with_forces(aldp, force, name="nan-min-max"))).all()


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


# -- item 2: the order of the two particles of a pair ------------------------------------------------
@pytest.mark.parametrize("cutoff", [None, 0.9])
def test_interaction_groups_take_particle_1_from_set1(aldp, cutoff):
    """``a1*exp(-r)`` with set1 above set2, and with overlapping sets (pairs in both: lower first)."""
    a = np.random.default_rng(0).uniform(0.5, 5.0, aldp.n_atoms)
    force = per_particle_force("a1*exp(-r)", a, cutoff)
    force.addInteractionGroup(range(11, 22), range(0, 11))
    force.addInteractionGroup(range(5, 22), range(0, 16))
    assert_matches(with_forces(aldp, force, name="groups"))


def test_asymmetric_pair_energies_without_an_order_are_refused(aldp):
    """Without interaction groups OpenMM's pair order is the platform's (Reference and CPU differ):
    ``a1*exp(-r)`` and a CustomGBForce pair energy ``s1/r`` are refused, with or without a cutoff;
    symmetric ones, also where only the parameters make them so, compile and match."""
    a = np.random.default_rng(0).uniform(0.5, 5.0, aldp.n_atoms)
    for cutoff in (None, 0.9):
        target = with_forces(aldp, per_particle_force("a1*exp(-r)", a, cutoff), name="asymmetric")
        with pytest.raises(UnsupportedForceError, match="changes when particles 1 and 2 swap"):
            TorchEnergy(target, verify=False)
        with pytest.raises(UnsupportedForceError, match=r"pair energy 's1/r', which changes when particles 1 and 2"):
            TorchEnergy(with_forces(aldp, gb_force("s1/r", a, cutoff), name="gb"), verify=False)
        assert_matches(with_forces(aldp, gb_force("s1*s2*B1*B2/r - (B1-B2)^2", a, cutoff), name="gb-symmetric"), n=3)
    same = np.full(aldp.n_atoms, 1.5)  # equal parameters: symmetric on this force
    assert_matches(with_forces(aldp, per_particle_force("a1*exp(-r) + (a1-a2)^2", same, 0.9), name="same"))
    assert_matches(with_forces(aldp, per_particle_force("(a1-a2)^2*exp(-r)", a), name="squared"))


# -- the slow fuzz (seeds 1-10): OpenMM simplifies, then differentiates, before it evaluates --------
def bond_force(expression: str, **globals_: float) -> openmm.CustomBondForce:
    force = openmm.CustomBondForce(expression)
    for name, value in globals_.items():
        force.addGlobalParameter(name, value)
    for i, j in [(0, 1), (1, 4), (4, 6), (6, 8), (8, 14), (3, 10)]:
        force.addBond(i, j, [])
    return force


def test_expressions_are_simplified_as_lepton_does(aldp):
    """OpenMM optimizes an expression, with its global parameters as symbols, before evaluating
    it: h/h is 1 at h = 0 (the fuzz's seed 2: select(square(g), h/h, sin(a2))), x - x and 0*x
    are 0 for a non-finite x, square(sqrt(x)) is x for x < 0, and a literal max(1, NaN) folds
    to 1 (std::max), not to NaN as its compiled code would evaluate it."""
    force = bond_force(
        "h/h*r^2 + 0*log(g) + (log(g) - log(g)) + square(sqrt(g - r)) + sqrt(square(r - 0.15)) + max(1, log(-1))",
        h=0.0, g=-1.0,
    )
    assert np.isfinite(assert_matches(with_forces(aldp, force, name="simplified"))).all()


def test_a_nan_constant_is_refused_as_openmm_would_hang(aldp):
    """A constant part that is NaN never equals itself in Lepton's tree comparison, so OpenMM's
    optimizer never finishes (a Context of the force hangs; the fuzz's seed 2: (0.713-1.779)^1.5):
    refused in one sentence, and ``auto`` raises it rather than fall back to a hanging OpenMM."""
    target = with_forces(aldp, bond_force("r + select(r, 1, (0.713 - 1.779)^1.5)"), name="nan")
    with pytest.raises(UnsupportedForceError, match="constant part that is NaN") as caught:
        TorchEnergy(target, verify=False)
    assert "\n" not in str(caught.value) and str(caught.value).count(". ") == 0
    with pytest.raises(UnsupportedForceError, match="OpenMM would hang"):
        make_energy(target, compile=False)


def test_forces_are_openmm_derivatives_not_autograd(aldp):
    """OpenMM differentiates the expression symbolically: the branch not taken by max or select
    contributes nothing even where its own derivative is infinite (max(sqrt(-r), c), max(acos(r),
    c) beyond 1 nm), and min(NaN, c), whose energy is c, has the NaN branch's derivative (seeds
    2-4: max(sqrt(-(r)), log(1.494^0.5)), min(max(r, acos(a1)), ...)); beyond a cutoff an
    expression undefined there (acos(r)) gives no force."""
    force = bond_force("max(sqrt(-r), 0.2) + min(max(r, acos(k)), 0.46) + select(step(r - 5), sqrt(0.1 - r), r)", k=2.0)
    assert np.isfinite(assert_matches(with_forces(aldp, force, name="derivatives"))).all()
    n = aldp.n_atoms
    nonbonded = per_particle_force("max(acos(r), 3.85) + acos(r)", np.ones(n), cutoff=0.6)
    assert np.isfinite(assert_matches(with_forces(aldp, nonbonded, name="cutoff"))).all()


def test_tables_and_signed_zeros_as_openmm_evaluates_them(aldp):
    """A Discrete table index that is NaN or +inf is C's (int) of it on x86, INT_MIN, so the first
    entry (tab2(2*r, 1.75/h) at h = 0, seed 5); -(0) is +0 in OpenMM's compiled code (0 - x), so
    atan2(-(delta(g)), -1.789) is pi, not -pi (seed 10)."""
    force = openmm.CustomNonbondedForce("tab(2*r, 1.75/h) + tab(sqrt(g), 2) + r*atan2(-(delta(g)), -1.789)")
    force.addTabulatedFunction("tab", openmm.Discrete2DFunction(3, 3, [1.0, 0.5, -0.5, 2.0, 0.0, 1.5, 3.0, -2.0, 0.7]))
    force.addGlobalParameter("h", 0.0)
    force.addGlobalParameter("g", -0.5)
    for _ in range(aldp.n_atoms):
        force.addParticle([])
    assert np.isfinite(assert_matches(with_forces(aldp, force, name="tables"))).all()
