"""Stratified CMT weights: move mass between metastable states without the shape penalty.

Why. The CMT step target q_{i+1} ∝ q_i^a p̃^b (a = λ/(1+λ+η), b = 1/(1+λ+η)) gives a region S
the mass ∫_S q_i^a p̃^b, which by Hölder is at most

    M_S = q_i(S)^a · Z_S^{1−a},    Z_S = ∫_S p̃^γ,   γ = b / (1 − a) = 1 / (1 + η),

with equality only when q_i's shape inside S is already the tempered shape p̃^γ. A small basin
whose shape the flow has not learned yet (ALDP's φ > 0 states: their bond angles differ from
the φ < 0 ones by about 1σ) loses mass at every step by that Hölder gap, and the loss
compounds until the basin is gone (benchmarks/cmt_settings_study.py). Stratifying removes
that drain: inside each stratum the fit target keeps the dual's weights (the CMT shape
update), but the strata's masses are set to M_S, the mass update the trust region would make
if every shape were right. With λ = 0 (a = 0) M_S is the dual's own stratum mass, so the tempered phase and
the final target (λ = η = 0) are unchanged; the correction acts only while the trust region
binds, damped by the power 1 − a.

On ALDP that alone kept the φ > 0 samples but not the basin's shape: while the path cooled,
the few φ > 0 samples were too few to learn it, and the importance estimate of Z_S then fell
too. A floor ρ adds defensive sampling at the level of strata: the fitted masses become
(1 − ρ) M_S + ρ / K, so a basin the target gives 2 % is sampled at ≥ ρ / K and its shape keeps
being learned from enough samples. The generator is then a slightly over-dispersed proposal:
importance weights stay exact, and at the level of strata the ESS falls by at most a factor
1 − ρ (Σ_S p_S² / q_S ≤ 1 / (1 − ρ)).

Strata are labels of configurations. ``phi-sign`` labels a peptide by the signs of its
backbone φ angles (the slow, left-handed αL/C7ax states sit at φ > 0), up to 2^R labels for R
residues; a stratum with no buffer sample keeps weight 0 (nothing can be moved into it).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

from .. import metrics
from ..errors import CMTInputError

STRATA = ("none", "phi-sign")


def stratifier(name: str, topology):
    """The labelling function x (B, n_atoms, 3) nm -> (B,) int of strata ``name``; None for "none"."""
    if name == "none":
        return None
    if not metrics.backbone_dihedrals(topology):
        raise CMTInputError(
            "cmt.strata 'phi-sign' needs a peptide with backbone φ angles and this target has none; "
            "set cmt.strata to 'none'."
        )
    return lambda x: phi_sign_labels(topology, x)


def phi_sign_labels(topology, x) -> np.ndarray:
    """(B,) int labels Σ_j 2^j [φ_j ≥ 0] of configurations x (B, n_atoms, 3) nm."""
    phi = metrics.ramachandran_angles(topology, np.asarray(x))[..., 0]
    return ((phi >= 0.0) * (1 << np.arange(phi.shape[1]))).sum(axis=1)


def stratified_log_weights(log_q, log_p, labels, lam: float, eta: float, log_weights, floor: float = 0.0) -> np.ndarray:
    """The dual's normalised log w̄ with each stratum's total moved to M_S (module docstring).

    log_q, log_p: (N,) log q_i and log p̃ = −u on the buffer (log p̃ = −inf: failed energy);
    labels: (N,) stratum of each sample; lam, eta: the dual's multipliers; log_weights: (N,)
    the dual's normalised log w̄; floor: ρ in [0, 1), the strata masses become
    (1 − ρ) M_S + ρ / K over the K strata with samples. Returns (N,) float64, normalised
    (logsumexp = 0).
    """
    log_q, log_p = np.asarray(log_q, np.float64), np.asarray(log_p, np.float64)
    log_w = np.asarray(log_weights, np.float64)
    labels = np.asarray(labels)
    a = lam / (1.0 + lam + eta)
    gamma = 1.0 / (1.0 + eta)
    n = log_q.shape[0]
    ok = np.isfinite(log_p) & np.isfinite(log_w)
    strata = [s for s in np.unique(labels) if np.any(ok & (labels == s))]
    log_mass_cmt, log_mass_ideal = [], []
    for s in strata:
        inside = labels == s
        both = inside & ok
        log_m = math.log(inside.sum() / n)  # q_i(S), from all samples in S
        log_z = logsumexp(gamma * log_p[both] - log_q[both]) - math.log(n)  # Ẑ_S ≈ E_q[1_S p̃^γ / q]
        log_mass_ideal.append(a * log_m + (1.0 - a) * log_z)
        log_mass_cmt.append(logsumexp(log_w[both]))
    log_mass_ideal = np.asarray(log_mass_ideal) - logsumexp(log_mass_ideal)
    if floor > 0.0:
        log_mass_ideal = np.logaddexp(math.log1p(-floor) + log_mass_ideal, math.log(floor / len(strata)))
    out = np.full(n, -np.inf)
    for s, cmt, ideal in zip(strata, log_mass_cmt, log_mass_ideal):
        both = (labels == s) & ok
        out[both] = log_w[both] - cmt + ideal
    return out
