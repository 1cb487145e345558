"""Throughput of the spline flow: training and sampling, the current implementation vs the one it replaced.

The baseline is the implementation as of commit c661161 (``rq_spline``, ``SplineCoupling``,
``CouplingFlow.forward``/``inverse`` and ``SplineFlow.rsample``/``sample``/``log_prob``), kept
verbatim in ``tests/flows/reference_flow.py`` as the tests' oracle and imported from there
(``BaselineSplineFlow``): it is built from a current :class:`~cmt_openmm.flows.SplineFlow` with
the same weights and buffers (its state_dict), sharing its ``CoordinateScaling`` and ``Prior``.
``tests/flows/test_flows.py`` checks that both give the same log q and samples.

The new flow runs its splines in the compiled loop of ``cmt_openmm/flows/spline_kernel.py`` where a
C++ compiler exists (``CMT_OPENMM_SPLINE_KERNEL=0``: its torch operations instead).

Flow: the preset size (6 layers, hidden 64, depth 2, 8 bins, float32) on aldp-vacuum's 60
internal coordinates, weights perturbed by N(0, 0.05^2) so the splines are not the identity.
Measured at each of ``--batches`` (256, 1,024, 4,096) and ``--threads`` (1, 2):

- ``train``: ``-flow.log_prob(z).mean()``, ``backward()`` and a step of ``torch.optim.Adam`` with its
  defaults (as ``cmt_openmm/training/loop.py``) on a batch of z
  (z sampled once from the flow), per sample;
- ``sample``: ``flow.sample(B)`` (prior sample, coupling layers, log q), per sample.

The implementations alternate (``--rounds`` times, about ``--seconds`` of calls each per
measurement) and every call is timed: the best call is the headline (the machine is shared;
slower calls measure other people's work), with the median call and this process's median CPU
time (all threads) beside it, and the load average before and after. Targets: >= 3x
training and >= 2x sampling throughput at every batch size and thread count. ``--compile`` also
tries ``torch.compile`` of the new flow's ``log_prob`` with a backward pass, in a subprocess (a
crash there ends only the subprocess; it is never the default path). Measured figures:
``benchmarks/RESULTS.md``. Usage, from the repository root:
``python -m benchmarks.flow_throughput [--quick] [--out PATH] [--compile] [--plain-adam]``
(both implementations step ``Adam(fused=True)``, as ``training/loop.py`` does; ``--plain-adam``:
torch's default Adam for both).
"""
from __future__ import annotations

import argparse
import json
import os
import platform as host
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from tests.flows.reference_flow import build_flows

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"train": 3.0, "sample": 2.0}


def _timed(fn, calls: int) -> tuple[list[float], float]:
    """Wall seconds of each of ``calls`` calls, and CPU seconds (this process, all threads) per call."""
    walls, cpu = [], time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return walls, (time.process_time() - cpu) / calls


def measure(flows: dict[str, nn.Module], z: Tensor, batch: int, rounds: int, seconds: float,
            fused_adam: bool = False) -> dict:
    """Per-sample microseconds of train and sample, per implementation: the best call (the cost
    without interference from other work on the machine), the median call, and the median CPU time
    (this process, all threads). The implementations alternate, ``rounds`` times, each round timing
    about ``seconds / rounds`` of calls of each."""
    zb = z[:batch].clone()
    optimizers = {name: torch.optim.Adam(flow.parameters(), lr=1e-5, fused=fused_adam or None)
                  for name, flow in flows.items()}
    generators = {name: torch.Generator().manual_seed(1) for name in flows}

    def train(name):
        flow, optimizer = flows[name], optimizers[name]

        def step():
            optimizer.zero_grad(set_to_none=True)
            (-flow.log_prob(zb).mean()).backward()
            optimizer.step()
        return step

    def sample(name):
        flow, generator = flows[name], generators[name]
        return lambda: flow.sample(batch, generator)

    results: dict = {}
    for task, make in (("train", train), ("sample", sample)):
        calls = {name: make(name) for name in flows}
        per_round = {}
        for name, fn in calls.items():  # warm-up; calls per round from the time of one call
            fn()
            per_call = _timed(fn, 1)[0][0]
            per_round[name] = max(1, round(seconds / rounds / max(per_call, 1e-6)))
        walls = {name: [] for name in flows}
        cpus = {name: [] for name in flows}
        for _ in range(rounds):
            for name, fn in calls.items():
                wall, cpu = _timed(fn, per_round[name])
                walls[name] += [w / batch * 1e6 for w in wall]
                cpus[name].append(cpu / batch * 1e6)
        r = results[task] = {
            name: {"us_per_sample_best": min(walls[name]), "us_per_sample_median": statistics.median(walls[name]),
                   "cpu_us_per_sample_median": statistics.median(cpus[name]), "calls": len(walls[name])}
            for name in flows
        }
        r["speedup_best"] = r["baseline"]["us_per_sample_best"] / r["new"]["us_per_sample_best"]
        r["speedup_median"] = r["baseline"]["us_per_sample_median"] / r["new"]["us_per_sample_median"]
        r["speedup_cpu"] = r["baseline"]["cpu_us_per_sample_median"] / r["new"]["cpu_us_per_sample_median"]
    return results


def agreement(flow: nn.Module, baseline: nn.Module, n: int = 512) -> dict:
    """Largest |difference| new vs baseline: log q of the same z, and samples (z, log q) from the same seed."""
    z, log_q = flow.sample(n, torch.Generator().manual_seed(3))
    z_old, log_q_old = baseline.sample(n, torch.Generator().manual_seed(3))
    with torch.no_grad():
        lp, lp_old = flow.log_prob(z), baseline.log_prob(z)
    return {"log_prob_max_abs_diff": float((lp - lp_old).abs().max()),
            "sample_log_q_max_abs_diff": float((log_q - log_q_old).abs().max()),
            "sample_z_max_abs_diff": float((z - z_old).abs().max())}


_COMPILE_SCRIPT = r"""
import time, torch
from tests.flows.reference_flow import build_flows
torch.set_num_threads({threads})
flow, _, _ = build_flows()
z, _ = flow.sample({batch}, torch.Generator().manual_seed(0))
compiled = torch.compile(flow.log_prob)
opt = torch.optim.Adam(flow.parameters(), lr=1e-5)
def step(fn):
    opt.zero_grad(set_to_none=True); (-fn(z).mean()).backward(); opt.step()
t0 = time.perf_counter(); step(compiled); first = time.perf_counter() - t0
best = {{}}
for name, fn in (("eager", flow.log_prob), ("compiled", compiled)):
    step(fn); ts = []
    for _ in range({repeats}):
        t0 = time.perf_counter(); step(fn); ts.append(time.perf_counter() - t0)
    best[name] = min(ts) / {batch} * 1e6
print("RESULT", first, best["eager"], best["compiled"])
"""


def try_compile(threads: int, batch: int, repeats: int, timeout: float = 600.0) -> dict:
    """torch.compile(flow.log_prob) + backward + Adam, in a subprocess (a crash only ends that),
    run in the repository root (``python -c`` puts it on the path)."""
    script = _COMPILE_SCRIPT.format(threads=threads, batch=batch, repeats=repeats)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        if proc.returncode < 0:
            error = f"killed by signal {-proc.returncode}" + (" (segmentation fault)" if proc.returncode == -11 else "")
        else:
            found = [line for line in proc.stderr.splitlines() if "Error" in line]
            error = (found or proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "returncode": proc.returncode, "error": error}
    first, eager, compiled = map(float, lines[-1].split()[1:])
    return {"ok": True, "threads": threads, "batch": batch, "compile_and_first_step_s": first,
            "train_us_per_sample_eager": eager, "train_us_per_sample_compiled": compiled}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the implementations per measurement")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="about this long per implementation and measurement (at least one call per round)")
    parser.add_argument("--quick", action="store_true", help="batch 256, 1 thread, 2 short rounds (a few seconds)")
    parser.add_argument("--compile", action="store_true",
                        help="also try torch.compile(flow.log_prob) + backward, in a subprocess")
    parser.add_argument("--plain-adam", dest="fused_adam", action="store_false",
                        help="torch's default Adam for both implementations (training/loop.py uses fused=True)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.threads, args.rounds, args.seconds = [256], [1], 2, 0.1
    threads_before = torch.get_num_threads()
    load_before = os.getloadavg()

    flow, baseline, _ = build_flows()
    flows = {"baseline": baseline, "new": flow}
    z, _ = flow.sample(max(args.batches), torch.Generator().manual_seed(0))
    check = agreement(flow, baseline)
    rows = []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                rows.append({"threads": threads, "batch": batch,
                             **measure(flows, z, batch, args.rounds, args.seconds, args.fused_adam)})
    finally:
        torch.set_num_threads(threads_before)
    worst = {task: min(row[task]["speedup_best"] for row in rows) for task in TARGETS}
    report = {
        "system": "aldp-vacuum",
        "flow": {"n_layers": 6, "hidden": 64, "depth": 2, "n_bins": 8, "dtype": "float32", "dim": flow.dim,
                 "circular": int(flow.scaling.circular.sum()), "perturbation": 0.05},
        "torch": torch.__version__, "python": host.python_version(), "cpu": host.processor() or host.machine(),
        "cores": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "rounds": args.rounds, "seconds": args.seconds, "fused_adam": args.fused_adam, "agreement": check,
        "targets": TARGETS, "worst_speedup": worst,
        "meets_targets": all(worst[task] >= TARGETS[task] for task in TARGETS), "results": rows,
    }
    if args.compile:
        report["compile"] = try_compile(threads=1, batch=1024, repeats=3)

    print(f"log q, new vs baseline (same weights): max |diff| {check['log_prob_max_abs_diff']:.1e} (log_prob), "
          f"{check['sample_log_q_max_abs_diff']:.1e} (sample); samples {check['sample_z_max_abs_diff']:.1e}")
    print("microseconds per sample: best call (median call); x = baseline / new, best calls")
    header = (f"{'threads':>7} {'batch':>5} | {'train old':>15} {'train new':>15} {'x':>5} | "
              f"{'sample old':>15} {'sample new':>15} {'x':>5}")
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for task in ("train", "sample"):
            r = row[task]
            cells += [f"{r[name]['us_per_sample_best']:6.1f} ({r[name]['us_per_sample_median']:6.1f})"
                      for name in ("baseline", "new")]
            cells.append(f"{r['speedup_best']:5.2f}")
        print(f"{row['threads']:>7} {row['batch']:>5} | {cells[0]:>15} {cells[1]:>15} {cells[2]:>5} | "
              f"{cells[3]:>15} {cells[4]:>15} {cells[5]:>5}")
    print("worst speed-up: " + ", ".join(f"{t} {worst[t]:.2f}x (target {TARGETS[t]:.0f}x)" for t in TARGETS)
          + f"; load average {load_before[0]:.1f} -> {report['load_average_after'][0]:.1f} on {os.cpu_count()} cores")
    if "compile" in report:
        print("torch.compile (subprocess):", json.dumps(report["compile"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
