"""Throughput of the batched torch energy against the OpenMM bridge (configurations/s), energies +
forces and energies only.

For aldp-implicit (CustomGBForce OBC1), aldp-obc (GBSAOBCForce) and aldp-vacuum, measured in the
same run on the same perturbed reference structures (0.01 nm Gaussian noise):

- ``openmm_1w`` / ``openmm_2w``: ``OpenMMEnergy(target, "Reference", n_workers=k).energy_and_forces``
  (1 worker: the Context in-process, the bridge's default and fastest single-core setting);
  its cost per configuration does not depend on the batch, so it runs on ``--openmm-batch``
  configurations (a 16k batch of aldp-implicit would make every repeat long);
- ``torch_eager`` / ``torch_compiled``: ``TorchEnergy(target, compile=False / True)
  .energy_and_forces`` at each of ``--batches`` (1k, 4k, 16k), float64, CPU, torch's
  intra-op threads (``--threads``, default: all cores). Compilation time is reported apart.

Both are measured twice: energies + forces (``energy_and_forces``; the keys ``configs_per_s``,
``speedup_vs_*`` of the record) and energies only (``energies_only``: ``energy(x)`` on a tensor
without grad, what CMT training calls under ``torch.no_grad``, against the bridge's
energies-only ``bridge(x)``). Speed-ups are given over the 1-worker, the 2-worker and the best
bridge.

Each method runs ``--repeats`` times, interleaved; the best wall time is kept (the machine is
shared: slower repeats measure other people's work) and the CPU time of this process and its
workers is reported too. Memory per configuration: the rise of this process's peak resident
memory during the largest torch call, divided by its batch (outputs included).
Targets: torch >= 100x the bridge for aldp-implicit, >= 5x for aldp-obc, at 1k-16k.
Usage, from the repository root:
``python -m benchmarks.torch_energy_throughput [--quick] [--out PATH] [--no-compile]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_seconds, machine, write_record
from cmt_openmm.energy import OpenMMEnergy
from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.systems import get_target

SYSTEMS = ["aldp-implicit", "aldp-obc", "aldp-vacuum"]
TARGETS = {"aldp-implicit": 100.0, "aldp-obc": 5.0}


def peak_rss_bytes(reset: bool = False) -> int:
    """Peak resident memory of this process (VmHWM; reset through /proc/self/clear_refs)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(run, pids: list[int]) -> tuple[float, float]:
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    run()
    return time.perf_counter() - t0, cpu_seconds(pids) - cpu0


def benchmark(name: str, batches: list[int], openmm_batch: int, repeats: int, compiled: bool, seed: int) -> dict:
    target = get_target(name)
    rng = np.random.default_rng(seed)
    x = target.positions + 0.01 * rng.standard_normal((max(batches + [openmm_batch]), target.n_atoms, 3))
    result: dict = {"n_atoms": target.n_atoms, "batches": batches, "openmm_batch": openmm_batch}

    start = time.perf_counter()
    eager = TorchEnergy(target, compile=False)
    result["torch_construction_and_verification_s"] = time.perf_counter() - start
    result["verification"] = {k: v for k, v in eager.verification.items() if k != "per_force"}
    torch_energies = {"torch_eager": eager}
    if compiled:
        energy = TorchEnergy(target, compile=True, verify=False)
        start = time.perf_counter()
        energy.energy_and_forces(x[:2])  # compiles (or loads torch's on-disk cache)
        result["torch_compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        _no_grad(energy, torch.as_tensor(x[:2]))  # the energies-only function, compiled apart
        result["torch_compile_energies_only_s"] = time.perf_counter() - start
        torch_energies["torch_compiled"] = energy if energy.compile else None
        if not energy.compile:
            del torch_energies["torch_compiled"]

    bridges = {
        "openmm_1w": OpenMMEnergy(target, "Reference", n_workers=1),
        "openmm_2w": OpenMMEnergy(target, "Reference", n_workers=2),
    }
    for bridge in bridges.values():
        bridge.energy_and_forces(x[:2])  # start the workers
    # check once that both agree on the benchmark structures
    u_t, f_t = eager.energy_and_forces(x[:16])
    u_o, f_o = bridges["openmm_1w"].energy_and_forces(x[:16])
    result["agreement"] = {
        "max_abs_energy_diff_kT": float(np.abs(u_t - u_o).max()),
        "max_abs_force_diff_kT_per_nm": float(np.abs(f_t - f_o).max()),
    }

    x_t = torch.as_tensor(x)
    for energy in torch_energies.values():  # warm-up: first-call allocations, thread pool
        energy.energy_and_forces(x[: min(batches)])
        with torch.no_grad():
            energy(x_t[: min(batches)])
    calls = {  # mode -> method -> (configurations, call)
        "energies_and_forces": {
            **{key: (openmm_batch, partial(b.energy_and_forces, x[:openmm_batch])) for key, b in bridges.items()},
            **{
                f"{key}@{n}": (n, partial(e.energy_and_forces, x[:n]))
                for key, e in torch_energies.items()
                for n in batches
            },
        },
        "energies_only": {
            **{key: (openmm_batch, partial(b, x_t[:openmm_batch])) for key, b in bridges.items()},
            **{f"{key}@{n}": (n, partial(_no_grad, e, x_t[:n])) for key, e in torch_energies.items() for n in batches},
        },
    }
    measured = {mode: _measure(methods, bridges, repeats) for mode, methods in calls.items()}
    memory = {}
    for key, energy in torch_energies.items():
        batch = max(batches)
        before = peak_rss_bytes(reset=True)
        energy.energy_and_forces(x[:batch])
        memory[key] = max(0, peak_rss_bytes() - before) / batch
    for bridge in bridges.values():
        bridge.close()
    result.update(measured["energies_and_forces"])
    result["energies_only"] = measured["energies_only"]
    result["peak_memory_bytes_per_config"] = memory
    return result


def _no_grad(energy, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return energy(x)


def _measure(methods: dict, bridges: dict, repeats: int) -> dict:
    """Best wall time of ``repeats`` interleaved runs of each method, CPU µs per configuration and
    speed-ups over the 1-worker, the 2-worker and the best bridge."""
    times: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    for _ in range(repeats):
        for key, (_, run) in methods.items():
            pids = bridges[key].worker_pids if key in bridges else []
            wall, c = timed(run, pids)
            times.setdefault(key, []).append(wall)
            cpu[key] = cpu.get(key, 0.0) + c
    rates = {key: methods[key][0] / min(t) for key, t in times.items()}
    cpu = {key: 1e6 * c / (repeats * methods[key][0]) for key, c in cpu.items()}
    best_openmm = max(rates["openmm_1w"], rates["openmm_2w"])
    torch_rates = {k: v for k, v in rates.items() if k.startswith("torch")}
    return {
        "configs_per_s": rates,
        "cpu_us_per_config": cpu,
        "times_s": times,
        "speedup_vs_openmm_1w": {k: v / rates["openmm_1w"] for k, v in torch_rates.items()},
        "speedup_vs_openmm_2w": {k: v / rates["openmm_2w"] for k, v in torch_rates.items()},
        "speedup_vs_best_openmm": {k: v / best_openmm for k, v in torch_rates.items()},
    }


def print_table(results: dict, repeats: int) -> None:
    for mode, title in (("energies_and_forces", "energies + forces"), ("energies_only", "energies only (no_grad)")):
        print(
            f"\n{title}, configurations/s (float64, best of {repeats}; {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads); speed-ups over the OpenMM bridge"
        )
        columns = ["system", "method", "batch", "configs/s", "CPU µs/config"]
        columns += ["x OpenMM 1w", "x OpenMM 2w", "MB/1k cfg"]
        widths = [15, 16, 7, 13, 15, 13, 13, 11]
        print("".join(f"{c:<{w}}" if k < 2 else f"{c:>{w}}" for k, (c, w) in enumerate(zip(columns, widths))))
        for name, r in results.items():
            m = r if mode == "energies_and_forces" else r[mode]
            rows = [
                (key, r["openmm_batch"], m["configs_per_s"][key], m["cpu_us_per_config"][key], "", "", "")
                for key in ("openmm_1w", "openmm_2w")
            ]
            for key, rate in m["configs_per_s"].items():
                if key.startswith("torch"):
                    method, batch = key.split("@")
                    mem = r["peak_memory_bytes_per_config"].get(method) if int(batch) == max(r["batches"]) else None
                    if mode != "energies_and_forces":
                        mem = None
                    rows.append(
                        (
                            method,
                            batch,
                            rate,
                            m["cpu_us_per_config"][key],
                            f"{m['speedup_vs_openmm_1w'][key]:.1f}x",
                            f"{m['speedup_vs_openmm_2w'][key]:.1f}x",
                            "" if mem is None else f"{mem * 1000 / 2**20:.1f}",
                        )
                    )
            for method, batch, rate, cpu, x1, x2, mem in rows:
                print(f"{name:<15}{method:<16}{batch:>7}{rate:>13,.0f}{cpu:>15.1f}{x1:>13}{x2:>13}{mem:>11}")
    for name, r in results.items():
        v = r["verification"]
        compile_text = f"compile time {r['torch_compile_s']:.1f} s; " if "torch_compile_s" in r else ""
        print(
            f"{name:<15}{compile_text}verification: max relative energy/force error "
            f"{v['max_relative_energy_error']:.1e}/{v['max_relative_force_error']:.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "torch_energy_throughput.json")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument(
        "--openmm-batch",
        type=int,
        default=None,
        help="configurations per bridge call (default 2000; 300 for aldp-implicit)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled torch energy")
    parser.add_argument(
        "--quick", action="store_true", help="smoke size: batches 64/256, 1 repeat, no compilation (a few seconds)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.no_compile = [64, 256], 1, True
        args.openmm_batch = args.openmm_batch or 32
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for name in args.systems:
        openmm_batch = args.openmm_batch or (300 if name == "aldp-implicit" else 2000)
        results[name] = benchmark(name, args.batches, openmm_batch, args.repeats, not args.no_compile, args.seed)

    print_table(results, args.repeats)
    print("targets: torch >= 100x the 2-worker bridge for aldp-implicit, >= 5x for aldp-obc (batches 1k-16k, 2 cores)")
    record = {
        "settings": vars(args) | {"out": str(args.out)},
        "machine": machine(torch_threads=torch.get_num_threads(), torch=torch.__version__),
        "targets_speedup_vs_openmm": TARGETS,
        "results": results,
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
