"""NonbondedForce (Lennard-Jones + Coulomb) without periodicity, with analytic gradients.

NoCutoff or CutoffNonPeriodic (reaction field, switching function). Pairs i<j and their
coefficients (ONE_4PI_EPS0 q_i q_j, sigma^2, 4 epsilon; (P, 1)) are fixed at construction;
distances (P, b) nm come from the chunk's :class:`~.geometry.PairGeometry` (pair list or dense
matrix); energies kJ/mol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import openmm
import torch

from .geometry import PairGeometry, PairList, upper_pairs
from .term import ONE_4PI_EPS0, ForceTerm, UnsupportedForceError, global_defaults, md_value

__all__ = ["NonbondedTerm"]


class NonbondedTerm(ForceTerm):
    """NonbondedForce without periodicity: Lennard-Jones + Coulomb over non-excluded pairs i<j,

        E = sum ONE_4PI_EPS0 q_i q_j c(r) + 4 eps_ij ((sig_ij/r)^12 - (sig_ij/r)^6) S(r),

    sig_ij = (sig_i + sig_j)/2, eps_ij = sqrt(eps_i eps_j) (Lorentz-Berthelot). Exceptions
    (1-4 pairs) replace the pair's q_i q_j, sig, eps by their own and always use the plain
    form (c = 1/r, S = 1, no cutoff); exceptions with q q = eps = 0 are exclusions.
    ``NoCutoff``: c(r) = 1/r, S = 1. ``CutoffNonPeriodic``: pairs with r < r_c only, reaction
    field c(r) = 1/r + k_rf r^2 - c_rf with k_rf = (eps_rf - 1)/((2 eps_rf + 1) r_c^3),
    c_rf = 3 eps_rf/((2 eps_rf + 1) r_c), and S(r) = 1 - 10t^3 + 15t^4 - 6t^5,
    t = (r - r_s)/(r_c - r_s) for r > r_s when the switching function is on. Particle and
    exception parameter offsets are applied at the global parameters' default values.
    """

    uses_dense = True  # distances gathered from the chunk's distance matrix when it has one

    def _compile(self, force: openmm.NonbondedForce) -> None:
        method = force.getNonbondedMethod()
        if method not in (openmm.NonbondedForce.NoCutoff, openmm.NonbondedForce.CutoffNonPeriodic):
            raise UnsupportedForceError(
                f"{self.label} uses a periodic nonbonded method (PME, Ewald, LJPME or CutoffPeriodic), "
                "which the torch backend does not implement."
            )
        if hasattr(force, "getIncludeDirectSpace") and not force.getIncludeDirectSpace():
            raise UnsupportedForceError(
                f"{self.label} excludes its direct-space interactions, which the torch backend does not implement."
            )
        n = force.getNumParticles()
        defaults = global_defaults(force)
        q, sig, eps = np.zeros(n), np.zeros(n), np.zeros(n)
        for i in range(n):
            q[i], sig[i], eps[i] = (md_value(v) for v in force.getParticleParameters(i))
        for k in range(force.getNumParticleParameterOffsets()):
            name, i, dq, dsig, deps = force.getParticleParameterOffset(k)
            value = defaults[name]
            q[i], sig[i], eps[i] = (
                q[i] + value * md_value(dq),
                sig[i] + value * md_value(dsig),
                eps[i] + value * md_value(deps),
            )
        exceptions = {}
        for k in range(force.getNumExceptions()):
            i, j, qq, s, e = force.getExceptionParameters(k)
            exceptions[k] = [i, j, md_value(qq), md_value(s), md_value(e)]
        offsets = set()
        for k in range(force.getNumExceptionParameterOffsets()):
            name, e_index, dqq, dsig, deps = force.getExceptionParameterOffset(k)
            value = defaults[name]
            row = exceptions[e_index]
            row[2:] = [row[2] + value * md_value(dqq), row[3] + value * md_value(dsig), row[4] + value * md_value(deps)]
            offsets.add(e_index)
        allowed = ~np.eye(n, dtype=bool)
        for i, j, *_ in exceptions.values():
            allowed[i, j] = allowed[j, i] = False
        active = [row for k, row in exceptions.items() if row[2] != 0.0 or row[4] != 0.0 or k in offsets]
        qq_m = np.outer(q, q)
        sig_m = 0.5 * (sig[:, None] + sig[None, :])
        eps_m = np.sqrt(np.outer(eps, eps))
        self.cutoff = None
        if method == openmm.NonbondedForce.CutoffNonPeriodic:
            self.cutoff = md_value(force.getCutoffDistance())
            eps_rf = force.getReactionFieldDielectric()
            self.k_rf = self.cutoff**-3 * (eps_rf - 1.0) / (2.0 * eps_rf + 1.0)
            self.c_rf = (1.0 / self.cutoff) * 3.0 * eps_rf / (2.0 * eps_rf + 1.0)
            self.switch = md_value(force.getSwitchingDistance()) if force.getUseSwitchingFunction() else None
            i, j = upper_pairs(allowed)  # every non-excluded pair (the cutoff needs the zero-charge ones too)
            main = (i, j, qq_m[i, j], sig_m[i, j], eps_m[i, j])
            exc = active
        else:  # NoCutoff: exceptions have the same form as the other pairs, merge them in
            i, j = upper_pairs(allowed & ((qq_m != 0.0) | (eps_m != 0.0)))
            main = (
                np.concatenate([i, [r[0] for r in active]]).astype(np.int64),
                np.concatenate([j, [r[1] for r in active]]).astype(np.int64),
                np.concatenate([qq_m[i, j], [r[2] for r in active]]),
                np.concatenate([sig_m[i, j], [r[3] for r in active]]),
                np.concatenate([eps_m[i, j], [r[4] for r in active]]),
            )
            exc = []
        self.main = self._pair_set(n, *main)
        self.exceptions = self._pair_set(
            n, [r[0] for r in exc], [r[1] for r in exc], [r[2] for r in exc], [r[3] for r in exc], [r[4] for r in exc]
        )
        self.width = max(1, len(self.main.pairs), len(self.exceptions.pairs))

    def _pair_set(self, n: int, i: Any, j: Any, qq: Any, sig: Any, eps: Any) -> "_PairParameters":
        sig = np.asarray(sig, float)
        return _PairParameters(
            PairList.build(i, j, n, self.device),
            self._tensor(ONE_4PI_EPS0 * np.asarray(qq, float), True),
            self._tensor(sig * sig, True),
            self._tensor(4.0 * np.asarray(eps, float), True),
        )

    def _block(self, geometry: PairGeometry, p: "_PairParameters", cutoff: bool, gradient: bool) -> torch.Tensor:
        """Energy of one set of pairs; adds its gradient when asked."""
        inv = geometry.pair_inverse(p.pairs) if not cutoff else None  # from the dense matrix, if any
        if inv is None:
            r, d = geometry.pairs(p.pairs)
            inv = torch.reciprocal(r)
        else:
            d = None
        qq, sig2, eps4 = p.qq, p.sig2, p.eps4
        inv2 = inv * inv
        s2 = sig2 * inv2
        s6 = s2 * s2 * s2
        if not cutoff and not gradient:  # energies only: sums over pairs as products (see OBCKernel)
            return torch.mm(eps4.t(), torch.sub(s6, 1.0).mul_(s6))[0].add_(torch.mm(qq.t(), inv)[0])
        lj = eps4 * (s6 * s6 - s6)
        dlj = -eps4 * (12.0 * s6 * s6 - 6.0 * s6) * inv  # dLJ/dr
        if not cutoff:
            coulomb = qq * inv
            w = (dlj - coulomb * inv) * inv if gradient else None
            energy = (lj + coulomb).sum(0)
        else:
            inside = (r < self.cutoff).to(r.dtype)
            if self.switch is not None:
                width = self.cutoff - self.switch
                t = torch.clamp((r - self.switch) / width, min=0.0)
                sw = 1.0 + t * t * t * (-10.0 + t * (15.0 - t * 6.0))
                dlj = dlj * sw + lj * (t * t * (-30.0 + t * (60.0 - t * 30.0)) / width)
                lj = lj * sw
            coulomb = qq * (inv + self.k_rf * r * r - self.c_rf)
            w = inside * (dlj + qq * (2.0 * self.k_rf * r - inv2)) * inv if gradient else None
            energy = (inside * (lj + coulomb)).sum(0)
        if gradient:
            geometry.add_pair_gradient(p.pairs, d, w)
        return energy

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        energy = geometry.zeros()
        if len(self.main.pairs):
            energy = energy + self._block(geometry, self.main, self.cutoff is not None, gradient)
        if len(self.exceptions.pairs):
            energy = energy + self._block(geometry, self.exceptions, False, gradient)
        return energy


@dataclass
class _PairParameters:
    """Pairs and their coefficients ONE_4PI_EPS0 q_i q_j, sig^2, 4 eps (P, 1)."""

    pairs: PairList
    qq: torch.Tensor
    sig2: torch.Tensor
    eps4: torch.Tensor
