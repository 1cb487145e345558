"""The fault table of issue 25: what a cluster does to a training run, done to a tiny one.

Each fault is injected into ``cmt-openmm train`` of the toy double well (CMT, 8 steps, OpenMM
energies from 2 bridge workers, steps slowed by 0.3-1 s so that faults land mid-run), in a
subprocess as a user would run it:

- ``worker killed``: SIGKILL to a bridge worker by pid while training (as the OOM killer would);
- ``SIGTERM``: a scheduler's pre-emption, then the command the run prints to continue it;
- ``second writer``: a second ``train --resume`` into the directory while the first trains;
- ``NaN (learning rate)``: a learning rate of 1e30 set during the 4th step, which makes the
  weights non-finite (the step is to be rolled back and taken again at a smaller rate);
- ``disk full`` / ``read-only folder``: ENOSPC / EROFS faked on the checkpoint of step 3 (as a
  full disk or a folder remounted read-only gives it), then the command the error names.

For each: ``survived`` (the run ended as designed: finished, or stopped with one sentence and a
command that continues it, which then finished), ``work lost`` (complete steps recorded that
had to be trained again), ``files intact`` (checkpoint loads with finite weights, metrics.jsonl
holds steps 1..k once each, no generator with non-finite weights) and what was said. Usage, from
the repository root: ``python -m benchmarks.faults [--out PATH]``; prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import machine, write_record

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
RUN = {"system": "toy-double-well", "method": "cmt", "seed": 3, "max_steps": MAX_STEPS,
       "flow": {"n_layers": 2, "hidden": 16}, "energy": {"backend": "openmm", "n_workers": 2},
       "cmt": {"n_samples": 200, "batch_size": 100, "lr": 5e-3, "fit_steps": 2, "steps_after_target": MAX_STEPS},
       "report": {"n_samples": 200, "n_draws": 1}}

SLOW_STEPS = ("import sys, time\n"
              "from cmt_openmm.training.cmt import CMTTrainer\n"
              "step = CMTTrainer.step\n"
              "CMTTrainer.step = lambda self: (step(self), time.sleep({seconds}))[0]\n")
"""Python run before the command line: each CMT step ``seconds`` longer, its numbers unchanged."""

NAN_IN_STEP_4 = ("from cmt_openmm.training.cmt import CMTTrainer\n"
                 "taken, slow = [], CMTTrainer.step\n"
                 "def broken(self):\n"
                 "    taken.append(1)\n"
                 "    if len(taken) == 4:  # the 4th step taken, once: weights, then loss, not finite\n"
                 "        for group in self.optimizer.param_groups:\n"
                 "            group['lr'] = 1e30\n"
                 "    return slow(self)\n"
                 "CMTTrainer.step = broken\n")
"""Python that sets the learning rate to 1e30 for the 4th step taken (a transient NaN)."""

WRITE_FAILS = ("import errno, os\n"
               "from cmt_openmm import files\n"
               "replace, calls = os.replace, []\n"
               "def failing(source, target):\n"
               "    if str(target).endswith('checkpoint.pt'):\n"
               "        calls.append(1)\n"
               "        if len(calls) == 3:\n"
               "            raise OSError({errno}, os.strerror({errno}), str(source))\n"
               "    return replace(source, target)\n"
               "files.os.replace = failing\n")
"""Python that makes the third checkpoint write fail with ``errno`` (ENOSPC, EROFS)."""


def _command_line(prefix: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-c", prefix + f"from cmt_openmm.cli.main import main\nsys.exit(main({argv!r}))\n"]


def _start(prefix: str, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(_command_line(prefix, argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _run(prefix: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_command_line(prefix, argv), cwd=ROOT, capture_output=True, text=True, timeout=600)


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _wait_for_steps(out: Path, k: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_steps(out)) < k:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"training ended or stalled before step {k}: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """Descendant processes of ``pid`` (Linux /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        out += kids
        todo += kids
    return out


def _bridge_workers(pid: int) -> list[int]:
    """The OpenMM bridge's worker processes under ``pid`` (spawned; not multiprocessing's resource tracker)."""
    workers = []
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            workers.append(child)
    return workers


def files_intact(out: Path) -> tuple[bool, str]:
    """Checkpoint loads with finite tensors, metrics.jsonl holds steps 1..k once each, and a
    generator, where there is one, has finite weights."""
    import torch
    from safetensors.torch import load_file

    steps = _steps(out)
    if steps != list(range(1, len(steps) + 1)):
        return False, f"metrics.jsonl steps {steps}"
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)

    def finite(obj) -> bool:
        if isinstance(obj, torch.Tensor):
            return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
        if isinstance(obj, dict):
            return all(finite(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return all(finite(v) for v in obj)
        return True

    if not finite(checkpoint):
        return False, "non-finite tensor in checkpoint.pt"
    generator = out / "generator.safetensors"
    if generator.is_file() and not all(bool(torch.isfinite(t).all()) for t in load_file(generator).values()
                                       if t.is_floating_point()):
        return False, "non-finite generator.safetensors"
    return True, f"{len(steps)} steps recorded"


def _continue(err: str, marker: str) -> subprocess.CompletedProcess:
    """Run the `cmt-openmm train ...` command the stderr names after ``marker``, as its user would."""
    line = next(line for line in reversed(err.splitlines()) if marker in line)
    argv = shlex.split(line.split(marker, 1)[1].strip())
    assert argv[:2] == ["cmt-openmm", "train"], argv
    return _run("import sys\n", argv[1:])


def worker_killed(run_file: Path, out: Path) -> dict:
    process = _start(SLOW_STEPS.format(seconds=0.3), ["train", str(run_file), "--out", str(out), "--quiet"])
    _wait_for_steps(out, 2, process)
    workers = _bridge_workers(process.pid)
    if workers:
        os.kill(workers[0], signal.SIGKILL)
    _, err = process.communicate(timeout=600)
    restarts = max((r.get("energy_restarts", 0) for r in _records(out)), default=0)
    survived = bool(workers) and process.returncode == 0 and _steps(out)[-1:] == [MAX_STEPS] and restarts >= 1
    return {"survived": survived, "work_lost_steps": 0 if survived else None,
            "said": f"{len(workers)} workers found; exit {process.returncode}; energy_restarts {restarts}"}


def sigterm(run_file: Path, out: Path) -> dict:
    process = _start(SLOW_STEPS.format(seconds=0.3), ["train", str(run_file), "--out", str(out), "--quiet"])
    _wait_for_steps(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    lost = len(_steps(out)) - _checkpoint_step(out)
    resumed = _continue(err, "continue with:")
    survived = process.returncode == 143 and resumed.returncode == 0 and _steps(out)[-1:] == [MAX_STEPS]
    return {"survived": survived, "work_lost_steps": lost, "said": err.strip().splitlines()[-1]}


def _checkpoint_step(out: Path) -> int:
    """The step the run's checkpoint holds (where a resume continues from)."""
    import torch

    return int(torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["step"])


def second_writer(run_file: Path, out: Path) -> dict:
    process = _start(SLOW_STEPS.format(seconds=1.0), ["train", str(run_file), "--out", str(out), "--quiet"])
    _wait_for_steps(out, 1, process)  # 7 slow steps left: the second writer starts well before the end
    second = _run("import sys\n", ["train", str(run_file), "--out", str(out), "--resume", "--quiet"])
    process.communicate(timeout=600)
    survived = second.returncode == 2 and process.returncode == 0 and _steps(out)[-1:] == [MAX_STEPS]
    said = (second.stderr.strip().splitlines() or ["(nothing)"])[-1]
    return {"survived": survived, "work_lost_steps": 0, "said": f"exit {second.returncode}: {said}"}


def nan_learning_rate(run_file: Path, out: Path) -> dict:
    result = _run(SLOW_STEPS.format(seconds=0.0) + NAN_IN_STEP_4, ["train", str(run_file), "--out", str(out), "--quiet"])
    rolled = [(r["step"], r.get("rollbacks"), r.get("lr")) for r in _records(out) if r.get("rollbacks")]
    survived = result.returncode == 0 and _steps(out)[-1:] == [MAX_STEPS] and bool(rolled)
    return {"survived": survived, "work_lost_steps": 0 if survived else None,
            "said": f"exit {result.returncode}; (step, rollbacks, lr) recorded: {rolled}"}


def write_error(errno_name: str):
    def fault(run_file: Path, out: Path) -> dict:
        import errno

        prefix = SLOW_STEPS.format(seconds=0.3) + WRITE_FAILS.format(errno=getattr(errno, errno_name))
        result = _run(prefix, ["train", str(run_file), "--out", str(out), "--quiet"])
        lost = len(_steps(out)) - _checkpoint_step(out)
        resumed = _continue(result.stderr, "continue the run with:")
        survived = result.returncode == 2 and resumed.returncode == 0 and _steps(out)[-1:] == [MAX_STEPS]
        return {"survived": survived, "work_lost_steps": lost, "said": result.stderr.strip().splitlines()[-1]}
    return fault


FAULTS = {
    "worker killed (SIGKILL by pid)": worker_killed,
    "SIGTERM, then the printed command": sigterm,
    "second writer (train --resume)": second_writer,
    "NaN (learning rate 1e30 in step 4)": nan_learning_rate,
    "disk full (ENOSPC on checkpoint)": write_error("ENOSPC"),
    "read-only folder (EROFS on checkpoint)": write_error("EROFS"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/faults.json")
    parser.add_argument("--only", nargs="+", choices=list(FAULTS), help="run these faults alone")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        run_file = work / "run.yaml"
        run_file.write_text(yaml.safe_dump(RUN))
        for k, (name, fault) in enumerate(FAULTS.items()):
            if args.only and name not in args.only:
                continue
            out = work / f"run{k}"
            start = time.perf_counter()
            try:
                row = fault(run_file, out)
            except Exception as error:  # a fault the run did not survive in an expected way: record it
                row = {"survived": False, "work_lost_steps": None, "said": f"{type(error).__name__}: {error}"[:300]}
            intact, why = files_intact(out) if (out / "checkpoint.pt").is_file() else (False, "no checkpoint")
            rows.append({"fault": name, **row, "files_intact": intact, "files": why,
                         "wall_s": round(time.perf_counter() - start, 1)})
            print(f"{name}: survived {row['survived']}, lost {row['work_lost_steps']}, intact {intact}", flush=True)
    print("\n| fault | survived | work lost (steps) | files intact | what it said |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {'yes' if r['survived'] else 'NO'} | {r['work_lost_steps']} | "
              f"{'yes' if r['files_intact'] else 'NO'} ({r['files']}) | {r['said']} |")
    record = {"benchmark": "faults", "max_steps": MAX_STEPS, "rows": rows, "machine": machine()}
    print(json.dumps(rows, indent=1))
    write_record(Path(args.out), record)
    return record


if __name__ == "__main__":
    main()
