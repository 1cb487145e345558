"""A training run's directory: its config, checkpoints and records, written so that a run resumes exactly.

Files (``run_dir``): ``config.yaml`` (the :class:`~.config.TrainConfig`, ``shards`` resolved),
``target/`` (:meth:`~cmt_openmm.target.Target.save`), ``checkpoint.pt`` (written atomically, tmp
file + ``os.replace``, by a :class:`CheckpointWriter`: every ``checkpoint_minutes`` and when the run
stops) and ``metrics.jsonl`` (one record per step, appended after each step; records of steps after
the checkpoint are dropped on resume). A checkpoint holds the generator's and the optimiser's
state, the weight average, the random stream, the method's state, the counters and the last
``RECENT_RECORDS`` records, already serialised; the history itself is ``metrics.jsonl``'s, because
serialising the whole history at every step costs a time that grows with the run (figures in
benchmarks/RESULTS.md). Checkpoints hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``: loading one cannot run code. The loop (:mod:`.loop`) calls
these; readers (:func:`load_history`) never lock.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import CMTInputError
from ..files import atomic_write, atomic_writer
from .config import AUTO, RESUMABLE, TrainConfig, resume_conflicts
from .distributed import check_shards, elastic_restart

if TYPE_CHECKING:
    from .averaging import WeightAverage
    from .loop import Trainer

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
TARGET_DIR = "target"  # Target.save: system.xml, structure.pdb, target.json
_FORMAT = "cmt_openmm.checkpoint/1"
RECENT_RECORDS = 256  # records kept in the checkpoint: minutes of steps, more than a crash loses of metrics.jsonl


def recent_records(history: list[dict] = ()) -> collections.deque:
    """The serialised last ``RECENT_RECORDS`` records of ``history`` (a deque that keeps that many)."""
    return collections.deque((json.dumps(r) for r in history[-RECENT_RECORDS:]), maxlen=RECENT_RECORDS)


def prepare_run_dir(run_dir: Path | None, config: TrainConfig, resume: bool,
                     processes: int) -> tuple[dict | None, TrainConfig]:
    """Create run_dir and write config.yaml; return the checkpoint to resume (None for a new run)
    and the config with ``shards: auto`` resolved (the stored count on resume, else ``processes``).
    A process that torchrun restarts resumes whenever the checkpoint exists."""
    if run_dir is None:
        if resume:
            raise CMTInputError("resume=True needs the run_dir of the run to continue.")
        return None, resolve_shards(config, processes)
    path = run_dir / CHECKPOINT_FILE
    resume = resume or (elastic_restart() and path.exists())
    if resume:
        if not path.exists():
            raise CMTInputError(f"no checkpoint {path} to resume from; start the run without resume.")
        checkpoint = load_checkpoint(path)
        checkpoint["records"] = resumed_history(run_dir, checkpoint)
        stored = json.loads(checkpoint["config"])
        config = resolve_shards(config, stored.get("shards", 1))
        conflicts = resume_conflicts(stored, config.to_dict())
        if conflicts:
            raise CMTInputError(
                f"the config differs from the run being resumed in {', '.join(conflicts)}; "
                f"only {' and '.join(RESUMABLE)} may change on resume."
            )
    else:
        if path.exists():
            raise CMTInputError(f"{run_dir} already holds a run; pass resume=True or choose a new run_dir.")
        checkpoint = None
        config = resolve_shards(config, processes)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    check_shards(config.shards, processes)
    atomic_write(run_dir / CONFIG_FILE, config.to_yaml())
    return checkpoint, config


def resolve_shards(config: TrainConfig, shards: int) -> TrainConfig:
    """``config`` with ``shards: auto`` replaced by ``shards``."""
    return dataclasses.replace(config, shards=shards) if config.shards == AUTO else config


def save_checkpoint(run_dir: Path, trainer: Trainer, average: WeightAverage | None, config: TrainConfig,
                     state: dict) -> None:
    payload = {
        "format": _FORMAT,
        "config": json.dumps(config.to_dict()),
        "generator": to_cpu(trainer.generator.state_dict()),
        "average": {} if average is None else to_cpu(average.state_dict()),
        "optimizer": to_cpu(trainer.optimizer.state_dict()),
        "rng": trainer.rng.get_state(),
        "rng_device": trainer.rng.device.type,
        "energy_backend": getattr(trainer.energy, "backend", "openmm"),
        "trainer": trainer.state_dict(),
        "step": state["step"],
        "evaluations": state["evaluations"],
        "n_failed": state["n_failed"],
        "n_restarts": state["n_restarts"],
        "wall_time": state["wall_time"],
        "seconds_per_step": -1.0 if state["seconds_per_step"] is None else state["seconds_per_step"],
        "recent_history": "\n".join(state["recent"]),
    }
    with atomic_writer(run_dir / CHECKPOINT_FILE) as handle:
        torch.save(payload, handle)


class CheckpointWriter:
    """Writes the checkpoint of a run's last complete step: :meth:`write` when the run stops or
    fails, ``write(when_due=True)`` after each step, which writes only once
    ``config.checkpoint_minutes`` of wall time have passed since the last checkpoint (0: every
    step). The seconds spent writing count towards the run's training time (``state["wall_time"]``,
    which ``max_minutes`` limits). Nothing is written without a ``run_dir``."""

    def __init__(self, run_dir: Path | None, trainer: Trainer, average: WeightAverage | None, config: TrainConfig,
                 state: dict) -> None:
        self.run_dir, self.trainer, self.average, self.config, self.state = run_dir, trainer, average, config, state
        self.step, self.at = state["step"], time.monotonic()  # the step on disk (a resumed run's, or 0) and when

    def write(self, when_due: bool = False) -> None:
        if self.run_dir is None or self.state["step"] == self.step:
            return
        if when_due and time.monotonic() - self.at < 60.0 * self.config.checkpoint_minutes:
            return
        start = time.perf_counter()
        save_checkpoint(self.run_dir, self.trainer, self.average, self.config, self.state)
        self.state["wall_time"] += time.perf_counter() - start
        self.step, self.at = self.state["step"], time.monotonic()


def load_checkpoint(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or one holding objects we refuse to unpickle
        raise CMTInputError(f"cannot read checkpoint {path} ({type(exc).__name__}): it is damaged or not a cmt_openmm "
                            "checkpoint (checkpoints are replaced atomically, so it was changed from outside); "
                            "start the run afresh in another directory, or restore the file from a backup.") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _FORMAT:
        raise CMTInputError(f"{path} is not a cmt_openmm training checkpoint ({_FORMAT}).")
    return checkpoint


def to_cpu(value):
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def restore(checkpoint: dict, generator, trainer: Trainer, average: WeightAverage | None, rng: torch.Generator,
             state: dict) -> None:
    generator.load_state_dict(checkpoint["generator"])
    if average is not None:  # ema_decay cannot change on resume, so the checkpoint holds the average
        average.load_state_dict(checkpoint["average"])
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])  # Adam moves its state to the parameters' device
    trainer.load_state_dict(checkpoint["trainer"])
    if checkpoint.get("rng_device", "cpu") == rng.device.type:
        rng.set_state(checkpoint["rng"])
    else:  # another device: its generator state does not fit; continue with a derived stream
        rng.manual_seed(int(np.random.SeedSequence([trainer.config.seed, int(checkpoint["step"])]).generate_state(1)[0]))
    state.update(
        step=int(checkpoint["step"]),
        evaluations=int(checkpoint["evaluations"]),
        n_failed=int(checkpoint["n_failed"]),
        n_restarts=int(checkpoint.get("n_restarts", 0)),
        wall_time=float(checkpoint["wall_time"]),
        seconds_per_step=None if checkpoint.get("seconds_per_step", -1.0) < 0 else float(checkpoint["seconds_per_step"]),
        history=checkpoint["records"],
    )
    state["recent"] = recent_records(state["history"])


def resumed_history(run_dir: Path, checkpoint: dict) -> list[dict]:
    """The records of steps 1 … step of the checkpoint: metrics.jsonl's, completed from the
    checkpoint's recent records where a crash cut the file short (a torn last line is ignored).
    Checkpoints that hold the whole history (``history``) give it."""
    step = int(checkpoint["step"])
    if "history" in checkpoint:
        return json.loads(checkpoint["history"])
    found: dict[int, dict] = {}
    path = run_dir / METRICS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    for line in [*lines, *checkpoint.get("recent_history", "").splitlines()]:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and 1 <= record["step"] <= step:
            found.setdefault(record["step"], record)
    missing = [k for k in range(1, step + 1) if k not in found]
    if missing:
        raise CMTInputError(
            f"{path} lacks the records of {len(missing)} of the {step} steps in the checkpoint (from step {missing[0]}), "
            f"more than the checkpoint keeps; restore the file from a backup, or start the run afresh in another "
            f"directory.")
    return [found[k] for k in range(1, step + 1)]


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the checkpoint's history (drops a record written after it)."""
    atomic_write(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))


def load_history(run_dir: str | os.PathLike) -> list[dict]:
    """The per-step records of a run directory's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise CMTInputError(f"{path} does not exist; is {run_dir} a training run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
