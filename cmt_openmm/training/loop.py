"""The training loop shared by every method: budget, records, checkpoints and exact resume.

All methods (CMT, reverse KL, forward KL, temperature annealing) run through :func:`train`, so
they share the flow architecture, the energy-evaluation accounting (``energy.n_evaluations``,
one per configuration sent to OpenMM), the per-step records and the checkpoints; budgets
therefore compare one to one. A method is a :class:`Trainer`: it performs one *step* (an
annealing step for CMT and the temperature ladder, ``steps_per_record`` Adam steps for the
gradient methods) and says how many energy evaluations its next step will use, so a step
that would overrun the budget is never started.

Run directory (``run_dir``, :mod:`.checkpoints`): ``config.yaml``, ``target/``, ``checkpoint.pt``,
``metrics.jsonl`` (one record per step), ``train.lock`` (held while a process trains there:
:func:`~.faults.training_lock`) and, at the end, ``generator.safetensors`` (with ``ema_decay`` set,
the average of the flow's weights, :mod:`.averaging`). The checkpoint is written at least every
``checkpoint_minutes`` of wall time and whenever the run stops, is interrupted or a step fails
(after rolling the step back), not after every step: serialising weights, Adam's state and the
average is a measurable part of a peptide flow's step (``benchmarks/checkpoint_cost.py``). So a
run that is killed outright (SIGKILL, a lost machine) loses at most that much training, any other
stop only the step in progress; ``resume=True`` reloads generator weights, optimizer state, the
torch RNG state, the method's state, the step counter, the history (dropping the records of steps
after the checkpoint) and the energy counters, and continues to the same result as an
uninterrupted run with the same seed.

Faults (:mod:`.faults`): SIGTERM and SIGINT abandon the step in progress and end the run at the
last complete step (stop reason "interrupted"); a step whose loss, gradients or weights are not
finite is rolled back and taken again at half the learning rate, at most ``MAX_ROLLBACKS`` times
in a row, so that neither a checkpoint nor the generator ever holds such weights; one process at
a time trains a run directory.

Randomness: one ``torch.Generator`` seeded from ``config.seed`` drives sampling and
minibatches; the flow is initialised from the same seed. No global or numpy RNG is used.

Processes (:mod:`.distributed`): under ``torchrun`` every rank runs this loop on its shards of each
step's samples; rank 0 alone takes the lock, writes the run directory and shows progress, the
energy counters are summed over the ranks, and the stop decisions (limits, signals) are taken on
numbers every rank shares, so all ranks stop after the same step. A stop signal there ends the
run after the step in progress (a rank cannot leave a step its peers are in); torchrun gives a
step 30 s after its own SIGTERM before it kills the ranks, whose last checkpoint then resumes.
A rank that torchrun restarts after a failure (``--max-restarts``) resumes from the checkpoint.

Devices: ``config.device`` holds the flow, the buffers, the fit and the random stream; energies
come back on the samples' device. Checkpoints hold CPU tensors only (weights, optimizer state,
the random stream's state and its device type), so a run resumes on another device; the random
stream then restarts from (seed, step), a new but reproducible stream (CUDA and CPU generators
have different states).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CMTInputError
from ..flows.coupling import conditioner_matmuls
from ..generator import GENERATOR_FILE, BoltzmannGenerator
from ..importance import CLIP_FRACTION, reverse_ess
from .averaging import WeightAverage
from .config import AUTO, TRAINERS, TrainConfig, resolve_device, resolve_threads
from .checkpoints import (METRICS_FILE, TARGET_DIR, CheckpointWriter, prepare_run_dir, recent_records, restore,
                          write_metrics)
from .distributed import Layout, World, broadcast_object, join, leave, on_main, peer_lost
from .faults import MAX_ROLLBACKS, Interrupted, StopSignals, diverged, non_finite, roll_back, snapshot, training_lock
from .schedule import MEASURED_STEPS, REPLAN_EVERY, plan_steps

RECHECK_SAMPLES = 4  # flow samples of a step evaluated by OpenMM too, every energy.recheck_every steps

@dataclass
class TrainResult:
    """Outcome of :func:`train`: the trained generator, the per-step records, the run directory,
    why training stopped ("target reached", "schedule finished", "max_steps", "budget",
    "max_minutes", "interrupted") and, when interrupted, the signal's name ("SIGTERM")."""

    generator: Any
    history: list[dict]
    run_dir: Path | None
    stop_reason: str
    signal: str | None = None


class Trainer(ABC):
    """One training method inside the shared loop.

    Subclasses implement :meth:`step` and :meth:`step_cost`; state beyond the generator, the
    optimizer (Adam, learning rate ``lr``) and the RNG goes in :meth:`state_dict`.
    """

    def __init__(self, target, generator, energy, config: TrainConfig, rng: torch.Generator, lr: float):
        self.target = target
        self.generator = generator
        self.energy = energy
        self.config = config
        self.rng = rng
        # fused: one kernel for all parameters (~3x faster Adam steps for small flows on CPUs)
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr, fused=True)
        self.steps_done = 0
        self.plan: int | None = None  # the steps the run will take (set by the loop, see .schedule)
        self.layout = Layout(World(), 1, config.seed, rng)  # this process's shards (set by the loop)

    @abstractmethod
    def step_cost(self) -> int:
        """Energy evaluations the next :meth:`step` will use (at most)."""

    @abstractmethod
    def step(self) -> dict:
        """Perform one step; return its record fields (JSON-able scalars)."""

    @property
    def done(self) -> str | None:
        """Why the method has finished on its own (None while it has not)."""
        return None

    def planned_steps(self) -> int | None:
        """Steps the method's own schedule has in all (None: open-ended, e.g. CMT)."""
        return None

    def prepare(self) -> str | None:
        """What a fresh run measures once before its first step (a resumed run restores it with
        :meth:`load_state_dict`); a line saying what it chose, or None."""
        return None

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: Mapping) -> None:
        self.steps_done = int(state["steps_done"])

    # -- helpers shared by the methods -------------------------------------------------------
    @property
    def parameters(self) -> list[torch.Tensor]:
        """The optimised parameters (whose gradients the ranks sum)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def recheck_energy(self, x: torch.Tensor) -> dict:
        """Every ``energy.recheck_every`` steps, the re-check of the torch energy against OpenMM on a
        few of this step's flow samples x (B, n_atoms, 3) nm: its record fields ({} otherwise, and
        for energies that are not torch)."""
        every = self.config.energy.recheck_every
        if not every or self.steps_done % every:
            return {}
        from ..energy.torch.recheck import recheck

        fields = recheck(self.energy, x.detach(), n=RECHECK_SAMPLES, seed=self.steps_done)
        return fields if fields.get("recheck_n") else {}

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def target_stats(self, log_p: torch.Tensor, log_q: torch.Tensor) -> dict:
        """Reverse ESS of flow samples against the target (raw energies; −inf → weight 0).

        A NaN log-weight (a flow whose weights went non-finite within the step) counts as a
        failed sample here, so that the step ends and the loop rolls it back (:mod:`.faults`)."""
        log_w = (log_p.detach().double() - log_q.detach().double()).cpu().numpy()
        log_w[np.isnan(log_w)] = -np.inf
        return {
            "reverse_ess": reverse_ess(log_w),
            "reverse_ess_clipped": reverse_ess(log_w, CLIP_FRACTION),
            "n_failed_batch": int(np.sum(~np.isfinite(log_w))),
        }


def train(
    target,
    config: TrainConfig | Mapping | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    energy=None,
) -> TrainResult:
    """Train a Boltzmann generator for ``target`` with ``config.method``.

    Args:
        target: a :class:`~cmt_openmm.target.Target` (or toy target).
        config: :class:`TrainConfig` or a mapping for :meth:`TrainConfig.from_dict`.
        run_dir: directory for config, checkpoints, records and the final generator
            (None: nothing is written, no resume possible).
        resume: continue the run in ``run_dir`` from its checkpoint; only the settings in
            :data:`~.config.RESUMABLE` (``budget``, ``max_steps``, ``max_minutes``,
            ``checkpoint_minutes``, ``threads``, ``device``) may differ from the stored config.
        progress: show a tqdm progress bar.
        energy: an energy for ``target`` to use (and not close); by default
            :func:`~cmt_openmm.energy.select.make_energy` builds one from ``config.energy``
            (the faster verified backend for "auto") and closes it at the end.

    Returns a :class:`TrainResult`. Stops when the method finishes (CMT: λ = η = 0), after
    ``max_steps`` steps, after ``max_minutes`` of training, or before a step that would exceed
    ``budget`` energy evaluations. A
    fresh run whose ``budget`` is below the cost of its first step is refused
    (:class:`~cmt_openmm.errors.CMTInputError`) rather than trained for 0 steps. SIGTERM or
    SIGINT (from the main thread's point of view) stop it at the last complete step with stop
    reason "interrupted": the result holds that step's generator, and ``generator.safetensors``
    is not written (the checkpoint holds everything to resume). A run directory another process
    is training is refused (:func:`~.faults.training_lock`), and so is a run whose step stays
    non-finite after ``MAX_ROLLBACKS`` rollbacks.

    Example (three CMT steps of a small flow on a toy, then one more by resuming; OpenMM
    energies, so that no time goes into choosing a backend):
        >>> import cmt_openmm, os, tempfile
        >>> toy = cmt_openmm.get_target("toy-double-well")
        >>> config = {"max_steps": 3, "flow": {"n_layers": 2, "hidden": 8}, "energy": {"backend": "openmm"},
        ...           "cmt": {"n_samples": 500, "fit_steps": 5, "batch_size": 250}}
        >>> run_dir = os.path.join(tempfile.mkdtemp(), "toy")
        >>> result = cmt_openmm.train(toy, config, run_dir, progress=False)
        >>> result.stop_reason, [record["energy_evaluations"] for record in result.history]
        ('max_steps', [500, 1000, 1500])
        >>> sorted(os.listdir(run_dir))
        ['checkpoint.pt', 'config.yaml', 'generator.safetensors', 'metrics.jsonl', 'target', 'train.lock']
        >>> again = cmt_openmm.train(toy, {**config, "max_steps": 4}, run_dir, resume=True, progress=False)
        >>> len(again.history), again.history[:3] == result.history   # continued, not restarted
        (4, True)
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    run_dir = Path(run_dir) if run_dir is not None else None
    device = resolve_device(config.device)
    world = join(device.type)
    try:
        with contextlib.ExitStack() as held:
            def prepare():  # rank 0: the lock, the run directory, the checkpoint to resume
                if run_dir is not None:
                    held.enter_context(training_lock(run_dir))
                checkpoint, resolved = prepare_run_dir(run_dir, config, resume, world.size)
                if run_dir is not None:  # the run directory describes itself: sample/evaluate need nothing else
                    target.save(run_dir / TARGET_DIR)
                return checkpoint, resolved

            checkpoint, config = broadcast_object(world, on_main(world, prepare))
            if device.type == "cuda" and world.size > 1:
                device = torch.device("cuda", world.local_rank)
            return _train(target, config, run_dir, checkpoint, progress and world.main, energy, world, device)
    except RuntimeError as exc:
        lost = peer_lost(world, exc, run_dir)
        if lost is None:
            raise
        raise lost from exc
    finally:
        leave(world)


def _train(target, config: TrainConfig, run_dir: Path | None, checkpoint: dict | None, progress: bool, energy,
           world: World, device: torch.device) -> TrainResult:
    from ..energy.select import make_energy

    generator = BoltzmannGenerator.build(
        target,
        n_layers=config.flow.n_layers,
        hidden=config.flow.hidden,
        n_bins=config.flow.n_bins,
        linear_bins=config.flow.linear_bins,
        mask=config.flow.mask,
        seed=config.seed,
    ).to(device)
    rng = torch.Generator(device=device).manual_seed(config.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(config.threads, world.local_size))
    own_energy = energy is None
    if own_energy:  # a resumed run keeps the backend it started with (a reproducible path)
        backend = checkpoint.get("energy_backend", config.energy.backend) if checkpoint else config.energy.backend
        energy = make_energy(target, backend, device=device, platform=config.energy.platform,
                             n_workers=config.energy.n_workers, compile=config.energy.compile)
    try:
        trainer = TRAINERS[config.method](target, generator, energy, config, rng)
        trainer.layout = Layout(world, config.shards, config.seed, rng)
        average = WeightAverage(generator, trainer.optimizer, config.ema_decay) if config.ema_decay else None
        state = {"step": 0, "evaluations": 0, "n_failed": 0, "n_restarts": 0, "wall_time": 0.0,
                 "seconds_per_step": None, "history": [], "recent": recent_records()}
        if checkpoint is not None:
            restore(checkpoint, generator, trainer, average, rng, state)
            if run_dir is not None and world.main:
                write_metrics(run_dir, state["history"])
        writes = run_dir if world.main else None
        with conditioner_matmuls(generator, config.flow.conditioner_dtype(device)), StopSignals() as signals:
            if checkpoint is None:
                _prepare(trainer, config, progress)
            trainer.layout.broadcast_parameters(generator)
            stop_reason = _run(trainer, average, config, writes, state, progress, signals)
    finally:
        torch.set_num_threads(threads)
        if own_energy:
            energy.close()
    trained = generator if average is None else average.module
    if stop_reason == "interrupted":  # a rank the signal missed stops with its peers
        name = signals.received.name if signals.received else "SIGTERM"
        return TrainResult(trained, state["history"], run_dir, stop_reason, name)
    if run_dir is not None and world.main:
        if non_finite({}, trained):  # the rollbacks keep this from happening; never write such a file
            raise RuntimeError(f"the generator to be written to {run_dir / GENERATOR_FILE} has non-finite weights.")
        trained.save(run_dir / GENERATOR_FILE)
    return TrainResult(trained, state["history"], run_dir, stop_reason)


def _prepare(trainer: Trainer, config: TrainConfig, progress: bool) -> None:
    """A fresh run's one-off measurement (:meth:`Trainer.prepare`), then the refusal of a budget
    below the cost of its first step (rather than a run of 0 steps and its report)."""
    message = trainer.prepare()
    if message and progress:
        _say(message)
    cost = trainer.step_cost()
    if not trainer.done and config.budget != AUTO and cost > config.budget:
        raise CMTInputError(
            f"the budget of {config.budget:,} energy evaluations is below the cost of one {config.method} step "
            f"({cost:,} evaluations), so the run would train 0 steps; raise budget to at least {cost:,} "
            f"or make one step cheaper (fewer samples per step in the {config.method} settings)."
        )


def _expected_steps(trainer: Trainer, config: TrainConfig, state: dict) -> tuple[int, str]:
    """The step count at which the run will stop (for the progress bar) and the limit that sets it:
    max_steps, the budget at the next step's cost, the time left at the recent speed, or the
    method's own schedule."""
    cost = max(trainer.step_cost(), 1)
    limits = {"max_steps": config.max_steps}
    if config.budget != AUTO:
        limits["budget"] = state["step"] + max(config.budget - state["evaluations"], 0) // cost
    if config.max_minutes is not None and state["step"] > 0:
        seconds_per_step = state["wall_time"] / state["step"]
        limits["max_minutes"] = state["step"] + math.ceil(
            max(60.0 * config.max_minutes - state["wall_time"], 0.0) / max(seconds_per_step, 1e-9))
    if trainer.planned_steps() is not None:
        limits["schedule"] = trainer.planned_steps()
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def _plan(trainer: Trainer, config: TrainConfig, state: dict, say: bool) -> None:
    """Give the trainer the run's plan (:func:`~.schedule.plan_steps`): the steps it will take,
    once the time limit's speed is measured: after MEASURED_STEPS steps, then every REPLAN_EVERY."""
    step = state["step"]
    due = step == MEASURED_STEPS or (step > MEASURED_STEPS and step % REPLAN_EVERY == 0)
    if config.max_minutes is not None and step >= MEASURED_STEPS and (due or state["seconds_per_step"] is None):
        first = state["history"][0]["wall_time"]
        state["seconds_per_step"] = (state["wall_time"] - first) / (step - 1)
    plan, limit = plan_steps(config.max_steps, config.budget, trainer.step_cost(), config.max_minutes,
                                state["seconds_per_step"])
    if say and plan is not None and (trainer.plan is None or abs(plan - trainer.plan) > 0.1 * trainer.plan):
        speed = f" at {state['seconds_per_step']:.2f} s per step" if limit == "max_minutes" else ""
        _say(f"plan: {plan:,} steps, ~{plan * trainer.step_cost():.2g} energy evaluations "
             f"({limit} limit{speed})")
    trainer.plan = plan


def _say(message: str) -> None:
    tqdm.write(f"[cmt-openmm] {message}", file=sys.stderr)


def _run(trainer: Trainer, average: WeightAverage | None, config: TrainConfig, run_dir: Path | None, state: dict,
         progress: bool, signals: StopSignals) -> str:
    """The steps, then the last complete step's checkpoint; writes into ``run_dir`` (None on ranks
    other than 0). The stop reason."""
    checkpoint = CheckpointWriter(run_dir, trainer, average, config, state)
    stop_reason = _steps(trainer, average, config, run_dir, state, progress, signals, checkpoint)
    checkpoint.write()
    return stop_reason


def _steps(trainer: Trainer, average: WeightAverage | None, config: TrainConfig, run_dir: Path | None, state: dict,
           progress: bool, signals: StopSignals, checkpoint: CheckpointWriter) -> str:
    """Steps until a limit, the method's end or a signal (the stop reason); a failed step is rolled
    back and the checkpoint written before its error goes on."""
    energy = trainer.energy
    layout = trainer.layout
    arm = signals.armed if layout.world.size == 1 else contextlib.nullcontext  # see the module docstring
    rollbacks = 0  # of the step being taken
    total, limit = _expected_steps(trainer, config, state)
    if progress:
        if config.max_minutes is not None and limit == "max_steps" and state["step"] == 0:
            limit = f"max_steps limit, or as many as fit in max_minutes: {config.max_minutes:g}"
        else:
            limit += " limit"
        expected = "" if config.budget == AUTO else f", ~{total * trainer.step_cost():,} energy evaluations in all"
        _say(f"{config.method}: at most {total:,} steps ({limit}){expected}; the bar shows the time left")
    with tqdm(
        total=total,
        initial=state["step"],
        desc=f"{config.method}",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    ) as bar:
        while True:
            received, state["wall_time"] = layout.max(signals.received is not None, state["wall_time"])
            if received:
                return "interrupted"
            if trainer.done:
                return trainer.done
            if state["step"] >= config.max_steps:
                return "max_steps"
            if config.budget != AUTO and state["evaluations"] + trainer.step_cost() > config.budget:
                return "budget"
            if config.max_minutes is not None and state["wall_time"] >= 60.0 * config.max_minutes:
                return "max_minutes"
            _plan(trainer, config, state, progress)
            good = snapshot(trainer, average)
            start, counters = time.perf_counter(), _counters(energy)
            layout.begin_step(trainer.steps_done)
            try:
                with arm():
                    record = trainer.step()
            except Interrupted:
                roll_back(good, trainer, average)
                return "interrupted"
            except Exception:  # the checkpoint holds complete steps only: the failed one is rolled back
                roll_back(good, trainer, average)
                checkpoint.write()
                raise
            # a step rolled back has used its evaluations too; the counts are the ranks' sums
            used = layout.sum(*(after - before for after, before in zip(_counters(energy), counters)))
            for key, value in zip(("evaluations", "n_failed", "n_restarts"), used):
                state[key] += int(value)
            state["wall_time"] += time.perf_counter() - start
            bad = non_finite(record, trainer.generator, *([] if average is None else [average.module]))
            if bad:
                roll_back(good, trainer, average)
                lr = trainer.optimizer.param_groups[0]["lr"]
                if rollbacks == MAX_ROLLBACKS:
                    checkpoint.write()
                    raise diverged(bad, state["step"], lr, config.method, state["n_failed"], run_dir)
                rollbacks += 1
                trainer.set_lr(lr / 2)
                _say(f"step {state['step'] + 1} gave a non-finite {bad}: rolled back, taking it again at a learning "
                     f"rate of {lr / 2:.3g}")
                continue
            trainer.steps_done += 1
            state["step"] += 1
            record = {
                "step": state["step"],
                "method": config.method,
                **record,
                "energy_evaluations": state["evaluations"],
                "n_failed": state["n_failed"],
                **({"energy_restarts": state["n_restarts"]} if state["n_restarts"] else {}),
                "wall_time": state["wall_time"],
                "planned_steps": trainer.plan,
                "energy_backend": getattr(energy, "backend", None),
                **({"rollbacks": rollbacks, "lr": trainer.optimizer.param_groups[0]["lr"]} if rollbacks else {}),
            }
            rollbacks = 0
            record = {k: _json_value(v) for k, v in record.items()}
            line = json.dumps(record)
            state["history"].append(record)
            state["recent"].append(line)
            if run_dir is not None:
                start = time.perf_counter()
                with open(run_dir / METRICS_FILE, "a") as fh:  # first: the checkpoint's step always has its record
                    fh.write(line + "\n")
                state["wall_time"] += time.perf_counter() - start
                checkpoint.write(when_due=True)
            if not trainer.done:  # the limit ahead can move (a schedule's steps differ in cost)
                bar.total = max(_expected_steps(trainer, config, state)[0], state["step"])
            bar.update(1)
            bar.set_postfix({**_postfix(record), "eval/s": f"{state['evaluations'] / max(state['wall_time'], 1e-9):,.0f}"},
                            refresh=False)


def _counters(energy) -> tuple[int, int, int]:
    """The energy's running counts: evaluations, failed evaluations, worker pools replaced."""
    return energy.n_evaluations, energy.n_failed, getattr(energy, "n_restarts", 0)


def _postfix(record: dict) -> dict:
    keys = ("lam", "eta", "temperature", "reverse_ess", "loss")
    return {k: f"{record[k]:.3g}" for k in keys if isinstance(record.get(k), (int, float))}


def _json_value(v):
    """Plain JSON scalar: numpy/torch numbers to Python, non-finite floats to None."""
    if isinstance(v, (np.generic, torch.Tensor)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
