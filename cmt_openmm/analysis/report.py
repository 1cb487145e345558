"""The report of a trained generator: ``report.json``, ``report.md`` and the plots, assembled.

Metrics are computed in :mod:`cmt_openmm.analysis.metrics`, pictures drawn in
:mod:`cmt_openmm.analysis.plots`; this module draws the samples, calls both and writes the
files (atomically). A peptide's draws larger than :data:`KEEP_POSITIONS_BYTES` keep only their
weights and Ramachandran angles (everything the report computes from them), so that
``cmt-openmm evaluate --n 10000000`` runs in bounded memory with the same numbers.
"""
from __future__ import annotations

import math
import os
import shlex
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..coordinates.backbone import BackboneAngles, is_peptide, ramachandran_angles
from ..files import atomic_write, to_json
from ..sampling.estimators import MIN_EFFECTIVE_SAMPLES
from ..sampling.drawing import draw_chunks, provenance
from ..sampling.reweighting import ReweightedEnsemble, reweight, warn_if_low_ess
from . import metrics, plots

KEEP_POSITIONS_BYTES = 256 * 2**20
"""Positions of all the report's draws (N × n_atoms × 24 bytes) above which a peptide's draws keep
none, only their log-weights and angles (:func:`draw_pooled`); the torch energies are then re-checked against OpenMM on a redraw of the first draw's
first :data:`RECHECK_DRAW` samples (the same samples: same seed and batches)."""

RECHECK_DRAW = 1000

ESS_WORDS = ((0.10, "good"), (0.01, "usable"), (0.001, "poor"))
"""The verdict's word for the reverse ESS of all the report's samples: "good" from 10 % (a few
samples per effective one), "usable" from 1 %, "poor" from 0.1 %, "unusable" below (over a thousand
samples per effective one) or whenever N_eff < MIN_EFFECTIVE_SAMPLES (100), when the report's
estimates are unreliable (a single sample carrying the weight gives ESS = 1/N, however bad the
generator)."""

USE_SAMPLES = "use its reweighted samples (`cmt-openmm sample`) for estimates with error bars"
MCMC_ONLY = ("use the generator only inside MCMC moves (`cmt-openmm mcmc RUN_DIR --out chain.npz`: MD with its "
             "proposals as exact moves; FlowIndependenceMove in your own script; or `cmt-openmm bridge-remd`), where "
             "a low ESS or a missed basin costs acceptance, not correctness")
"""The next step for a generator whose reweighted samples cannot be trusted on their own
(`mcmc_only` names the run's folder)."""


def mcmc_only(run_dir: str | None = None) -> str:
    """:data:`MCMC_ONLY` with the run's folder in its command (``RUN_DIR`` when not given)."""
    return MCMC_ONLY.replace("RUN_DIR", shlex.quote(str(run_dir))) if run_dir else MCMC_ONLY


def write_run_report(run_dir: str | os.PathLike, target, generator, history: Sequence[dict],
                     stop_reason: str | None, *, method: str, seed: int, n_samples: int, n_draws: int,
                     sample_seed: int, progress: bool = True, reference_positions: np.ndarray | None = None,
                     reference_file: str | None = None, name: str = "report", energy=None) -> dict:
    """Draw ``n_draws`` reweighted draws of ``n_samples``, compute the metrics, draw the plots and
    write ``name``.json / ``name``.md into ``run_dir``; returns the report dictionary.

    ``history``: the training records (empty: no training curves); ``reference_positions``:
    (M, n_atoms, 3) nm MD frames for forward ESS, EUBO and Ramachandran TV/KL; ``energy``: the
    reduced-energy callable to use (the run's platform; default a Reference ``OpenMMEnergy``).
    """
    run_dir = Path(run_dir)
    positions = not is_peptide(target) or n_draws * n_samples * target.n_atoms * 24 <= KEEP_POSITIONS_BYTES
    if positions:
        pooled = ReweightedEnsemble.concatenate(draw_ensembles(generator, target, n_samples, n_draws, sample_seed,
                                                               progress, energy=energy))
    else:
        pooled = draw_pooled(generator, target, n_samples, n_draws, sample_seed, progress, energy=energy)
    warn_if_low_ess(pooled, f"the report's {n_draws} draws of {n_samples} samples", stacklevel=2)
    report = {
        "system": target.name,
        "temperature": target.temperature,
        "method": method,
        "seed": seed,
        "run_dir": str(run_dir.resolve()),
        "training": {**metrics.training_summary(history, stop_reason, run_dir.resolve()), **energy_restarts(history)},
        "samples": metrics.sample_metrics(pooled, n_draws),
    }
    checked = pooled if positions else (lambda: reweight(generator, target, min(n_samples, RECHECK_DRAW),
                                                         seed=sample_seed, progress=False, energy=energy,
                                                         min_effective_samples=0))
    report["energy"] = energy_record(energy, target, checked)
    reference_angles = None
    if reference_positions is not None:
        report["reference"] = metrics.reference_metrics(generator, target, reference_positions, pooled, energy=energy)
        report["reference"]["file"] = None if reference_file is None else str(reference_file)
        if is_peptide(target):
            reference_angles = ramachandran_angles(target.topology, reference_positions)
    report = {"verdict": verdict(report), **report}
    title = f"{target.name}, {method}, {target.temperature:g} K"
    # The training report draws the training curves; an evaluation only its own sample plots.
    curves = history if name == "report" else ()
    report["plots"] = plots.make_plots(run_dir, curves, pooled, title, prefix="" if name == "report" else f"{name}_",
                                       reference_angles=reference_angles)
    write_report(run_dir, report, name)
    return report


def verdict(report: dict) -> dict:
    """The report's opening verdict, ``summary`` one sentence: whether training reached its target
    (λ, η of the last step; :func:`~.metrics.training_summary`), the reverse ESS of all the draws
    pooled with their N_eff and a word for it (:data:`ESS_WORDS`), with reference frames the
    φ > 0 basins (by residue) the reference visits and which of them no flow sample lies in
    (``lost``, whatever the weights: reweighting cannot restore a basin never sampled), and the
    one next step: use its reweighted samples (a good or usable ESS and no basin lost; short of
    the target, continuing training would raise the ESS further), continue training (short of
    the target with a poor ESS), or use the generator only inside MCMC moves (a basin lost, or
    a poor ESS at the target).
    """
    training, samples = report.get("training") or {}, report["samples"]
    final, ess, n_eff = training.get("final") or {}, samples["reverse_ess_pooled"], samples["n_effective"]
    quality = "unusable" if n_eff < MIN_EFFECTIVE_SAMPLES else next(
        (word for floor, word in ESS_WORDS if ess >= floor), "unusable")
    out = {"target_reached": training.get("target_reached"), "lam": final.get("lam"), "eta": final.get("eta"),
           "reverse_ess": ess, "n_effective": n_eff, "quality": quality}
    if out["target_reached"] is None:
        parts = [f"training stopped ({training.get('stop_reason') or 'n/a'})"]
    else:
        parts = [f"training {'reached' if out['target_reached'] else 'did not reach'} its target "
                 f"(λ = {final['lam']:.3g}, η = {final.get('eta') or 0:.3g})"]
    n = samples["n_draws"] * samples["n_samples_per_draw"]
    parts.append(f"reverse ESS {_pct(ess)} of all {n:,} samples (N_eff = {_n_eff(n_eff)}): {quality}")
    thin = _thin_populations(samples)
    if thin:
        parts.append(f"{len(thin)} basin population(s) rest on fewer than {MIN_EFFECTIVE_SAMPLES:g} effective samples "
                     f"(fewest: {_n_eff(min(thin))}; see Samples)")
    lost = []
    reference = ((report.get("reference") or {}).get("reference_populations") or {}).get("phi_positive_population")
    if reference:
        visited = [k for k, e in metrics.by_residue(reference).items() if (e.get("value") or 0) > 0]
        lost = [k for k in visited if not samples.get("phi_positive_samples", {}).get(k)]
        out["basins"] = {"in_reference": visited, "lost": lost}
        names = ", ".join(k.replace("_", " ") for k in lost)
        parts.append(f"of the {len(visited)} φ > 0 basins (by residue) the reference visits, its samples visit "
                     f"{len(visited) - len(lost)}" + (f", missing {names}" if lost else "") if visited else
                     "the reference visits no φ > 0 basin")
    usable = quality in ("good", "usable") and not lost
    continue_training = metrics.continue_training(training.get("stop_reason"), report.get("run_dir"))
    if usable:
        out["next_step"] = USE_SAMPLES + ("" if out["target_reached"] is not False else
                                          f"; or, for a higher ESS, {continue_training}")
    elif out["target_reached"] is False and not lost:
        out["next_step"] = continue_training
    else:
        out["next_step"] = mcmc_only(report.get("run_dir"))
    out["summary"] = f"{'; '.join(parts)}; next step: {out['next_step']}."
    return out


def _residue(key: str, names: Sequence[str] | None) -> str:
    """``residue_2`` as "residue 2 (ILE3)": the k-th residue with a backbone φ and its name."""
    k = int(key.rsplit("_", 1)[1])
    return f"residue {k}" + (f" ({names[k - 1]})" if names and k <= len(names) else "")


def energy_restarts(history: Sequence[dict]) -> dict:
    """``{"energy_restarts": k}`` when training replaced its energy worker pool k > 0 times (the
    records' cumulative ``energy_restarts``), else ``{}``."""
    k = max((int(r.get("energy_restarts") or 0) for r in history), default=0)
    return {"energy_restarts": k} if k else {}


def energy_record(energy, target, pooled: ReweightedEnsemble | Callable[[], ReweightedEnsemble]) -> dict:
    """Which energies the report's weights rest on; for the torch path, its verification at
    construction and a re-check of 64 of the report's samples against OpenMM (``pooled``: the
    samples, or a function that draws them, called only then)."""
    backend = getattr(energy, "backend", "openmm")
    record = {"backend": backend, "selection": getattr(energy, "selection", None)}
    if backend == "torch":
        from ..energy.select import recheck_against_openmm

        samples = pooled if isinstance(pooled, ReweightedEnsemble) else pooled()
        record["verification"] = getattr(energy, "verification", None)
        record["recheck"] = recheck_against_openmm(target, samples.positions, samples.reduced_energy)
    return record


def draw_ensembles(generator, target, n_samples: int, n_draws: int, seed: int,
                   progress: bool = True, energy=None, positions: bool = True) -> list[ReweightedEnsemble]:
    """``n_draws`` independent reweighted draws of ``n_samples`` flow samples each (seeds seed+k);
    ``positions=False``: keep only weights and Ramachandran angles (`reweight`'s).

    A single draw's low ESS is not warned about: the report judges the pooled draws.
    """
    from tqdm.auto import tqdm

    out = []
    for k in tqdm(range(n_draws), desc="report draws", disable=not progress, unit="draw"):
        out.append(reweight(generator, target, n_samples, seed=seed + k, progress=False, energy=energy,
                            min_effective_samples=0, positions=positions))
    return out


def draw_pooled(generator, target, n_samples: int, n_draws: int, seed: int, progress: bool = True,
                energy=None, batch_size: int = 1000) -> ReweightedEnsemble:
    """The draws of :func:`draw_ensembles` (the same samples and weights), pooled in one ensemble
    that keeps only what the report's metrics and plots use: the log-weights, the invalid flags,
    the count of failed energies and, for peptides, the backbone angles
    (`ReweightedEnsemble.weights_only`: 33 bytes a sample for alanine dipeptide). Draw k is the
    k-th block of ``n_samples``."""
    from tqdm.auto import tqdm

    total = int(n_samples) * int(n_draws)
    log_w, invalid, angles, failed = np.empty(total), np.empty(total, bool), None, 0
    for k in tqdm(range(n_draws), desc="report draws", disable=not progress, unit="draw"):
        for chunk in draw_chunks(generator, target, n_samples, batch_size=batch_size, seed=seed + k, energy=energy):
            rows = slice(k * n_samples + chunk.start, k * n_samples + chunk.start + len(chunk.log_q))
            part = ReweightedEnsemble(target, None, chunk.log_q, chunk.reduced_energy, chunk.invalid)
            log_w[rows], invalid[rows], failed = part.log_weights, part.invalid, failed + part.failed_energies
            if is_peptide(target):
                a = BackboneAngles.of(target.topology, chunk.positions)
                angles = BackboneAngles.empty(total, a) if angles is None else angles
                angles.put(rows, a)
    return ReweightedEnsemble.weights_only(target, log_w, invalid, failed, provenance(generator, seed, total),
                                           angles=angles)


def write_report(run_dir: str | os.PathLike, report: dict, name: str = "report") -> tuple[Path, Path]:
    """Write ``name.json`` and ``name.md`` atomically into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write(run_dir / f"{name}.json", to_json(report))
    md_path = atomic_write(run_dir / f"{name}.md", render_markdown(report))
    return json_path, md_path


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _n_eff(n: float) -> str:
    return f"{n:.1f}" if n < 10 else f"{n:,.0f}"


def _num(x: float, fmt: str) -> str:
    """``fmt`` of x, or two significant digits when ``fmt`` would round a non-zero x (beyond
    rounding noise, 1e-12) to zero."""
    text = fmt.format(x)
    return f"{x:.1e}" if abs(x) >= 1e-12 and float(text) == 0 else text


def _pm(e: dict | None, scale: float = 1.0, fmt: str = "{:.4f}", population: bool = True,
        reference: bool = False) -> str:
    """"value ± error", or for an estimate marked ``reliable: false`` "unreliable (N_eff = …)"
    (reweighted: the value rests on a handful of samples) or "value ± error (unreliable: N_eff = …)"
    (reference MD: the value stands, its correlated error bar is unreliable); "0 (no samples;
    N_eff = …)" for a basin no sample visited (enough samples, but no error bar to give); for a
    chain's population with fewer than ``MIN_TRANSITIONS`` φ transitions, its value (or "never
    visited") and "(unreliable: k φ transitions)", without an error bar."""
    if not e or e.get("value") is None:
        return "n/a"
    if e.get("transitions", metrics.MIN_TRANSITIONS) < metrics.MIN_TRANSITIONS:  # a chain's few visits
        seen = _num(scale * e["value"], fmt) if e["value"] else "never visited"
        return f"{seen} (unreliable: {e['transitions']} φ transitions)"
    unreliable = e.get("reliable") is False
    if e.get("seen_in") == "none" and e.get("n_effective", 0.0) >= MIN_EFFECTIVE_SAMPLES:
        return f"0 (no samples; N_eff = {_n_eff(e.get('n_effective', 0.0))})"
    if unreliable and not reference:
        return f"unreliable (N_eff = {_n_eff(e.get('n_effective', 0.0))})"
    err = e.get("error")
    if population and e["value"] == 0 and not err:
        text = "0 (no samples)"
    else:
        value = _num(scale * e["value"], fmt)
        text = f"{value} ± {_num(scale * err, fmt)}" if err is not None else value
    return f"{text} (unreliable: N_eff = {_n_eff(e.get('n_effective', 0.0))})" if unreliable else text


def md_population_text(e: dict | None) -> str:
    """An MD or MCMC population (``peptide_populations`` of frames in time order) as text: "value ±
    error", marked "(unreliable: N_eff = …)" when its correlated error rests on too few effective frames."""
    return _pm(e, reference=True)


def _thin_populations(s: dict) -> list[float]:
    """Effective counts of the populations marked unreliable although the whole draw is reliable:
    their basin's weight (or its complement's) sits on fewer than the minimum of effective samples."""
    if not s.get("reliable"):
        return []
    pops = {**metrics.by_residue(s.get("phi_positive_population") or {}), **(s.get("basin_populations") or {})}
    return [e["n_effective"] for e in pops.values()
            if e.get("reliable") is False and "seen_in" not in e and "n_effective" in e]


def _thin_basins(s: dict, run_dir: str) -> list[str]:
    """A line for `_thin_populations` and how many times the samples would lift the fewest to the
    minimum (effective counts grow with N)."""
    thin = _thin_populations(s)
    if not thin:
        return []
    need, fewest = s["min_effective_samples"], min(thin)
    factor = math.ceil(need / max(fewest, 1e-9))
    more = (f"about {factor}× the samples would lift the fewest to {need:g} (`cmt-openmm evaluate {run_dir} "
            f"--n {factor * s['n_samples_per_draw']}`)" if factor <= 20 else
            "more samples alone would take too many: train longer, or use the generator inside MCMC moves")
    return [f"- {len(thin)} population(s) rest on fewer than {need:g} effective samples inside or outside their "
            f"basin (fewest: {_n_eff(fewest)}) although the whole draw has {_n_eff(s['n_effective'])}: "
            f"the flow puts few samples where that weight is; {more}"]


def render_markdown(report: dict) -> str:
    """Human-readable summary of a report dictionary."""
    lines = [f"# cmt-openmm report: {report.get('system', '?')} at {report.get('temperature', '?')} K", ""]
    if report.get("verdict"):
        lines += [f"**Verdict**: {report['verdict']['summary']}", ""]
    tr = report.get("training") or {}
    if tr:
        lines += [
            "## Training",
            "",
            f"- method: {tr.get('method') or report.get('method')}, seed {report.get('seed')}",
            f"- steps: {tr.get('steps')} (stopped: {tr.get('stop_reason') or 'n/a'})",
            f"- energy evaluations: {tr.get('energy_evaluations'):,} (failed: {tr.get('failed_evaluations', 0)})",
            f"- wall time: {tr.get('wall_time_s', 0.0):.1f} s (energies: {tr.get('energy_backend') or 'openmm'})",
        ]
        if tr.get("energy_restarts"):
            lines.append(f"- energy worker pools replaced: {tr['energy_restarts']} (a worker died; the step's energies "
                         "were evaluated again on a fresh pool)")
        final = tr.get("final") or {}
        if final:
            lines.append("- last step: " + ", ".join(f"{k} = {v:.4g}" for k, v in final.items() if isinstance(v, (int, float))))
        if tr.get("verdict"):
            lines.append(f"- **not finished**: {tr['verdict']}")
        lines.append("")
    energy = report.get("energy") or {}
    if energy.get("recheck"):
        check = energy["recheck"]
        lines += [f"- report energies: {energy.get('selection') or 'torch'}; {check['n_checked']} samples re-checked "
                  f"against OpenMM: largest difference {check.get('max_abs_difference_kT', float('nan')):.2e} kT, "
                  f"{check.get('max_relative_difference', float('nan')):.1e} of the energy "
                  f"({'agrees: within 1e-6 relative' if check.get('passed') else 'DISAGREES: beyond 1e-6 relative'})",
                  ""]
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
        if "n_effective" in s:
            lines.append(f"- effective samples N·ESS (all draws pooled): {_n_eff(s['n_effective'])}; estimates resting on "
                         f"fewer than {s['min_effective_samples']:g} are marked unreliable (their error bars are meaningless); "
                         "a basin's population rests on the fewer of those inside and outside the basin")
            if not s["reliable"]:
                lines.append(f"- **the reweighted estimates below are unreliable**: N_eff = {_n_eff(s['n_effective'])} "
                             f"< {s['min_effective_samples']:g}; a handful of samples carry the weight")
        if "phi_positive_population" in s:
            php = s["phi_positive_population"]
            if "value" in php:
                lines.append(f"- φ > 0 basin (αL ∪ C7ax, 0° ≤ φ < 120°) population, reweighted: {_pm(php)}")
            else:
                names = s.get("phi_residues")
                lines += [f"- φ > 0 population, {_residue(k, names)}: {_pm(v)}" for k, v in php.items()]
        lines += _thin_basins(s, report.get("run_dir") or "RUN")
        if "basin_populations" in s:
            ref = ((report.get("reference") or {}).get("reference_populations") or {}).get("basin_populations", {})
            dF = s.get("basin_free_energies_kT", {})
            lines += ["", "| basin | population (reweighted) | ΔF (kT) | reference population |", "|---|---|---|---|"]
            for name, pop in s["basin_populations"].items():
                lines.append(f"| {name} | {_pm(pop)} | {_pm(dF.get(name), fmt='{:.2f}', population=False)} | {_pm(ref.get(name), reference=True)} |")
        if "modes" in s:
            m = s["modes"]
            lines += ["", "| mode | exact | reweighted | raw flow |", "|---|---|---|---|"]
            for k, (e, r, q) in enumerate(zip(m["exact"], m["reweighted"], m["raw_flow"])):
                rw = f"{r:.4f}" if m.get("reliable", True) else f"unreliable (N_eff = {_n_eff(m['n_effective'])})"
                lines.append(f"| {k} | {e:.4f} | {rw} | {q:.4f} |")
        lines.append("")
    ref = report.get("reference")
    if ref:
        lines += ["## Against reference samples", "", f"- reference frames: {ref['n_reference']}",
                  f"- forward ESS: {_pct(ref.get('forward_ess'))}",
                  f"- EUBO: {ref['eubo']:.3f} kT" if ref.get("eubo") is not None else "- EUBO: inf"]
        if ref.get("reference_outside_flow_support"):
            lines[-1] += (f" ({ref['reference_outside_flow_support']:,} of the {ref['n_reference']:,} reference frames lie "
                          "where the generator has no density: it never proposes them)")
        ref_pops = ref.get("reference_populations") or {}
        if "ramachandran_tv" in ref:
            lines += [f"- Ramachandran TV: {ref['ramachandran_tv']:.4f} (total variation of the φ/ψ histograms: 0 "
                      "identical, 1 no overlap)", f"- Ramachandran KL: {ref['ramachandran_kl']:.4f}"]
        if ref_pops.get("error_method"):
            lines.append(f"- reference population errors: {ref_pops['error_method']}")
        if ref_pops.get("phi_positive_population"):
            samples = report.get("samples") or {}
            flow = metrics.by_residue(samples.get("phi_positive_population") or {})
            seen = samples.get("phi_positive_samples", {})
            lines += ["", "| φ > 0 basin (0° ≤ φ < 120°) | flow samples in it | flow, reweighted | reference MD |",
                      "|---|---|---|---|"]
            for k, e in metrics.by_residue(ref_pops["phi_positive_population"]).items():
                count = f"{seen[k]:,}" if k in seen else "n/a"
                lines.append(f"| {_residue(k, samples.get('phi_residues'))} | {count} | {_pm(flow.get(k))} | "
                             f"{_pm(e, reference=True)} |")
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    lines.append(f"_written {time.strftime('%Y-%m-%d %H:%M:%S')}_")
    return "\n".join(lines) + "\n"
