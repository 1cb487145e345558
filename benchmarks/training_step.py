"""One CMT annealing step as training runs it: flow sampling, energies, dual and weighted fit.

A benchmark of the flow alone does not stand for training: a step also draws the buffer,
evaluates its energies and solves the dual. This times :class:`~cmt_openmm.training.cmt.CMTTrainer`
steps on each system and energy backend (the buffer's samples, their energies, then
:meth:`~cmt_openmm.training.cmt.CMTTrainer.anneal`: the dual and the Adam steps), after warm-up
steps, with the flow and settings of a preset (``--preset``, default ``aldp-quick``). The first
backend named is the baseline: every row gives its step time as a ratio against the baseline's,
measured in the same run; ``--train-dtypes float32 bfloat16`` adds rows with bfloat16 conditioners
(``flow.train_dtype``), against the same baseline, the two taking turns step by step.
``--step-scales 1 2 4`` times the step at each ``cmt.step_scale`` (the samples per annealing step
and per Adam step multiplied) and gives each scale's seconds per sample as a ratio against the
first scale's: what ``step_scale: auto`` weighs, part by part. Prints a table and writes JSON::

    .ci/with-env python benchmarks/training_step.py --systems aldp-vacuum ala4 --threads 1 2 \\
        --backends openmm torch-compiled --out benchmarks/results/training_step.json
    .ci/with-env python benchmarks/training_step.py --preset ala4-hour --systems ala4 --threads 1 \\
        --backends torch-compiled --train-dtypes bfloat16 --step-scales 1 2 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import cmt_openmm
from cmt_openmm.energy import make_energy
from cmt_openmm.flows.coupling import conditioner_matmuls
from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.runs.presets import get_preset
from cmt_openmm.training import TrainConfig
from cmt_openmm.training.cmt import CMTTrainer

BACKENDS = {"openmm": ("openmm", False), "torch": ("torch", False), "torch-compiled": ("torch", True)}
PARTS = ("sample", "energy", "anneal")


def time_steps(system: str, backend: str, threads: int, n_steps: int, n_warmup: int,
               train_dtypes: tuple[str, ...] = ("float32",), preset: str = "aldp-quick",
               step_scale: int = 1) -> list[dict]:
    """Median seconds of each part of a CMT step, and of the whole step: a row per conditioner
    dtype, the dtypes taking turns step by step on one trainer (so a changing load on the
    machine falls on each alike)."""
    settings = get_preset(preset)
    settings["cmt"]["step_scale"] = step_scale
    config = TrainConfig.from_dict({k: settings[k] for k in ("method", "seed", "flow", "cmt")})
    target = cmt_openmm.get_target(system)
    torch.set_num_threads(threads)
    f = config.flow
    generator = BoltzmannGenerator.build(target, n_layers=f.n_layers, hidden=f.hidden, n_bins=f.n_bins, mask=f.mask,
                                         seed=0)
    name, compile_ = BACKENDS[backend]
    dtypes = {d: TrainConfig.from_dict({"flow": {"train_dtype": d}}).flow.conditioner_dtype() for d in train_dtypes}
    times = {d: {part: [] for part in PARTS} for d in train_dtypes}
    with make_energy(target, name, compile=compile_) as energy:
        trainer = CMTTrainer(target, generator, energy, config, torch.Generator().manual_seed(0))
        for i in range(len(train_dtypes) * (n_warmup + n_steps)):
            train_dtype = train_dtypes[i % len(train_dtypes)]
            with conditioner_matmuls(generator, dtypes[train_dtype]):
                t0 = time.perf_counter()
                x, log_q = generator.sample(trainer.n_samples, generator=trainer.rng)
                t1 = time.perf_counter()
                with torch.no_grad():
                    log_p = -energy(x)
                t2 = time.perf_counter()
                trainer.anneal(x, log_q, log_p)
                trainer.steps_done += 1
                t3 = time.perf_counter()
            if i >= len(train_dtypes) * n_warmup:
                for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2)):
                    times[train_dtype][part].append(seconds)
    rows = []
    for train_dtype, parts in times.items():
        medians = {part: statistics.median(values) for part, values in parts.items()}
        step = sum(medians.values())
        rows.append({"system": system, "preset": preset, "backend": backend, "train_dtype": train_dtype,
                     "threads": threads, "step_scale": step_scale, "n_samples": trainer.n_samples,
                     "batch_size": trainer.batch_size, "fit_steps": trainer.fit_steps, "dim": generator.dim,
                     **{f"{p}_s": medians[p] for p in PARTS}, "step_s": step,
                     "evaluations_per_s": trainer.n_samples / step})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="+", default=["aldp-vacuum", "ala4"])
    p.add_argument("--backends", nargs="+", default=["openmm", "torch-compiled"], choices=sorted(BACKENDS))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--train-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="dtypes of the conditioners while training (flow.train_dtype)")
    p.add_argument("--preset", default="aldp-quick", help="the preset whose flow and CMT settings are timed")
    p.add_argument("--step-scales", nargs="+", type=int, default=[1],
                   help="cmt.step_scale values; each row's seconds per sample against the first's")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (workers, compilation)")
    p.add_argument("--out", default="benchmarks/results/training_step.json")
    args = p.parse_args(argv)
    if min(args.step_scales) < 1:
        p.error("--step-scales must be positive integers (1: the preset's own step).")
    rows = []
    for system in args.systems:
        for threads in args.threads:
            first_scale = {}  # (backend, dtype): seconds per sample at the first scale
            for scale in args.step_scales:
                baseline = None  # the first backend's step at this scale
                for backend in args.backends:
                    for row in time_steps(system, backend, threads, args.steps, args.warmup, tuple(args.train_dtypes),
                                          args.preset, scale):
                        baseline = baseline or row["step_s"]
                        row["speedup_vs_" + args.backends[0]] = baseline / row["step_s"]
                        per_sample = row["step_s"] / row["n_samples"]
                        same = first_scale.setdefault((backend, row["train_dtype"]), per_sample)
                        row[f"per_sample_vs_scale_{args.step_scales[0]}"] = per_sample / same
                        rows.append(row)
    header = f"{'system':<12} {'backend':<15} {'conditioner':<11} {'thr':>3} {'scale':>5} {'sample s':>9} " \
             f"{'energy s':>9} {'anneal s':>9} {'step s':>8} {'eval/s':>8} {'speedup':>8} {'per sample':>10}"
    print(header)
    for r in rows:
        print(f"{r['system']:<12} {r['backend']:<15} {r['train_dtype']:<11} {r['threads']:>3} {r['step_scale']:>5} "
              f"{r['sample_s']:>9.3f} {r['energy_s']:>9.3f} "
              f"{r['anneal_s']:>9.3f} {r['step_s']:>8.3f} {r['evaluations_per_s']:>8,.0f} "
              f"{r['speedup_vs_' + args.backends[0]]:>7.2f}x {r[f'per_sample_vs_scale_{args.step_scales[0]}']:>9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "baseline": args.backends[0], "steps": args.steps,
                               "warmup": args.warmup}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
