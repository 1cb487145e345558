"""What writing checkpoints costs a training run: seconds per step with a checkpoint after every step
(``checkpoint_minutes: 0``) against the default interval (``checkpoint_minutes: 1``).

Each row trains the system's preset (its flow, CMT settings and threads; seed 0) for ``--steps``
steps, the two settings taking turns ``--repeats`` times each
(:func:`benchmarks.common.time_preset_settings`).
Prints a table and writes JSON::

    .ci/with-env python -m benchmarks.checkpoint_cost --systems aldp-vacuum:aldp-quick ala4:ala4-hour \\
        --steps 40 --out benchmarks/results/checkpoint_cost.json
"""
from __future__ import annotations

import argparse

from benchmarks.common import add_preset_timing_arguments, report_rows, time_preset_settings

SETTINGS = {"every step": 0.0, "every minute": 1.0}  # checkpoint_minutes; the first is the baseline


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_timing_arguments(parser, ["aldp-vacuum:aldp-quick", "ala4:ala4-hour"], steps=40)
    args = parser.parse_args(argv)
    rows = []
    for pair in args.systems:
        system, preset = pair.split(":")
        settings = {name: {"checkpoint_minutes": minutes} for name, minutes in SETTINGS.items()}
        times = time_preset_settings(system, preset, settings, args.steps, args.repeats)
        base = times["every step"][0]
        for name, (step, cpu) in times.items():
            rows.append({"system": system, "preset": preset, "checkpoint": name, "steps": args.steps,
                         "seconds_per_step": step, "cpu_seconds_per_step": cpu, "speedup_vs_every_step": base / step})
    return report_rows(rows, {"system": "{system}", "checkpoint": "{checkpoint}",
                              "s per step": "{seconds_per_step:.3f}",
                              "CPU s per step": "{cpu_seconds_per_step:.3f}",
                              "vs every step": "{speedup_vs_every_step:.2f}×"}, args.out)


if __name__ == "__main__":
    main()
