"""Generalized Born of the OBC family, evaluated analytically on the (n, n, b) distance matrix.

:class:`OBCKernel` (Born radii, polar and ACE energies, gradient through the radii), used by
GBSAOBCForce (:class:`GBSAOBCTerm`) and by CustomGBForces recognised as OBC1/OBC2
(:class:`OBCFamilyGBTerm`, see :mod:`.custom_gb`).

Radii nm, charges e, energies kJ/mol; per-atom parameters as (n,) arrays (:class:`OBCParameters`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import openmm
import torch

from .geometry import PairGeometry, PairList, upper_pairs
from .term import ONE_4PI_EPS0, ForceTerm, UnsupportedForceError, md_value

__all__ = ["GBSAOBCTerm", "OBCFamilyGBTerm", "OBCKernel", "OBCParameters"]


@dataclass
class OBCParameters:
    """Parameters of an OBC-family GB model (arrays (n,), nm and kJ/mol; see :class:`OBCKernel`)."""

    charge: np.ndarray
    offset_radius: np.ndarray  # or_i = radius - offset
    scaled_radius: np.ndarray  # sr_i = or_i * scale
    radius: np.ndarray  # R_i in the Born radius: 1/B = 1/or - tanh(...)/R
    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    self_factor: float  # E_self = self_factor * q^2 / B
    pair_factor: float  # E_pair = pair_factor * q_i q_j (1/f - [cutoff] 1/r_c)
    ace_factor: float | None  # E_ACE = ace_factor * (R_ace + probe)^2 (R_ace/B)^6, or None
    ace_radius: np.ndarray | None = None
    probe: float = 0.14
    inner_correction: bool = False  # ReferenceObc's term for atom i inside atom j's scaled sphere
    cutoff: float | None = None


class OBCKernel:
    """Generalized Born, OBC family (Onufriev, Bashford, Case 2004; HCT pair integrals):

        I_i   = 1/2 sum_{j != i, or_i <= r + sr_j} [1/L - 1/U + (r - sr_j^2/r)(1/U^2 - 1/L^2)/4
                + log(L/U)/(2r)  (+ 2 (1/or_i - 1/L) if or_i < sr_j - r and ``inner_correction``)],
              U = r + sr_j, L = max(or_i, |r - sr_j|);
        psi_i = I_i or_i,   B_i = 1 / (1/or_i - tanh(alpha psi - beta psi^2 + gamma psi^3)/R_i);
        E     = sum_i [self_factor q_i^2/B_i + ace_factor (R'_i + probe)^2 (R'_i/B_i)^6]
              + sum_{i<j} pair_factor q_i q_j / f_ij,   f_ij = sqrt(r^2 + B_i B_j exp(-r^2/(4 B_i B_j))).

    With a cutoff, pairs with r > r_c are left out of both sums and pair energies are shifted
    by -pair_factor q_i q_j / r_c. Analytic gradient as in OpenMM's ReferenceObc: the pair
    terms' dE/dr, then dE/dB_i carried through the Born radii back onto the pair distances.
    """

    def __init__(self, p: OBCParameters, device: Any, dtype: torch.dtype):
        n = len(p.charge)
        t = lambda a: torch.as_tensor(np.asarray(a, float), dtype=dtype, device=device)  # noqa: E731
        self.n = n
        self.or_i = t(p.offset_radius[:, None, None])  # rows: atom i
        self.inv_or_i = t(1.0 / p.offset_radius[:, None, None])
        self.neg_or_i = -self.or_i
        self.sr_j = t(p.scaled_radius[None, :, None])  # columns: atom j
        self.sr2_j = t(p.scaled_radius[None, :, None] ** 2)
        col = lambda a: t(np.asarray(a, float)[:, None])  # noqa: E731
        self.or_vec, self.inv_or, self.inv_radius = (
            col(p.offset_radius),
            col(1.0 / p.offset_radius),
            col(1.0 / p.radius),
        )
        self.alpha, self.beta, self.gamma = col(p.alpha), col(p.beta), col(p.gamma)
        self.neg_beta, self.half_or = -self.beta, 0.5 * self.or_vec
        self.one = torch.ones((), dtype=dtype, device=device)
        self.quarter, self.quarter_sr2_j = 0.25 * self.one, 0.25 * self.sr2_j
        self.q2_self = col(p.self_factor * p.charge**2)
        qq = p.pair_factor * np.outer(p.charge, p.charge)
        i, j = upper_pairs(qq != 0.0)
        self.pairs = PairList.build(i, j, n, device)
        self.ij = torch.cat([self.pairs.i, self.pairs.j])  # one gather of B for both ends
        self.qq = t(qq[i, j][:, None])
        self.ace = None if p.ace_factor is None else col(p.ace_factor * (p.ace_radius + p.probe) ** 2 * p.ace_radius**6)
        self.inner = p.inner_correction
        self.cutoff = p.cutoff
        if p.cutoff is not None:
            self.qq_shift = self.qq / p.cutoff

    def __call__(self, geometry: PairGeometry, gradient: bool) -> torch.Tensor:
        r, inv_r = geometry.dense(), geometry.dense_inverse()
        h, keep = self._integrals(r, inv_r, gradient)
        psi = h.sum(1).mul_(self.half_or)  # I or, I = sum_j h / 2: (n, b)
        th = torch.addcmul(self.neg_beta, self.gamma, psi).mul_(psi).add_(self.alpha).mul_(psi).tanh_()
        inv_B = torch.addcmul(self.inv_or, th, self.inv_radius, value=-1.0)
        B = torch.reciprocal(inv_B)
        energy = (self.q2_self * inv_B).sum(0)
        if self.ace is not None:
            ib3 = inv_B * inv_B * inv_B
            ace = self.ace * ib3 * ib3
            energy = energy + ace.sum(0)
        pairs = self.pairs
        r2 = geometry.dense_squared().view(-1, geometry.batch).index_select(0, pairs.flat)
        Bi, Bj = B.index_select(0, self.ij).chunk(2)
        BB = Bi * Bj
        e = torch.div(r2, BB).mul_(-0.25).exp_()
        inv_f = torch.addcmul(r2, BB, e).sqrt_().reciprocal_()  # faster than rsqrt
        if self.cutoff is None and not gradient:
            # the sum over pairs as a product: a compiled kernel then computes inv_f vectorised over
            # the batch, where a sum over pairs gathered pairs into vectors
            return energy + torch.mm(self.qq.t(), inv_f)[0]
        pair = self.qq * inv_f
        if self.cutoff is not None:
            within = (r2 <= self.cutoff**2).to(r2.dtype)
            pair.mul_(within)
            energy = energy + (pair - self.qq_shift * within).sum(0)
        else:
            energy = energy + pair.sum(0)
        if not gradient:
            return energy
        g = -pair * inv_f * inv_f
        geometry.add_pair_gradient(pairs, None, g * (1.0 - 0.25 * e))  # (dE/dr)/r at fixed Born radii
        dBB = 0.5 * g * e * (1.0 + 0.25 * r2 / BB)  # dE/d(B_i B_j)
        dE_dB = -self.q2_self * inv_B * inv_B
        if self.ace is not None:
            dE_dB = dE_dB - 6.0 * ace * inv_B
        dE_dB = dE_dB.expand_as(B).contiguous()
        dE_dB.index_add_(0, pairs.i, dBB * Bj)
        dE_dB.index_add_(0, pairs.j, dBB * Bi)
        dB_dpsi = (
            B * B * (1.0 - th * th) * (self.alpha + psi * (3.0 * self.gamma * psi - 2.0 * self.beta)) * self.inv_radius
        )
        dE_dI = dE_dB * dB_dpsi * self.or_vec  # (n, b)
        c = self._integral_slopes(r, inv_r, keep).mul_((0.5 * dE_dI)[:, None, :])
        geometry.add_weights(torch.add(c, c.transpose(0, 1)).mul_(inv_r))
        return energy

    def _integrals(self, r: torch.Tensor, inv_r: torch.Tensor, gradient: bool) -> tuple[torch.Tensor, tuple]:
        """h_ij (n, n, b) of the class docstring (I_i = 1/2 sum_j h_ij), in few passes: with
        U = max(r + sr_j, or_i), a pair outside the integration domain (r + sr_j < or_i, where
        L = or_i too) gets h = 0 exactly (L = U) without a mask; the diagonal is zeroed.
        ``keep`` holds what :meth:`_integral_slopes` needs."""
        o, s = self.or_i, self.sr_j
        U = torch.add(r, s)
        domain = U >= o if gradient else None
        U.clamp_min_(o)
        diff = torch.sub(r, s)
        L = diff.abs() if (gradient or self.inner) else diff.abs_()
        outer = L > o if gradient else None  # dL/dr != 0
        L.clamp_min_(o)
        # one division for both reciprocals (divisions, square roots and the logarithm bound
        # the compiled kernel)
        inv_LU = torch.mul(L, U).reciprocal_()
        inv_U = torch.mul(L, inv_LU)
        inv_L = U.mul_(inv_LU)
        log_ratio = torch.mul(L, inv_U).log_()
        a = torch.addcmul(r, self.sr2_j, inv_r, value=-1.0)  # r - sr_j^2 / r
        # 1/L - 1/U + (a/4)(1/U^2 - 1/L^2) = (1/L - 1/U)(1 - (a/4)(1/L + 1/U))
        h = torch.addcmul(self.one, a, inv_L + inv_U, value=-0.25).mul_(inv_L - inv_U)
        h.addcmul_(log_ratio, inv_r, value=0.5)
        inside = None
        if self.inner:  # 2 (1/or_i - 1/L) where or_i < sr_j - r (there L = sr_j - r), else 0
            inside = diff < self.neg_or_i
            h.add_(torch.sub(inv_L, self.inv_or_i).mul_(inside), alpha=-2.0)
        within = None
        if self.cutoff is not None:
            within = (r <= self.cutoff).to(r.dtype)
            h.mul_(within)
        h.diagonal(0, 0, 1).zero_()
        return h, (inv_L, inv_U, log_ratio, a, diff, domain, outer, inside, within)

    def _integral_slopes(self, r: torch.Tensor, inv_r: torch.Tensor, keep: tuple) -> torch.Tensor:
        """dh_ij/dr_ij (n, n, b) from :meth:`_integrals`' ``keep``; 0 on the diagonal."""
        inv_L, inv_U, log_ratio, a, diff, domain, outer, inside, within = keep
        inv_L2, inv_U2 = inv_L * inv_L, inv_U * inv_U
        dL = torch.sign(diff).mul_(outer)  # dL/dr: 0 where L = or_i
        m = torch.mul(inv_L2, dL)  # -d(1/L)/dr
        dh = torch.addcmul(self.quarter, self.quarter_sr2_j, inv_r * inv_r).mul_(inv_U2 - inv_L2)
        dh.sub_(m).add_(inv_U2)
        dh.sub_(torch.mul(inv_U, inv_U2).addcmul_(inv_L, m, value=-1.0).mul_(a), alpha=0.5)
        dh.addcmul_(torch.mul(dL, inv_L).sub_(inv_U).addcmul_(log_ratio, inv_r, value=-1.0), inv_r, value=0.5)
        dh.mul_(domain)
        if inside is not None:
            dh.sub_(inv_L2.mul_(inside), alpha=2.0)
        if within is not None:
            dh.mul_(within)
        dh.diagonal(0, 0, 1).zero_()
        return dh


class GBSAOBCTerm(ForceTerm):
    """GBSAOBCForce: OBC2 as OpenMM's ReferenceObc (see :class:`OBCKernel`) with
    or = radius - 0.009 nm, sr = or * scale, R = radius, (alpha, beta, gamma) = (1, 0.8, 4.85),
    the inner-sphere correction on, self_factor = pair_factor/2 with
    pair_factor = -ONE_4PI_EPS0 (1/eps_solute - 1/eps_solvent), and the ACE surface term
    4 pi gamma_SA (radius + 0.14)^2 (radius/B)^6 (gamma_SA = surface area energy)."""

    needs_dense = True
    live_tensors = 26  # (n, n, b): 25.6 measured on aldp-obc (OBCKernel's integrals, their slopes, r, 1/r, W)

    def _compile(self, force: openmm.GBSAOBCForce) -> None:
        method = force.getNonbondedMethod()
        if method not in (openmm.GBSAOBCForce.NoCutoff, openmm.GBSAOBCForce.CutoffNonPeriodic):
            raise UnsupportedForceError(
                f"{self.label} uses periodic boundary conditions, which the torch backend does not implement."
            )
        rows = np.array(
            [[md_value(v) for v in force.getParticleParameters(i)] for i in range(force.getNumParticles())]
        ).reshape(-1, 3)
        charge, radius, scale = rows.T
        offset_radius = radius - 0.009
        eps_in, eps_out = force.getSoluteDielectric(), force.getSolventDielectric()
        pref = -ONE_4PI_EPS0 * (1.0 / eps_in - 1.0 / eps_out) if eps_in != 0.0 and eps_out != 0.0 else 0.0
        n = len(charge)
        self.kernel = OBCKernel(
            OBCParameters(
                charge=charge,
                offset_radius=offset_radius,
                scaled_radius=offset_radius * scale,
                radius=radius,
                alpha=np.full(n, 1.0),
                beta=np.full(n, 0.8),
                gamma=np.full(n, 4.85),
                self_factor=0.5 * pref,
                pair_factor=pref,
                ace_factor=4 * math.pi * md_value(force.getSurfaceAreaEnergy()),
                ace_radius=radius,
                probe=0.14,
                inner_correction=True,
                cutoff=md_value(force.getCutoffDistance()) if method != openmm.GBSAOBCForce.NoCutoff else None,
            ),
            self.device,
            self.dtype,
        )

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        return self.kernel(geometry, gradient)


class OBCFamilyGBTerm(ForceTerm):
    """A CustomGBForce recognised as OpenMM's OBC1/OBC2 (:func:`~.custom_gb.recognise_obc`),
    evaluated by :class:`OBCKernel` without the inner-sphere correction
    (B = 1/(1/or - tanh(...)/(or + offset))) with analytic gradients;
    :func:`~.custom_gb.compile_custom_gb` keeps it only when it agrees with
    :class:`~.custom_gb.CustomGBTerm` on the same force."""

    needs_dense = True
    live_tensors = 26  # (n, n, b): 25.7 measured on aldp-implicit, as GBSAOBCTerm

    def __init__(
        self,
        force: openmm.CustomGBForce,
        index: int,
        parameters: OBCParameters,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float64,
        n_atoms: int | None = None,
    ):
        self.parameters = parameters
        super().__init__(force, index, device, dtype, n_atoms)

    def _compile(self, force: openmm.CustomGBForce) -> None:
        self.kernel = OBCKernel(self.parameters, self.device, self.dtype)

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        return self.kernel(geometry, gradient)
