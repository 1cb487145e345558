"""What a flow setting costs a training step: seconds per step of a preset with its own flow
against variants of it (``hidden=128,n_bins=4``: the preset's flow with those two settings).

Most of a coupling layer's arithmetic is its conditioner's last Linear: ``hidden`` inputs, 3K + 1
outputs per transformed coordinate (K spline bins; ``linear_bins`` sets K on bonds and angles,
two thirds of a peptide's coordinates); the splines themselves cost O(K) per coordinate. Each
row trains the system's preset (seed 0) for ``--steps`` steps, the whole step as users run it
(sampling, energies, dual and fit), the settings taking turns ``--repeats`` times each
(:func:`benchmarks.common.time_preset_settings`). What a setting does to the generator's ESS per
hour is measured by whole runs (benchmarks/RESULTS.md). Prints a table and writes JSON::

    .ci/with-env python -m benchmarks.flow_settings_cost --systems ala4:ala4-hour aldp-vacuum:aldp-quick \\
        --variants linear_bins=4 hidden=128,n_bins=4 --steps 30 --out benchmarks/results/flow_settings_cost.json
"""
from __future__ import annotations

import argparse

from benchmarks.common import add_preset_timing_arguments, report_rows, time_preset_settings
from cmt_openmm.runs.presets import get_preset


def flow_variant(text: str) -> dict:
    """``"hidden=128,n_bins=4"`` -> ``{"hidden": 128, "n_bins": 4}`` (integer values)."""
    try:
        return {key.strip(): int(value) for key, value in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a flow variant; write KEY=INTEGER[,KEY=INTEGER...], "
                                         "e.g. hidden=128,n_bins=4.") from None


def describe(flow: dict) -> str:
    """``{"hidden": 64, "n_bins": 8, ...}`` -> ``"hidden 64, n_layers 6, bins 8 / 8"`` (torsions / bonds, angles)."""
    linear = flow.get("linear_bins") or flow["n_bins"]
    return f"hidden {flow['hidden']}, n_layers {flow['n_layers']}, bins {flow['n_bins']} / {linear}"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_timing_arguments(parser, ["ala4:ala4-hour", "aldp-vacuum:aldp-quick"], steps=30)
    parser.add_argument("--variants", nargs="+", type=flow_variant, default=[{"linear_bins": 4}],
                        help="flow settings to time against the preset's, each KEY=INTEGER[,KEY=INTEGER...]")
    args = parser.parse_args(argv)
    rows = []
    for pair in args.systems:
        system, preset = pair.split(":")
        flow = get_preset(preset)["flow"]
        variants = {"the preset": {}, **{",".join(f"{k}={v}" for k, v in variant.items()): variant
                                        for variant in args.variants}}
        times = time_preset_settings(system, preset, {name: {"flow": v} for name, v in variants.items()}, args.steps,
                                     args.repeats)  # the preset first
        base = times["the preset"][0]
        for name, (step, cpu) in times.items():
            rows.append({"system": system, "preset": preset, "variant": name,
                         "flow": describe({**flow, **variants[name]}), "steps": args.steps,
                         "seconds_per_step": step, "cpu_seconds_per_step": cpu,
                         "speedup_vs_preset": base / step})
    return report_rows(rows, {"system": "{system}", "variant": "{variant}",
                              "flow (bins: torsions / bonds, angles)": "{flow}",
                              "s per step": "{seconds_per_step:.3f}", "CPU s per step": "{cpu_seconds_per_step:.3f}",
                              "vs the preset": "{speedup_vs_preset:.2f}×"}, args.out)


if __name__ == "__main__":
    main()
