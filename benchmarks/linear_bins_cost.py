"""What fewer spline bins on bonds and angles save a training step: seconds per step of a preset
with its own flow (``n_bins`` bins on every coordinate) against ``flow.linear_bins`` bins on the
non-circular ones.

Most of a coupling layer's arithmetic is the conditioner's last Linear, 3K + 1 outputs per
transformed coordinate; bonds and angles are two thirds of a peptide's coordinates. Each row
trains the system's preset (seed 0) for ``--steps`` steps, the whole step as users run it
(sampling, energies, dual and fit), the settings taking turns ``--repeats`` times each
(:func:`benchmarks.common.time_preset_settings`). What the cheaper step does to the generator's
ESS per hour is measured by whole runs (benchmarks/RESULTS.md). Prints a table and writes JSON::

    .ci/with-env python -m benchmarks.linear_bins_cost --systems ala4:ala4-hour aldp-vacuum:aldp-quick \\
        --linear-bins 4 --steps 30 --out benchmarks/results/linear_bins_cost.json
"""
from __future__ import annotations

import argparse

from benchmarks.common import add_preset_timing_arguments, print_table, time_preset_settings, write_record
from cmt_openmm.runs.presets import get_preset


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_timing_arguments(parser, ["ala4:ala4-hour", "aldp-vacuum:aldp-quick"], steps=30)
    parser.add_argument("--linear-bins", nargs="+", type=int, default=[4])
    args = parser.parse_args(argv)
    rows = []
    for pair in args.systems:
        system, preset = pair.split(":")
        n_bins = get_preset(preset)["flow"]["n_bins"]
        settings = {n_bins: {}, **{k: {"flow": {"linear_bins": k}} for k in args.linear_bins}}  # the preset first
        times = time_preset_settings(system, preset, settings, args.steps, args.repeats)
        base = times[n_bins][0]
        for k, (step, cpu) in times.items():
            rows.append({"system": system, "preset": preset, "n_bins": n_bins, "linear_bins": k, "steps": args.steps,
                         "seconds_per_step": step, "cpu_seconds_per_step": cpu, "speedup_vs_preset": base / step})
    print_table(rows, {"system": "{system}", "bins (torsions / bonds, angles)": "{n_bins} / {linear_bins}",
                       "s per step": "{seconds_per_step:.3f}", "CPU s per step": "{cpu_seconds_per_step:.3f}",
                       "vs the preset": "{speedup_vs_preset:.2f}×"})
    if args.out:
        write_record(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
