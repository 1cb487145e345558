"""What a long training run meets: stop signals, a second writer, steps that go non-finite.

- **Signals.** :class:`StopSignals` turns SIGTERM and SIGINT (a scheduler's pre-emption, Ctrl-C)
  into the loop's stop reason "interrupted". A signal during a step abandons it at once and the
  run ends at the last complete step, whose checkpoint is on disk: the step is abandoned rather
  than finished because a step can outlast a scheduler's grace period (SLURM's is 30 s by
  default) and the signal often reaches the energy workers too. A signal while a checkpoint is
  written waits for it, then ends the run. The loop keeps a :func:`snapshot` in memory before
  each step (weights, Adam state, method state, random stream; taking it draws no random
  numbers, so runs are unchanged) and puts an abandoned step's back (:func:`roll_back`).
- **One writer.** :func:`training_lock` holds ``train.lock`` in the run directory while a process
  trains there (``fcntl.flock``: the system releases it when the process dies, even by SIGKILL),
  so a second ``train`` into it is refused instead of interleaving two runs' records and
  checkpoints. Readers (sampling, reports) never take it.
- **Divergence.** A step after which :func:`non_finite` finds a non-finite loss, gradient or
  weight is rolled back to its snapshot and taken again at half the learning rate, at most
  ``MAX_ROLLBACKS`` times in a row, then the run ends (:func:`diverged`). The retried step
  redraws the same samples, so a resumed run still repeats an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import math
import os
import signal
import socket
import threading
import warnings
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None
import torch

from ..errors import CMTInputError, CMTTrainingDiverged

LOCK_FILE = "train.lock"
MAX_ROLLBACKS = 3  # non-finite steps rolled back in a row before the run stops


class Interrupted(BaseException):
    """A stop signal inside a step (a BaseException, as KeyboardInterrupt: no ``except Exception`` keeps it)."""


class StopSignals:
    """SIGTERM and SIGINT handlers for the loop: inside :meth:`armed` (a step) the first signal
    raises :class:`Interrupted` at once; elsewhere (writing a checkpoint) it is noted in
    ``received`` and the loop stops before the next step. The first signal also puts the previous
    handlers back, so that a second one acts as without training (SIGINT: KeyboardInterrupt,
    SIGTERM: the process ends), which atomic files survive. Only the main thread can set handlers;
    elsewhere signals keep their usual effect."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self._armed = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        self._put_back()

    def _put_back(self) -> None:
        for number, handler in self._previous.items():  # None: a handler set outside Python, not restorable
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        self.received = signal.Signals(number)
        self._put_back()
        if self._armed:
            raise Interrupted

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


def snapshot(trainer, average) -> dict:
    """Copies of what a step changes (weights, optimizer, method state, random stream), to roll back to."""
    state = {"generator": trainer.generator.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "trainer": trainer.state_dict(), "average": None if average is None else average.state_dict()}
    return {**copy.deepcopy(state), "rng": trainer.rng.get_state()}


def roll_back(good: dict, trainer, average) -> None:
    """Put back a :func:`snapshot` (the optimizer then shares its tensors: take a new one before the next step)."""
    trainer.generator.load_state_dict(good["generator"])
    trainer.optimizer.load_state_dict(good["optimizer"])
    trainer.load_state_dict(good["trainer"])
    if average is not None:
        average.load_state_dict(good["average"])
    trainer.rng.set_state(good["rng"])


def non_finite(record: dict, *modules: torch.nn.Module) -> str | None:
    """What is not finite after a step: "loss" (the record's), "gradient" or "weight" (of
    ``modules``); None when all are finite."""
    loss = record.get("loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        return "loss"
    parameters = [p for module in modules for p in module.parameters()]
    for name, tensors in (("gradient", [p.grad for p in parameters if p.grad is not None]), ("weight", parameters)):
        if tensors and not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
            return name
    return None


def diverged(bad: str, step: int, lr: float, method: str, n_failed: int, run_dir: Path | None) -> CMTTrainingDiverged:
    """The error that ends a run whose step ``step`` + 1 stayed non-finite (``bad``: what) after
    ``MAX_ROLLBACKS`` rollbacks, the last try at learning rate ``lr``."""
    kept = (f"the checkpoint in {run_dir} holds step {step}, but resuming would diverge again; "
            if run_dir is not None and step > 0 else "")  # no step done: no checkpoint written
    return CMTTrainingDiverged(f"training diverged: step {step + 1} gave a non-finite {bad} {MAX_ROLLBACKS + 1} times "
                               f"in a row, the last time at a learning rate of {lr:.3g}; {kept}start again with a "
                               f"lower {method}.lr, or check the energy ({n_failed:,} failed evaluations so far).", step)


@contextlib.contextmanager
def training_lock(run_dir: str | os.PathLike, mark: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s ``train.lock`` (``fcntl.flock``; the file and folder are made if
    missing) for the block, or refuse in one sentence while another process holds it. The system
    releases it when the process ends, however it ends. ``mark`` writes this process's id and
    host into the file while held, for the refusal to name. Where the file system has no locks
    (some Lustre and NFS mounts), a warning says so and the block runs unlocked.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:  # "a+": no truncation before the lock is ours
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "whose id is not written yet"
            raise CMTInputError(f"another process ({holder}) is training the run in {run_dir}; wait for it to end "
                                "or stop it, then train there again.") from None
        except OSError as error:  # e.g. a Lustre mount without flock: go on unlocked, but say so
            if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            warnings.warn(f"cannot lock {run_dir} ({os.strerror(error.errno).lower()}); make sure that no other "
                          "process trains it meanwhile.", stacklevel=3)
        if mark:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        try:
            yield
        finally:
            if mark:
                handle.truncate(0)
