"""Training split over processes (torchrun) against one process with the same cores.

The same training run (a preset's settings, ``shards: 2``, a fixed number of steps) is run as
users would run it: ``cmt-openmm train`` in one process with ``threads: 2`` (the baseline), and
``torchrun --standalone --nproc-per-node 2 -m cmt_openmm train`` with ``threads: 1`` per rank. Both
draw the same samples and take the same Adam steps (shards 2: the histories agree to rounding,
which the script checks), so the ratio is the speed of the layout alone. The layouts take turns,
``--repeats`` times each, and each figure is the median of its turns (a changing load on the machine
falls on both alike). Timings are the runs' own: energy evaluations per second of training (``metrics.jsonl``: evaluations / wall time of the
steps) and the command's wall clock (start-up and the short report included).

Also printed, on paper: the bytes each rank sends per step (the gather of the buffer's log q,
log p̃ and strata: 24 N bytes; one all-reduce of the flow's gradients per Adam step: 4 P bytes)
and the speed-up expected on R ranks from the measured one (Amdahl: the part of a step that two
ranks did not halve stays whole on R ranks; the communication is added at a stated bandwidth and
latency). Prints a table and writes JSON::

    .ci/with-env python benchmarks/distributed_training.py --systems aldp ala4 --steps 60 12 \\
        --out benchmarks/results/distributed_training.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import machine, write_record
from cmt_openmm.runs.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"aldp": "aldp-quick", "ala4": "ala4-hour"}
TINY_REPORT = {"n_samples": 200, "n_draws": 1}
LAYOUTS = {"1 process x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1)}
# on paper: NVLink within a node, InfiniBand between nodes (bandwidth bytes/s, latency s per collective)
LINKS = {"8 GPUs (NVLink)": (8, 100e9, 20e-6), "4 nodes (InfiniBand)": (4, 12.5e9, 50e-6)}


def run_file(system: str, steps: int, threads: int, folder: Path) -> Path:
    """The preset of ``system`` for ``steps`` steps with 2 shards, as a run file."""
    data = get_preset(PRESETS[system])
    data.update(max_steps=steps, budget=10**12, max_minutes=None, threads=threads, shards=2, report=TINY_REPORT)
    path = folder / f"{system}-{threads}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def train(system: str, steps: int, ranks: int, threads: int, folder: Path, turn: int) -> dict:
    """Run one layout; its evaluations/s of training, command wall clock and history."""
    out = folder / f"{system}-{ranks}x{threads}-{turn}"
    command = ["-m", "cmt_openmm", "train", str(run_file(system, steps, threads, folder)), "--out", str(out), "--quiet"]
    if ranks > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *command]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{system} on {ranks} x {threads} failed:\n{done.stderr[-2000:]}")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]
    return {"evaluations_per_s": last["energy_evaluations"] / last["wall_time"], "train_s": last["wall_time"],
            "command_s": wall, "steps": len(history), "history": history, "backend": last.get("energy_backend")}


def _median_run(runs: list[dict]) -> dict:
    """The turns of one layout: the median of each timing, the first turn's history."""
    return {**runs[0], **{key: statistics.median(run[key] for run in runs)
                          for key in ("evaluations_per_s", "train_s", "command_s")},
            "turns": [{key: run[key] for key in ("evaluations_per_s", "train_s", "command_s")} for run in runs]}


def lam_differences(a: list[dict], b: list[dict]) -> list[float]:
    """Relative differences of λ step by step between two histories: rounding at first (the layouts
    run the same training), growing over the steps as rounding differences do in training."""
    return [abs(x["lam"] - y["lam"]) / max(abs(x["lam"]), 1e-12) for x, y in zip(a, b)]


def communication(system: str) -> dict:
    """Bytes a rank sends per step: the gathered buffer and the all-reduced gradients."""
    import cmt_openmm
    from cmt_openmm.generator import BoltzmannGenerator

    preset = get_preset(PRESETS[system])
    flow, cmt = preset["flow"], preset["cmt"]
    generator = BoltzmannGenerator.build(cmt_openmm.get_target(preset["system"]), n_layers=flow["n_layers"],
                                         hidden=flow["hidden"], n_bins=flow["n_bins"], seed=0)
    n_parameters = sum(p.numel() for p in generator.parameters())
    gathered = 3 * 8 * cmt["n_samples"]
    reduced = 4 * (n_parameters + 1) * cmt["fit_steps"]
    return {"parameters": n_parameters, "gather_bytes": gathered, "allreduce_bytes": reduced,
            "collectives": cmt["fit_steps"] + 3}


def projection(speedup_2: float, step_s: float, comm: dict) -> dict:
    """Expected speed-up on R ranks: serial fraction f from the 2-rank speed-up S2 (S2 = 1 / (f + (1 − f)/2)),
    then 1 / (f + (1 − f)/R + t_comm / t_step), t_comm from the bytes (ring all-reduce: 2 (R−1)/R of them)."""
    serial = min(max(2.0 / speedup_2 - 1.0, 0.0), 1.0)
    out = {}
    for name, (ranks, bandwidth, latency) in LINKS.items():
        volume = comm["gather_bytes"] * (ranks - 1) / 2 + comm["allreduce_bytes"] * 2 * (ranks - 1) / ranks
        t_comm = volume / bandwidth + comm["collectives"] * latency * math.log2(ranks)
        out[name] = 1.0 / (serial + (1.0 - serial) / ranks + t_comm / step_s)
        out[f"{name}: communication per step / step"] = t_comm / step_s
    return {"serial_fraction": serial, **out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", nargs="+", default=["aldp", "ala4"], choices=sorted(PRESETS))
    parser.add_argument("--steps", nargs="+", type=int, default=[60, 12], help="steps per system (one each)")
    parser.add_argument("--repeats", type=int, default=2, help="turns of each layout (medians are reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/distributed_training.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for system, steps in zip(args.systems, args.steps):
            turns = {name: [] for name in LAYOUTS}
            for turn in range(args.repeats):
                for name, (ranks, threads) in LAYOUTS.items():
                    turns[name].append(train(system, steps, ranks, threads, Path(tmp), turn))
            runs = {name: _median_run(runs) for name, runs in turns.items()}
            base, split = runs["1 process x 2 threads"], runs["2 ranks x 1 thread"]
            ratio = split["evaluations_per_s"] / base["evaluations_per_s"]
            comm = communication(system)
            rows.append({
                "system": system, "preset": PRESETS[system], "steps": steps, "backend": base["backend"],
                **{f"{name}: {key}": run[key] for name, run in runs.items()
                   for key in ("evaluations_per_s", "train_s", "command_s", "turns")},
                "ratio": ratio, "command_ratio": base["command_s"] / split["command_s"],
                "lam_rel_difference_by_step": lam_differences(base["history"], split["history"]),
                "communication": comm,
                "expected_speedup": projection(ratio, base["train_s"] / steps, comm),
            })
    print(f"{'system':8} {'steps':>5} {'1x2 eval/s':>11} {'2x1 eval/s':>11} {'ratio':>6} {'cmd 1x2 s':>9} "
          f"{'cmd 2x1 s':>9} {'gather B':>9} {'allred B':>9} {'8 GPUs':>7} {'4 nodes':>7}")
    for r in rows:
        e = r["expected_speedup"]
        print(f"{r['system']:8} {r['steps']:5d} {r['1 process x 2 threads: evaluations_per_s']:11,.0f} "
              f"{r['2 ranks x 1 thread: evaluations_per_s']:11,.0f} {r['ratio']:6.2f} "
              f"{r['1 process x 2 threads: command_s']:9.1f} {r['2 ranks x 1 thread: command_s']:9.1f} "
              f"{r['communication']['gather_bytes']:9,d} {r['communication']['allreduce_bytes']:9,d} "
              f"{e['8 GPUs (NVLink)']:7.1f} {e['4 nodes (InfiniBand)']:7.1f}")
    write_record(args.out, {"benchmark": "distributed_training", "machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
