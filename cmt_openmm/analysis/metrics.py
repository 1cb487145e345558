"""The metrics of a trained generator: what the report and the benchmarks print.

Two kinds, both following docs/method.md, "Metrics":

- Ramachandran histograms and their TV / KL distances (functions of angles and weights);
- the report's sample and reference metrics, computed from reweighted draws: reverse ESS as
  the median over several independent draws with the spread (one draw scatters by several
  times), with and without clipping the largest 1e-4 of the log-weights; basin populations and
  free energies (peptides) or exact-vs-model mode weights (toys); forward ESS, EUBO and
  Ramachandran TV/KL against reference MD frames.

Every population and free energy carries ``n_effective`` and ``reliable``: a reweighted
population rests on the smaller of the Kish counts of the weights inside and outside its basin
(`state_effective_samples`: a rare basin's weight can sit on a few samples however large N · ESS
is), reference-MD estimates on N / g (g the statistical inefficiency of the frames, which are a
correlated time series; a chain's φ > 0 population also needs :data:`MIN_TRANSITIONS` φ
transitions, `chain_populations`); below
:data:`~cmt_openmm.sampling.estimators.MIN_EFFECTIVE_SAMPLES` (100) the estimate and its error
bar are marked unreliable (``"reliable": false``) and the report prints "unreliable" instead
of a precise-looking number.

Hand-written glue over :mod:`cmt_openmm.importance`, :mod:`cmt_openmm.sampling.estimators` and
:mod:`cmt_openmm.sampling.reweighting`; the conventions (which KL direction, how empty bins are
treated, where angles wrap) are the documented ones.
"""

from __future__ import annotations

import math
import shlex
from typing import Any, Sequence

import numpy as np

from ..coordinates.backbone import BackboneAngles, is_peptide, phi_residue_names, ramachandran_angles
from ..errors import CMTInputError
from ..importance import CLIP_FRACTION, eubo, forward_ess, reverse_ess
from ..sampling.estimators import (ALDP_BASINS, BLOCK_ROWS, MIN_EFFECTIVE_SAMPLES, PHI_POSITIVE, Estimate, as_weights,
                                   basin_free_energies, basin_indicators, basin_populations, effective_samples,
                                   statistical_inefficiency)
from ..sampling.ensemble_weights import effective_samples_about
from ..sampling.reweighting import ReweightedEnsemble
from ..units import as_float64, wrap_angle

KL_EPSILON = 1e-10
"""Added to every bin of both histograms (then renormalised) before a KL divergence."""


def ramachandran_histogram(angles: Any, weights: Any = None, bins: int = 100) -> np.ndarray:
    """Normalised (φ, ψ) histogram(s) on [-π, π)² with bins×bins bins.

    ``angles`` (B, 2) -> (bins, bins), or (B, n_pairs, 2) -> (n_pairs, bins, bins); axis -2 is
    φ, axis -1 is ψ. ``weights`` (B,), non-negative, any normalisation (None: uniform). Every
    histogram sums to 1.
    """
    a = wrap_angle(angles)
    single = a.ndim == 2
    if single:
        a = a[:, None, :]
    if a.ndim != 3 or a.shape[-1] != 2:
        raise CMTInputError(f"angles have shape {a.shape}, expected (B, 2) or (B, n_pairs, 2).")
    w = as_weights(weights, a.shape[0])
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    hists = np.stack(
        [np.histogram2d(a[:, k, 0], a[:, k, 1], bins=(edges, edges), weights=w)[0] for k in range(a.shape[1])]
    )
    hists /= hists.sum(axis=(-2, -1), keepdims=True)
    return hists[0] if single else hists


def _check_pair(p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    p, q = as_float64(p), as_float64(q)
    if p.shape != q.shape:
        raise CMTInputError(f"histograms have shapes {p.shape} and {q.shape}: compare histograms with the same bins.")
    return p, q


def histogram_tv(p: Any, q: Any, axis: int | Sequence[int] | None = None) -> np.ndarray | float:
    """Total variation ½ Σ |P - Q| of two normalised histograms (summed over ``axis``; None: all)."""
    p, q = _check_pair(p, q)
    tv = 0.5 * np.abs(p - q).sum(axis=None if axis is None else tuple(np.atleast_1d(axis)))
    return float(tv) if np.ndim(tv) == 0 else tv


def histogram_kl(p: Any, q: Any, axis: int | Sequence[int] | None = None, epsilon: float = KL_EPSILON) -> np.ndarray | float:
    """KL(P ‖ Q) = Σ P log(P / Q) of two histograms (P: reference, Q: model).

    ``epsilon`` (default 1e-10) is added to every bin of both, which are then renormalised over
    ``axis`` (None: all axes), so bins empty in Q give a large finite penalty instead of +inf.
    """
    p, q = _check_pair(p, q)
    ax = None if axis is None else tuple(np.atleast_1d(axis))
    p = (p + epsilon) / (p + epsilon).sum(axis=ax, keepdims=True)
    q = (q + epsilon) / (q + epsilon).sum(axis=ax, keepdims=True)
    kl = np.sum(p * np.log(p / q), axis=ax)
    return float(kl) if np.ndim(kl) == 0 else kl


def ramachandran_tv(angles_model: Any, angles_ref: Any, weights_model: Any = None, bins: int = 100) -> float:
    """Ramachandran TV averaged over backbone pairs (the "Ram TV" of docs/method.md, "Published results").

    ``angles_model`` (B, n_pairs, 2) with optional importance weights; ``angles_ref`` (M, n_pairs, 2)
    unweighted reference (MD) angles.
    """
    pm = ramachandran_histogram(angles_model, weights_model, bins)
    pr = ramachandran_histogram(angles_ref, None, bins)
    return float(np.mean(histogram_tv(pm, pr, axis=(-2, -1))))


# ---------------------------------------------------------------------------------------------
# The report's metrics
# ---------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and every value of repeated measurements."""
    v = np.asarray(list(values), dtype=float)
    return {
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "draws": [float(x) for x in v],
    }


def _estimate(e: Estimate, n_effective: float | None = None) -> dict:
    """{"value", "error"} (None where not finite), with ``n_effective`` and ``reliable`` when given."""
    out = {"value": _finite(e.value), "error": _finite(e.error)}
    if n_effective is not None:
        out["n_effective"] = float(n_effective)
        out["reliable"] = bool(n_effective >= MIN_EFFECTIVE_SAMPLES)
    return out


def _population(e: Estimate, n_effective: float) -> dict:
    """:func:`_estimate` of a basin population; one seen in no sample (or in all) has no error bar
    to give, however many samples there are: it is marked unreliable, with ``"seen_in": "none"``
    (or ``"all"``), rather than reported as 0 ± 0."""
    out = _estimate(e, n_effective)
    if e.value in (0.0, 1.0):
        out.update(error=None, reliable=False, seen_in="none" if e.value == 0.0 else "all")
    return out


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def training_summary(history: Sequence[dict], stop_reason: str | None = None, run_dir: Any = None) -> dict:
    """Steps, energy evaluations, wall time and the last record's main fields; ``run_dir`` (the
    run's folder) goes into the command that continues a run short of its target."""
    if not history:
        return {"steps": 0, "energy_evaluations": 0, "wall_time_s": 0.0, "stop_reason": stop_reason}
    last = history[-1]
    keys = ("lam", "eta", "temperature", "reverse_ess", "reverse_ess_clipped", "ess_step", "loss", "entropy")
    return {
        "method": last.get("method"),
        "steps": int(last.get("step", len(history))),
        "energy_evaluations": int(last.get("energy_evaluations", 0)),
        "failed_evaluations": int(last.get("n_failed", 0)),
        "wall_time_s": float(last.get("wall_time", 0.0)),
        "energy_backend": last.get("energy_backend"),
        "stop_reason": stop_reason,
        "final": {k: last[k] for k in keys if k in last},
        **_target_verdict(last, stop_reason, run_dir),
    }


CONTINUE_TRAINING = ("continue it with `cmt-openmm train --out RUN_DIR --resume` and a larger budget, max_steps "
                     "or max_minutes")
"""What to do with a run that stopped before its target, when neither its folder nor the limit
that stopped it is known (:func:`continue_training` names both where they are)."""


def continue_training(stop_reason: str | None = None, run_dir: Any = None) -> str:
    """What to do with a run that stopped before its target (the training verdict and the
    report's), as one clause: the limit that stopped it and the command that continues it in
    ``run_dir`` (``RUN_DIR`` when not given). ``max_minutes`` counts all the run's training time,
    earlier stretches included."""
    out = shlex.quote(str(run_dir)) if run_dir else "RUN_DIR"
    resume = f"cmt-openmm train --out {out} --resume"
    if stop_reason == "max_minutes":
        return (f"continue it with `{resume} --max-minutes M`, M larger than the minutes trained so far "
                f"(max_minutes counts all of the run's training)")
    if stop_reason == "max_steps":
        return f"continue it with `{resume} --max-steps N`, N larger than the steps taken"
    if stop_reason == "budget":
        return f"continue it with `{resume} --budget N`, N larger than the energy evaluations spent"
    return CONTINUE_TRAINING.replace("RUN_DIR", out)


def _target_verdict(last: dict, stop_reason: str | None, run_dir: Any = None) -> dict:
    """For an annealing path (records with λ, η): whether it reached the target, and if not, what
    that means and what to do, in one sentence."""
    if "lam" not in last or last.get("lam") is None:
        return {}
    reached = last["lam"] == 0 and (last.get("eta") or 0) == 0
    if reached:
        return {"target_reached": True}
    return {"target_reached": False, "verdict": (
        f"training stopped ({stop_reason or 'unknown'}) before the path reached the target (λ = {last['lam']:.3g} > 0): "
        "weights, estimates and flow moves stay exact, and more training would raise the ESS; "
        f"{continue_training(stop_reason, run_dir)}.")}


def sample_metrics(ensembles: Sequence[ReweightedEnsemble] | ReweightedEnsemble, n_draws: int = 1) -> dict:
    """ESS (median of draws with spread, clipped and not), failures, and state populations.

    ``ensembles``: the draws, or all of them pooled in one ensemble whose ``n_draws`` equal
    consecutive parts are the draws (what the report keeps of a large draw: log-weights and angles,
    `ReweightedEnsemble.weights_only`; no copy is made). ``n_effective`` is N · ESS of the pooled
    draws and ``reliable`` whether it reaches :data:`MIN_EFFECTIVE_SAMPLES`; a toy's mode weights
    inherit both, and each peptide population has its own (`state_effective_samples`). Peptides
    also get ``phi_positive_samples``: by residue (every backbone φ, in chain order;
    ``phi_residues`` names them), how many of the pooled samples lie in the φ > 0 basin
    (:data:`PHI_POSITIVE`), whatever their weights.
    """
    if isinstance(ensembles, ReweightedEnsemble):
        pooled, size = ensembles, len(ensembles) // int(n_draws)
        if size * int(n_draws) != len(pooled) or size < 1:
            raise CMTInputError(f"{len(pooled)} pooled samples do not split into {n_draws} equal draws.")
        draws = [pooled.log_weights[k * size : (k + 1) * size] for k in range(int(n_draws))]
    else:
        pooled = ensembles[0] if len(ensembles) == 1 else ReweightedEnsemble.concatenate(ensembles)
        draws, size = [e.log_weights for e in ensembles], len(ensembles[0])
    target = pooled.target
    n_eff = pooled.n_effective
    out = {
        "n_draws": len(draws),
        "n_samples_per_draw": size,
        "reverse_ess": spread(reverse_ess(lw) for lw in draws),
        "reverse_ess_clipped": spread(reverse_ess(lw, CLIP_FRACTION) for lw in draws),
        "clip_fraction": CLIP_FRACTION,
        "reverse_ess_pooled": pooled.ess,
        "failed_energies": pooled.failed_energies,
        "chirality_flips": int(pooled.invalid.sum()),
        "n_effective": float(n_eff),
        "min_effective_samples": MIN_EFFECTIVE_SAMPLES,
        "reliable": bool(n_eff >= MIN_EFFECTIVE_SAMPLES),
    }
    if is_peptide(target):
        angles = pooled.backbone_angles()
        out["phi_residues"] = phi_residue_names(target.topology)
        out["phi_positive_samples"] = {f"residue_{i + 1}": phi_positive_count(angles.phi[:, i])
                                       for i in range(angles.phi.shape[1])}
    weights = pooled.weights
    if not weights.any():
        return out
    if is_peptide(target):
        out.update(peptide_populations(angles.pairs, weights, target.kT, phi=angles.phi))
    elif hasattr(target, "mode_weights"):
        out["modes"] = {**toy_modes(pooled), "n_effective": float(n_eff), "reliable": out["reliable"]}
    return out


def phi_positive_count(phi: np.ndarray) -> int:
    """How many of the angles φ (N,) lie in the φ > 0 basin (:data:`PHI_POSITIVE`), counted a block
    of samples at a time."""
    return sum(int(basin_indicators(_any_psi(phi[i : i + BLOCK_ROWS]), PHI_POSITIVE)["phi>0"].sum())
               for i in range(0, len(phi), BLOCK_ROWS))


PHI_POSITIVE_CORE = (math.radians(20.0), math.radians(100.0))
PHI_NEGATIVE_CORE = (math.radians(-20.0), math.radians(140.0))
"""Cores of the φ > 0 basin (20°..100°) and the φ < 0 one (φ ≤ -20° or φ ≥ 140°: C5 wraps across ±180°)
between which `phi_transitions` counts, leaving a buffer so that recrossings of φ = 0 are not counted."""


def phi_transitions(phi: np.ndarray) -> list[int]:
    """Core-to-core transitions between the φ < 0 and φ > 0 basins of a time series (``phi`` (T,) or
    (T, n_phi) radians, frames in time order), one count per residue."""
    counts = []
    for series in np.asarray(phi).reshape(len(phi), -1).T:
        state = np.full(series.shape, -1)
        state[(series >= PHI_POSITIVE_CORE[0]) & (series <= PHI_POSITIVE_CORE[1])] = 1
        state[(series <= PHI_NEGATIVE_CORE[0]) | (series >= PHI_NEGATIVE_CORE[1])] = 0
        visited = state[state >= 0]
        counts.append(int(np.count_nonzero(np.diff(visited))) if visited.size else 0)
    return counts


def _any_psi(phi: np.ndarray) -> np.ndarray:
    """φ (N,) as (φ, ψ) pairs (N, 2) with ψ = 0, for boxes whose ψ interval is the full circle
    (:data:`PHI_POSITIVE`): a C-terminal residue has a φ but no ψ."""
    return np.stack([phi, np.zeros_like(phi)], axis=-1)


ERROR_METHODS = {
    "delta": ("delta method on independent importance-weighted samples; N_eff = the smaller Kish count "
              "(Σw)²/Σw² of the weights inside and outside the basin"),
    "correlated": ("delta method × statistical inefficiency g of each estimate's series (frames in time "
                   "order; pymbar.timeseries.statistical_inefficiency); N_eff = N / g"),
}
"""How `peptide_populations` computes its error bars, as written into report.json / report.md."""


def state_effective_samples(weights: np.ndarray, inside: np.ndarray) -> float:
    """Effective samples a reweighted state's population rests on: the smaller of the Kish counts
    (Σw)² / Σw² of the weights (N,) inside the state (``inside`` (N,) bool) and outside it
    (`effective_samples_about` of its indicator; the whole draw's count for a state that holds no
    weight, or all of it: the evidence that the state is empty, or everything)."""
    indicator = np.asarray(inside, dtype=float)
    return float(effective_samples_about(weights, indicator, weights @ indicator / weights.sum()))


def peptide_populations(angles: np.ndarray, weights: np.ndarray | None, kT: float, error: str | None = None,
                        phi: np.ndarray | None = None) -> dict:
    """Basin populations and free energies with their errors: the ALDP boxes for one backbone pair
    (``angles`` (N, n_pairs, 2)), and the φ > 0 basin (:data:`PHI_POSITIVE`) of every backbone φ
    (``phi`` (N, n_phi), which includes an uncapped peptide's C-terminal residue; None: the pairs'
    φ), one estimate for a single φ and by residue otherwise (``residue_k``: the k-th residue with a φ,
    in chain order).

    ``weights`` (N,): independent importance-weighted samples, delta-method errors (``error``
    default "delta"). ``weights=None``: MD frames in time order (reference MD: one replica-exchange
    state per iteration), which are strongly correlated, so ``error`` defaults to "correlated":
    the standard error is sqrt(var · g / N) with g the statistical inefficiency of each basin's
    indicator series (pymbar's ``timeseries.statistical_inefficiency``), not the i.i.d. sqrt(var / N).
    Every estimate has ``n_effective`` (`state_effective_samples` of its basin, or N / g per
    estimate for "correlated"; for ΔF the smaller of the two basins') and ``reliable``;
    ``error_method`` says which errors were used.
    """
    error = error or ("correlated" if weights is None else "delta")
    if error not in ERROR_METHODS:
        raise CMTInputError(f"error must be one of {sorted(ERROR_METHODS)}, got {error!r}.")
    n = angles.shape[0]
    w = as_weights(weights, n)
    kish = effective_samples(w)

    def n_effective(angles2: np.ndarray, basins: dict) -> dict[str, float]:
        ind = basin_indicators(angles2, basins)
        if error != "correlated":
            return {k: state_effective_samples(w, v) for k, v in ind.items()}
        return {k: kish / statistical_inefficiency(w * (v - w @ v)) for k, v in ind.items()}

    out: dict[str, Any] = {"error_method": ERROR_METHODS[error]}
    if angles.shape[1] == 1:
        pops = basin_populations(angles[:, 0], w, ALDP_BASINS, error=error)
        n_eff = n_effective(angles[:, 0], ALDP_BASINS)
        out["basin_populations"] = {k: _population(v, n_eff[k]) for k, v in pops.items()}
        if any(v.value > 0 for v in pops.values()):
            ref = max(pops, key=lambda k: pops[k].value)
            dF = basin_free_energies(angles[:, 0], w, ALDP_BASINS, kT=1.0, reference=ref, error=error)
            out["basin_free_energies_kT"] = {k: _estimate(v, min(n_eff[k], n_eff[ref])) for k, v in dF.items()}
    phi = angles[..., 0] if phi is None else phi
    phi_positive = {}
    for i in range(phi.shape[1]):
        a = _any_psi(phi[:, i])
        est = basin_populations(a, w, PHI_POSITIVE, error=error)["phi>0"]
        phi_positive[f"residue_{i + 1}"] = _population(est, n_effective(a, PHI_POSITIVE)["phi>0"])
    out["phi_positive_population"] = phi_positive["residue_1"] if len(phi_positive) == 1 else phi_positive
    return out


MIN_TRANSITIONS = 20
"""φ transitions (`phi_transitions`) a chain needs before its φ > 0 population counts as reliable:
a chain that crossed φ = 0 a few times has visited the basin a few times, whatever N / g says
(g itself is then estimated from those few visits)."""


def by_residue(php: dict) -> dict:
    """φ > 0 populations by residue (``phi_positive_population``): one backbone pair's single
    estimate becomes ``residue_1``."""
    return {"residue_1": php} if "value" in php else php


def md_populations(target, positions: np.ndarray) -> dict:
    """`chain_populations` of MD frames (N, n_atoms, 3) nm in time order."""
    angles = BackboneAngles.of(target.topology, positions)
    return chain_populations(angles.pairs, angles.phi, target.kT)


def chain_populations(pairs: np.ndarray, phi: np.ndarray, kT: float) -> dict:
    """`peptide_populations` of a chain's frames in time order (``pairs`` (N, n_pairs, 2), ``phi``
    (N, n_phi) radians; correlated errors); each φ > 0 population also carries the chain's
    ``transitions`` and is marked unreliable below :data:`MIN_TRANSITIONS`."""
    out = peptide_populations(pairs, None, kT, phi=phi)
    php = out["phi_positive_population"]
    for estimate, n in zip(by_residue(php).values(), phi_transitions(phi), strict=True):
        estimate["transitions"] = n
        estimate["reliable"] = estimate["reliable"] and n >= MIN_TRANSITIONS
    return out


def toy_modes(pooled: ReweightedEnsemble) -> dict:
    """Reweighted, raw and exact mode weights of a toy target."""
    target = pooled.target
    labels = np.asarray(target.mode_of(pooled.positions), dtype=int)
    exact = np.asarray(target.mode_weights(), dtype=float)
    w = pooled.weights
    model = np.bincount(labels, weights=w, minlength=len(exact))[: len(exact)]
    raw = np.bincount(labels, minlength=len(exact))[: len(exact)] / len(labels)
    return {
        "exact": exact.tolist(),
        "reweighted": model.tolist(),
        "raw_flow": raw.tolist(),
        "max_abs_error": float(np.max(np.abs(model - exact))),
    }


def reference_metrics(generator, target, reference_positions: np.ndarray, pooled: ReweightedEnsemble | None,
                      batch_size: int = 1000, energy=None) -> dict:
    """Forward ESS, EUBO (kT) and, for peptides, Ramachandran TV/KL against MD reference frames.

    ``reference_positions`` are MD frames in time order; their basin populations
    (``reference_populations``) get correlated errors (statistical inefficiency, see
    `peptide_populations`).
    """
    import torch

    from ..energy import OpenMMEnergy

    ref = np.asarray(reference_positions, dtype=np.float64)
    own = energy is None
    energy = OpenMMEnergy(target) if own else energy
    try:
        u = np.concatenate([np.asarray(energy(ref[i : i + batch_size]), dtype=float).reshape(-1)
                            for i in range(0, len(ref), batch_size)])
    finally:
        if own:
            energy.close()
    u = np.where(np.isnan(u), np.inf, u)
    with torch.no_grad():
        log_q = np.concatenate([
            generator.log_prob(torch.as_tensor(ref[i : i + batch_size])).double().cpu().numpy().reshape(-1)
            for i in range(0, len(ref), batch_size)
        ])
    log_p = -u
    with np.errstate(invalid="ignore"):
        log_w = np.where(np.isfinite(log_p), log_p - log_q, -np.inf)
    out = {
        "n_reference": int(len(ref)),
        "forward_ess": forward_ess(log_w),
        "eubo": _finite(eubo(log_p, log_q)),
        "reference_outside_flow_support": int(np.sum(~np.isfinite(log_q))),
    }
    if is_peptide(target):
        ref_angles = ramachandran_angles(target.topology, ref)
        out["reference_populations"] = md_populations(target, ref)
        if pooled is not None and pooled.weights.any():
            model_angles = pooled.ramachandran_angles()
            out["ramachandran_tv"] = ramachandran_tv(model_angles, ref_angles, pooled.weights)
            pm = ramachandran_histogram(model_angles, pooled.weights)
            pr = ramachandran_histogram(ref_angles)
            out["ramachandran_kl"] = float(np.mean(histogram_kl(pr, pm, axis=(-2, -1))))
    return out
