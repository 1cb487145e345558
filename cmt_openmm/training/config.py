"""Training settings: one validated, serialisable configuration for every training method.

A run is reproducible from its config file: :class:`TrainConfig` loads from a plain dict (as
parsed from YAML), refuses unknown keys and bad values with one sentence
(:class:`~cmt_openmm.errors.CMTInputError`), and ``to_dict()`` round-trips. Hand-written
dataclasses rather than pydantic keep the dependency list short and the messages ours.
Numbers may be given as YAML strings such as ``1e6`` (PyYAML reads those as text).
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import CMTInputError
from ..flows import MASKS
from .strata import STRATA, STRATA_MASSES

TRAINERS: dict[str, type] = {}
"""The trainer class of each method name (``TrainConfig.method``), filled by :func:`register_method`."""
RESUMABLE = ("budget", "max_steps", "max_minutes", "checkpoint_minutes", "threads", "device")
"""Training settings a resumed run may change."""
DEVICES = ("cpu", "cuda", "auto")


def register_method(name: str):
    """Class decorator: make a :class:`~cmt_openmm.training.loop.Trainer` subclass the trainer of
    ``method: name`` (the built-in ones register in :mod:`.cmt` and :mod:`.baselines`; a study
    registers a variant under its own name and reads the settings section it needs)."""
    def register(cls: type) -> type:
        TRAINERS[name] = cls
        return cls
    return register


def resume_conflicts(stored: typing.Mapping, new: typing.Mapping) -> list[str]:
    """Sorted names of the settings that differ between a run's stored and new config (dicts of
    :meth:`TrainConfig.to_dict`) and may not change on resume. A setting added to a section
    (``flow``, ``cmt``, ...) after the run was stored counts as its default there. ``shards`` and
    ``cmt.step_scale`` given as "auto" resume with the stored value (the run keeps what it measured)."""
    defaults = dataclasses.asdict(TrainConfig())
    stored = {k: {**defaults[k], **v} if isinstance(v, typing.Mapping) and isinstance(defaults.get(k), dict) else v
              for k, v in stored.items()}
    if isinstance(new.get("cmt"), typing.Mapping) and new["cmt"].get("step_scale") == AUTO:
        new = {**new, "cmt": {**new["cmt"], "step_scale": stored.get("cmt", {}).get("step_scale", AUTO)}}

    def differs(k):  # shards "auto" resumes with the stored count (absent in runs from before shards: 1)
        if k == "shards" and new.get(k) == AUTO:
            return False
        return stored.get(k, 1 if k == "shards" else None) != new.get(k)

    return sorted(k for k in set(stored) | set(new) if differs(k) and k not in RESUMABLE)


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _check(pred, what: str) -> dict:
    return {"check": pred, "what": what}


POSITIVE = _check(_positive, "a positive number")
NON_NEGATIVE = _check(_non_negative, "a number >= 0")
AUTO = "auto"  # a setting sized from the run's plan (:mod:`.schedule`)
POSITIVE_OR_AUTO = {**POSITIVE, "auto": True}


TRAIN_DTYPES = ("float32", "bfloat16", "auto")  # flow.train_dtype


@dataclass
class FlowConfig:
    """Size of the spline coupling flow (same architecture for every method; linear_bins: bins of
    the splines on bonds and angles, None: n_bins, which then sets the torsions'), and train_dtype:
    the dtype of the conditioners' matmuls while training ("bfloat16": a faster step where the
    hardware multiplies bfloat16 matrices; "auto": bfloat16 there,
    float32 elsewhere, :func:`native_bfloat16`). The generator handed out runs in float32
    (:func:`~cmt_openmm.flows.coupling.conditioner_matmuls`)."""

    n_layers: int = field(default=8, metadata=POSITIVE)
    hidden: int = field(default=128, metadata=POSITIVE)
    n_bins: int = field(default=8, metadata=POSITIVE)
    linear_bins: typing.Optional[int] = field(default=None, metadata=POSITIVE)
    mask: str = field(default="random", metadata=_check(lambda v: v in MASKS, "one of " + ", ".join(MASKS)))
    train_dtype: str = field(default="float32", metadata=_check(lambda v: v in TRAIN_DTYPES,
                                                                  "one of " + ", ".join(TRAIN_DTYPES)))

    def conditioner_dtype(self, device="cpu"):
        """The torch dtype of the conditioners while training on ``device`` (None: the flow's own)."""
        import torch

        if self.train_dtype == "bfloat16" or (self.train_dtype == AUTO and native_bfloat16(device)):
            return torch.bfloat16
        return None


def native_bfloat16(device="cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU torch says
    supports bfloat16, or a CPU whose flags (Linux /proc/cpuinfo) list avx512_bf16 or amx_bf16.
    Elsewhere bfloat16 matmuls are emulated and slower than float32."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = _cpu_flags()
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (OSError where there is none)."""
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@dataclass
class EnergyConfig:
    """Energies: backend ("auto": the faster of torch and OpenMM when torch is supported and
    verified, see :mod:`cmt_openmm.energy.select`; "torch"; "openmm"), the OpenMM platform and
    worker processes, torch.compile of the torch path, and the training losses' regularisation
    threshold (kT).

    compile: "auto" compiles the torch energy on CPUs where it is safe and faster: a crash in
    compiled code cannot be caught in-process, so a subprocess first compiles and checks it
    against eager torch and OpenMM, once per System and machine, and its verdict is cached
    (:mod:`cmt_openmm.energy.torch.compile_probe`); true compiles without that probe; false
    never compiles nor probes (as does ``CMT_OPENMM_COMPILE=0`` in the environment).
    recheck_every: every so many steps, a few of the step's own flow samples are evaluated by
    OpenMM too and the torch energy switches itself to OpenMM if they disagree
    (:func:`~cmt_openmm.energy.torch.recheck.recheck`; fields ``recheck_*`` in the step's record;
    0: never).
    """

    backend: str = field(default="auto", metadata=_check(lambda v: v in ("auto", "torch", "openmm"),
                                                          "one of auto, torch, openmm"))
    platform: str = "Reference"
    n_workers: int = field(default=1, metadata=POSITIVE)
    compile: typing.Union[bool, str] = field(default=AUTO, metadata={"auto": True})
    threshold: float = field(default=1e3, metadata=POSITIVE)
    recheck_every: int = field(default=200, metadata=NON_NEGATIVE)


@dataclass
class CMTConfig:
    """Constrained Mass Transport (docs/method.md; defaults from its "Calibration" section).

    fit_steps: Adam steps per annealing step; None = one pass over the buffer
    (ceil(n_samples / batch_size)). resample: minibatches drawn ∝ w̄ (else uniform with
    weights in the loss). steps_after_target: annealing steps to continue once the dual first
    returns λ = η = 0 (the target is reached); each solves the dual again, and the learning
    rate is multiplied by lr_decay_after_target before each of them (1 = constant; < 1 damps
    the step-to-step fluctuation of the final flow). lr_decay_from: when that decay starts,
    "target" (the first step with λ = η = 0) or "cooled" (the first step after the warm-up whose
    entropy constraint is inactive, η = 0: the path has cooled and the remaining steps mostly
    refine the flow at λ ≲ 1, where a shrinking learning rate is what lifts ESS;
    docs/cmt_settings.md). eps_ent_warmup, warmup_steps: a two-phase
    entropy constraint, ε_ent = eps_ent_warmup for the first warmup_steps annealing steps (None:
    eps_ent throughout); a tight value keeps the path hot (η > 0) while the flow learns the shape
    of every basin, then eps_ent lets it cool (docs/cmt_settings.md). strata: "none", "phi-sign",
    "phi-sign-turns" or "phi-basin" (peptides); with strata, each of the K strata in the buffer is
    fitted with at least mass strata_floor / K, the dual's weights kept inside each; strata_mass: each
    stratum's mass before the floor, "dual" (the dual's), "holder" (the Hölder bound: the mass
    the step would give it if the flow's shape inside it were right) or "holder-turns" (the bound
    per stratum and turn pattern, the floor over the strata; :mod:`cmt_openmm.training.strata`).
    eps_ent: auto sizes the entropy budget per step so that the path cools at cool_fraction of the
    run's planned steps; lr_decay_after_target: auto decays the learning rate to lr_final_fraction
    of lr by the planned last step (:mod:`cmt_openmm.training.schedule`). step_scale multiplies
    n_samples and batch_size (the fit's Adam steps per annealing step stay fit_steps); auto measures
    a step at scales 1, 2, 4, … on the run's device before a fresh run's first step and keeps
    doubling while a sample gets at least a quarter cheaper
    (:func:`~cmt_openmm.training.schedule.pick_step_scale`; 1 on the CPUs measured, where a step's
    time grows with its samples); a resumed run keeps the scale it started with.
    """

    eps_tr: float = field(default=0.5, metadata=POSITIVE)
    eps_ent: typing.Union[float, str] = field(default=1.0, metadata=POSITIVE_OR_AUTO)
    eps_ent_warmup: typing.Optional[float] = field(default=None, metadata=POSITIVE)
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)
    n_samples: int = field(default=8000, metadata=POSITIVE)
    fit_steps: typing.Optional[int] = field(default=None, metadata=POSITIVE)
    batch_size: int = field(default=256, metadata=POSITIVE)
    lr: float = field(default=5e-4, metadata=POSITIVE)
    resample: bool = True
    steps_after_target: int = field(default=0, metadata=NON_NEGATIVE)
    lr_decay_after_target: typing.Union[float, str] = field(
        default=1.0, metadata={**_check(lambda v: 0 < v <= 1, "a number in (0, 1]"), "auto": True})
    lr_decay_from: str = field(default="target", metadata=_check(lambda v: v in ("target", "cooled"),
                                                                  "one of target, cooled"))
    strata: str = field(default="none", metadata=_check(lambda v: v in STRATA, "one of " + ", ".join(STRATA)))
    strata_floor: float = field(default=0.1, metadata=_check(lambda v: 0 < v < 1, "a number in (0, 1)"))
    strata_mass: str = field(default="dual", metadata=_check(lambda v: v in STRATA_MASSES,
                                                             "one of " + ", ".join(STRATA_MASSES)))
    cool_fraction: float = field(default=0.5, metadata=_check(lambda v: 0 < v < 1, "a number in (0, 1)"))
    lr_final_fraction: float = field(default=0.04, metadata=_check(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    step_scale: typing.Union[int, str] = field(default=1, metadata=POSITIVE_OR_AUTO)


@dataclass
class ReverseKLConfig:
    """Reverse KL by reparameterised gradients; one record every steps_per_record Adam steps."""

    batch_size: int = field(default=256, metadata=POSITIVE)
    lr: float = field(default=5e-4, metadata=POSITIVE)
    steps_per_record: int = field(default=50, metadata=POSITIVE)


@dataclass
class ForwardKLConfig:
    """Maximum likelihood on given samples: data = .npz with ``positions`` (M, n_atoms, 3) nm.

    eval_samples: flow samples per record for the reverse ESS (their energies are counted).
    """

    data: typing.Optional[str] = None
    batch_size: int = field(default=256, metadata=POSITIVE)
    lr: float = field(default=5e-4, metadata=POSITIVE)
    steps_per_record: int = field(default=50, metadata=POSITIVE)
    eval_samples: int = field(default=1000, metadata=NON_NEGATIVE)


@dataclass
class TemperatureAnnealingConfig:
    """TA-BG: reverse KL at t_high (K), then importance-weighted fits down a geometric ladder.

    The ladder has n_temperatures levels from t_high to the target temperature (both
    included); the reverse-KL stage takes reverse_kl_steps Adam steps (a record every
    steps_per_record), then each lower level gets steps_per_temperature annealing steps of
    n_samples buffer samples and fit_steps Adam steps (None = one pass over the buffer), and
    the target temperature final_steps more.
    """

    t_high: float = field(default=1200.0, metadata=POSITIVE)
    n_temperatures: int = field(default=8, metadata=_check(lambda v: v >= 2, "an integer >= 2"))
    reverse_kl_steps: int = field(default=500, metadata=NON_NEGATIVE)
    steps_per_record: int = field(default=50, metadata=POSITIVE)
    batch_size: int = field(default=256, metadata=POSITIVE)
    lr: float = field(default=5e-4, metadata=POSITIVE)
    n_samples: int = field(default=8000, metadata=POSITIVE)
    fit_steps: typing.Optional[int] = field(default=None, metadata=POSITIVE)
    resample: bool = True
    steps_per_temperature: int = field(default=1, metadata=POSITIVE)
    final_steps: int = field(default=0, metadata=NON_NEGATIVE)


@dataclass
class TrainConfig:
    """Everything a training run needs besides the target.

    method: "cmt" | "reverse_kl" | "forward_kl" | "temperature_annealing"; seed: the only
    source of randomness; budget: maximum number of energy evaluations (a step that would
    exceed it is not started), or "auto" with max_minutes: as many as fit in that time;
    max_steps: maximum number of steps (annealing steps for CMT and the ladder, records of
    steps_per_record Adam steps for the gradient methods); max_minutes:
    training wall time after which no new step starts (None: no limit); checkpoint_minutes: the
    longest time between two checkpoints (0: after every step); the run also writes one when it
    stops, is interrupted or fails, so only a hard kill loses up to that much training; threads: torch
    CPU threads while training (the CLI's --threads; 1 is fastest for the ALDP flows on few
    cores; "auto": :func:`resolve_threads`, for the larger peptides' steps);
    ema_decay: None, or average the flow's weights over training with this decay per Adam step
    and hand out the average as the trained generator (:mod:`.averaging`; e.g. 0.999); device: "cpu", "cuda" or "auto" (cuda when available) for the flow, buffers and fit;
    shards: the independent random streams each step's samples are drawn from
    (:mod:`.distributed`): "auto" = one per process (1 without torchrun), kept on resume; a run
    on R processes equals a one-process run with shards R, and resumes on any number of
    processes that divides it.

    Example (missing keys take defaults; a wrong value is refused in one sentence):
        >>> import cmt_openmm
        >>> cfg = cmt_openmm.TrainConfig.from_dict({"method": "cmt", "budget": "1e5", "cmt": {"eps_tr": 0.3}})
        >>> cfg.budget, cfg.cmt.eps_tr, cfg.flow.n_layers, cmt_openmm.TrainConfig.from_dict(cfg.to_dict()) == cfg
        (100000, 0.3, 8, True)
        >>> cmt_openmm.TrainConfig.from_dict({"cmt": {"eps_tr": -1}})
        Traceback (most recent call last):
        ...
        cmt_openmm.errors.CMTInputError: training setting cmt.eps_tr must be a positive number, got -1.
    """

    method: str = field(default="cmt", metadata=_check(lambda v: v in TRAINERS, "a registered method (cmt, reverse_kl, "
                                                                           "forward_kl, temperature_annealing)"))
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    budget: typing.Union[int, str] = field(default=1_000_000, metadata=POSITIVE_OR_AUTO)
    max_steps: int = field(default=1000, metadata=POSITIVE)
    max_minutes: typing.Optional[float] = field(default=None, metadata=POSITIVE)
    checkpoint_minutes: float = field(default=1.0, metadata=NON_NEGATIVE)
    threads: typing.Union[int, str] = field(default=1, metadata=POSITIVE_OR_AUTO)
    ema_decay: typing.Optional[float] = field(default=None, metadata=_check(lambda v: 0 < v < 1, "a number in (0, 1)"))
    device: str = field(default="cpu", metadata=_check(lambda v: v in DEVICES, "one of " + ", ".join(DEVICES)))
    shards: typing.Union[int, str] = field(default=AUTO, metadata=POSITIVE_OR_AUTO)
    flow: FlowConfig = field(default_factory=FlowConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    cmt: CMTConfig = field(default_factory=CMTConfig)
    reverse_kl: ReverseKLConfig = field(default_factory=ReverseKLConfig)
    forward_kl: ForwardKLConfig = field(default_factory=ForwardKLConfig)
    temperature_annealing: TemperatureAnnealingConfig = field(default_factory=TemperatureAnnealingConfig)

    @classmethod
    def from_dict(cls, data: typing.Mapping | None) -> "TrainConfig":
        """Build and validate from a (YAML-parsed) mapping; missing keys take defaults."""
        config = _from_dict(cls, data or {}, "")
        if config.budget == AUTO and config.max_minutes is None:
            raise CMTInputError("budget: auto sizes the run to its wall time, so it needs max_minutes too "
                                "(e.g. max_minutes: 60), or give budget as a number of energy evaluations.")
        if config.method == "forward_kl" and not config.forward_kl.data:
            raise CMTInputError("method forward_kl needs forward_kl.data, an .npz file with `positions` in nm.")
        if config.cmt.strata_mass != "dual" and config.cmt.strata == "none":
            raise CMTInputError(f"cmt.strata_mass {config.cmt.strata_mass} sets the masses of strata, and cmt.strata "
                                "is none; set cmt.strata (phi-sign, phi-sign-turns or phi-basin) or leave "
                                "strata_mass out.")
        if config.cmt.strata_mass == "holder-turns" and config.cmt.strata == "phi-sign-turns":
            raise CMTInputError("cmt.strata_mass holder-turns cuts the strata by their turns, and cmt.strata "
                                "phi-sign-turns already does; use strata_mass holder with it, or strata phi-sign "
                                "or phi-basin with holder-turns.")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Load a YAML file holding the mapping of :meth:`from_dict`."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CMTInputError(f"cannot read training config {path}: {exc}.") from None
        if not isinstance(data, dict):
            raise CMTInputError(f"training config {path} must hold a mapping of settings.")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        """Plain, YAML-safe dict; ``TrainConfig.from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _from_dict(cls, data, prefix: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, typing.Mapping):
        raise CMTInputError(f"training setting {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CMTInputError(
            f"unknown training setting {prefix}{unknown[0]}; known keys here are {', '.join(fields)}."
        )
    values = {}
    for name, value in data.items():
        key = prefix + name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _from_dict(kind, value, key + ".")
            continue
        meta = fields[name].metadata
        if meta.get("auto") and value == AUTO:
            values[name] = AUTO
            continue
        if meta.get("auto"):  # Union[number, "auto"]: the number's type is the first
            kind = typing.get_args(kind)[0]
        values[name] = _coerce(kind, value, key)
        if values[name] is not None and "check" in meta and not meta["check"](values[name]):
            raise CMTInputError(f"training setting {key} must be {meta['what']}, got {value!r}.")
    return cls(**values)


def _coerce(kind, value, key: str):
    optional = typing.get_origin(kind) is typing.Union
    if optional:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise CMTInputError(f"training setting {key} must be true or false, got {value!r}.")
    if kind is str:
        if isinstance(value, str) and value:
            return value
        raise CMTInputError(f"training setting {key} must be a non-empty string, got {value!r}.")
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise CMTInputError(f"training setting {key} must be a finite number, got {value!r}.")
    if kind is int:
        if float(number) != int(number):
            raise CMTInputError(f"training setting {key} must be a whole number, got {value!r}.")
        return int(number)
    return float(number)


MAX_AUTO_THREADS = 4  # the flows' small matmuls split over many threads spend more on
# synchronisation than they gain; 2 threads pay on an ala4 step (RESULTS.md), more are untested


def resolve_threads(threads: int | str, processes: int = 1) -> int:
    """torch threads of a ``threads`` setting: the number itself, or for "auto" this process's share
    of the cores it may run on when ``processes`` train side by side on them, at most MAX_AUTO_THREADS."""
    if threads != AUTO:
        return int(threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // processes, MAX_AUTO_THREADS))


def resolve_device(name: str):
    """The torch.device of a ``device`` setting ("cpu", "cuda", "auto"); "cuda" without a GPU is refused."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CMTInputError("device cuda was asked for but torch sees no CUDA device here; use device: cpu or auto.")
    if name not in ("cpu", "cuda"):
        raise CMTInputError(f"device must be one of {', '.join(DEVICES)}, got {name!r}.")
    return torch.device(name)
