"""What fewer spline bins on bonds and angles save a training step: seconds per step of a preset
with its own flow (``n_bins`` bins on every coordinate) against ``flow.linear_bins`` bins on the
non-circular ones.

Most of a coupling layer's arithmetic is the conditioner's last Linear, 3K + 1 outputs per
transformed coordinate; bonds and angles are two thirds of a peptide's coordinates. Each row
trains the system's preset (seed 0) for ``--steps`` steps (:func:`benchmarks.common.time_preset_run`:
the whole step as users run it, sampling, energies, dual and fit), on one energy object built
once, after a discarded 3-step warm-up run; the settings take turns, ``--repeats`` times each, so
a changing load on the machine falls on all alike. What the cheaper step does to the generator's
ESS per hour is measured by whole runs (benchmarks/RESULTS.md). Prints a table and writes JSON::

    .ci/with-env python -m benchmarks.linear_bins_cost --systems ala4:ala4-hour aldp-vacuum:aldp-quick \\
        --linear-bins 4 --steps 30 --out benchmarks/results/linear_bins_cost.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import cmt_openmm
from benchmarks.common import time_preset_run
from cmt_openmm.energy import make_energy
from cmt_openmm.runs.presets import get_preset


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["ala4:ala4-hour", "aldp-vacuum:aldp-quick"],
                        help="SYSTEM:PRESET pairs")
    parser.add_argument("--linear-bins", nargs="+", type=int, default=[4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for pair in args.systems:
        system, preset = pair.split(":")
        n_bins = get_preset(preset)["flow"]["n_bins"]
        settings = {n_bins: {}, **{k: {"flow": {"linear_bins": k}} for k in args.linear_bins}}  # the preset first
        target = cmt_openmm.get_target(system)
        with make_energy(target, "auto") as energy:
            time_preset_run(target, preset, 3, energy)  # warm-up: the first steps in a process are slower
            times = {k: [] for k in settings}
            for _ in range(args.repeats):
                for k, setting in settings.items():
                    times[k].append(time_preset_run(target, preset, args.steps, energy, **setting))
        base = statistics.median(t for t, _ in times[n_bins])
        for k, runs in times.items():
            step = statistics.median(t for t, _ in runs)
            rows.append({"system": system, "preset": preset, "n_bins": n_bins, "linear_bins": k, "steps": args.steps,
                         "seconds_per_step": step, "cpu_seconds_per_step": statistics.median(c for _, c in runs),
                         "speedup_vs_preset": base / step})
    print("| system | bins (torsions / bonds, angles) | s per step | CPU s per step | vs the preset |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['n_bins']} / {r['linear_bins']} | {r['seconds_per_step']:.3f} "
              f"| {r['cpu_seconds_per_step']:.3f} | {r['speedup_vs_preset']:.2f}× |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
