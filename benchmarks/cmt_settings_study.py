"""Which CMT settings keep every alanine-dipeptide basin (φ > 0 above all) on a CPU budget?

Runs named CMT configurations (``CONFIGS``) on ``aldp-vacuum`` at 300 K, each stopped by a
wall-clock limit (the training setting ``max_minutes``) and a CPU-time limit, and prints one
table: settings, annealing steps, energy evaluations, wall/CPU seconds, final λ/η, the last step
with the entropy constraint active (η > 0.05), reverse ESS (median of 5 draws of 5,000 flow
samples, with min/max), the flow's raw φ > 0 fraction, the reweighted φ > 0 population with its
(delta-method) error, the "MD gap" and every reweighted basin population, beside the
replica-exchange reference (``--reference``).

MD gap = log E_{p|φ>0}[q/p̃] − log E_{p|φ<0}[q/p̃] on the reference frames: how much of the
flow's density lies on the true φ > 0 basin relative to the φ < 0 one (0: carried in the right
proportion; −5: under-weighted e^5 times, i.e. the basin's shape is lost even where the flow
still puts samples at φ > 0). During training it is computed every 5 steps on all φ > 0 frames
and 300 φ < 0 frames, at the end on all frames.

The trainer is a subclass of the library's ``CMTTrainer``, registered as training method
``cmt_study`` (:func:`cmt_openmm.training.register_method`; it reads the ``cmt`` settings) and
run through ``cmt_openmm.training.train``. It (a) adds per-step diagnostics of each buffer to
the records (raw φ > 0 and C7ax fractions, the φ > 0 fraction under the target weights p̃/q and
under the dual's weights w̄, i.e. in q_{i+1}, and under the fitted weights, which differ from w̄
when a config sets ``cmt.strata``; the MD gap), (b) stops at the CPU-time limit, (c) prototypes
a defensive mixture and buffer reuse (a config's ``study`` section, not part of the library) and
(d) records each step's time split (sampling, energies, dual, log q of reused samples, weights,
fit; the table's last column, ms per step). Per-step records go to
``<out>/<name>/metrics.jsonl``, the evaluation to ``<out>/<name>/eval.json``. A config's
``study.system`` picks the target (default ``aldp-vacuum``; ``impl_*``: ``aldp-implicit``, torch
energies through energy backend "auto"; no MD-gap reference there).

Buffer reuse (``study.reuse = K``): the dual is solved on the fresh buffer as always; the flow
is then fitted to q_{i+1} on the union of the fresh buffer and the last K buffers, each sample
weighted by q_{i+1}/q_source (:func:`reuse_log_weights`; energies kept from when the sample was
drawn, log q_i recomputed under the current flow), then the strata floor. Records:
``ess_fit_kish`` (Kish ESS = N · reverse ESS of the union's fit weights, absolute),
``old_weight_fraction``, ``t_logq``, ``prev_ratio_ess`` / ``prev_logq_shift_std`` (Kish ESS
fraction and spread of log q_i − log q_{i−1} on the previous buffer: how far one fit moved the
flow).

    .ci/with-env nice -n 5 python -m benchmarks.cmt_settings_study run n4k_fit8_warm120_ent1 --cpu 450 --wall 700
    .ci/with-env python -m benchmarks.cmt_settings_study table --trajectory n4k_fit8_warm120_ent1
    .ci/with-env python -m benchmarks.cmt_settings_study eval n4k_fit8_warm120_ent1 --draws 20
    .ci/with-env nice -n 10 python -m benchmarks.cmt_settings_study run impl_base impl_reuse2_n2k --cpu 150 --wall 600 \\
        --out runs/study_reuse
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp

from cmt_openmm.analysis.metrics import spread
from cmt_openmm.coordinates.backbone import ramachandran_angles
from cmt_openmm.importance import normalized_weights, reverse_ess
from cmt_openmm.sampling.estimators import ALDP_BASINS, aldp_basins, basin_indicators, basin_populations
from cmt_openmm.sampling.reweighting import ReweightedEnsemble, reweight
from cmt_openmm.systems import get_target
from cmt_openmm.training import TRAINERS, load_history, register_method, train
from cmt_openmm.training.cmt import CMTTrainer, fit_to_buffer
from cmt_openmm.training.strata import floored_log_weights

SYSTEM = "aldp-vacuum"
METHOD = "cmt_study"  # StudyCMTTrainer's method name
BASE = {  # the aldp-quick preset's training keys, trained by StudyCMTTrainer
    "method": METHOD,
    "seed": 0,
    "budget": 10_000_000,
    "max_steps": 100_000,
    "flow": {"n_layers": 6, "hidden": 64, "n_bins": 8},
    "cmt": {"eps_tr": 0.5, "eps_ent": 1.0, "n_samples": 2000, "batch_size": 256, "lr": 1e-3},
}
# "study" keys are this script's, not TrainConfig's: the prototype mechanism
#   defensive: α of a defensive mixture, fit weights (1 − α) w̄ + α / N
#   reuse: K, fit q_{i+1} on the fresh buffer plus the last K buffers (their energies kept,
#          log q_i of their samples recomputed), weights in reuse_log_weights
#   system: the target (default SYSTEM); energies "auto" (torch for aldp-implicit)
# The run limits (--wall: the training setting max_minutes, --cpu) are set on the command line.
_N4K = {"n_samples": 4000, "fit_steps": 8}
_WARM = {"eps_ent_warmup": 0.5, "warmup_steps": 120}
_WARM03 = {"eps_ent_warmup": 0.3, "warmup_steps": 120}
_TORS9 = {"n_layers": 9, "mask": "torsions"}
_QUICK = {**_N4K, **_WARM, "eps_ent": 1.0, "strata": "phi-sign", "strata_floor": 0.1}  # = aldp-quick's cmt
CONFIGS: dict[str, dict] = {
    "base": {},
    "ent03": {"cmt": {"eps_ent": 0.3}},
    "8x128": {"flow": {"n_layers": 8, "hidden": 128}},
    "n4k": {"cmt": {"n_samples": 4000}},
    "n4k_fit8": {"cmt": _N4K},
    "n4k_fit8_cpu450": {"cmt": _N4K},
    "n4k_fit8_lr2e-3": {"cmt": {**_N4K, "lr": 2e-3}},
    "n4k_fit8_ent05": {"cmt": {**_N4K, "eps_ent": 0.5}},
    "n4k_fit8_def02": {"cmt": _N4K, "study": {"defensive": 0.2}},
    "n4k_fit8_warm120_ent1": {"cmt": {**_N4K, "eps_ent": 1.0, **_WARM}},
    "n4k_fit8_warm120_ent1_seed1": {"seed": 1, "cmt": {**_N4K, "eps_ent": 1.0, **_WARM}},
    "n4k_fit8_warm03x120_ent1_seed1": {"seed": 1, "cmt": {**_N4K, "eps_ent": 1.0, **_WARM03}},
    "n4k_fit8_warm03x120_ent1_seed2": {"seed": 2, "cmt": {**_N4K, "eps_ent": 1.0, **_WARM03}},
    "n4k_fit8_warm120_ent2": {"cmt": {**_N4K, "eps_ent": 2.0, **_WARM}},
    "n4k_fit16_warm120_ent1": {"cmt": {**_N4K, "fit_steps": 16, **_WARM}},
    "n4k_fit16_warm120_ent1_seed1": {"seed": 1, "cmt": {**_N4K, "fit_steps": 16, **_WARM}},
    "tors9_warm120_ent1": {"flow": _TORS9, "cmt": {**_N4K, **_WARM}},
    "tors9_warm120_ent1_seed1": {"seed": 1, "flow": _TORS9, "cmt": {**_N4K, **_WARM}},
    "tr2_warm120_ent1": {"cmt": {**_N4K, **_WARM, "eps_tr": 2.0}},
    "tr2_warm120_ent1_seed1": {"seed": 1, "cmt": {**_N4K, **_WARM, "eps_tr": 2.0}},
    "tr1_warm120_ent1": {"cmt": {**_N4K, **_WARM, "eps_tr": 1.0}},
    "tr2_fit16_warm120_ent1": {"cmt": {**_N4K, **_WARM, "eps_tr": 2.0, "fit_steps": 16}},
    "tr1_ent2": {"cmt": {**_N4K, "eps_tr": 1.0, "eps_ent": 2.0}},
    "tr1_ent4": {"cmt": {**_N4K, "eps_tr": 1.0, "eps_ent": 4.0}},
    "tr1_ent1": {"cmt": {**_N4K, "eps_tr": 1.0, "eps_ent": 1.0}},
    "tr1_ent1.5": {"cmt": {**_N4K, "eps_tr": 1.0, "eps_ent": 1.5}},
    "tr1_ent1_seed1": {"seed": 1, "cmt": {**_N4K, "eps_tr": 1.0, "eps_ent": 1.0}},
    "n8k_fit8_warm120_ent1_seed1": {"seed": 1, "cmt": {"n_samples": 8000, "fit_steps": 8, **_WARM}},
    "n4k_fit16_lr5e-4_warm120_ent1_seed1": {"seed": 1, "cmt": {**_N4K, "fit_steps": 16, "lr": 5e-4, **_WARM}},
    "n4k_fit16_lr5e-4_warm120_ent1_seed3": {"seed": 3, "cmt": {**_N4K, "fit_steps": 16, "lr": 5e-4, **_WARM}},
    "floor01_warm120_ent1_seed1": {"seed": 1, "cmt": {**_N4K, **_WARM, "strata": "phi-sign", "strata_floor": 0.1}},
    "floor01_warm120_ent1_seed3": {"seed": 3, "cmt": {**_N4K, **_WARM, "strata": "phi-sign", "strata_floor": 0.1}},
    "floor01_warm120_ent1": {"cmt": {**_N4K, **_WARM, "strata": "phi-sign", "strata_floor": 0.1}},
    "floor01_warm120_ent1_seed2": {"seed": 2, "cmt": {**_N4K, **_WARM, "strata": "phi-sign", "strata_floor": 0.1}},
    # buffer reuse: the aldp-quick settings, fresh buffer + the last K buffers
    "vac_base": {"cmt": _QUICK},
    "vac_reuse2_n2k": {"cmt": {**_QUICK, "n_samples": 2000}, "study": {"reuse": 2}},
    "vac_reuse1": {"cmt": _QUICK, "study": {"reuse": 1}},
    "impl_base": {"cmt": _QUICK, "study": {"system": "aldp-implicit"}},
    "impl_reuse2_n2k": {"cmt": {**_QUICK, "n_samples": 2000}, "study": {"system": "aldp-implicit", "reuse": 2}},
    "impl_reuse1": {"cmt": _QUICK, "study": {"system": "aldp-implicit", "reuse": 1}},
    "impl_n2k": {"cmt": {**_QUICK, "n_samples": 2000}, "study": {"system": "aldp-implicit"}},
    "impl_base_seed1": {"seed": 1, "cmt": _QUICK, "study": {"system": "aldp-implicit"}},
    "impl_reuse1_seed1": {"seed": 1, "cmt": _QUICK, "study": {"system": "aldp-implicit", "reuse": 1}},
}


def deep_update(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def phi_positive(topology, x) -> np.ndarray:
    """(B,) bool: φ ∈ [0, π) for configurations x (B, n_atoms, 3) nm."""
    return ramachandran_angles(topology, np.asarray(x))[:, 0, 0] >= 0.0


def weighted_fraction(mask: np.ndarray, log_w: np.ndarray) -> float:
    w = normalized_weights(log_w)
    return float(np.sum(w[mask]))


def reuse_log_weights(lam: float, eta: float, log_p, log_q_now, log_q_source) -> np.ndarray:
    """Normalised log-weights (M,) of q_{i+1} ∝ q_i^{λ/s} p̃^{1/s} (s = 1 + λ + η) on a union of buffers.

    Sample n was drawn from q_source(n) (the flow of an earlier annealing step, or q_i itself
    for the fresh buffer); log_p: (M,) log p̃ = −u as evaluated when drawn (−inf: failed, weight
    0); log_q_now: (M,) log q_i under the current flow; log_q_source: (M,) the log-density
    reported when the sample was drawn. Per-buffer importance weights
    log w_n = (a_n + λ b_n^now) / s − log q_source(x_n), self-normalised over the union: every
    buffer's weights estimate the same normaliser ∫ q_i^{λ/s} p̃^{1/s}, so the union is a
    consistent self-normalised estimator of q_{i+1}. On the fresh buffer (b^now = b^source) this
    is the dual's log w = (a − (1 + η) b) / s.
    """
    a = np.asarray(log_p, np.float64)
    b = np.asarray(log_q_now, np.float64)
    src = np.asarray(log_q_source, np.float64)
    s = 1.0 + lam + eta
    log_w = np.full(a.shape, -np.inf)
    ok = np.isfinite(a) & np.isfinite(b)  # an old sample outside the current flow's support: 0
    log_w[ok] = (a[ok] + lam * b[ok]) / s - src[ok]
    return log_w - logsumexp(log_w[ok])


def md_gap(generator, md) -> float:
    """log(q(φ>0)/p(φ>0)) − log(q(φ<0)/p(φ<0)) estimated on reference MD frames (nats).

    ``md``: (x, u, φ>0 mask) of :func:`_md_frames`. Each term is log E_{p|half}[q/p̃] + const,
    i.e. how much of the flow's mass lies on the reference frames of that half; 0 means the
    φ > 0 basin is carried in the right proportion, −10 means the flow under-weights it by
    e^10 (lost).
    """
    x, u, pos = md
    with torch.no_grad():
        lq = generator.log_prob(x).double().numpy()
    r = lq + u
    ok = np.isfinite(r)
    return float(logsumexp(r[pos & ok]) - math.log(pos.sum()) - logsumexp(r[~pos & ok]) + math.log((~pos).sum()))


@register_method(METHOD)
class StudyCMTTrainer(CMTTrainer):
    """CMTTrainer plus per-step φ diagnostics, a CPU-time limit and the prototype mechanisms.

    Every step records its time split (``t_sample``: drawing the buffer, ``t_energy``: its
    energies, ``t_dual``: the dual, ``t_logq``: log q_i of reused samples, ``t_weights``: the
    fit weights, ``t_fit``: the Adam steps, ``t_diag``: this script's diagnostics). The fit runs
    after the library's ``anneal`` (called with ``fit_steps = 0``, which changes nothing else:
    the fit is the only consumer of the random stream there), so a run without ``reuse`` is the
    library's run step for step.
    """

    study: dict = {}  # this script's settings, set per run by run_config (train() constructs the trainer)

    def __init__(self, target, generator, energy, config, rng):
        super().__init__(target, generator, energy, config, rng)
        self.defensive = float(self.study.get("defensive", 0.0))
        self.reuse = int(self.study.get("reuse", 0))
        if self.reuse and self.defensive:
            raise ValueError("study keys 'reuse' and 'defensive' are not implemented together")
        self.old: deque = deque(maxlen=max(self.reuse, 1))  # (x, log q_source, log p̃) of past buffers
        self.cpu_limit = float(self.study.get("cpu", math.inf))
        self.cpu_start = time.process_time()
        self.md = _md_frames(self.study.get("reference"), target)
        self.times: dict[str, float] = {}

    @property
    def done(self):
        if time.process_time() - self.cpu_start > self.cpu_limit:
            return "cpu"
        return super().done

    def draw_buffer(self):
        """The library's draw_buffer, timed in two parts."""
        t0 = time.perf_counter()
        x, log_q = self.generator.sample(self.settings.n_samples, generator=self.rng)
        t1 = time.perf_counter()
        with torch.no_grad():
            log_p = -self.energy(x)
        self.times = {"t_sample": t1 - t0, "t_energy": time.perf_counter() - t1}
        return x, log_q, log_p

    def fit_log_weights(self, sol, labels, log_q, log_p):
        self.t_dual_end = time.perf_counter()
        self.solution = sol  # for the diagnostics of step()
        self.fitted = super().fit_log_weights(sol, labels, log_q, log_p)
        self.fit_weights = self.fitted
        if self.defensive:
            # defensive mixture (prototype): fit (1 − α) q_{i+1} + α q_i, i.e. w̄ → (1 − α) w̄ + α / N
            a, n = self.defensive, len(self.fitted)
            self.fit_weights = np.logaddexp(np.log1p(-a) + np.asarray(self.fitted), math.log(a / n))
        return self.fit_weights

    def union_log_weights(self, sol, x, log_q, log_p) -> tuple[torch.Tensor, np.ndarray, dict]:
        """The fit buffer and its weights: the fresh buffer plus the last ``reuse`` ones.

        Old samples keep their energies and source densities; log q_i is recomputed under the
        current flow (one forward pass, no gradients). Weights: :func:`reuse_log_weights`, then
        the strata floor when the config sets strata (as ``CMTTrainer.fit_log_weights``).
        Returns (x_union, normalised log w̄, record fields).
        """
        t0 = time.perf_counter()
        xs, now, src, lp = [x], [log_q.double()], [log_q.double()], [log_p.double()]
        with torch.no_grad():
            for x_old, lq_old, lp_old in self.old:
                xs.append(x_old)
                now.append(self.generator.log_prob(x_old).double())
                src.append(lq_old)
                lp.append(lp_old)
        t1 = time.perf_counter()
        x_all = torch.cat(xs)
        lw = reuse_log_weights(sol.lam, sol.eta, torch.cat(lp).cpu().numpy(), torch.cat(now).cpu().numpy(),
                               torch.cat(src).cpu().numpy())
        if self.strata_of is not None:
            lw = floored_log_weights(lw, self.strata_of(x_all.detach().cpu().numpy()), self.settings.strata_floor)
        n = x.shape[0]
        extra = {"t_logq": t1 - t0, "n_fit_buffer": int(x_all.shape[0]), "ess_fit_kish": len(lw) * reverse_ess(lw),
                 "old_weight_fraction": float(np.exp(logsumexp(lw[n:]))) if len(lw) > n else 0.0}
        if len(xs) > 1:  # how far the last fit moved the flow: q_i / q_{i-1} on the previous buffer
            shift = (now[1] - src[1]).cpu().numpy()
            shift = shift[np.isfinite(shift)]
            extra["prev_logq_shift_std"] = float(np.std(shift))
            extra["prev_ratio_ess"] = len(shift) * reverse_ess(shift) / len(now[1])
        return x_all, lw, extra

    def anneal(self, x, log_q, log_p):
        """The library's anneal (dual, λ/η bookkeeping, record) with the fit done here, on the
        union of buffers when ``reuse`` is set."""
        fit_steps, self.fit_steps = self.fit_steps, 0
        t0 = time.perf_counter()
        try:
            record = super().anneal(x, log_q, log_p)
        finally:
            self.fit_steps = fit_steps
        t1 = time.perf_counter()
        sol, t_dual = self.solution, self.t_dual_end - t0
        if self.reuse:
            x_fit, log_w, extra = self.union_log_weights(sol, x, log_q, log_p)
            t_weights = time.perf_counter() - t1 - extra["t_logq"]
        else:
            x_fit = x
            log_w = self.fit_weights  # the library's (or the defensive) weights, from super().anneal
            extra = {"t_logq": 0.0, "n_fit_buffer": int(x.shape[0]),
                     "ess_fit_kish": len(log_w) * reverse_ess(log_w), "old_weight_fraction": 0.0}
            t_weights = time.perf_counter() - t1
        t2 = time.perf_counter()
        c = self.settings
        loss = fit_to_buffer(self.generator, self.optimizer, x_fit, log_w, self.fit_steps, c.batch_size,
                             c.resample, self.rng)
        t3 = time.perf_counter()
        if self.reuse:
            self.old.appendleft((x.detach(), log_q.detach().double(), log_p.detach().double()))
        self.times.update({"t_dual": t_dual, "t_weights": t_weights + (t1 - self.t_dual_end),
                           "t_fit": t3 - t2})
        return {**record, **extra, "loss": loss}

    def step(self) -> dict:
        x, log_q, log_p = self.draw_buffer()
        record = self.anneal(x, log_q, log_p)
        t0 = time.perf_counter()
        sol = self.solution
        angles = ramachandran_angles(self.target.topology, x.numpy())[:, 0]
        pos = angles[:, 0] >= 0.0
        inside = basin_indicators(angles, ALDP_BASINS)
        lw_target = (log_p.double() - log_q.double()).numpy()
        extra = {}
        if self.md is not None and (self.steps_done + 1) % 5 == 0:
            extra["md_gap"] = md_gap(self.generator, self.md)
        out = {
            **record, "eps_ent_used": record["eps_ent"],
            "phi_pos_raw": float(pos.mean()),
            "phi_pos_target_w": weighted_fraction(pos, lw_target),
            "phi_pos_next": weighted_fraction(pos, sol.log_weights),
            "phi_pos_fit": weighted_fraction(pos, self.fitted),
            "n_phi_pos": int(pos.sum()),
            "raw_C7ax": float(inside["C7ax"].mean()),
            "raw_alphaL": float(inside["alphaL"].mean()),
            "next_C7ax": weighted_fraction(inside["C7ax"], sol.log_weights),
            **extra,
            "cpu_time": time.process_time(),
        }
        return {**out, **self.times, "t_logq": record["t_logq"], "t_diag": time.perf_counter() - t0}


def _md_frames(path, target, n_neg: int = 300):
    """(x, u, φ>0 mask) of all φ > 0 reference frames and n_neg φ < 0 ones, or None."""
    if not path or not Path(path).exists():
        return None
    data = np.load(path)
    x, u = data["positions"], data["reduced_energy"]
    pos = phi_positive(target.topology, x)
    keep = np.concatenate([np.flatnonzero(pos), np.flatnonzero(~pos)[:: max(1, (~pos).sum() // n_neg)]])
    return torch.as_tensor(x[keep]), u[keep].astype(np.float64), pos[keep]


def run_config(name: str, out: Path, wall: float, cpu: float, reference: str | None) -> None:
    extra = copy.deepcopy(CONFIGS[name])
    study = {"wall": wall, "cpu": cpu, "reference": reference, **extra.pop("study", {})}
    config = deep_update(BASE, extra)
    if math.isfinite(wall):
        config["max_minutes"] = wall / 60.0
    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    system = study.setdefault("system", SYSTEM)
    if system != SYSTEM:  # the reference frames (and their energies) are aldp-vacuum's
        study["reference"] = None
    target = get_target(system, 300.0)
    TRAINERS[METHOD].study = study  # the class train() builds (this module's StudyCMTTrainer)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = train(target, config, run_dir, progress=False)
    info = {"name": name, "config": config, "study": study, "stop_reason": result.stop_reason,
            "train_wall": time.perf_counter() - wall0, "train_cpu": time.process_time() - cpu0}
    info.update(evaluate(target, result.generator, reference=study["reference"]))
    (run_dir / "eval.json").write_text(json.dumps(info, indent=1))
    print(f"[{name}] done: {result.stop_reason}, {len(result.history)} steps, "
          f"ESS {info['ess_median']:.4f}, φ>0 {info['phi_pos_rew'][0]:.4f}", flush=True)


def evaluate(target, generator, n: int = 5000, draws: int = 5, reference: str | None = None) -> dict:
    """Reverse ESS per draw (``draws`` reweighted draws of ``n`` samples, OpenMM energies), raw
    and reweighted φ > 0 fractions and basin populations (pooled)."""
    from cmt_openmm.energy import OpenMMEnergy

    with OpenMMEnergy(target) as energy:
        ensembles = [reweight(generator, target, n, batch_size=n, seed=1000 + d, energy=energy, progress=False,
                              min_effective_samples=0) for d in range(draws)]
    pooled = ReweightedEnsemble.concatenate(ensembles)
    ess = spread(e.ess for e in ensembles)
    angles = pooled.ramachandran_angles()[:, 0]
    basins = basin_populations(angles, pooled.weights, aldp_basins(include_halves=True))
    raw = basin_populations(angles, None, aldp_basins(include_halves=True))
    md = _md_frames(reference, target, n_neg=10**9)
    return {
        "md_gap": None if md is None else md_gap(generator, md),
        "ess_draws": ess["draws"],
        "ess_median": ess["median"],
        "ess_pooled": pooled.ess,
        "phi_pos_raw": raw["phi>0"].value,
        "phi_pos_rew": list(basins["phi>0"]),
        "basins_rew": {k: list(v) for k, v in basins.items()},
        "basins_raw": {k: v.value for k, v in raw.items()},
    }


def reference_populations(path: str, n_blocks: int = 10) -> dict:
    """Basin populations of the reference frames; error = standard error over n_blocks time blocks.

    REMD frames are correlated (the φ > 0 basin is visited rarely), so the i.i.d. error would
    be several times too small.
    """
    target = get_target(SYSTEM, 300.0)
    x = np.load(path)["positions"]
    angles = ramachandran_angles(target.topology, x)[:, 0]
    inside = basin_indicators(angles, aldp_basins(True))
    out = {}
    for name, mask in inside.items():
        blocks = np.array_split(mask.astype(float), n_blocks)
        means = np.array([b.mean() for b in blocks])
        out[name] = [float(mask.mean()), float(means.std(ddof=1) / math.sqrt(n_blocks))]
    return out


def describe(config: dict, study: dict) -> str:
    c, f = config["cmt"], config["flow"]
    parts = [f"tr{c['eps_tr']:g}", f"ent{c['eps_ent']:g}", f"N{c['n_samples']}",
             f"fit{c.get('fit_steps') or 'pass'}", f"lr{c['lr']:g}", f"{f['n_layers']}x{f['hidden']}" + ("" if f.get("mask", "random") == "random" else f"-{f['mask']}"),
             "res" if c.get("resample", True) else "wtd"] + ([f"seed{config['seed']}"] if config.get("seed") else [])
    if c.get("eps_ent_warmup") is not None:
        parts.append(f"warm{c['eps_ent_warmup']:g}x{c.get('warmup_steps', 0)}")
    parts += [f"{k}={v}" for k, v in study.items() if k not in ("wall", "cpu", "reference")]
    return " ".join(parts)


def table(out: Path, reference: str | None) -> str:
    ref = reference_populations(reference) if reference and Path(reference).exists() else None
    names = ["C7eq", "C5", "alphaR", "alphaL", "C7ax"]
    head = ("| run | settings | steps | evals | wall s | cpu s | λ | η | last η>0.05 | ESS % med [min, max] "
            "| raw φ>0 | rew φ>0 ± | MD gap | " + " | ".join(names) + " | ms/step: " + "/".join(_SPLIT) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if ref:
        lines.append("| **reference (REMD)** |" + " |" * 10 + f" {ref['phi>0'][0]:.4f} ± {ref['phi>0'][1]:.4f} | 0 | "
                     + " | ".join(f"{ref[k][0]:.4f}" for k in names) + " |")
    for d in sorted(p for p in out.iterdir() if (p / "eval.json").exists()):
        e = json.loads((d / "eval.json").read_text())
        h = load_history(d)
        last = h[-1]
        active = [r["step"] for r in h if r.get("eta") and r["eta"] > 0.05]
        ess = np.array(e["ess_draws"]) * 100
        rb = e["basins_rew"]
        lines.append(
            f"| {e['name']} | {describe(e['config'], e['study'])} | {len(h)} | {last['energy_evaluations']:.2e} | "
            f"{e['train_wall']:.0f} | {e['train_cpu']:.0f} | {last['lam']:.3g} | {last['eta']:.3g} | "
            f"{max(active) if active else 0} | {np.median(ess):.2f} [{ess.min():.2f}, {ess.max():.2f}] | "
            f"{e['phi_pos_raw']:.3f} | {e['phi_pos_rew'][0]:.4f} ± {e['phi_pos_rew'][1]:.4f} | "
            f"{e.get('md_gap') if e.get('md_gap') is None else round(e['md_gap'], 1)} | "
            + " | ".join(f"{rb[k][0]:.4f}" for k in names) + f" | {time_split(h)} |")
    return "\n".join(lines)


_SPLIT = ("sample", "energy", "logq", "dual", "weights", "fit", "diag", "total")


def time_split(history: list[dict]) -> str:
    """Mean milliseconds per step of each part (records without the timings: "-")."""
    if "t_fit" not in history[-1]:
        return "-"
    parts = [np.mean([r.get(f"t_{k}", 0.0) for r in history]) for k in _SPLIT[:-1]]
    total = history[-1]["wall_time"] / len(history)
    return "/".join(f"{1000 * v:.0f}" for v in (*parts, total))


def trajectory(out: Path, name: str, every: int = 5) -> str:
    """Per-step φ > 0 diagnostics of one run (every `every` steps)."""
    h = load_history(out / name)
    rows = ["step  lam  eta  ESS%  raw_phi>0  tw_phi>0  next_phi>0  n_pos  raw_C7ax  next_C7ax  md_gap  cpu"
            "  fitESS(Kish)/M  old_w"]
    for r in h:
        if r["step"] % every == 0 or r["step"] <= 3 or r is h[-1]:
            gap = r.get("md_gap")
            rows.append(f"{r['step']:4d}  {r['lam']:.3g}  {r['eta']:.3g}  {100 * r['reverse_ess']:.2f}  "
                        f"{r['phi_pos_raw']:.4f}  {r['phi_pos_target_w']:.2e}  {r['phi_pos_next']:.2e}  "
                        f"{r['n_phi_pos']}  {r.get('raw_C7ax', math.nan):.4f}  {r.get('next_C7ax', math.nan):.2e}  "
                        f"{gap if gap is None else round(gap, 1)}  {r.get('cpu_time', 0):.0f}  "
                        f"{r.get('ess_fit_kish', math.nan):.0f}/{r.get('n_fit_buffer', 0)}  "
                        f"{r.get('old_weight_fraction', math.nan):.3f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate named configs, one after the other")
    r.add_argument("names", nargs="+", choices=sorted(CONFIGS))
    r.add_argument("--wall", type=float, default=600.0, help="training wall-clock limit per run (s)")
    r.add_argument("--cpu", type=float, default=math.inf, help="training CPU-time limit per run (s)")
    r.add_argument("--out", default="runs/study")
    r.add_argument("--reference", default="runs/ref/aldp-vacuum-ref.npz",
                   help="MD frames (npz: positions, reduced_energy) for the per-step md_gap diagnostic")
    v = sub.add_parser("eval", help="re-evaluate finished runs with more samples (writes eval_<draws>x<samples>.json)")
    v.add_argument("names", nargs="+")
    v.add_argument("--draws", type=int, default=20)
    v.add_argument("--samples", type=int, default=5000)
    v.add_argument("--out", default="runs/study")
    v.add_argument("--reference", default="runs/ref/aldp-vacuum-ref.npz")
    t = sub.add_parser("table", help="print the table of finished runs")
    t.add_argument("--out", default="runs/study")
    t.add_argument("--reference", default="runs/ref/aldp-vacuum-ref.npz")
    t.add_argument("--trajectory", nargs="*", default=[], help="also print per-step diagnostics of these runs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.cmd == "run":
        out.mkdir(parents=True, exist_ok=True)
        for name in args.names:
            run_config(name, out, args.wall, args.cpu, args.reference)
    elif args.cmd == "eval":
        from cmt_openmm.generator import BoltzmannGenerator

        for name in args.names:
            system = json.loads((out / name / "eval.json").read_text())["study"].get("system", SYSTEM)
            target = get_target(system, 300.0)
            generator = BoltzmannGenerator.load(out / name / "generator.safetensors", target)
            e = evaluate(target, generator, args.samples, args.draws, args.reference if system == SYSTEM else None)
            (out / name / f"eval_{args.draws}x{args.samples}.json").write_text(json.dumps(e, indent=1))
            ess = 100 * np.array(e["ess_draws"])
            print(f"{name}: ESS % median {np.median(ess):.2f} [{ess.min():.2f}, {ess.max():.2f}], pooled "
                  f"{100 * e['ess_pooled']:.2f}; raw φ>0 {e['phi_pos_raw']:.4f}; reweighted φ>0 "
                  f"{e['phi_pos_rew'][0]:.4f} ± {e['phi_pos_rew'][1]:.4f}; MD gap {e['md_gap']}; "
                  + ", ".join(f"{k} {v[0]:.4f}±{v[1]:.4f}" for k, v in e["basins_rew"].items() if "phi" not in k),
                  flush=True)
    else:
        print(table(out, args.reference))
        for name in args.trajectory:
            print(f"\n{name}\n" + trajectory(out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
