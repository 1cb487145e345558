"""What writing checkpoints costs a training run: seconds per step with a checkpoint after every step
(``checkpoint_minutes: 0``) against the default interval (``checkpoint_minutes: 1``).

Each row trains the system's preset (its flow, CMT settings and threads; seed 0) for ``--steps``
steps (:func:`benchmarks.common.time_preset_run`), on one energy object built once (the compiled
torch energies compile once), after a discarded 3-step warm-up run. The two settings take
turns, ``--repeats`` times each, so a changing load on the machine falls on both alike.
Prints a table and writes JSON::

    .ci/with-env python -m benchmarks.checkpoint_cost --systems aldp-vacuum:aldp-quick ala4:ala4-hour \\
        --steps 40 --out benchmarks/results/checkpoint_cost.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import cmt_openmm
from benchmarks.common import time_preset_run
from cmt_openmm.energy import make_energy

SETTINGS = {"every step": 0.0, "every minute": 1.0}  # checkpoint_minutes; the first is the baseline


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["aldp-vacuum:aldp-quick", "ala4:ala4-hour"],
                        help="SYSTEM:PRESET pairs")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for pair in args.systems:
        system, preset = pair.split(":")
        target = cmt_openmm.get_target(system)
        with make_energy(target, "auto") as energy:
            time_preset_run(target, preset, 3, energy, checkpoint_minutes=0.0)  # warm-up: first steps are slower
            times = {name: [] for name in SETTINGS}
            for _ in range(args.repeats):
                for name, minutes in SETTINGS.items():
                    times[name].append(time_preset_run(target, preset, args.steps, energy, checkpoint_minutes=minutes))
        base = statistics.median(t for t, _ in times["every step"])
        for name, runs in times.items():
            step = statistics.median(t for t, _ in runs)
            rows.append({"system": system, "preset": preset, "checkpoint": name, "steps": args.steps,
                         "seconds_per_step": step, "cpu_seconds_per_step": statistics.median(c for _, c in runs),
                         "speedup_vs_every_step": base / step})
    print("| system | checkpoint | s per step | CPU s per step | vs every step |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['checkpoint']} | {r['seconds_per_step']:.3f} | {r['cpu_seconds_per_step']:.3f} "
              f"| {r['speedup_vs_every_step']:.2f}× |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
