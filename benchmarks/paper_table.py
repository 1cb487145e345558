"""The paper's table side by side: CMT, reverse KL and TA-BG on the paper's four systems.

For each of ``aldp-implicit`` (AlanineDipeptideImplicit, ff96 + OBC1), ``ala4``, ``ala6`` and
``elil`` (amber99sbildn + amber99_obc, built offline by ``cmt_openmm.systems.peptide``), every
method trains the same flow with the same energy accounting for several seeds
(:mod:`benchmarks.aldp_methods` does each run: its settings, report and row), and the table
prints ESS % (clipped and not), Ram TV (with ``--reference SYSTEM=FILE``), evaluations and
wall time beside the published numbers (docs/method.md, "Published results"). Each run writes ``row.json`` in its own
directory and is skipped when that file exists, so a long table is built over several
invocations (``--systems``, ``--methods``, ``--seeds`` pick the part to run now).

Budget presets:

- ``cpu-small``: the budget CMT spends in about 10 minutes on one core (the torch energies
  where they are faster: ``energy.backend: auto``), a 15-minute limit per run, so 3 methods x 2
  seeds take about half an hour per system on 2 cores with ``--jobs 2``;
- ``cpu-hour``: the wall time of the ``ala4-hour`` / ``ala6-2h`` / ``elil-2h`` presets per run (an
  hour for ALDP and ala4, two for ala6 and ELIL) with CMT's settings taken from those presets
  (entropy budget and learning-rate decay sized to the run's plan), and every method given the
  same time limit, the evaluations CMT takes in it on 2 cores, and the presets' bfloat16
  conditioners and weight average;
- ``paper``: the published budgets (1e8 evaluations for ALDP and ala4, 4e8 for ala6, 8e8 for
  ELIL; reverse KL 2.56e8) for a GPU machine.

    python -m benchmarks.paper_table --preset cpu-small --systems aldp-implicit ala4 --jobs 2 --out runs/paper
    python -m benchmarks.paper_table --tiny --out /tmp/paper     # seconds, for the tests
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks import aldp_methods as methods_bench
from cmt_openmm.runs.presets import get_preset

SYSTEMS = ("aldp-implicit", "ala4", "ala6", "elil")
PUBLISHED = {  # docs/method.md, "Published results": mean of 4 runs; ESS %, Ram TV, evaluations
    "aldp-implicit": {"reverse_kl": (94.13, 1.36e-2, 2.56e8), "temperature_annealing": (95.76, 1.24e-2, 1e8),
                      "cmt": (97.69, 9.43e-3, 1e8)},
    "ala4": {"reverse_kl": (75.06, 2.89e-2, 2.56e8), "temperature_annealing": (65.81, 1.53e-2, 1e8),
             "cmt": (68.60, 1.43e-2, 1e8)},
    "ala6": {"reverse_kl": (21.83, 7.73e-2, 2.56e8), "temperature_annealing": (18.22, 2.59e-2, 4e8),
             "cmt": (29.63, 2.48e-2, 4e8)},
    "elil": {"reverse_kl": (1.26, 2.61e-1, 2.56e8), "temperature_annealing": (13.75, 2.54e-2, 8e8),
             "cmt": (26.06, 3.13e-2, 8e8)},
}
PRESETS = {  # budget (evaluations) and training wall-clock limit (s) per run, per system
    # About 10 minutes of training per run on one core: a budget CMT spends in that time (timings:
    # RESULTS.md), so that every method finishes its schedule (TA-BG its ladder) within the
    # budget; a 15-minute limit stops a slower method's run.
    "cpu-small": {"aldp-implicit": (3e6, 900), "ala4": (1.5e6, 900), "ala6": (1.5e6, 900), "elil": (1.5e6, 900)},
    # The *-hour presets' training time; budgets: what CMT evaluates in that time (RESULTS.md, the
    # ala4-hour, ala6-2h and elil-2h runs), so that the time limit, not the budget, ends CMT and reverse KL.
    "cpu-hour": {"aldp-implicit": (1.5e7, 3300), "ala4": (4e7, 3300), "ala6": (3.5e7, 6720), "elil": (3.5e7, 6720)},
    "paper": {"aldp-implicit": (1e8, None), "ala4": (1e8, None), "ala6": (4e8, None), "elil": (8e8, None)},
}
SIZED_PRESETS = {"aldp-implicit": "ala4-hour", "ala4": "ala4-hour", "ala6": "ala6-2h", "elil": "elil-2h"}
"""The preset whose CMT settings ``cpu-hour`` uses per system (sized to the run's plan, so they fit any peptide)."""


def run_dir(out: Path, system: str, method: str, seed: int) -> Path:
    return out / system / f"{method}-seed{seed}"


def bench_settings(args: argparse.Namespace, system: str) -> argparse.Namespace:
    """The settings of ``benchmarks/aldp_methods.py`` for one system's runs: at ``cpu-hour`` every method
    trains the sized preset's flow (size, bins, conditioner dtype) and weight average."""
    budget, time_limit = PRESETS[args.preset][system]
    bench = argparse.Namespace(
        system=system, temperature=300.0, budget=3000 if args.tiny else budget, time_limit=time_limit,
        reference=args.references.get(system), n_layers=2 if args.tiny else 6, hidden=16 if args.tiny else 64,
        n_bins=4 if args.tiny else 8, samples=200 if args.tiny else 10_000, draws=2 if args.tiny else 5,
        jobs=1, out=str(args.out / system), tiny=args.tiny, train_dtype="float32", ema_decay=None, linear_bins=None)
    if args.preset == "cpu-hour" and not args.tiny:
        sized = get_preset(SIZED_PRESETS[system])
        flow = sized["flow"]
        bench.n_layers, bench.hidden, bench.n_bins = flow["n_layers"], flow["hidden"], flow["n_bins"]
        bench.train_dtype, bench.linear_bins, bench.ema_decay = flow["train_dtype"], flow.get("linear_bins"), \
            sized["ema_decay"]
    return bench


def run_system(args: argparse.Namespace, system: str) -> list[dict]:
    """The rows of one system: finished runs are read back, missing ones are trained."""
    bench = bench_settings(args, system)
    settings = methods_bench.method_settings(int(bench.budget), args.tiny, 4000, 8, 1e-3, strata=True,
                                             reference=bench.reference)
    if args.preset == "cpu-hour" and not args.tiny:
        settings["cmt"] = get_preset(SIZED_PRESETS[system])["cmt"]
    if "forward_kl" in args.methods and not bench.reference:
        raise SystemExit(f"forward_kl trains on MD frames: give --reference {system}=FILE (cmt-openmm reference-md).")
    runs = [(method, seed) for method in args.methods for seed in args.seeds]
    missing = [(m, s) for m, s in runs if not (run_dir(args.out, system, m, s) / "row.json").is_file()]
    jobs = [(bench, settings, m, s, run_dir(args.out, system, m, s) / "row.json", {"system": system}) for m, s in missing]
    if args.jobs > 1 and len(missing) > 1:
        bench.jobs = args.jobs  # no progress bars from parallel runs
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(methods_bench.run_and_save, *zip(*jobs)))
    else:
        for job in jobs:
            methods_bench.run_and_save(*job)
    return [json.loads((run_dir(args.out, system, m, s) / "row.json").read_text()) for m, s in runs]


def table(rows_by_system: dict[str, list[dict]], preset: str, references: dict[str, str] | None = None) -> str:
    lines = [f"Budget preset {preset}; ours: mean ± std over seeds (ESS = median of draws per run); "
             "published: docs/method.md (mean of 4 runs, GPU budgets).", "",
             "| system | method | evals | ESS % | ESS % clipped | Ram TV | wall (s) | basins kept | published ESS % | published Ram TV | published evals |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for system, rows in rows_by_system.items():
        for group, s in methods_bench.aggregate(rows).items():
            pub = PUBLISHED[system].get(s["method"])
            fmt = methods_bench._fmt
            lines.append(
                f"| {system} | {methods_bench.LABEL[group]} | {fmt(s['evaluations'], fmt='{:.3g}')} | {fmt(s['ess'], 100)} "
                f"| {fmt(s['ess_clipped'], 100)} | {fmt(s['ram_tv'], fmt='{:.2e}')} | {fmt(s['train_wall_s'], fmt='{:.0f}')} "
                f"| {s['runs_keeping_every_basin']}/{s['n_runs']}"
                + (f" ({s['unreliable_runs']} unreliable: too few effective samples)" if s["unreliable_runs"] else "")
                + (f" ({s['diverged_runs']} diverged)" if s["diverged_runs"] else "")
                + " | "
                + (f"{pub[0]} | {pub[1]} | {pub[2]:.3g} |" if pub else "– | – | – |"))
    for system, path in sorted((references or {}).items()):
        if system in rows_by_system:  # Ram TV below this is the reference's own noise, not the flow's error
            floor, n = methods_bench.reference_tv_floor(path, system, 300.0)
            lines.append(f"\nRam TV floor of the {system} reference (its two halves, {n} frames): {floor:.3f}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--methods", nargs="+", default=["cmt", "reverse_kl", "temperature_annealing"],
                   choices=["cmt", "reverse_kl", "temperature_annealing", "forward_kl"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (one core each)")
    p.add_argument("--reference", nargs="*", default=[], metavar="SYSTEM=FILE",
                   help="MD reference frames per system (the npz of cmt-openmm reference-md, or a trajectory)")
    p.add_argument("--out", type=Path, default=Path("runs/paper_table"))
    p.add_argument("--tiny", action="store_true", help="seconds-long runs (tests)")
    args = p.parse_args(argv)
    try:
        args.references = dict(item.split("=", 1) for item in args.reference)
    except ValueError:
        raise SystemExit("--reference takes SYSTEM=FILE pairs, e.g. ala4=runs/ref/ala4.npz.") from None
    if args.tiny:
        args.seeds = args.seeds[:1]
    rows = {system: run_system(args, system) for system in args.systems}
    text = table(rows, args.preset, args.references)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"preset": args.preset, "rows": rows, "published": PUBLISHED},
                                                      indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
