"""Peak memory of ``cmt-openmm sample`` and ``evaluate`` at two ensemble sizes: does it stay bounded?

Issue 25: 1e7 alanine-dipeptide samples are 5.3 GB of float64 positions, which ``sample`` used to
hold whole. Now positions are written as they are drawn and only ~33 bytes a sample stay in
memory (``sample``), and ``evaluate`` keeps the log-weights and angles of its draws (33 bytes a
sample) with its estimates computed a block of samples at a time, so the peak resident memory at
1e7 samples should be within 1.5x of that at 1e5 (the process's own ~1.2 GB: torch, OpenMM, the energy). Each command runs in a fresh process on a
tiny trained ALDP run (2 CMT steps, trained here unless ``--run-dir`` names one); its peak RSS is
the largest resident set of the command or any process it started (``ru_maxrss`` of a wrapper
that runs only it), and the process tree's summed RSS is polled every 0.2 s as well.
``evaluate`` draws ``--draws 1`` of N samples and writes the report's plots.

Usage, from the repository root:
``python -m benchmarks.sample_memory [--sizes 100000 10000000] [--commands sample evaluate] [--out PATH]``;
prints a table and JSON with the ratio of the peaks (largest size over smallest) for each command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import machine, write_record

ROOT = Path(__file__).resolve().parents[1]
RUN = {"system": "aldp-vacuum", "temperature": 300, "method": "cmt", "seed": 0, "max_steps": 2,
       "flow": {"n_layers": 2, "hidden": 16, "n_bins": 4},
       "cmt": {"n_samples": 256, "fit_steps": 4, "batch_size": 64, "eps_tr": 0.5, "eps_ent": 1.0},
       "report": {"n_samples": 200, "n_draws": 2}}
"""The tiny run sampled: its network size matters little, the energies and files dominate."""

WRAPPER = ("import resource, subprocess, sys\n"
           "rc = subprocess.run(sys.argv[1:]).returncode\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
           "sys.exit(rc)\n")
"""Runs one command; its ru_maxrss (kB) is then the largest RSS of that command's processes alone."""


def tree_rss_kb(pid: int) -> int:
    """Summed VmRSS (kB) of ``pid`` and its descendants (Linux /proc; 0 for a process gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as status:
                total += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total


def measure(command: list[str]) -> dict:
    """Run ``command`` under the wrapper: wall time (s), peak RSS of its largest process and of its tree (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *command], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    tree = 0
    while proc.poll() is None:
        tree = max(tree, tree_rss_kb(proc.pid))
        time.sleep(0.2)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(int(err.split()[-1]) / 1024, 1),
            "peak_tree_rss_mb": round(tree / 1024, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 10_000_000])
    parser.add_argument("--commands", nargs="+", default=["sample", "evaluate"], choices=["sample", "evaluate"])
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--run-dir", help="a trained run to sample (default: train a tiny ALDP run here)")
    parser.add_argument("--work", help="folder for the run and the samples (default: a temporary one, removed)")
    parser.add_argument("--out", default="benchmarks/results/sample_memory.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        run_dir = Path(args.run_dir) if args.run_dir else work / "run"
        cli = [sys.executable, "-m", "cmt_openmm"]
        if not args.run_dir:
            (work / "run.yaml").write_text(yaml.safe_dump(RUN))
            subprocess.run([*cli, "train", str(work / "run.yaml"), "--out", str(run_dir), "--quiet"], cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = []
        for command in args.commands:
            for n in sorted(args.sizes):
                if command == "sample":
                    argv_ = [*cli, "sample", str(run_dir), "--n", str(n), "--out", str(work / "s.npz"),
                             "--batch-size", str(args.batch_size), "--quiet"]
                else:
                    argv_ = [*cli, "evaluate", str(run_dir), "--n", str(n), "--draws", "1", "--quiet"]
                row = {"command": command, "n": n, **measure(argv_)}
                if command == "sample":
                    row["npz_gb"] = round((work / "s.npz").stat().st_size / 1e9, 2)
                    (work / "s.npz").unlink()
                rows.append(row)
                print(f"{command:9s} n={n:>11,}  peak RSS {row['peak_rss_mb']:8.1f} MB  tree {row['peak_tree_rss_mb']:8.1f} MB"
                      f"  {row['wall_s']:7.1f} s", flush=True)
    ratios = {}
    for command in args.commands:
        mine = [r for r in rows if r["command"] == command]
        ratios[command] = round(mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"], 3)
    print("\n| command | samples | peak RSS (MB) | tree RSS (MB) | wall (s) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['command']} | {r['n']:,} | {r['peak_rss_mb']:.0f} | {r['peak_tree_rss_mb']:.0f} | {r['wall_s']:.0f} |")
    record = {"benchmark": "sample_memory", "rows": rows, "ratio_largest_over_smallest": ratios,
              "goal": "ratio <= 1.5", "batch_size": args.batch_size, "machine": machine()}
    print(json.dumps({"ratio_largest_over_smallest": ratios, "goal": "ratio <= 1.5"}))
    write_record(Path(args.out), record)
    return record


if __name__ == "__main__":
    main()
