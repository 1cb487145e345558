"""Final report of a trained generator: metrics (``report.json``), a summary (``report.md``), plots.

The numbers follow ``docs/method.md`` (Metrics) and its calibration advice: the reverse ESS of
one draw scatters by several times, so it is the *median over several independent draws*
with the spread (min, max, every draw), with and without clipping the largest 1e-4 of the
log-weights. All draws are pooled into one reweighted ensemble for populations and plots:
ALDP basin populations and free energies (peptides), exact-vs-model mode weights (toys).
With reference samples (MD, positions in nm) it adds forward ESS, EUBO and Ramachandran
TV/KL. Hand-written glue over :mod:`cmt_openmm.metrics` and :mod:`cmt_openmm.reweighting`.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import metrics, plots
from .reweighting import ReweightedEnsemble, reweight

CLIP_FRACTION = 1e-4
FES_BINS = 60
PHI_POSITIVE = {"phi>0": ((0.0, 2.0 * math.pi / 3.0), (-math.pi, math.pi))}
"""The ALDP φ > 0 basin, αL ∪ C7ax: 0° ≤ φ < 120°, any ψ (radians; [lo, hi) intervals, ψ full
circle). φ ∈ [120°, 180°) belongs to the C5/β region that reaches across φ = ±180°."""


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and every value of repeated measurements."""
    v = np.asarray(list(values), dtype=float)
    return {
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "draws": [float(x) for x in v],
    }


def _estimate(e: metrics.Estimate) -> dict:
    return {"value": _finite(e.value), "error": _finite(e.error)}


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def is_peptide(target) -> bool:
    """True when the topology has at least one backbone (φ, ψ) pair."""
    return target.has_molecule and bool(metrics.backbone_dihedrals(target.topology))


def training_summary(history: Sequence[dict], stop_reason: str | None = None) -> dict:
    """Steps, energy evaluations, wall time and the last record's main fields."""
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
        "stop_reason": stop_reason,
        "final": {k: last[k] for k in keys if k in last},
    }


def draw_ensembles(generator, target, n_samples: int, n_draws: int, seed: int,
                   progress: bool = True, energy=None) -> list[ReweightedEnsemble]:
    """``n_draws`` independent reweighted draws of ``n_samples`` flow samples each (seeds seed+k)."""
    from tqdm.auto import tqdm

    out = []
    for k in tqdm(range(n_draws), desc="report draws", disable=not progress, unit="draw"):
        out.append(reweight(generator, target, n_samples, seed=seed + k, progress=False, energy=energy))
    return out


def pool(ensembles: Sequence[ReweightedEnsemble]) -> ReweightedEnsemble:
    """One ensemble holding every sample of ``ensembles`` (same target)."""
    target = ensembles[0].target
    cat = lambda name: np.concatenate([getattr(e, name) for e in ensembles])  # noqa: E731
    return ReweightedEnsemble(target, cat("positions"), cat("log_q"), cat("reduced_energy"), cat("invalid"))


def sample_metrics(ensembles: Sequence[ReweightedEnsemble]) -> dict:
    """ESS (median of draws with spread, clipped and not), failures, and state populations."""
    pooled = pool(ensembles)
    target = pooled.target
    out = {
        "n_draws": len(ensembles),
        "n_samples_per_draw": len(ensembles[0]),
        "reverse_ess": spread(e.ess for e in ensembles),
        "reverse_ess_clipped": spread(e.ess_clipped(CLIP_FRACTION) for e in ensembles),
        "clip_fraction": CLIP_FRACTION,
        "reverse_ess_pooled": pooled.ess,
        "failed_energies": int(np.sum(~np.isfinite(pooled.reduced_energy))),
        "chirality_flips": int(pooled.invalid.sum()),
    }
    if not pooled.weights.any():
        return out
    if is_peptide(target):
        out.update(peptide_populations(pooled.ramachandran_angles(), pooled.weights, target.kT))
    elif hasattr(target, "mode_weights"):
        out["modes"] = toy_modes(pooled)
    return out


def peptide_populations(angles: np.ndarray, weights: np.ndarray | None, kT: float) -> dict:
    """Basin populations with delta-method errors: the ALDP boxes and the φ > 0 basin
    (:data:`PHI_POSITIVE`) for one backbone pair, the φ > 0 basin per residue for longer peptides."""
    out: dict[str, Any] = {}
    if angles.shape[1] == 1:
        pops = metrics.basin_populations(angles[:, 0], weights, {**metrics.ALDP_BASINS, **PHI_POSITIVE})
        basins = {k: v for k, v in pops.items() if k in metrics.ALDP_BASINS}
        out["basin_populations"] = {k: _estimate(v) for k, v in basins.items()}
        out["phi_positive_population"] = _estimate(pops["phi>0"])
        if any(v.value > 0 for v in basins.values()):
            dF = metrics.basin_free_energies(basins, kT=1.0)
            out["basin_free_energies_kT"] = {k: _estimate(v) for k, v in dF.items()}
    else:
        out["phi_positive_population"] = {
            f"residue_{i + 1}": _estimate(metrics.basin_populations(angles[:, i], weights, PHI_POSITIVE)["phi>0"])
            for i in range(angles.shape[1])
        }
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
    """Forward ESS, EUBO (kT) and, for peptides, Ramachandran TV/KL against MD reference frames."""
    import torch

    from .energy import OpenMMEnergy

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
        "forward_ess": metrics.forward_ess(log_w),
        "eubo": _finite(metrics.eubo(log_p, log_q)),
        "reference_outside_flow_support": int(np.sum(~np.isfinite(log_q))),
    }
    if is_peptide(target):
        ref_angles = metrics.ramachandran_angles(target.topology, ref)
        out["reference_populations"] = peptide_populations(ref_angles, None, target.kT)
        if pooled is not None and pooled.weights.any():
            model_angles = pooled.ramachandran_angles()
            out["ramachandran_tv"] = metrics.ramachandran_tv(model_angles, ref_angles, pooled.weights)
            pm = metrics.ramachandran_histogram(model_angles, pooled.weights)
            pr = metrics.ramachandran_histogram(ref_angles)
            out["ramachandran_kl"] = float(np.mean(metrics.histogram_kl(pr, pm, axis=(-2, -1))))
    return out


def make_plots(run_dir: Path, history: Sequence[dict], pooled: ReweightedEnsemble | None, title: str,
               prefix: str = "") -> list[str]:
    """Training curves, and the reweighted Ramachandran FES (peptides) or x-marginal (toys).

    Files are ``{prefix}training_curves.png`` and ``{prefix}ramachandran_fes.png`` or
    ``{prefix}marginal_x.png`` in ``run_dir``; returns their names.
    """
    run_dir = Path(run_dir)
    written = []
    if history:
        written.append(plots.plot_training_curves(history, run_dir / f"{prefix}training_curves.png", title))
    if pooled is not None and pooled.weights.any():
        target = pooled.target
        if is_peptide(target):
            written.append(plot_ramachandran(pooled, run_dir / f"{prefix}ramachandran_fes.png", title))
        elif getattr(target, "box", None) is not None:
            written.append(plot_toy_marginal(pooled, run_dir / f"{prefix}marginal_x.png", title))
    return [str(Path(p).name) for p in written]


def plot_ramachandran(pooled: ReweightedEnsemble, path: Path, title: str = "", bins: int = FES_BINS) -> Path:
    """Reweighted (φ, ψ) free-energy surface of the first backbone pair, with bootstrap errors."""
    angles = pooled.ramachandran_angles()[:, 0]
    fes = pooled.free_energy_surface(angles, bins=bins, range=[(-np.pi, np.pi)] * 2, n_bootstrap=50)
    return plots.plot_free_energy_surface(fes.free_energy, fes.edges[0], fes.edges[1], path,
                                          uncertainty=fes.error, title=title or "reweighted FES")


def plot_toy_marginal(pooled: ReweightedEnsemble, path: Path, title: str = "", bins: int = 60) -> Path:
    """Marginal of the first coordinate: reweighted flow, raw flow and the exact one when known."""
    target = pooled.target
    edges = np.linspace(target.box[0, 0], target.box[0, 1], bins + 1)
    x = pooled.positions[:, 0, 0]
    model = np.histogram(x, edges, weights=pooled.weights)[0]
    raw = np.histogram(x, edges)[0] / max(len(x), 1)
    exact = target.marginal(0, edges) if hasattr(target, "marginal") else None
    return plots.plot_marginal(edges, model, path, exact=exact, raw=raw, title=title)


def write_report(run_dir: str | os.PathLike, report: dict, name: str = "report") -> tuple[Path, Path]:
    """Write ``name.json`` and ``name.md`` atomically into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = run_dir / f"{name}.json", run_dir / f"{name}.md"
    for path, text in zip(paths, (json.dumps(report, indent=2, default=_json_default) + "\n", render_markdown(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _pm(e: dict | None, scale: float = 1.0, fmt: str = "{:.4f}") -> str:
    if not e or e.get("value") is None:
        return "n/a"
    err = e.get("error")
    return (fmt.format(scale * e["value"]) + " ± " + fmt.format(scale * err)) if err is not None else fmt.format(scale * e["value"])


def render_markdown(report: dict) -> str:
    """Human-readable summary of a report dictionary."""
    lines = [f"# cmt-openmm report: {report.get('system', '?')} at {report.get('temperature', '?')} K", ""]
    tr = report.get("training") or {}
    if tr:
        lines += [
            "## Training",
            "",
            f"- method: {tr.get('method') or report.get('method')}, seed {report.get('seed')}",
            f"- steps: {tr.get('steps')} (stopped: {tr.get('stop_reason') or 'n/a'})",
            f"- energy evaluations: {tr.get('energy_evaluations'):,} (failed: {tr.get('failed_evaluations', 0)})",
            f"- wall time: {tr.get('wall_time_s', 0.0):.1f} s",
        ]
        final = tr.get("final") or {}
        if final:
            lines.append("- last step: " + ", ".join(f"{k} = {v:.4g}" for k, v in final.items() if isinstance(v, (int, float))))
        lines.append("")
    s = report.get("samples") or {}
    if s:
        ess, essc = s["reverse_ess"], s["reverse_ess_clipped"]
        lines += [
            "## Samples",
            "",
            f"{s['n_draws']} draws of {s['n_samples_per_draw']} samples each (median [min, max] over draws).",
            "",
            "| metric | median | min | max |",
            "|---|---|---|---|",
            f"| reverse ESS | {_pct(ess['median'])} | {_pct(ess['min'])} | {_pct(ess['max'])} |",
            f"| reverse ESS, top {s['clip_fraction']:g} log-weights clipped | {_pct(essc['median'])} | {_pct(essc['min'])} | {_pct(essc['max'])} |",
            "",
            f"- failed energies: {s['failed_energies']}, chirality flips: {s['chirality_flips']}",
        ]
        if "phi_positive_population" in s:
            php = s["phi_positive_population"]
            if "value" in php:
                lines.append(f"- φ > 0 basin (αL ∪ C7ax, 0° ≤ φ < 120°) population, reweighted: {_pm(php)}")
            else:
                lines += [f"- φ > 0 population, {k}: {_pm(v)}" for k, v in php.items()]
        if "basin_populations" in s:
            ref = ((report.get("reference") or {}).get("reference_populations") or {}).get("basin_populations", {})
            dF = s.get("basin_free_energies_kT", {})
            lines += ["", "| basin | population (reweighted) | ΔF (kT) | reference population |", "|---|---|---|---|"]
            for name, pop in s["basin_populations"].items():
                lines.append(f"| {name} | {_pm(pop)} | {_pm(dF.get(name), fmt='{:.2f}')} | {_pm(ref.get(name))} |")
        if "modes" in s:
            m = s["modes"]
            lines += ["", "| mode | exact | reweighted | raw flow |", "|---|---|---|---|"]
            for k, (e, r, q) in enumerate(zip(m["exact"], m["reweighted"], m["raw_flow"])):
                lines.append(f"| {k} | {e:.4f} | {r:.4f} | {q:.4f} |")
        lines.append("")
    ref = report.get("reference")
    if ref:
        lines += ["## Against reference samples", "", f"- reference frames: {ref['n_reference']}",
                  f"- forward ESS: {_pct(ref.get('forward_ess'))}",
                  f"- EUBO: {ref['eubo']:.3f} kT" if ref.get("eubo") is not None else "- EUBO: inf"]
        if "ramachandran_tv" in ref:
            lines += [f"- Ramachandran TV: {ref['ramachandran_tv']:.4f}", f"- Ramachandran KL: {ref['ramachandran_kl']:.4f}"]
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    lines.append(f"_written {time.strftime('%Y-%m-%d %H:%M:%S')}_")
    return "\n".join(lines) + "\n"
