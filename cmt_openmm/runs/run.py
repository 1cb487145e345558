"""A training run directory as one object: create or open it, then train, sample, evaluate.

:class:`Run` is what the command line, the benchmarks, the examples and users' notebooks all
drive, as scripts drive OpenMM's ``Simulation``: one place that reads and writes run
directories, so a run made from Python is read back by ``cmt-openmm sample`` and the reverse.
Its directory is made absolute once, when the object is made, so relative folders mean the
caller's folder everywhere. The directory holds ``run.yaml`` (:mod:`.run_files`) beside what
training writes (:mod:`cmt_openmm.training.loop`); runs trained with
``cmt_openmm.train(target, config, run_dir)`` have no ``run.yaml`` and open all the same.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import CMTInputError
from ..files import atomic_write, to_json
from ..training.config import AUTO, RESUMABLE, TrainConfig, resume_conflicts
from ..training.distributed import World, elastic_restart, launched
from ..training.faults import training_lock
from ..training.checkpoints import CHECKPOINT_FILE, CONFIG_FILE, TARGET_DIR, load_history
from .presets import get_preset
from .run_files import RUN_FILE, RunSpec, build_target, parse_run_config, read_yaml, run_from_api, saved_target_entry

REPORT = "report"
EVALUATION = "evaluation"


class Run:
    """A run directory: its settings (:class:`RunSpec`, training settings a typed
    :class:`~cmt_openmm.training.TrainConfig`), its target and, once trained, its generator.

    Arguments:
        directory: the run directory (made absolute against the current folder).
        spec: the validated run settings.
        target: the Target, when the caller already has it (built from ``spec`` otherwise).

    Make one with :meth:`create` (a new run, or ``resume=True`` to continue one),
    :meth:`from_preset` or :meth:`open` (an existing run directory).

    Example:
        >>> import cmt_openmm, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> run = cmt_openmm.Run.from_preset(folder, "toy-quick", max_steps=2)
        >>> run.train(progress=False, report=False)["stop_reason"]
        'max_steps'
        >>> again = cmt_openmm.Run.open(folder)
        >>> again.config.max_steps, len(again.history)
        (2, 2)
        >>> ensemble = again.sample(500, progress=False)
        >>> len(ensemble)
        500
    """

    def __init__(self, directory: str | os.PathLike, spec: RunSpec, target: Any = None):
        self.directory = Path(directory).expanduser().resolve()
        self.spec = spec
        self._target = target
        self._generator = None
        self._stop_reason: str | None = None  # of this object's last train()

    # -- making one ----------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | os.PathLike, config: str | os.PathLike | Mapping | RunSpec, *,
               overrides: Mapping | None = None, resume: bool = False, target: Any = None) -> "Run":
        """A run of ``config`` in ``directory``, with its ``run.yaml`` written.

        ``config``: a YAML run file (relative paths against its folder), a run mapping
        (relative paths against the current folder) or a :class:`RunSpec`; ``overrides``: top-level
        settings that replace the config's (e.g. ``{"budget": 2e6}``); ``target``: a Target
        object to train on instead of building one from ``config["system"]`` (the config then
        needs no ``system``; the run directory keeps the target's System XML and PDB).
        A directory that already holds a run is refused unless ``resume``; with ``resume`` only
        the settings in ``RESUMABLE`` may differ from the stored ones.
        """
        directory = Path(directory).expanduser().resolve()
        has_run = (directory / CHECKPOINT_FILE).is_file()
        resume = resume or (has_run and elastic_restart())  # torchrun restarted this rank after a failure
        # refused while another process trains there (it would change its run's files; it may not have
        # written its first checkpoint yet); under torchrun rank 0 checks, as it alone takes the lock,
        # which it may already hold while a peer starts
        if directory.is_dir() and launched().main:
            with training_lock(directory, mark=False):
                pass
        if has_run != resume:  # before anything is written (a target is saved in the directory)
            raise CMTInputError(f"{directory} already holds a run; resume it (--resume, resume=True) or choose another "
                                "directory." if has_run else
                                f"{directory} holds no checkpoint to resume; start the run without resume.")
        data, base = _run_mapping(config, overrides)
        if target is not None:
            data = {**data, "system": _save_target(target, directory), "temperature": _temperature(data, target)}
        run = cls(directory, parse_run_config(data, base), target)
        if resume:
            run._check_resumed_settings()
        run.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(run.directory / RUN_FILE, yaml.safe_dump(run.spec.to_dict(), sort_keys=False))
        return run

    @classmethod
    def from_preset(cls, directory: str | os.PathLike, name: str, *, resume: bool = False, **overrides) -> "Run":
        """A run of the built-in preset ``name`` (``cmt-openmm presets``) with ``overrides``."""
        return cls.create(directory, get_preset(name), overrides=overrides, resume=resume)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Run":
        """The existing run in ``directory`` (made by :meth:`create`, ``cmt-openmm train`` or
        ``cmt_openmm.train(target, config, run_dir)``)."""
        directory = Path(directory).expanduser().resolve()
        if not directory.is_dir():
            raise CMTInputError(f"run directory {directory} does not exist; train first with `cmt-openmm train`.")
        path = directory / RUN_FILE
        if path.is_file():
            return cls(directory, parse_run_config(read_yaml(path), directory))
        spec, target = run_from_api(directory)
        return cls(directory, spec, target)

    def _check_resumed_settings(self) -> None:
        """Refuse a resume whose system, temperature or non-resumable settings differ from the stored run's."""
        if (self.directory / RUN_FILE).is_file():
            stored = parse_run_config(read_yaml(self.directory / RUN_FILE), self.directory)
            if (stored.system, stored.temperature) != (self.spec.system, self.spec.temperature):
                raise CMTInputError(f"{self.directory} was trained on {stored.system} at {stored.temperature} K; "
                                    "resume it with the same system.")
            changed = resume_conflicts(stored.train.to_dict(), self.spec.train.to_dict())
            if changed:
                raise CMTInputError(f"the run in {self.directory} was trained with other {', '.join(changed)} "
                                    f"settings; only {' and '.join(RESUMABLE)} may change on resume.")

    # -- what it holds -------------------------------------------------------------------------
    @property
    def config(self) -> TrainConfig:
        """The training settings."""
        return self.spec.train

    @property
    def target(self):
        """The Target (built from the run's system entry on first use)."""
        if self._target is None:
            self._target = build_target(self.spec.system, self.spec.temperature)
        return self._target

    @property
    def trained(self) -> bool:
        """Whether training has started (a checkpoint exists)."""
        return (self.directory / CHECKPOINT_FILE).is_file()

    @property
    def generator(self):
        """The trained generator (``generator.safetensors``, loaded once)."""
        from ..generator import load_generator

        if self._generator is None:
            self._generator = load_generator(self.directory, target=self.target)
        return self._generator

    @property
    def history(self) -> list[dict]:
        """The per-step training records."""
        return load_history(self.directory)

    @property
    def stop_reason(self) -> str | None:
        """Why training stopped: as this object's last :meth:`train` returned it, else as the
        training report recorded it (None before either, and when the report is of fewer steps
        than the run has taken: a later stretch was interrupted or killed)."""
        if self._stop_reason is not None:
            return self._stop_reason
        try:
            training = json.loads((self.directory / f"{REPORT}.json").read_text())["training"]
            history = self.history
            return training["stop_reason"] if history and training["steps"] == history[-1]["step"] else None
        except (OSError, ValueError, KeyError, TypeError, CMTInputError):
            return None

    @property
    def finished(self) -> str | None:
        """Why resuming this run would train nothing, in one sentence that says what to raise to
        continue; None when it would train. A run has finished when its method has (target
        reached, schedule finished), or when the limit that stopped it (max_steps, budget,
        max_minutes) is not raised in this run's settings."""
        reason = self.stop_reason
        if not self.trained or reason is None:
            return None
        done = f"the run in {self.directory} has already finished"
        if reason in ("target reached", "schedule finished"):
            return f"{done} ({reason}), so there is nothing left to train; sample or evaluate it."
        limits = {"max_steps": ("{:,} steps", "--max-steps"), "budget": ("{:,.0f} energy evaluations", "--budget"),
                  "max_minutes": ("{:g} minutes", "--max-minutes")}
        if reason not in limits:
            return None
        stored, new = getattr(TrainConfig.from_yaml(self.directory / CONFIG_FILE), reason), getattr(self.config, reason)
        if new in (None, AUTO) or (stored not in (None, AUTO) and new > stored):
            return None
        value, where = limits[reason]
        return f"{done} (it reached its {reason} of {value.format(stored)}); raise {reason} ({where}) to continue."

    def energy(self):
        """The energy the run's settings name (``energy.backend``, ``platform``, ``n_workers``,
        ``compile``), for sampling and reports as for training; a context manager that closes it."""
        from ..energy.select import make_energy

        settings = self.config.energy
        return make_energy(self.target, settings.backend, platform=settings.platform,
                           n_workers=settings.n_workers, compile=settings.compile)

    # -- doing things --------------------------------------------------------------------------
    def train(self, *, progress: bool = True, report: bool = True) -> dict:
        """Train (continuing from the checkpoint where there is one), then write the report.

        Returns the report dictionary, or with ``report=False`` the run directory and why
        training stopped. A run that has already :attr:`finished` trains nothing and writes
        nothing: it returns its stored report. A run stopped by SIGTERM or SIGINT writes no
        report either: it returns the run directory, the stop reason "interrupted", the signal's
        name and the steps taken, and continues with ``resume=True``.
        """
        from ..training import train

        resume = self.trained
        stored = self.directory / f"{REPORT}.json"
        main = launched().main  # under torchrun, rank 0 alone reports (the other ranks only train)
        progress = progress and main
        if resume and self.finished and (stored.is_file() or not report):
            if not report:
                return {"run_dir": str(self.directory), "stop_reason": self.stop_reason}
            return json.loads(stored.read_text())
        _say(f"{'resuming' if resume else 'training'} {self.config.method} on {self.target.name} at "
             f"{self.spec.temperature:g} K in {self.directory}", progress)
        result = train(self.target, self.config, run_dir=self.directory, resume=resume, progress=progress)
        self._generator, self._stop_reason = result.generator, result.stop_reason
        if result.stop_reason == "interrupted":
            return {"run_dir": str(self.directory), "stop_reason": result.stop_reason, "signal": result.signal,
                    "steps": len(result.history)}
        if not report or not main:
            return {"run_dir": str(self.directory), "stop_reason": result.stop_reason}
        return self._report(result.history, result.stop_reason, progress=progress, name=REPORT)

    def sample(self, n: int, *, batch_size: int = 1000, seed: int = 0, temperature: float | None = None,
               progress: bool = True):
        """``n`` generator samples weighted towards the target (a :class:`ReweightedEnsemble`),
        with the run's energies; ``temperature`` (K) reweights them to another temperature."""
        from ..sampling.reweighting import reweight

        with self.energy() as energy:
            ensemble = reweight(self.generator, self.target, n, batch_size=batch_size, seed=seed,
                                progress=progress, energy=energy)
        return ensemble if temperature is None else ensemble.reweight_to(temperature)

    def write_samples(self, n: int, out: str | os.PathLike, *, pdb: str | os.PathLike | None = None,
                      dcd: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                      resample: int | None = None, seed: int = 0, batch_size: int = 1000,
                      temperature: float | None = None, progress: bool = True, world=None) -> dict:
        """Draw :meth:`sample`'s samples and write them as they are drawn, in bounded memory
        (:func:`~cmt_openmm.sampling.sample_files.write_samples`): ``out`` (.npz: positions nm,
        log_q, reduced_energy, log_weights), optionally ``weights`` (.npy/.csv), ``dcd`` and ``pdb``
        (the ``resample`` resampled frames when given, else every sample), and ``out`` with .json
        (the summary, also returned; with ``resample``, how many frames are distinct and a sentence
        saying that they repeat and that N_eff bounds their information). No file appears under
        its final name before it is complete.

        Under torchrun (``world``, a :class:`~cmt_openmm.training.distributed.World` joined by the
        caller) every rank draws its share of the samples and rank 0 writes the files (the same
        files as one process writes); the other ranks write nothing and return None.
        """
        from ..sampling.drawing import draw_chunks
        from ..sampling.sample_files import write_samples
        from ..training.distributed import on_main

        out = Path(out)
        world = world or World()
        on_main(world, lambda: _check_sample_outputs(n, out, pdb, dcd, weights, resample))
        with self.energy() as energy:
            if not world.main:
                for _ in draw_chunks(self.generator, self.target, n, batch_size=batch_size, seed=seed, energy=energy,
                                     world=world):
                    pass
                return None
            _, summary = write_samples(self.generator, self.target, n, out, pdb=pdb, dcd=dcd, weights=weights,
                                       resample=resample, seed=seed, batch_size=batch_size, temperature=temperature,
                                       energy=energy, progress=progress, world=world)
        atomic_write(out.with_suffix(".json"), to_json(summary))
        return summary

    def evaluate(self, reference: str | os.PathLike | None = None, *, n_samples: int | None = None,
                 n_draws: int | None = None, seed: int | None = None, progress: bool = True,
                 name: str = EVALUATION) -> dict:
        """Draw reweighted samples, compute the metrics, draw the plots and write ``name``.json/.md
        into the run directory; returns the report dictionary.

        ``reference``: MD frames to compare with (the npz of ``cmt-openmm reference-md`` or a
        trajectory mdtraj reads with the run's topology: DCD, XTC, netCDF, PDB, ...).
        """
        reference_positions = None if reference is None else self.reference_positions(reference)  # before sampling
        return self._report(self.history, self.stop_reason, progress=progress, name=name, reference=reference,
                            reference_positions=reference_positions, n_samples=n_samples, n_draws=n_draws,
                            seed=seed)

    def reference_positions(self, path: str | os.PathLike):
        """(M, n_atoms, 3) nm frames of a reference file, checked against the run's atom count."""
        from ..sampling.reference_md import load_reference

        positions, _ = load_reference(str(path), self.target.topology)
        if positions.shape[1] != self.target.n_atoms:
            raise CMTInputError(f"reference {path} has {positions.shape[1]} atoms but {self.target.name} has "
                                f"{self.target.n_atoms}; pass frames of the same system.")
        return positions

    def _report(self, history, stop_reason, *, progress: bool, name: str, reference=None, reference_positions=None,
                n_samples: int | None = None, n_draws: int | None = None, seed: int | None = None) -> dict:
        from ..analysis.report import write_run_report

        settings = self.spec.report
        n_samples, n_draws = n_samples or settings["n_samples"], n_draws or settings["n_draws"]
        _say(f"{name}: {n_draws} draws of {n_samples} samples", progress)
        with self.energy() as energy:
            return write_run_report(
                self.directory, self.target, self.generator, history, stop_reason, method=self.config.method,
                seed=self.config.seed, n_samples=n_samples, n_draws=n_draws,
                sample_seed=settings["seed"] if seed is None else seed, progress=progress,
                reference_file=None if reference is None else str(reference), name=name, energy=energy,
                reference_positions=reference_positions)

    def __repr__(self) -> str:
        return f"Run({str(self.directory)!r}, method={self.config.method!r}, system={self.spec.system!r})"


def report(run_dir: str | os.PathLike, reference: str | os.PathLike | None = None, n_samples: int | None = None,
           n_draws: int | None = None, seed: int | None = None, progress: bool = True,
           name: str = EVALUATION) -> dict:
    """Evaluate the run in ``run_dir``: ``Run.open(run_dir).evaluate(...)`` (see :meth:`Run.evaluate`)."""
    return Run.open(run_dir).evaluate(reference, n_samples=n_samples, n_draws=n_draws, seed=seed,
                                      progress=progress, name=name)


def _run_mapping(config, overrides: Mapping | None) -> tuple[Any, Path]:
    """The run mapping of a run file path, a mapping or a RunSpec, with ``overrides`` applied, and
    the folder its relative paths are relative to."""
    if isinstance(config, RunSpec):
        data, base = config.to_dict(), Path.cwd()
    elif isinstance(config, (str, os.PathLike)):
        data, base = read_yaml(config), Path(config).expanduser().resolve().parent
    elif isinstance(config, Mapping):
        data, base = dict(config), Path.cwd()
    else:
        raise CMTInputError(f"a run's config must be a run file path, a mapping or a RunSpec, not "
                            f"{type(config).__name__}.")
    if isinstance(data, dict) and overrides:
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return data, base


def _save_target(target, directory: Path) -> Any:
    """Save ``target`` in the run directory; the system entry that names it."""
    saved = directory / TARGET_DIR
    target.save(saved)
    return saved_target_entry(target, saved)


def _temperature(data, target) -> float:
    """The run's temperature: the target's; a run file that names another one is refused."""
    given = data.get("temperature") if isinstance(data, dict) else None
    if given is not None and abs(float(given) - target.temperature) > 1e-9:
        raise CMTInputError(f"the config's temperature {given} K differs from the target's {target.temperature:g} K; "
                            "build the target at the temperature you want and leave it out of the config.")
    return target.temperature


def _check_sample_outputs(n: int, out: Path, pdb, dcd, weights, resample) -> None:
    if n < 1:
        raise CMTInputError(f"the number of samples must be positive, got {n}.")
    if resample is not None and resample < 1:
        raise CMTInputError(f"the number of resampled frames must be positive, got {resample}.")
    if weights and Path(weights).suffix not in (".npy", ".csv"):
        raise CMTInputError(f"the weights file {weights} must end in .npy or .csv.")
    if out.suffix != ".npz":
        raise CMTInputError(f"the samples file {out} must end in .npz.")
    for path in (out, pdb, dcd, weights):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise CMTInputError(f"the folder of {path} does not exist; create it first.")


def _say(message: str, progress: bool) -> None:
    import sys

    if progress:
        print(f"[cmt-openmm] {message}", file=sys.stderr, flush=True)
