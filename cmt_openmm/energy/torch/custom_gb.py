"""CustomGBForce: any expressions, as OpenMM's Reference platform, and OBC1/OBC2 recognised.

Any computed values and energy terms are evaluated as OpenMM's Reference platform does
(:class:`CustomGBTerm`); OpenMM's OBC1/OBC2 expressions are recognised structurally
(:func:`recognise_obc`) so that :func:`compile_custom_gb` can use the analytic
:class:`~.obc.OBCFamilyGBTerm` when it agrees with the generic term.

Pair sums run over the dense (n, n, b) distance matrix (nm), per-particle parameters broadcast
as (n, 1, 1) ("1") and (1, n, 1) ("2"); energies kJ/mol.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import openmm
import torch

from .geometry import PairGeometry
from .lepton import (
    Expr,
    LeptonExpression,
    as_tensor_like,
    expression_variables,
    pair_symmetric,
    parse_lepton,
    tabulated_functions,
)
from .obc import OBCFamilyGBTerm, OBCParameters
from .term import ForceTerm, UnsupportedForceError, global_defaults, md_value, per_particle_parameters

__all__ = ["CustomGBTerm", "compile_custom_gb", "recognise_obc"]


class CustomGBTerm(ForceTerm):
    """CustomGBForce, any energy expressions, evaluated as OpenMM's Reference platform does:

        computed value, SingleParticle:  V(i) = f(params_i, earlier V(i), x_i, y_i, z_i)
        computed value, ParticlePair:    V(i) = sum_{j != i} f(r_ij, params and earlier values
                                                of i as "1" and of j as "2")
        energy term, SingleParticle:     sum_i e(params_i, V(i), x_i, y_i, z_i)
        energy term, ParticlePair:       sum_{i<j} e(r_ij, params and values of i as "1", j as "2")

    ParticlePair sums skip excluded pairs (not the ``NoExclusions`` variants) and, with
    ``CutoffNonPeriodic``, pairs with r >= r_c. A pair energy that is not symmetric under
    1 <-> 2 is refused (OpenMM's platforms order pairs differently). Pair sums run over the dense (i, j) matrix so
    that every per-pair constant (GBn's neck tables ``getd0(radindex1, radindex2)``) is folded
    once. Differentiated by autograd with respect to the pair distances (and x, y, z).
    Global parameters take their default values.
    """

    needs_dense = True
    # (n, n, b) tensors alive at the peak: autograd keeps every operation's inputs; 60 measured on
    # amber14's GBn2 for alanine dipeptide (longer expressions keep more)
    live_tensors = 64

    def _compile(self, force: openmm.CustomGBForce) -> None:
        self.cutoff = self._method_cutoff(force)
        n = force.getNumParticles()
        self.n_atoms = n
        names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
        params = per_particle_parameters(n, force.getParticleParameters, len(names))
        glob = global_defaults(force)
        tables = tabulated_functions(force, self.label)
        arity = {name: t.arity for name, t in tables.items()}
        excluded = np.eye(n, dtype=bool)
        for k in range(force.getNumExclusions()):
            i, j = force.getExclusionParticles(k)
            excluded[i, j] = excluded[j, i] = True
        no_self = ~np.eye(n, dtype=bool)
        as_mask = lambda m: torch.as_tensor(m[:, :, None], device=self.device)  # noqa: E731
        self.allowed = {True: as_mask(~excluded), False: as_mask(no_self)}  # key: exclusions apply
        self.upper = {True: as_mask(np.triu(~excluded, 1)), False: as_mask(np.triu(no_self, 1))}
        self.offdiag = as_mask(no_self)
        single_static = {**glob, **{name: torch.as_tensor(params[:, k][:, None]) for k, name in enumerate(names)}}
        pair_static = dict(glob)
        for k, name in enumerate(names):
            pair_static[name + "1"] = torch.as_tensor(params[:, k][:, None, None])
            pair_static[name + "2"] = torch.as_tensor(params[:, k][None, :, None])

        def compile_(text: str, static: dict, dynamic: set) -> LeptonExpression:
            return LeptonExpression(
                parse_lepton(text, arity),
                static,
                dynamic,
                tables,
                dtype=self.dtype,
                device=self.device,
                label=self.label,
            )

        self.values: list[tuple[str, int, LeptonExpression]] = []
        names_so_far: list[str] = []
        for k in range(force.getNumComputedValues()):
            name, text, kind = force.getComputedValueParameters(k)
            if kind == openmm.CustomGBForce.SingleParticle:
                expression = compile_(text, single_static, set(names_so_far) | {"x", "y", "z"})
            else:
                expression = compile_(text, pair_static, {"r"} | {v + s for v in names_so_far for s in "12"})
            self.values.append((name, kind, expression))
            names_so_far.append(name)
        self.energies: list[tuple[int, LeptonExpression]] = []
        # pair energies must be symmetric under 1 <-> 2: OpenMM's platforms order the pairs
        # differently (Reference: lower index first without a cutoff, higher first with one);
        # computed values stand in as random positive numbers per particle
        rng = np.random.default_rng(0)
        samples = {**{name: params[:, k] for k, name in enumerate(names)},
                   **{name: rng.uniform(0.1, 1.0, n) for name in names_so_far}}
        for k in range(force.getNumEnergyTerms()):
            text, kind = force.getEnergyTermParameters(k)
            if kind == openmm.CustomGBForce.SingleParticle:
                expression = compile_(text, single_static, set(names_so_far) | {"x", "y", "z"})
            else:
                if not pair_symmetric(parse_lepton(text, arity), samples, glob, tables, self.cutoff or 3.0):
                    raise UnsupportedForceError(
                        f"{self.label} has the pair energy {text!r}, which changes when particles 1 and 2 swap, and "
                        "OpenMM's platforms take the two particles of a pair in different orders (make it symmetric)."
                    )
                expression = compile_(text, pair_static, {"r"} | {v + s for v in names_so_far for s in "12"})
            self.energies.append((kind, expression))
        self.uses_xyz = any(
            {"x", "y", "z"} & set(e.dynamic_names)
            for _, kind, e in self.values
            if kind == openmm.CustomGBForce.SingleParticle
        ) or any(
            {"x", "y", "z"} & set(e.dynamic_names)
            for kind, e in self.energies
            if kind == openmm.CustomGBForce.SingleParticle
        )
        self.translation_invariant = not self.uses_xyz

    def _energy(self, r: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        b = r.shape[-1]
        zero = r.new_zeros(())
        values: dict[str, torch.Tensor] = {}

        def single_env() -> dict[str, torch.Tensor]:
            return {"x": X[0], "y": X[1], "z": X[2], **values}

        def pair_env() -> dict[str, torch.Tensor]:
            env = {"r": r}
            for name, v in values.items():
                env[name + "1"], env[name + "2"] = v[:, None, :], v[None, :, :]
            return env

        def mask(allowed: torch.Tensor) -> torch.Tensor:
            return allowed if self.cutoff is None else allowed & (r < self.cutoff)

        for name, kind, expression in self.values:
            if kind == openmm.CustomGBForce.SingleParticle:
                v = as_tensor_like(expression(single_env()), r)
            else:
                f = as_tensor_like(expression(pair_env()), r)
                v = torch.where(mask(self.allowed[kind == openmm.CustomGBForce.ParticlePair]), f, zero).sum(1)
            values[name] = v.expand(self.n_atoms, b) if v.shape != (self.n_atoms, b) else v
        energy = r.new_zeros(b)
        for kind, expression in self.energies:
            if kind == openmm.CustomGBForce.SingleParticle:
                e = as_tensor_like(expression(single_env()), r)
                energy = energy + e.expand(self.n_atoms, b).sum(0)
            else:
                f = as_tensor_like(expression(pair_env()), r)
                energy = energy + torch.where(
                    mask(self.upper[kind == openmm.CustomGBForce.ParticlePair]), f, zero
                ).expand(self.n_atoms, self.n_atoms, b).sum((0, 1))
        return energy

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        r = geometry.dense()
        if not gradient:
            return self._energy(r, geometry.X)
        with torch.enable_grad():
            r_leaf = r.detach().requires_grad_()
            X_leaf = geometry.X.detach().requires_grad_(self.uses_xyz)
            energy = self._energy(r_leaf, X_leaf)
            leaves = [r_leaf, X_leaf] if self.uses_xyz else [r_leaf]
            grads = (
                torch.autograd.grad(energy.sum(), leaves, allow_unused=True)
                if energy.requires_grad
                else [None] * len(leaves)
            )
        if grads[0] is not None:
            R = torch.where(self.offdiag, grads[0], torch.zeros((), dtype=r.dtype, device=r.device))
            geometry.add_weights((R + R.transpose(0, 1)) * geometry.dense_inverse())
        if self.uses_xyz and grads[1] is not None:
            geometry.add_direct(grads[1])
        return energy.detach()


# -- recognising OpenMM's OBC-family CustomGBForce (customgbforces.py, prmtop implicitSolvent) --
_OBC_I = (
    "select(step(r+sr2-or1), 0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))+0.5*log(L/U)/r), 0);"
    "U=r+sr2;L=max(or1, D);D=abs(r-sr2)"
)
_OBC_B = [  # $a, $b, $c: alpha, beta, gamma (constants or per-particle parameters); $o: offset
    "1/(1/or-tanh($a*psi-$b*psi^2+$c*psi^3)/radius);psi=I*or; radius=or+$o",
    "1/(1/or-tanh(psi-$b*psi^2+$c*psi^3)/radius);psi=I*or; radius=or+$o",
    "1/(1/or-tanh($a*psi+$c*psi^3)/radius);psi=I*or; radius=or+$o",
]
_OBC_SELF = "-0.5*$k*(1/$ein-1/$eout)*charge^2/B"
_OBC_ACE = "$s*(radius+$p)^2*(radius/B)^6; radius=or+$o"
_OBC_PAIR = [
    "-$k*(1/$ein-1/$eout)*charge1*charge2/f;f=sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))",
    "-$k*(1/$ein-1/$eout)*charge1*charge2*(1/f-$ic);f=sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))",
]


def _unify(pattern: Expr, expr: Expr, bindings: dict[str, Expr], placeholders_may_use: set[str]) -> bool:
    """Structural match of ``expr`` against ``pattern``; a variable ``$name`` of the pattern
    matches any subexpression of constants and of the variables ``placeholders_may_use``."""
    if pattern.op == "var" and pattern.value.startswith("$"):
        bound = bindings.get(pattern.value)
        if bound is not None:
            return _same(bound, expr)
        if not expression_variables(expr) <= placeholders_may_use:
            return False
        bindings[pattern.value] = expr
        return True
    if pattern.op != expr.op or len(pattern.args) != len(expr.args):
        return False
    if pattern.op in ("const", "var"):
        return pattern.value == expr.value
    return all(_unify(p, e, bindings, placeholders_may_use) for p, e in zip(pattern.args, expr.args))


def _same(a: Expr, b: Expr) -> bool:
    if a is b:
        return True
    if a.op != b.op or a.value != b.value or len(a.args) != len(b.args):
        return False
    return all(_same(x, y) for x, y in zip(a.args, b.args))


def _match(text: str, patterns: list[str], allowed: set[str]) -> dict[str, Expr] | None:
    try:
        expr = parse_lepton(text)
    except UnsupportedForceError:
        return None
    for pattern in patterns:
        bindings: dict[str, Expr] = {}
        if _unify(parse_lepton(pattern), expr, bindings, allowed):
            return bindings
    return None


def _evaluate_static(expr: Expr, static: Mapping[str, Any]) -> Any:
    static = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in static.items()}
    value = LeptonExpression(expr, static, (), dtype=torch.float64).constant
    return value.numpy() if isinstance(value, torch.Tensor) else value


def recognise_obc(force: openmm.CustomGBForce) -> OBCParameters | None:
    """The :class:`OBCParameters` of a CustomGBForce whose computed values and energy terms are
    OpenMM's OBC1/OBC2 ones (``openmm.app.internal.customgbforces``: ``implicit/obc1.xml``,
    ``implicit/obc2.xml``, Amber prmtop ``implicitSolvent=OBC1/OBC2``), matched structurally
    against templates whose numbers (and per-particle alpha/beta/gamma) are read from the
    force; None for anything else (HCT, GBn, GBn2, salt screening, other names)."""
    names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
    if (
        not {"charge", "or", "sr"} <= set(names)
        or force.getNumTabulatedFunctions()
        or force.getNumComputedValues() != 2
    ):
        return None
    if force.getNumGlobalParameters() or force.getNonbondedMethod() not in (0, 1):
        return None
    excluded_any = force.getNumExclusions() > 0
    (n_i, text_i, kind_i), (n_b, text_b, kind_b) = (force.getComputedValueParameters(k) for k in range(2))
    if (
        (n_i, n_b) != ("I", "B")
        or kind_b != openmm.CustomGBForce.SingleParticle
        or kind_i == openmm.CustomGBForce.SingleParticle
    ):
        return None
    if (excluded_any and kind_i == openmm.CustomGBForce.ParticlePair) or _match(text_i, [_OBC_I], set()) is None:
        return None
    n = force.getNumParticles()
    params = per_particle_parameters(n, force.getParticleParameters, len(names))
    static = {name: params[:, k] for k, name in enumerate(names)}
    b = _match(text_b, _OBC_B, set(names))
    if b is None:
        return None
    ones = np.ones(n)
    value = lambda key, default: ones * (_evaluate_static(b[key], static) if key in b else default)  # noqa: E731
    alpha, beta, gamma, offset = value("$a", 1.0), value("$b", 0.0), value("$c", 0.0), value("$o", 0.0)
    self_factor = pair_factor = ace = None
    ace_offset = probe = 0.0
    shift_cutoff = None
    for k in range(force.getNumEnergyTerms()):
        text, kind = force.getEnergyTermParameters(k)
        if kind == openmm.CustomGBForce.SingleParticle:
            m = _match(text, [_OBC_SELF], set())
            if m is not None and self_factor is None:
                k_, ein, eout = (_evaluate_static(m[key], {}) for key in ("$k", "$ein", "$eout"))
                self_factor = -0.5 * k_ * (1 / ein - 1 / eout)
                continue
            m = _match(text, [_OBC_ACE], set())
            if m is not None and ace is None:
                ace, probe, ace_offset = (_evaluate_static(m[key], {}) for key in ("$s", "$p", "$o"))
                continue
            return None
        m = _match(text, _OBC_PAIR, set())
        if m is None or pair_factor is not None or (excluded_any and kind == openmm.CustomGBForce.ParticlePair):
            return None
        k_, ein, eout = (_evaluate_static(m[key], {}) for key in ("$k", "$ein", "$eout"))
        pair_factor = -k_ * (1 / ein - 1 / eout)
        if "$ic" in m:
            shift_cutoff = 1.0 / _evaluate_static(m["$ic"], {})
    if self_factor is None or pair_factor is None:
        return None
    cutoff = None if force.getNonbondedMethod() == 0 else md_value(force.getCutoffDistance())
    if (shift_cutoff is None) != (cutoff is None) or (
        cutoff is not None and not math.isclose(cutoff, shift_cutoff, rel_tol=1e-12)
    ):
        return None
    orr = static["or"]
    return OBCParameters(
        charge=static["charge"],
        offset_radius=orr,
        scaled_radius=static["sr"],
        radius=orr + offset,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        self_factor=self_factor,
        pair_factor=pair_factor,
        ace_factor=ace,
        ace_radius=orr + ace_offset,
        probe=probe,
        inner_correction=False,
        cutoff=cutoff,
    )


def _agrees(fast: ForceTerm, generic: ForceTerm, positions: np.ndarray) -> bool:
    """Energies and gradients of two float64 CPU terms agree (1e-10 relative) near ``positions``."""
    rng = np.random.default_rng(12345)
    x = torch.as_tensor(positions[None] + 0.02 * rng.standard_normal((8, *positions.shape)), dtype=torch.float64)
    results = []
    for term in (fast, generic):
        geometry = PairGeometry.from_batch(x, dense=True)
        results.append((term(geometry, True), geometry.gradient()))
    (e1, g1), (e2, g2) = results
    scale_e, scale_g = e2.abs().max().clamp(min=1.0), g2.abs().max().clamp(min=1.0)
    return bool((e1 - e2).abs().max() <= 1e-10 * scale_e and (g1 - g2).abs().max() <= 1e-10 * scale_g)


def compile_custom_gb(
    force: openmm.CustomGBForce, index: int, positions: np.ndarray | None, device: Any, dtype: torch.dtype
) -> ForceTerm:
    """The term of a CustomGBForce: :class:`~.obc.OBCFamilyGBTerm` when the force is
    recognised as OBC1/OBC2 (:func:`recognise_obc`) and agrees with the generic
    :class:`CustomGBTerm` on structures near ``positions`` (nm; not checked without them),
    else the generic term."""
    generic = CustomGBTerm(force, index, device, dtype)
    parameters = recognise_obc(force)
    if parameters is not None:
        if positions is None or _agrees(
            OBCFamilyGBTerm(force, index, parameters), CustomGBTerm(force, index), positions
        ):
            return OBCFamilyGBTerm(force, index, parameters, device, dtype)
    return generic
