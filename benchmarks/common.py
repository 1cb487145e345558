"""What the throughput benchmarks share: CPU time with worker processes, the machine, the JSON record."""
from __future__ import annotations

import json
import os
import platform as host
import time
from pathlib import Path

import openmm

from cmt_openmm.files import atomic_write


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


def write_record(path: Path, record: dict) -> None:
    """Write a benchmark's JSON record to ``path`` (atomically, creating its folder) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=2))
    print(f"wrote {path}")
