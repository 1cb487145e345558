"""What the throughput benchmarks share: CPU time with worker processes, the machine, the JSON record,
a timed training run of a preset."""
from __future__ import annotations

import json
import os
import platform as host
import statistics
import tempfile
import time
from pathlib import Path

import openmm

import cmt_openmm
from cmt_openmm.energy import make_energy
from cmt_openmm.files import atomic_write
from cmt_openmm.runs.presets import get_preset
from cmt_openmm.training import TrainConfig, train


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process and of the processes ``pids`` (Linux /proc)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


def machine(**extra) -> dict:
    """The machine a measurement ran on: cores, load average, Python and OpenMM versions, ``extra``."""
    return {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "python": host.python_version(),
            "openmm": openmm.__version__, **extra}


def print_table(rows: list[dict], columns: dict[str, str]) -> None:
    """Print ``rows`` as a Markdown table: ``columns`` maps each header to a format string of a
    row's keys (``"{seconds_per_step:.3f}"``); columns after the first two are right-aligned."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|")
    for row in rows:
        print("| " + " | ".join(f.format(**row) for f in columns.values()) + " |")


def report_rows(rows: list[dict], columns: dict[str, str], out: Path | None) -> list[dict]:
    """Print ``rows`` as a table (:func:`print_table`), write them to ``out`` when given, return them."""
    print_table(rows, columns)
    if out:
        write_record(out, rows)
    return rows


def write_record(path: Path, record: dict | list) -> None:
    """Write a benchmark's JSON record to ``path`` (atomically, creating its folder) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=2))
    print(f"wrote {path}")


def time_preset_run(target, preset: str, steps: int, energy, **settings) -> tuple[float, float]:
    """(seconds of training time per step, CPU seconds per step) of one run of ``steps`` steps of
    ``preset`` (its flow, method settings and threads) on ``target``, through
    :func:`cmt_openmm.training.train` as users run it (roll-back snapshots, records, checkpoints),
    in a fresh run directory. ``settings`` replace the preset's, section by section as in a run
    file (``flow={"linear_bins": 4}`` changes one flow setting). Seconds per step: the run's own
    training time (``wall_time``) over its steps after the first; CPU seconds: this process's
    (all its threads), which another process's load inflates less. A preset's ``step_scale: auto``
    is run as 1, the scale it keeps on CPUs, so that its one-off measurement stays out of the CPU
    seconds per step."""
    data = {k: v for k, v in get_preset(preset).items() if k not in ("system", "temperature", "report")}
    data.update(budget=10**12, max_minutes=None, max_steps=steps)
    if data.get("cmt", {}).get("step_scale") == "auto":
        data["cmt"] = {**data["cmt"], "step_scale": 1}
    for key, value in settings.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    config = TrainConfig.from_dict(data)
    with tempfile.TemporaryDirectory() as folder:
        cpu = time.process_time()
        history = train(target, config, Path(folder) / "run", progress=False, energy=energy).history
        cpu = time.process_time() - cpu
    return (history[-1]["wall_time"] - history[0]["wall_time"]) / (steps - 1), cpu / steps


def add_preset_timing_arguments(parser, systems: list[str], steps: int) -> None:
    """The options of a benchmark built on :func:`time_preset_settings`: ``--systems`` (SYSTEM:PRESET
    pairs), ``--steps``, ``--repeats`` and ``--out`` (the JSON record)."""
    parser.add_argument("--systems", nargs="+", default=systems, help="SYSTEM:PRESET pairs")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)


def time_preset_settings(system: str, preset: str, settings: dict[str, dict], steps: int,
                         repeats: int) -> dict[str, tuple[float, float]]:
    """Median (seconds per step, CPU seconds per step) of :func:`time_preset_run` for each named
    ``settings`` entry (keyword settings of one run), on one energy object built once (compiled
    torch energies compile once), after a discarded 3-step warm-up run with the first entry; the
    entries take turns, ``repeats`` times each, so a changing load on the machine falls on all alike."""
    target = cmt_openmm.get_target(system)
    with make_energy(target, "auto") as energy:
        time_preset_run(target, preset, 3, energy, **next(iter(settings.values())))  # first steps are slower
        times = {name: [] for name in settings}
        for _ in range(repeats):
            for name, setting in settings.items():
                times[name].append(time_preset_run(target, preset, steps, energy, **setting))
    return {name: (statistics.median(t for t, _ in runs), statistics.median(c for _, c in runs))
            for name, runs in times.items()}
