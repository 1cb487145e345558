"""Random Lepton expressions in CustomBondForce and CustomNonbondedForce against OpenMM's Reference
platform (issue 24): each compiles to OpenMM's energies and forces (1e-9 relative, on structures
where OpenMM's are finite) or is refused in one sentence; any other exception or a mismatch fails.

Expressions mix Lepton's functions (select, step, delta, floor, min, atan2, ...), global and
per-bond / per-particle parameters and Discrete1D/2D tables; nonbonded forces get interaction
groups half of the time (without them an expression that is not symmetric in particles 1 and 2 is
refused). Seeded: the default run tries 40 forces in a few seconds, ``-m slow`` 2,000.

Negative controls, run once by hand: with ``"max": torch.minimum`` in lepton._OPS the default run
failed on ``max(atan2(r, min(p, 1.507)), erf(recip(p)))`` (0.077 against OpenMM's 9.655 kJ/mol);
with static scalars passed to functions as Python floats again (issue 24's crash) it failed with
"TypeError: maximum(): argument 'other' (position 2) must be Tensor, not float". The default run
and 60 more forces (seed 1000-1059) gave 28 matches, 5 refusals and 7 forces OpenMM could not
evaluate anywhere in the first 40, and no failure.

Each force is compiled to torch before OpenMM sees it: OpenMM never returns from a Context of an
expression with a NaN constant (its optimizer loops), which the compiler refuses
(OpenMMWouldHangError). The slow run's failures (OpenMM's algebraic simplification, its symbolic
derivatives, table indices beyond int, the sign of -(0)) each have a regression test in
test_torch_expressions.py; after them seeds 1-60 (12,000 forces) matched or were refused.
"""

from __future__ import annotations

import numpy as np
import openmm
import pytest

from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.energy.torch.term import UnsupportedForceError
from cmt_openmm.systems import get_target

from test_torch_energy import openmm_reference, structures, with_forces

UNARY = ["sin", "cos", "tanh", "erf", "erfc", "abs", "floor", "ceil", "step", "delta", "square", "cube", "atan",
         "exp", "sqrt", "log", "recip", "acos", "sinh"]
BINARY = ["+", "-", "*", "/", "min", "max", "atan2", "^"]
TABLE_1D = openmm.Discrete1DFunction([0.5, -1.0, 2.0, 0.25])
TABLE_2D = openmm.Discrete2DFunction(2, 3, [1.0, 0.5, -0.5, 2.0, 0.0, 1.5])


def expression(rng: np.random.Generator, leaves: list[str], depth: int, tables: bool = False) -> str:
    """A random Lepton expression of ``leaves`` (variables) and constants, ``depth`` levels deep;
    with ``tables``, calls of the Discrete1D ``tab1`` and Discrete2D ``tab2``."""
    if depth == 0 or rng.random() < 0.2:
        return str(rng.choice(leaves)) if rng.random() < 0.75 else f"{rng.uniform(0.1, 3.0):.3f}"
    sub = lambda: expression(rng, leaves, depth - 1, tables)  # noqa: E731
    kind = rng.random()
    if kind < 0.35:
        return f"{rng.choice(UNARY)}({sub()})"
    if kind < 0.8:
        op = rng.choice(BINARY)
        if op == "^":
            return f"({sub()})^{rng.choice(['2', '3', '-1', '0.5', '1.5'])}"
        return f"{op}({sub()}, {sub()})" if op[0].isalpha() else f"({sub()}){op}({sub()})"
    if kind < 0.9:
        return f"select({sub()}, {sub()}, {sub()})"
    if tables:  # constants or expressions as indices
        return rng.choice([f"tab1(floor(4*{sub()}))", f"tab2({sub()}, 1)", f"tab2(2*r, {sub()})"])
    return f"-({sub()})"


def random_force(rng: np.random.Generator, n_atoms: int) -> openmm.Force:
    globals_ = {"g": rng.uniform(-1.0, 2.0), "h": float(rng.integers(0, 2))}  # h: 0 or 1, for select
    if rng.random() < 0.5:
        force = openmm.CustomBondForce(expression(rng, ["r", "g", "h", "p"], 3))
        force.addPerBondParameter("p")
        for i, j in [(0, 1), (1, 4), (4, 6), (6, 8), (8, 14), (3, 10)]:
            force.addBond(i, j, [rng.uniform(-1.0, 1.0)])
    else:
        force = openmm.CustomNonbondedForce(expression(rng, ["r", "g", "h", "a1", "a2"], 3, tables=True))
        force.addPerParticleParameter("a")
        force.addTabulatedFunction("tab1", openmm.XmlSerializer.clone(TABLE_1D))
        force.addTabulatedFunction("tab2", openmm.XmlSerializer.clone(TABLE_2D))
        for _ in range(n_atoms):
            force.addParticle([rng.choice([0.5, 1.0, 2.0])])
        if rng.random() < 0.5:
            force.addInteractionGroup(range(8, n_atoms), range(0, 12))
        if rng.random() < 0.5:
            force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
            force.setCutoffDistance(0.6)
    for name, value in globals_.items():
        force.addGlobalParameter(name, value)
    return force


def fuzz(n_forces: int, seed: int) -> dict[str, int]:
    """Compile ``n_forces`` random forces; assert each matches OpenMM or is refused in one
    sentence; counts of matched, refused and skipped (OpenMM non-finite everywhere)."""
    aldp = get_target("aldp-vacuum")
    rng = np.random.default_rng(seed)
    x = structures(aldp.positions, 4, seed)
    counts = {"matched": 0, "refused": 0, "skipped": 0}
    for _ in range(n_forces):
        force = random_force(rng, aldp.n_atoms)
        text = force.getEnergyFunction()
        target = with_forces(aldp, force, name="fuzz")
        try:  # first: OpenMM never returns from a force refused with OpenMMWouldHangError
            energy = TorchEnergy(target, verify=False, compile=False)
        except UnsupportedForceError as error:
            message = str(error)
            assert "\n" not in message and message.endswith("."), (text, message)
            counts["refused"] += 1
            continue
        e_ref, f_ref = openmm_reference(target.system, x)
        finite = np.isfinite(e_ref) & np.isfinite(f_ref).all(axis=(1, 2))
        if not finite.any():
            counts["skipped"] += 1
            continue
        u, f = energy.energy_and_forces(x[finite])
        e, g = u * target.kT, f * target.kT
        scale_e, scale_f = max(np.abs(e_ref[finite]).max(), 1.0), max(np.abs(f_ref[finite]).max(), 1.0)
        assert np.abs(e - e_ref[finite]).max() <= 1e-9 * scale_e, (text, e, e_ref[finite])
        assert np.abs(g - f_ref[finite]).max() <= 1e-9 * scale_f, (text, np.abs(g - f_ref[finite]).max())
        counts["matched"] += 1
    return counts


def test_random_expressions_match_openmm_or_are_refused():
    counts = fuzz(40, seed=0)
    assert counts["matched"] >= 20, counts


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 11))
def test_thousands_of_random_expressions_match_openmm_or_are_refused(seed):
    counts = fuzz(200, seed=seed)
    assert counts["matched"] >= 100, counts
