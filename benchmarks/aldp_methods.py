"""CMT vs reverse KL vs temperature annealing (TA-BG) on alanine dipeptide, same flow and budget.

Every method trains the same spline flow on the same target with the same energy-evaluation
budget (each configuration sent to OpenMM counts, docs/method.md, "Budget accounting"), for several seeds,
optionally under a wall-clock limit per run. Each trained generator is then judged on fresh
samples: reverse ESS (median of several draws with the spread, and with the top 1e-4 of the
log-weights clipped), the φ > 0 basin population (αL ∪ C7ax) and every ALDP basin — CMT must
not lose one — and, given MD reference frames (``cmt-openmm reference-md``), forward ESS,
EUBO and Ramachandran TV. Prints a table in the paper's format beside the published
numbers (AlanineDipeptideImplicit, 1e8 evaluations, GPUs: a scale this CPU benchmark does not
reach) and writes ``results.json``. Each run is a :class:`cmt_openmm.Run` (its directory holds
``run.yaml``, the training files and ``report.json``); the wall-clock limit is the training
setting ``max_minutes``.

    python -m benchmarks.aldp_methods --system aldp-vacuum --budget 2e6 --seeds 0 1 2 --jobs 2 \\
        --reference runs/ref/aldp-vacuum-ref.npz --out runs/bench_methods
    python -m benchmarks.aldp_methods --tiny          # a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cmt_openmm import Run
from cmt_openmm.errors import CMTTrainingDiverged
from cmt_openmm.files import atomic_write
from cmt_openmm.runs.presets import get_preset
from cmt_openmm.runs.run_files import build_target

PUBLISHED = {  # docs/method.md, "Published results": ALDP (AlanineDipeptideImplicit), mean of 4 runs
    "reverse_kl": {"evals": 2.56e8, "ess": 94.13, "ram_tv": 1.36e-2},
    "temperature_annealing": {"evals": 1e8, "ess": 95.76, "ram_tv": 1.24e-2},
    "cmt": {"evals": 1e8, "ess": 97.69, "ram_tv": 9.43e-3},
}
LOST_POPULATION = 1e-4  # without a reference: a basin below this reweighted population counts as lost
LOST_FRACTION = 0.1  # with a reference: below this fraction of the reference population
LABEL = {"cmt": "CMT", "cmt_strata": "CMT + φ strata", "reverse_kl": "reverse KL", "temperature_annealing": "TA-BG",
         "forward_kl": "forward KL"}


def group_of(method: str, section: dict) -> str:
    """Table row a run belongs to: its method, with CMT split by whether it used strata."""
    return "cmt_strata" if method == "cmt" and section.get("strata", "none") != "none" else method


def method_settings(budget: int, tiny: bool, buffer: int, fit_steps: int, lr: float, strata: bool = True,
                    reference: str | None = None) -> dict:
    """Per-method sections. CMT = the ``aldp-quick`` preset's settings (its two-phase entropy
    constraint and φ-sign strata included; strata=False drops the strata) with this run's
    buffer / fit steps / lr; TA-BG uses the same buffer and
    fit, spends ~1/4 of the budget on its reverse-KL stage and ~1/2 of the rest going down
    the ladder; reverse KL gets the same batch size and lr; forward KL (only with MD
    ``reference`` frames) the same batch size and lr on those frames."""
    preset = get_preset("aldp-quick")["cmt"]
    strata_section = {"strata": preset["strata"], "strata_floor": preset["strata_floor"]} if strata else {"strata": "none"}
    if tiny:
        return {
            **({"forward_kl": {"data": reference, "batch_size": 16, "lr": 1e-3, "steps_per_record": 2,
                               "eval_samples": 64}} if reference else {}),
            "cmt": {"eps_tr": 0.5, "eps_ent": 1.0, "n_samples": 256, "fit_steps": 4, "batch_size": 64, "lr": 1e-3,
                    **strata_section},
            "reverse_kl": {"batch_size": 64, "lr": 1e-3, "steps_per_record": 4},
            "temperature_annealing": {"t_high": 1200.0, "n_temperatures": 3, "reverse_kl_steps": 4, "steps_per_record": 2,
                                      "batch_size": 64, "lr": 1e-3, "n_samples": 256, "fit_steps": 4, "final_steps": 1000},
        }
    cmt = {**preset, "n_samples": buffer, "fit_steps": fit_steps, "lr": lr, **strata_section}
    batch = cmt["batch_size"]
    n_temperatures = 8
    ladder_steps = budget * 3 // 4 // buffer
    forward = {"forward_kl": {"data": reference, "batch_size": batch, "lr": lr, "steps_per_record": 50,
                              "eval_samples": 1000}} if reference else {}
    return {
        **forward,
        "cmt": cmt,
        "reverse_kl": {"batch_size": batch, "lr": lr, "steps_per_record": 50},
        "temperature_annealing": {"t_high": 1200.0, "n_temperatures": n_temperatures, "steps_per_record": 50,
                                  "reverse_kl_steps": max(50, int(budget / 4 / batch) // 50 * 50),
                                  "steps_per_temperature": max(1, ladder_steps // 2 // (n_temperatures - 1)),
                                  "batch_size": batch, "lr": lr, "n_samples": buffer, "fit_steps": fit_steps,
                                  "final_steps": 100_000},
    }


def max_steps_for(method: str, section: dict, budget: int) -> int:
    """Steps the budget allows (so that progress bars show a real total); the budget still stops runs."""
    if method == "reverse_kl":
        return max(1, budget // (section["batch_size"] * section["steps_per_record"]))
    if method == "forward_kl":  # energies only for its ESS records; 5,000 Adam steps (the time limit may stop it)
        return 100
    ladder = budget // section["n_samples"]
    if method == "temperature_annealing":
        ladder += -(-section["reverse_kl_steps"] // section["steps_per_record"])
    return max(1, ladder)


def run_one(args: argparse.Namespace, settings: dict, method: str, seed: int) -> dict:
    """Train one (method, seed) from scratch, write its report (against ``args.reference`` when
    given), return its table row (:func:`diverged_row` where training diverged: a baseline that
    fails is a result of the table, not the end of it)."""
    torch.set_num_threads(1)
    budget = int(args.budget)
    run_dir = Path(args.out) / f"{method}-seed{seed}"
    config = {
        "system": args.system, "temperature": args.temperature, "method": method, "seed": seed,
        "budget": budget, "max_steps": max_steps_for(method, settings[method], budget),
        "max_minutes": None if args.time_limit is None else args.time_limit / 60.0,
        "flow": {"n_layers": args.n_layers, "hidden": args.hidden, "n_bins": args.n_bins,
                 "linear_bins": args.linear_bins, "train_dtype": args.train_dtype},
        "ema_decay": args.ema_decay,
        method: copy.deepcopy(settings[method]),
        "report": {"n_samples": args.samples, "n_draws": args.draws},
    }
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run = Run.create(run_dir, config)
    print(f"=== {LABEL[method]} seed {seed}: started ===", flush=True)
    start = time.perf_counter()
    progress = args.jobs == 1
    try:
        if args.reference is None:
            report = run.train(progress=progress)
        else:  # the report compares with the MD frames: one report, written after training
            run.train(progress=progress, report=False)
            report = run.evaluate(args.reference, progress=progress, name="report")
    except CMTTrainingDiverged as error:
        row = diverged_row(method, seed, run.history, error, time.perf_counter() - start)
    else:
        row = row_of(method, seed, report, time.perf_counter() - start)
    row["group"] = group_of(method, settings[method])
    print(format_row(row), flush=True)
    return row


def run_and_save(args: argparse.Namespace, settings: dict, method: str, seed: int, row_path: Path, extra: dict) -> None:
    """:func:`run_one` with ``extra`` keys added to its row, written atomically to ``row_path``
    (module-level, so that process pools of other scripts can pickle it)."""
    row = {**run_one(args, settings, method, seed), **extra}
    atomic_write(row_path, json.dumps(row))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", default="aldp-vacuum", help="aldp-vacuum | aldp-obc | aldp-implicit")
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--methods", nargs="+", default=["cmt", "reverse_kl", "temperature_annealing"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=2e6, help="energy evaluations per run (same for every method)")
    p.add_argument("--time-limit", dest="time_limit", type=float,
                   help="training wall-clock seconds per run (the runs' max_minutes)")
    p.add_argument("--reference", help="MD reference .npz (positions nm) for forward ESS, EUBO, Ram TV")
    p.add_argument("--n-layers", dest="n_layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--n-bins", dest="n_bins", type=int, default=8)
    p.add_argument("--linear-bins", dest="linear_bins", type=int,
                   help="spline bins on bonds and angles (flow.linear_bins; default: --n-bins)")
    p.add_argument("--train-dtype", dest="train_dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="the conditioners' dtype while training (flow.train_dtype; every method)")
    p.add_argument("--ema-decay", dest="ema_decay", type=float, help="the weights' moving average (every method)")
    p.add_argument("--buffer", type=int, default=4000, help="CMT / TA-BG samples per annealing step")
    p.add_argument("--fit-steps", dest="fit_steps", type=int, default=8, help="CMT / TA-BG Adam steps per annealing step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (every method)")
    p.add_argument("--no-strata", dest="strata", action="store_false",
                   help="CMT without the preset's φ-sign strata (the method exactly as published)")
    p.add_argument("--samples", type=int, default=10_000, help="flow samples per evaluation draw")
    p.add_argument("--draws", type=int, default=5, help="evaluation draws (ESS = median over draws)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (one core each; 1 shows progress bars)")
    p.add_argument("--out", default="runs/bench_aldp_methods")
    p.add_argument("--tiny", action="store_true", help="a smoke run: tiny flow and budget, one seed")
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="train nothing: one table from the results.json of earlier runs (e.g. methods run separately)")
    args = p.parse_args(argv)
    if args.combine:
        return combine(args.combine, Path(args.out))
    if args.tiny:
        args.budget, args.seeds, args.samples, args.draws = 3000, args.seeds[:1], 300, 2
        args.n_layers, args.hidden, args.n_bins = 2, 16, 4
    budget = int(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = method_settings(budget, args.tiny, args.buffer, args.fit_steps, args.lr, args.strata, args.reference)
    runs = [(method, seed) for method in args.methods for seed in args.seeds]
    if args.jobs == 1:
        rows = [run_one(args, settings, method, seed) for method, seed in runs]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(run_one, *zip(*[(args, settings, m, s) for m, s in runs])))
    args.budget = budget
    write_results(out, rows, args, settings)
    return 0


def write_results(out: Path, rows: list[dict], args: argparse.Namespace, settings: dict) -> None:
    summary = aggregate(rows)
    table = format_table(rows, summary, args)
    print("\n" + table)
    results = {"settings": {**vars(args), "method_settings": settings, "torch_threads": 1},
               "runs": rows, "summary": summary, "published": PUBLISHED}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'table.md'}")


def combine(dirs: list[str], out: Path) -> int:
    """One table and results.json from several earlier runs of this script (same system and budget)."""
    missing = [d for d in dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        raise SystemExit(f"no results.json in {', '.join(missing)}; pass the --out directories of finished runs.")
    parts = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    first = parts[0]["settings"]
    for part in parts[1:]:
        other = part["settings"]
        for key in ("system", "temperature", "budget", "n_layers", "hidden", "n_bins"):
            if other[key] != first[key]:
                raise SystemExit(f"cannot combine runs with different {key} ({first[key]} vs {other[key]}); "
                                 "combine runs of one benchmark setting only.")
    rows, settings = [], {}
    for part in parts:
        for row in part["runs"]:
            section = part["settings"]["method_settings"][row["method"]]
            row.setdefault("group", group_of(row["method"], section))
            settings[row["group"]] = section
            rows.append(row)
    args = argparse.Namespace(**{**first, "seeds": sorted({r["seed"] for r in rows}), "combined_from": dirs})
    write_results(out, rows, args, settings)
    return 0


def row_of(method: str, seed: int, report: dict, total_wall: float) -> dict:
    s, tr, ref = report["samples"], report["training"], report.get("reference") or {}
    pops = s.get("basin_populations", {})
    phi = s.get("phi_positive_population") or {}
    if phi and "value" not in phi:  # a longer peptide: its basins are the φ > 0 states of each residue
        pops = {f"phi>0 {k}": v for k, v in phi.items()}
        phi = {}
    row = {
        "method": method, "seed": seed,
        "ess": s["reverse_ess"]["median"], "ess_min": s["reverse_ess"]["min"], "ess_max": s["reverse_ess"]["max"],
        "ess_clipped": s["reverse_ess_clipped"]["median"],
        "evaluations": tr["energy_evaluations"], "steps": tr["steps"], "stop_reason": tr["stop_reason"],
        "train_wall_s": tr["wall_time_s"], "total_wall_s": total_wall,
        "phi_positive": phi.get("value"),
        "phi_positive_error": phi.get("error"),
        "basins": {k: v["value"] for k, v in pops.items()},
        "lost_basins": [k for k, v in pops.items() if (v["value"] or 0.0) < LOST_POPULATION],
        "chirality_flips": s["chirality_flips"],
        "reliable": s.get("reliable", True),  # False: N·ESS below the report's minimum, populations unreliable
    }
    if ref:
        row.update(eubo=ref.get("eubo"), ram_tv=ref.get("ramachandran_tv"), forward_ess=ref.get("forward_ess"),
                   reference_phi_positive=(ref.get("reference_populations", {}).get("phi_positive_population") or {}).get("value"))
        ref_phi = ref.get("reference_populations", {}).get("phi_positive_population") or {}
        ref_pops = ref.get("reference_populations", {}).get("basin_populations") or (
            {f"phi>0 {k}": v for k, v in ref_phi.items()} if ref_phi and "value" not in ref_phi else {})
        row["lost_basins"] = [k for k, v in pops.items()
                              if (v["value"] or 0.0) < LOST_FRACTION * ((ref_pops.get(k) or {}).get("value") or 0.0)]
    return row


def diverged_row(method: str, seed: int, history: list[dict], error: CMTTrainingDiverged, total_wall: float) -> dict:
    """The row of a run whose training diverged: no generator was written, so nothing can be drawn:
    ESS 0 and every basin lost; its cost is that of its last finite step (``history``'s last record)."""
    last = history[-1] if history else {}
    return {"method": method, "seed": seed, "ess": 0.0, "ess_min": 0.0, "ess_max": 0.0, "ess_clipped": 0.0,
            "evaluations": last.get("energy_evaluations", 0), "steps": len(history),
            "stop_reason": f"diverged after step {error.step}", "train_wall_s": last.get("wall_time", 0.0),
            "total_wall_s": total_wall, "phi_positive": None, "phi_positive_error": None, "basins": {},
            "lost_basins": ["all (training diverged)"], "chirality_flips": 0, "reliable": False, "diverged": str(error)}


def _mean_std(values):
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def aggregate(rows: list[dict]) -> dict:
    out = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == group]
        out[group] = {key: _mean_std([r.get(key) for r in rs])
                      for key in ("ess", "ess_clipped", "eubo", "ram_tv", "evaluations", "train_wall_s", "phi_positive")}
        out[group]["method"] = rs[0]["method"]
        out[group]["n_runs"] = len(rs)
        out[group]["lost_basins"] = sorted({b for r in rs for b in r["lost_basins"]})
        out[group]["runs_keeping_every_basin"] = sum(not r["lost_basins"] for r in rs)
        out[group]["diverged_runs"] = sum(bool(r.get("diverged")) for r in rs)
        out[group]["unreliable_runs"] = sum(not r.get("reliable", True) and not r.get("diverged") for r in rs)
    return out


def _fmt(ms, scale=1.0, fmt="{:.2f}"):
    mean, std = ms
    if mean is None:
        return "–"
    return fmt.format(scale * mean) + (" ± " + fmt.format(scale * std) if std else "")


def format_row(r: dict) -> str:
    return (f"{LABEL[r['group']]:<14} seed {r['seed']}: ESS {100 * r['ess']:.2f} % [{100 * r['ess_min']:.2f}, "
            f"{100 * r['ess_max']:.2f}], clipped {100 * r['ess_clipped']:.2f} %, evals {r['evaluations']:,}, "
            f"train {r['train_wall_s']:.0f} s, φ>0 {'n/a' if r['phi_positive'] is None else format(r['phi_positive'], '.2e')}, "
            f"lost basins {r['lost_basins'] or 'none'} ({r['stop_reason']})")


def reference_tv_floor(reference: str, system: str, temperature: float) -> tuple[float, int]:
    """Ramachandran TV between the two halves of the reference frames, and the number of frames."""
    from cmt_openmm.analysis.metrics import ramachandran_tv
    from cmt_openmm.coordinates.backbone import ramachandran_angles

    angles = ramachandran_angles(build_target(system, temperature).topology,
                                         np.load(reference)["positions"])
    half = len(angles) // 2
    return float(ramachandran_tv(angles[:half], angles[half:])), len(angles)


def format_table(rows: list[dict], summary: dict, args) -> str:
    head = (f"ALDP ({args.system}, {args.temperature:g} K), budget {int(args.budget):,} evaluations, "
            f"flow {args.n_layers}x{args.hidden} ({args.n_bins} bins), seeds {args.seeds}; "
            "mean ± std over seeds, ESS = median of draws")
    lines = [head, "",
             "| method | evals | ESS % | ESS % (clipped 1e-4) | EUBO (kT) | Ram TV | wall (s) | φ>0 pop. | runs keeping every basin | basins lost (any run) | published ESS % | published Ram TV | published evals |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for group, s in summary.items():
        pub = PUBLISHED.get(s["method"])
        published = f"{pub['ess']} | {pub['ram_tv']} | {pub['evals']:.3g}" if pub else "– | – | –"
        lines.append(
            f"| {LABEL[group]} | {_fmt(s['evaluations'], fmt='{:.3g}')} | {_fmt(s['ess'], 100)} | {_fmt(s['ess_clipped'], 100)} "
            f"| {_fmt(s['eubo'])} | {_fmt(s['ram_tv'], fmt='{:.2e}')} | {_fmt(s['train_wall_s'], fmt='{:.0f}')} "
            f"| {_fmt(s['phi_positive'], fmt='{:.4f}')} | {s['runs_keeping_every_basin']}/{s['n_runs']} "
            f"| {', '.join(s['lost_basins']) or 'none'} | {published} |")
    ref_phi = [r.get("reference_phi_positive") for r in rows if r.get("reference_phi_positive") is not None]
    if ref_phi:
        lines += ["", f"reference MD φ>0 (αL ∪ C7ax) population: {ref_phi[0]:.4f}"]
    if getattr(args, "reference", None):
        floor, n = reference_tv_floor(args.reference, args.system, args.temperature)
        lines += [f"Ram TV noise floor: the reference's first and second halves ({n // 2} frames each) differ by "
                  f"TV = {floor:.3f}; a model compared with all {n} frames carries roughly half of that from "
                  "the reference's own noise (TV ~ 1/sqrt(frames)), more where frames are correlated."]
    lines += ["", "Published: AlanineDipeptideImplicit (ff96 + OBC1), 300 K, GPU-scale budgets (docs/method.md)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
