"""Throughput of the OpenMM energy bridge against a plain serial OpenMM loop (configurations/s).

For aldp-vacuum (NonbondedForce), aldp-obc (GBSAOBCForce) and aldp-implicit (CustomGBForce),
measured in the same run on the same perturbed reference structures, energies and forces:

- ``serial``: one Context, ``setPositions`` + ``getState(energy, forces)`` with the public
  ``getForces(asNumpy=True).value_in_unit(...)`` (the loop most scripts contain);
- ``serial_fast``: the same loop reading forces with OpenMM's zero-copy ``_getVectorAsNumpy``,
  which is exactly the bridge's inner loop: the baseline for the bridge's own overhead;
- ``in_process``: ``OpenMMEnergy(target)`` (n_workers=1, the default: one Context in-process);
- ``1_worker`` / ``2_workers``: ``OpenMMEnergy(target, n_workers=k, in_process=False)``;
- ``2_workers_torch``: the same through torch autograd (``energy(x).sum().backward()``).

Each method runs ``--repeats`` times, interleaved; the best wall time is kept (the machine is
shared, so slower repeats measure other people's work). CPU time per configuration (this
process plus its workers, from /proc, summed over the repeats) is reported too: it shows the
bridge's own cost even when other jobs compete for the cores. Worker start-up is timed apart.
Targets: 1 worker within 20 % of ``serial_fast``; 2 workers >= 1.7x ``serial_fast``
on 2 cores. Usage, from the repository root:
``python -m benchmarks.energy_throughput [--out PATH] [--repeats N]``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit
import torch

from benchmarks.common import cpu_seconds, machine, write_record
from cmt_openmm.energy import OpenMMEnergy
from cmt_openmm.systems import get_target

BATCH = {"aldp-vacuum": 2000, "aldp-obc": 2000, "aldp-implicit": 200}
KJ, KJ_NM = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer
COLUMNS = ["serial", "serial_fast", "in_process", "1_worker", "2_workers", "2_workers_torch"]


def serial_loop(context: openmm.Context, x: np.ndarray, fast: bool) -> None:
    energies, forces = np.empty(len(x)), np.empty_like(x)
    for i in range(len(x)):
        context.setPositions(x[i])
        state = context.getState(getEnergy=True, getForces=True)
        if fast:
            energies[i] = state.getPotentialEnergy()._value
            state._getVectorAsNumpy(openmm.State.Forces, forces[i])
        else:
            energies[i] = state.getPotentialEnergy().value_in_unit(KJ)
            forces[i] = state.getForces(asNumpy=True).value_in_unit(KJ_NM)


def benchmark(name: str, batch: int, repeats: int, platform: str, seed: int) -> dict:
    target = get_target(name)
    x = target.positions + 0.01 * np.random.default_rng(seed).standard_normal((batch, target.n_atoms, 3))
    x_torch = torch.tensor(x)
    context = openmm.Context(
        target.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform)
    )
    bridges = {
        "in_process": OpenMMEnergy(target, platform),
        "1_worker": OpenMMEnergy(target, platform, n_workers=1, in_process=False),
        "2_workers": OpenMMEnergy(target, platform, n_workers=2),
    }
    startup = {}
    for key, energy in bridges.items():
        start = time.perf_counter()
        energy(x[:2])
        startup[key] = time.perf_counter() - start

    def autograd():
        xt = x_torch.clone().requires_grad_()
        bridges["2_workers"](xt).sum().backward()

    pids = {key: energy.worker_pids for key, energy in bridges.items()}
    pids["2_workers_torch"] = pids["2_workers"]
    methods = {
        "serial": lambda: serial_loop(context, x, fast=False),
        "serial_fast": lambda: serial_loop(context, x, fast=True),
        "in_process": lambda: bridges["in_process"].energy_and_forces(x),
        "1_worker": lambda: bridges["1_worker"].energy_and_forces(x),
        "2_workers": lambda: bridges["2_workers"].energy_and_forces(x),
        "2_workers_torch": autograd,
    }
    times, cpu = {key: [] for key in methods}, dict.fromkeys(methods, 0.0)
    for _ in range(repeats):
        for key, run in methods.items():
            cpu_start, start = cpu_seconds(pids.get(key, [])), time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
            cpu[key] += cpu_seconds(pids.get(key, [])) - cpu_start
    for energy in bridges.values():
        energy.close()
    best = {key: min(t) for key, t in times.items()}
    cpu_us = {key: 1e6 * c / (repeats * batch) for key, c in cpu.items()}
    base = best["serial_fast"]
    return {
        "batch": batch,
        "configs_per_s": {key: batch / t for key, t in best.items()},
        "us_per_config": {key: 1e6 * t / batch for key, t in best.items()},
        "cpu_us_per_config": cpu_us,
        "times_s": times,
        "worker_startup_s": startup,
        "ratios": {
            "cpu_overhead_in_process_vs_serial_fast": cpu_us["in_process"] / cpu_us["serial_fast"] - 1.0,
            "cpu_overhead_1_worker_vs_serial_fast": cpu_us["1_worker"] / cpu_us["serial_fast"] - 1.0,
            "cpu_overhead_2_workers_vs_serial_fast": cpu_us["2_workers"] / cpu_us["serial_fast"] - 1.0,
            "overhead_in_process_vs_serial_fast": best["in_process"] / base - 1.0,
            "overhead_1_worker_vs_serial_fast": best["1_worker"] / base - 1.0,
            "speedup_2_workers_vs_serial_fast": base / best["2_workers"],
            "speedup_2_workers_vs_serial": best["serial"] / best["2_workers"],
            "speedup_in_process_vs_serial": best["serial"] / best["in_process"],
            "speedup_2_workers_torch_vs_serial_fast": base / best["2_workers_torch"],
        },
    }


def print_table(title: str, results: dict, key: str, cell: str, ratios: list[tuple[str, int, str, str]]) -> None:
    """One table: a row per system, a column per method (``results[system][key]``, formatted by
    ``cell``), then the ``ratios`` (label, label width, key in ``ratios``, format)."""
    print(title)
    print(f"{'system':<15}{'batch':>6}" + "".join(f"{c:>17}" for c in COLUMNS)
          + "".join(f"{label:>{width}}" for label, width, _, _ in ratios))
    for name, r in results.items():
        print(f"{name:<15}{r['batch']:>6}" + "".join(cell.format(r[key][c]) for c in COLUMNS)
              + "".join(fmt.format(r["ratios"][ratio]) for _, _, ratio, fmt in ratios))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "energy_throughput.json")
    parser.add_argument("--systems", nargs="+", default=list(BATCH), choices=list(BATCH))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the batch sizes")
    parser.add_argument("--platform", default="Reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results = {}
    for name in args.systems:
        results[name] = benchmark(name, max(2, int(BATCH[name] * args.scale)), args.repeats, args.platform, args.seed)
    print_table(f"\nconfigurations/s ({args.platform} platform, best of {args.repeats}; {os.cpu_count()} cores)",
                results, "configs_per_s", "{:>17,.0f}",
                [("1w overhead", 13, "overhead_1_worker_vs_serial_fast", "{:>12.1%}"),
                 ("2w speedup", 12, "speedup_2_workers_vs_serial_fast", "{:>11.2f}x")])
    print_table(f"\nCPU µs per configuration (this process + its workers, over all {args.repeats} repeats)",
                results, "cpu_us_per_config", "{:>17.1f}",
                [("1w overhead", 13, "cpu_overhead_1_worker_vs_serial_fast", "{:>12.1%}"),
                 ("2w overhead", 12, "cpu_overhead_2_workers_vs_serial_fast", "{:>12.1%}")])
    print("targets: 1-worker overhead <= 20% over serial_fast; 2-worker speedup >= 1.7x serial_fast (2 free cores)")
    record = {
        "settings": vars(args) | {"out": str(args.out)},
        "machine": machine(),
        "targets": {"max_1_worker_overhead": 0.20, "min_2_worker_speedup": 1.7},
        "results": results,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
