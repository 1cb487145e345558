"""Custom bonded, external and nonbonded forces, from their Lepton energy expressions.

Each is a Lepton energy expression (:mod:`.lepton`) of one internal variable per term (r nm,
theta or phi rad; x, y, z nm for external forces), differentiated with respect to that variable
as OpenMM differentiates it (symbolically, :mod:`.lepton_derivative`: autograd would turn a
branch not taken with an infinite derivative into a NaN force), then carried onto the atoms by
the analytic geometry of :mod:`.geometry`.

Per-term parameters are (P, 1) columns against variables (P, b); energies kJ/mol; global
parameters take their default values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import openmm
import torch

from .geometry import Angles, Dihedrals, Incidence, PairGeometry, PairList, bond_lengths
from .lepton import LeptonExpression, as_tensor_like, pair_symmetric, parse_lepton, tabulated_functions
from .term import ForceTerm, UnsupportedForceError, global_defaults, md_value, per_particle_parameters

__all__ = ["CustomBondedTerm", "CustomExternalTerm", "CustomNonbondedTerm"]


def value_and_derivative(
    expression: LeptonExpression, name: str, q: torch.Tensor, gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-term energies e(q) (P, b) and, if asked, OpenMM's de/dq (``expression`` compiled
    with ``derivatives=[name]``), both broadcast to q's shape."""
    e = as_tensor_like(expression({name: q}), q).expand_as(q)
    if not gradient:
        return e, None
    return e, as_tensor_like(expression.derivatives[name]({name: q}), q).expand_as(q)


class CustomBondedTerm(ForceTerm):
    """CustomBondForce / CustomAngleForce / CustomTorsionForce: E = sum_terms f(v, params)
    with v = r (bond length), theta (angle in [0, pi]) or theta (dihedral in (-pi, pi]);
    f compiled from the force's Lepton expression (global parameters at their defaults),
    df/dv by autograd over v, then the analytic geometry."""

    def _compile(self, force: Any) -> None:
        if isinstance(force, openmm.CustomBondForce):
            kind, count, getter, per_term = "bond", force.getNumBonds(), force.getBondParameters, 2
            names = [force.getPerBondParameterName(k) for k in range(force.getNumPerBondParameters())]
        elif isinstance(force, openmm.CustomAngleForce):
            kind, count, getter, per_term = "angle", force.getNumAngles(), force.getAngleParameters, 3
            names = [force.getPerAngleParameterName(k) for k in range(force.getNumPerAngleParameters())]
        else:
            kind, count, getter, per_term = "torsion", force.getNumTorsions(), force.getTorsionParameters, 4
            names = [force.getPerTorsionParameterName(k) for k in range(force.getNumPerTorsionParameters())]
        self.kind, self.count = kind, count
        rows = [getter(k) for k in range(count)]
        self.width = max(1, count)
        if kind == "bond":
            self.pairs = PairList.build([row[0] for row in rows], [row[1] for row in rows], self.n_atoms, self.device)
        else:
            self.atoms, self.incidence = self._atoms(rows, Angles if kind == "angle" else Dihedrals)
        params = np.array([[md_value(v) for v in row[per_term]] for row in rows], float).reshape(count, len(names))
        static = {
            **global_defaults(force),
            **{name: torch.as_tensor(params[:, k][:, None]) for k, name in enumerate(names)},
        }
        self.variable = "r" if kind == "bond" else "theta"
        self.expression = LeptonExpression(
            parse_lepton(force.getEnergyFunction()),
            static,
            {self.variable},
            dtype=self.dtype,
            device=self.device,
            label=self.label,
            derivatives=[self.variable],
        )

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        if self.count == 0:
            return geometry.zeros()
        if self.kind == "bond":
            q, d = bond_lengths(geometry, self.pairs)
        else:
            coords = (Angles if self.kind == "angle" else Dihedrals)(geometry.X, *self.atoms)
            q = coords.theta if self.kind == "angle" else coords.phi
        e, de = value_and_derivative(self.expression, self.variable, q, gradient)
        if gradient:
            if self.kind == "bond":
                geometry.add_pair_gradient(self.pairs, d, de / q)
            else:
                coords.backward(geometry, de, self.incidence)
        return e.sum(0)


class CustomExternalTerm(ForceTerm):
    """CustomExternalForce: E = sum_particles f(x, y, z, params) (global parameters at their
    defaults); gradient by autograd over the particles' coordinates."""

    translation_invariant = False

    def _compile(self, force: openmm.CustomExternalForce) -> None:
        names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
        rows = [force.getParticleParameters(k) for k in range(force.getNumParticles())]
        self.atoms = self._index([row[0] for row in rows])
        self.incidence = Incidence([row[0] for row in rows], self.n_atoms, self.device)
        self.width = max(1, len(rows))
        params = np.array([[md_value(v) for v in row[1]] for row in rows], float).reshape(len(rows), len(names))
        static = {
            **global_defaults(force),
            **{name: torch.as_tensor(params[:, k][:, None]) for k, name in enumerate(names)},
        }
        self.expression = LeptonExpression(
            parse_lepton(force.getEnergyFunction()),
            static,
            {"x", "y", "z"},
            dtype=self.dtype,
            device=self.device,
            label=self.label,
            derivatives="xyz",
        )

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        if len(self.atoms) == 0:
            return geometry.zeros()
        p = geometry.X.index_select(1, self.atoms)  # (3, P, b)
        values = {"x": p[0], "y": p[1], "z": p[2]}
        energy = as_tensor_like(self.expression(values), p).expand(p.shape[1:]).sum(0)
        if gradient:
            derivatives = self.expression.derivatives
            g = torch.stack([as_tensor_like(derivatives[v](values), p).expand(p.shape[1:]) for v in "xyz"])
            geometry.add_atoms(self.incidence, g)
        return energy


class CustomNonbondedTerm(ForceTerm):
    """CustomNonbondedForce without periodicity: E = sum_{i<j, not excluded} f(r, params_i as
    "1", params_j as "2") S(r), with r < r_c only and S = 1 - 10t^3 + 15t^4 - 6t^5,
    t = (r - r_s)/(r_c - r_s) (switching function on) for ``CutoffNonPeriodic``; with
    interaction groups, each group's pairs with "1" from set1 and "2" from set2 (a pair with
    both atoms in both sets once, lower index as "1"), as OpenMM. Without groups OpenMM's order
    depends on the platform and the cutoff (Reference: lower index first without a cutoff, its
    neighbour list's higher index first with one; CPU: mixed), so an expression that is not
    symmetric under 1 <-> 2 on this force's parameters (:func:`~.lepton.pair_symmetric`) is refused."""

    def _compile(self, force: openmm.CustomNonbondedForce) -> None:
        if force.getNumComputedValues():
            raise UnsupportedForceError(
                f"{self.label} has computed values, which the torch backend does not implement."
            )
        self.cutoff = self._method_cutoff(force)
        self.switch = (
            md_value(force.getSwitchingDistance())
            if self.cutoff is not None and force.getUseSwitchingFunction()
            else None
        )
        n = force.getNumParticles()
        names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
        params = per_particle_parameters(n, force.getParticleParameters, len(names))
        excluded = set()
        for k in range(force.getNumExclusions()):
            i, j = force.getExclusionParticles(k)
            excluded.add((min(i, j), max(i, j)))
        if force.getNumInteractionGroups() == 0:
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in excluded]
        else:  # "1" from set1, "2" from set2; a pair with both atoms in both sets once, lower first
            pairs = []
            for g in range(force.getNumInteractionGroups()):
                set1, set2 = (set(s) for s in force.getInteractionGroupParameters(g))
                for a1 in sorted(set1):
                    for a2 in sorted(set2):
                        if a1 == a2 or (min(a1, a2), max(a1, a2)) in excluded:
                            continue
                        if a1 > a2 and a2 in set1 and a1 in set2:
                            continue
                        pairs.append((a1, a2))
        i = np.array([p[0] for p in pairs], dtype=np.int64)
        j = np.array([p[1] for p in pairs], dtype=np.int64)
        self.pairs = PairList.build(i, j, n, self.device)
        self.width = max(1, len(pairs))
        static = dict(global_defaults(force))
        for k, name in enumerate(names):
            static[name + "1"] = torch.as_tensor(params[i, k][:, None])
            static[name + "2"] = torch.as_tensor(params[j, k][:, None])
        tables = tabulated_functions(force, self.label)
        root = parse_lepton(force.getEnergyFunction(), {k: t.arity for k, t in tables.items()})
        per_particle = {name: params[:, k] for k, name in enumerate(names)}
        if not force.getNumInteractionGroups() and not pair_symmetric(
            root, per_particle, global_defaults(force), tables, self.cutoff or 3.0
        ):
            raise UnsupportedForceError(
                f"{self.label} has an energy that changes when particles 1 and 2 swap, and without interaction "
                "groups OpenMM's platforms take the two particles of a pair in different orders (make it symmetric, or "
                "add interaction groups)."
            )
        self.expression = LeptonExpression(
            root,
            static,
            {"r"},
            tables,
            dtype=self.dtype,
            device=self.device,
            label=self.label,
            derivatives=["r"],
        )

    def _pair_energy(self, r: torch.Tensor, gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pair energies (P, b) kJ/mol and, if asked, dE/dr: the expression's derivative times
        OpenMM's switching function, plus the energy times the switch's derivative, as
        ReferenceCustomNonbondedIxn; zero beyond the cutoff (masked after differentiation)."""
        e, de = value_and_derivative(self.expression, "r", r, gradient)
        if self.cutoff is None:
            return e, de
        if self.switch is not None:
            width = self.cutoff - self.switch
            t = torch.clamp((r - self.switch) / width, min=0.0)
            if gradient:
                de = de * (1.0 + t * t * t * (-10.0 + t * (15.0 - t * 6.0))) + e * (
                    t * t * (-30.0 + t * (60.0 - t * 30.0)) / width
                )
            e = e * (1.0 + t * t * t * (-10.0 + t * (15.0 - t * 6.0)))
        inside, zero = r < self.cutoff, torch.zeros((), dtype=r.dtype, device=r.device)
        return torch.where(inside, e, zero), (torch.where(inside, de, zero) if gradient else None)

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        if len(self.pairs) == 0:
            return geometry.zeros()
        r, d = geometry.pairs(self.pairs)
        e, de = self._pair_energy(r, gradient)
        if gradient:
            geometry.add_pair_gradient(self.pairs, d, de / r)
        return e.sum(0)
