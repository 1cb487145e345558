"""Strata with a floor: CMT fits that cannot lose a metastable state while it has samples.

Why. The CMT step target q_{i+1} ∝ q_i^a p̃^b (a = λ/(1+λ+η), b = 1/(1+λ+η)) gives a region S
the mass ∫_S q_i^a p̃^b, which by Hölder is at most q_i(S)^a (∫_S p̃^γ)^{1−a} (γ = 1/(1+η)),
with equality only when q_i's shape inside S is already the tempered shape p̃^γ. A small basin
whose shape the flow has not learned yet (ALDP's φ > 0 states: their bond angles differ from
the φ < 0 ones by about 1σ) loses mass at every step by that Hölder gap; the loss compounds,
the basin's few samples cannot teach the flow its shape, and the basin is gone
(benchmarks/cmt_settings_study.py).

The floor is defensive sampling at the level of strata. Inside each stratum the fit keeps the
dual's weights (the CMT update of the shape); the strata's masses M_S become
(1 − ρ) M_S + ρ / K over the K strata holding samples of positive weight, so a basin the target gives 2 % is
fitted at ≥ ρ / K and keeps enough samples to learn its shape. The generator is then a slightly
over-dispersed proposal: importance weights stay exact, and at the level of strata the ESS
falls by at most a factor 1 − ρ (Σ_S p_S² / q_S ≤ 1 / (1 − ρ)). A stratum with no buffer sample
keeps weight 0: the floor keeps basins, it cannot find new ones.

The same gap makes a state the flow holds but has not shaped yet fall behind the path: on ala4
the hydrogen-bonded helical turns carry most of the weight variance and get a third to a half of
their mass (benchmarks/weight_breakdown.py). ``strata_mass: holder`` gives each stratum the
Hölder bound itself, M_S ∝ q_i(S)^a (∫_S p̃^γ)^{1−a} (γ = 1/(1+η); q_i(S) and ∫_S p̃^γ estimated
from the buffer by counting and importance sampling): the mass the step target would give S if
the flow's shape inside it were right, so the strata's masses follow the tempered path while
the shapes inside them follow the trust region. Where the shapes are right it equals the dual's
masses. Alone (no floor) on ALDP it kept the φ > 0 samples through the hot phase but not the
basin's shape, and added nothing to the floor there (docs/cmt_settings.md); the floor applies
after it.

Strata are labels of configurations. ``phi-sign`` labels a peptide by the signs of its
backbone φ angles (the slow, left-handed αL/C7ax states sit at φ > 0), up to 2^R labels for R
residues; ``phi-sign-turns`` also by which turn hydrogen bonds (i → i + 3, i → i + 4) it forms
(:func:`~cmt_openmm.coordinates.backbone.turn_hydrogen_bonds`), up to 2^(R + T) labels.
``phi-basin`` labels by which φ lie in the φ > 0 basin itself, 0° ≤ φ < 120°
(:data:`~cmt_openmm.coordinates.backbone.PHI_POSITIVE_BASIN`, the basin the reports judge):
a φ ≥ 0 stratum also holds the edge of the β region (120° ≤ φ < 180°, which reaches across
±180°), so under ``phi-sign`` the flow can meet the floor with β-edge samples and leave the basin
itself thin; ``phi-basin`` puts the β edge with the rest of β and floors the basin.

``strata_mass: holder-turns`` splits the Hölder masses finer than the floor: each stratum is cut
by its turn pattern (which turn hydrogen bonds form) and each piece gets its Hölder bound, while
the floor stays over the strata (φ labels). With ``phi-sign-turns`` the floor itself is shared
among up to 2^(R + T) labels and thins to nothing per basin; here it stays at ρ / 2^R at most.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

from ..coordinates.backbone import backbone_phis, in_phi_positive_basin, phi_angles, turn_contacts
from ..errors import CMTInputError

STRATA = ("none", "phi-sign", "phi-sign-turns", "phi-basin")
STRATA_MASSES = ("dual", "holder", "holder-turns")


def stratifier(name: str, topology, by_turns: bool = False):
    """The labelling function x (B, n_atoms, 3) nm -> (B,) int of strata ``name``; None for "none".
    ``by_turns`` (strata_mass holder-turns): the labels also carry the turn pattern above the R φ bits
    (:func:`floor_labels` strips it)."""
    if name == "none":
        return None
    if not backbone_phis(topology):
        raise CMTInputError(
            f"cmt.strata {name!r} needs a peptide with backbone φ angles and this target has none; "
            "set cmt.strata to 'none'."
        )
    if name == "phi-sign-turns":  # the φ signs with the turn pattern above them
        name, by_turns = "phi-sign", True
    label = phi_basin_labels if name == "phi-basin" else phi_sign_labels
    if not by_turns:
        return lambda x: label(topology, x)
    return lambda x: with_turn_pattern(topology, x, label(topology, x))


def floor_labels(labels, topology) -> np.ndarray:
    """The φ strata (B,) of labels (B,) that carry a turn pattern above their R φ bits."""
    return np.asarray(labels) & ((1 << len(backbone_phis(topology))) - 1)


def _as_bits(flags: np.ndarray) -> np.ndarray:
    """(B,) int Σ_j 2^j flags[:, j] of boolean flags (B, K)."""
    return (flags * (1 << np.arange(flags.shape[1]))).sum(axis=1)


def phi_sign_labels(topology, x) -> np.ndarray:
    """(B,) int labels Σ_j 2^j [φ_j ≥ 0] of configurations x (B, n_atoms, 3) nm, over every backbone φ
    (an uncapped peptide's C-terminal residue included)."""
    return _as_bits(phi_angles(topology, np.asarray(x)) >= 0.0)


def phi_basin_labels(topology, x) -> np.ndarray:
    """(B,) int labels Σ_j 2^j [0° ≤ φ_j < 120°] of configurations x (B, n_atoms, 3) nm: which backbone
    φ lie in the φ > 0 basin (:func:`~cmt_openmm.coordinates.backbone.in_phi_positive_basin`)."""
    return _as_bits(in_phi_positive_basin(phi_angles(topology, np.asarray(x))))


def phi_sign_turn_labels(topology, x) -> np.ndarray:
    """(B,) int labels: :func:`phi_sign_labels` + 2^R Σ_k 2^k [turn k formed] (R backbone φ, turns of
    :func:`~cmt_openmm.coordinates.backbone.turn_contacts`), x (B, n_atoms, 3) nm."""
    return with_turn_pattern(topology, x, phi_sign_labels(topology, x))


def with_turn_pattern(topology, x, labels) -> np.ndarray:
    """φ labels (B,) of configurations x (B, n_atoms, 3) nm + 2^R × their :func:`turn_pattern`."""
    return np.asarray(labels) + (turn_pattern(topology, x) << len(backbone_phis(topology)))


def turn_pattern(topology, x) -> np.ndarray:
    """(B,) int Σ_k 2^k [turn k formed] of configurations x (B, n_atoms, 3) nm, over the turns of
    :func:`~cmt_openmm.coordinates.backbone.turn_contacts`."""
    return _as_bits(turn_contacts(topology, np.asarray(x)))


def holder_log_weights(log_weights, labels, log_q, log_p, lam: float, eta: float) -> np.ndarray:
    """Normalised log w̄ (N,) with each stratum's mass moved to its Hölder bound, the ratios inside
    it kept: M_S ∝ N_S^a (Σ_{n∈S} p̃_n^γ / q_n)^{1−a}, a = λ/(1+λ+η), γ = 1/(1+η).

    log_weights: (N,) the dual's log w̄ (−inf: weight 0, kept); labels: (N,) strata; log_q, log_p:
    (N,) the buffer's log q_i and log p̃ (p̃ unnormalised); lam, eta: the dual's multipliers.
    """
    log_w = np.asarray(log_weights, np.float64)
    labels = np.asarray(labels)
    log_ratio = np.asarray(log_p, np.float64) / (1.0 + eta) - np.asarray(log_q, np.float64)
    a = lam / (1.0 + lam + eta)
    ok = np.isfinite(log_w)
    out = np.full_like(log_w, -np.inf)
    strata = np.unique(labels[ok])
    masses = np.empty(len(strata))
    for k, s in enumerate(strata):
        inside = (labels == s) & ok
        masses[k] = a * math.log(inside.sum()) + (1.0 - a) * logsumexp(log_ratio[inside])
        out[inside] = log_w[inside] - logsumexp(log_w[inside]) + masses[k]
    return out - logsumexp(masses)


def floored_log_weights(log_weights, labels, floor: float) -> np.ndarray:
    """Normalised log w̄ (N,) with each stratum's total M_S moved to (1 − floor) M_S + floor / K.

    log_weights: (N,) the dual's log w̄ (−inf: weight 0, kept); labels: (N,) the
    stratum of each sample; floor: ρ in [0, 1); K: the strata holding positive weight.
    Returns (N,) float64 with logsumexp 0; inside a stratum the ratios are unchanged.
    """
    log_w = np.asarray(log_weights, np.float64)
    labels = np.asarray(labels)
    ok = np.isfinite(log_w)
    strata = np.unique(labels[ok])
    out = log_w - logsumexp(log_w[ok])
    for s in strata:
        inside = (labels == s) & ok
        mass = logsumexp(out[inside])
        out[inside] += np.logaddexp(math.log1p(-floor) + mass, math.log(floor / len(strata))) - mass
    return out
