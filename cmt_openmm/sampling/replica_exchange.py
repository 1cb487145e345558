"""One replica-exchange driver over openmmtools' ``ReplicaExchangeSampler``: storage, resume, seeding, frames.

:func:`run_replica_exchange` runs a ladder of thermodynamic states with MCMC moves per state,
as openmmtools' ``ParallelTempering`` builds on ``ReplicaExchangeSampler``; the temperature
ladder of :mod:`cmt_openmm.sampling.reference_md` and the λ ladder of
:mod:`cmt_openmm.export.flow_bridged_remd` are both runs of it. It adds to the public sampler API:

- netCDF storage through our own ``MultiStateReporter`` (checkpoint every iteration, closed
  explicitly), created afresh or resumed with ``ReplicaExchangeSampler.from_storage``: a run
  killed at any moment (SIGKILL included) continues from its last stored iteration. The caller's
  settings (a JSON dict) are stored in the metadata, and a resume of storage written for another
  system, with other settings, by something else or unreadable is refused in one sentence;
- seeding: the run seeds NumPy's global generator (replica mixing; restored afterwards) and
  numba's (openmmtools' jitted swap-all mixing), and :class:`SeededLangevinMove` draws the
  integrator's and the velocities' seeds from it, so a fresh run is reproducible for a given
  seed and platform. A resumed run is reseeded from (seed, iteration): statistically sound,
  not bit-identical to an uninterrupted one;
- minimisation of every replica before a fresh run, a progress bar over iterations, and the
  frames of thermodynamic state 0 read back from storage (:func:`read_state0_frames`), with
  the provenance and npz writing shared by its users (:meth:`ReplicaExchangeRun.provenance`,
  :func:`write_frames`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import openmm
import openmm.unit as unit
from openmmtools import cache, mcmc, states
from openmmtools.multistate import MultiStateReporter, ReplicaExchangeSampler

from ..energy.openmm.worker import platform_name
from ..errors import CMTInputError
from ..files import atomic_writer

__all__ = ["run_replica_exchange", "ReplicaExchangeOptions", "ReplicaExchangeRun", "SeededLangevinMove",
           "seed_everything", "stored_metadata", "read_state0_frames", "write_frames", "positive_value",
           "package_version", "SETTINGS_KEY"]

SETTINGS_KEY = "cmt_openmm_settings"
"""The metadata entry of the storage holding the run's settings (JSON)."""

_FRESH = "pass resume=False (--restart) to start afresh or choose another storage path"
"""What a refused resume says to do."""

_SEED_MAX = 2**31 - 1


class SeededLangevinMove(mcmc.LangevinDynamicsMove):
    """`LangevinDynamicsMove` (BAOAB, `LangevinMiddleIntegrator`) whose randomness is seeded.

    The integrator's random-number seed and the velocities drawn from the Maxwell-Boltzmann
    distribution before each segment come from NumPy's global generator, which
    :func:`run_replica_exchange` seeds. Serialises like its parent (openmmtools storage, deepcopy).
    """

    def __init__(self, timestep=1.0 * unit.femtosecond, collision_rate=1.0 / unit.picosecond, n_steps=1000, **kw):
        kw["reassign_velocities"] = False  # drawn here with a seed, in _before_integration
        super().__init__(timestep=timestep, collision_rate=collision_rate, n_steps=n_steps, **kw)

    def _get_integrator(self, thermodynamic_state):
        integrator = super()._get_integrator(thermodynamic_state)
        integrator.setRandomNumberSeed(int(np.random.randint(1, _SEED_MAX)))
        return integrator

    def _before_integration(self, context, thermodynamic_state):
        context.setVelocitiesToTemperature(thermodynamic_state.temperature, int(np.random.randint(1, _SEED_MAX)))


def seed_everything(seed: int, iteration: int) -> None:
    """Seed NumPy's global generator and numba's from (seed, iteration)."""
    derived = int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0]) % _SEED_MAX
    np.random.seed(derived)
    try:
        from numba import njit

        @njit(cache=False)
        def _numba_seed(s):  # numba keeps its own generator for jitted code
            np.random.seed(s)

        _numba_seed(derived)
    except ImportError:  # openmmtools then mixes replicas in Python, with NumPy's generator
        pass


def positive_value(x: Any, u: unit.Unit, name: str) -> float:
    """``x`` (a float in ``u`` or a Quantity) as a finite positive float in ``u``."""
    if unit.is_quantity(x):
        if not x.unit.is_compatible(u):
            raise CMTInputError(f"{name} {x} has the wrong unit: pass {u} or a float in {u}.")
        x = x.value_in_unit(u)
    value = float(x)
    if not (math.isfinite(value) and value > 0):
        raise CMTInputError(f"{name} must be a finite positive number, got {value}.")
    return value


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        import cmt_openmm

        return getattr(cmt_openmm, "__version__", "unknown") if package == "cmt_openmm" else "unknown"


def _platform(name: str) -> openmm.Platform:
    try:
        return openmm.Platform.getPlatformByName(name)
    except openmm.OpenMMException:
        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise CMTInputError(f"OpenMM platform {name!r} is not available here: use one of {names}.") from None


@dataclass(frozen=True)
class ReplicaExchangeOptions:
    """How to run (not stored, free to change on resume); checked when made.

    n_iterations: total iterations (a resumed run continues up to this number); storage: the
    netCDF file (a ``<stem>_checkpoint.nc`` sits beside it); seed: see the module docstring;
    resume: continue ``storage`` when it exists, False deletes it first; progress: a tqdm bar
    titled ``description``; n_equilibration: initial iterations left out of the frames;
    platform: OpenMM platform name or ``openmm.Platform`` (kept as its name); minimize: minimise every replica before a fresh run;
    context_cache_capacity: Contexts kept per cache; citations: let openmmtools print its citations.
    """

    n_iterations: int
    storage: Path
    seed: int = 0
    resume: bool = True
    progress: bool = True
    n_equilibration: int = 0
    platform: str = "Reference"
    minimize: bool = True
    context_cache_capacity: int = 4
    description: str = "replica exchange"
    citations: bool = False

    def __post_init__(self):
        object.__setattr__(self, "storage", Path(self.storage))
        object.__setattr__(self, "platform", platform_name(self.platform))
        if int(self.n_iterations) < 1 or not 0 <= int(self.n_equilibration) < int(self.n_iterations):
            raise CMTInputError("need n_iterations >= 1 and 0 <= n_equilibration < n_iterations.")
        _platform(self.platform)

    @property
    def checkpoint(self) -> Path:
        return self.storage.with_name(self.storage.stem + "_checkpoint.nc")


@dataclass
class ReplicaExchangeRun:
    """What :func:`run_replica_exchange` ran: state-0 frames (nm), their u = U/kT, the mean exchange
    acceptance (None for one replica), the iterations stored, the number of replicas, the
    sampler's moves after the run (their statistics), and the settings and options it ran with."""

    positions: np.ndarray
    reduced_energy: np.ndarray
    exchange_acceptance: float | None
    n_iterations_stored: int
    n_replicas: int
    mcmc_moves: list
    settings: dict
    options: ReplicaExchangeOptions

    def provenance(self, **extra) -> dict:
        """The settings, the run's counts and options, ``extra``, and the package versions (JSON-ready)."""
        o = self.options
        return {
            **self.settings,
            "n_replicas": int(self.n_replicas),
            "n_iterations": int(o.n_iterations),
            "n_iterations_stored": int(self.n_iterations_stored),
            "n_equilibration": int(o.n_equilibration),
            "n_frames": int(self.positions.shape[0]),
            "seed": int(o.seed),
            "platform": o.platform,
            "storage": str(o.storage),
            "exchange_acceptance": self.exchange_acceptance,
            **extra,
            "openmm": openmm.__version__,
            "openmmtools": package_version("openmmtools"),
            "cmt_openmm": package_version("cmt_openmm"),
        }


def write_frames(out_path: str | os.PathLike, positions: np.ndarray, reduced_energy: np.ndarray,
                 provenance: dict) -> Path:
    """The npz of frames: ``positions`` (nm), ``reduced_energy`` and ``provenance`` (a JSON string)."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as handle:
        np.savez(handle, positions=positions, reduced_energy=reduced_energy,
                 provenance=np.array(json.dumps(provenance)))
    return path


def stored_metadata(storage: str | os.PathLike) -> dict | None:
    """The metadata of an existing replica-exchange storage (None when there is none)."""
    storage = Path(storage)
    if not storage.exists():
        return None
    logger = logging.getLogger("openmmtools.multistate")
    log_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        reporter = MultiStateReporter(str(storage), open_mode="r")
        try:
            return reporter.read_dict("metadata")
        finally:
            reporter.close()
    except Exception as error:  # netCDF/HDF5 and openmmtools raise many kinds; none is ours to pass on
        raise _unreadable(storage, error) from error
    finally:
        logger.setLevel(log_level)


def run_replica_exchange(
    *,
    ladder: Callable[[], tuple[Sequence[states.ThermodynamicState], mcmc.MCMCMove | Sequence[mcmc.MCMCMove]]],
    start: states.SamplerState,
    settings: dict,
    options: ReplicaExchangeOptions,
    metadata: dict[str, str] | None = None,
) -> ReplicaExchangeRun:
    """Replica exchange (swap-all mixing) of the states of ``ladder``, stored in ``options.storage``.

    Args:
        ladder: makes the thermodynamic states (state 0's frames are kept) and the MCMC move, or
            one move per state; called once, after seeding, and only for a new storage.
        start: the starting configuration of every replica.
        settings: what defines the run (JSON-serialisable): stored in the metadata; a resume
            whose stored settings differ is refused with `CMTInputError`.
        options: iterations, storage, seed, resume, progress and the rest (:class:`ReplicaExchangeOptions`).
        metadata: further string entries stored with a new storage.
    """
    from tqdm.auto import tqdm

    o = options
    platform = _platform(o.platform)
    storage, checkpoint, n_iterations = o.storage, o.checkpoint, int(o.n_iterations)
    logger = logging.getLogger("openmmtools.multistate")
    log_level = logger.level
    logger.setLevel(logging.ERROR)  # openmmtools warns "API is experimental" on every sampler and reporter
    numpy_state = np.random.get_state()
    if not o.resume:
        for path in (storage, checkpoint):
            path.unlink(missing_ok=True)
    storage.parent.mkdir(parents=True, exist_ok=True)
    # Our own reporter, closed explicitly: a sampler left to the garbage collector keeps the
    # netCDF files open, and reopening an open HDF5 file can crash the process.
    reporter = MultiStateReporter(str(storage), checkpoint_interval=1, checkpoint_storage=checkpoint.name)
    ReplicaExchangeSampler._global_citation_silence = not o.citations  # its citations go to stdout
    try:
        if storage.exists():
            sampler = _from_storage(reporter, storage)
            _check_stored_settings(sampler.metadata, settings, storage)
            if sampler.number_of_iterations < n_iterations:
                sampler.number_of_iterations = n_iterations
        else:
            checkpoint.unlink(missing_ok=True)
            seed_everything(o.seed, 0)
            thermodynamic_states, moves = ladder()
            sampler = ReplicaExchangeSampler(mcmc_moves=moves, number_of_iterations=n_iterations,
                                             replica_mixing_scheme="swap-all", online_analysis_interval=None)
            sampler.create(thermodynamic_states, start, reporter,
                           metadata={SETTINGS_KEY: json.dumps(settings), **(metadata or {})})
        sampler.energy_context_cache = cache.ContextCache(platform=platform, capacity=o.context_cache_capacity)
        sampler.sampler_context_cache = cache.ContextCache(platform=platform, capacity=o.context_cache_capacity)
        seed_everything(o.seed, sampler.iteration)
        if sampler.iteration == 0 and o.minimize:
            sampler.minimize()
        with tqdm(total=n_iterations, initial=min(sampler.iteration, n_iterations), disable=not o.progress,
                  desc=o.description, unit="it") as bar:
            while sampler.iteration < n_iterations:
                sampler.run(1)
                bar.update(1)
        final_iteration, n_replicas, moves = sampler.iteration, sampler.n_replicas, list(sampler._mcmc_moves)
    finally:
        del ReplicaExchangeSampler._global_citation_silence  # back to openmmtools' own setting
        reporter.close()
        np.random.set_state(numpy_state)
        logger.setLevel(log_level)
    positions, u, acceptance = read_state0_frames(storage, checkpoint, int(o.n_equilibration) + 1, n_iterations)
    acceptance = acceptance if n_replicas > 1 else None  # one replica has no exchanges (openmmtools counts self-swaps)
    return ReplicaExchangeRun(positions, u, acceptance, int(final_iteration), int(n_replicas), moves, settings, o)


def _from_storage(reporter: MultiStateReporter, storage: Path) -> ReplicaExchangeSampler:
    """The sampler stored in ``storage``, or a one-sentence refusal when it cannot be read."""
    try:
        return ReplicaExchangeSampler.from_storage(reporter)
    except Exception as error:  # netCDF/HDF5 and openmmtools raise many kinds; none is ours to pass on
        raise _unreadable(storage, error) from error


def _unreadable(storage: Path, error: Exception) -> CMTInputError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return CMTInputError(f"storage {storage} cannot be read as replica-exchange storage ({reason[:200]}); {_FRESH}.")


def _check_stored_settings(metadata: dict, settings: dict, storage: Path) -> None:
    """Refuse storage written by something else, for another system, or with other settings (one sentence)."""
    if SETTINGS_KEY not in metadata:
        raise CMTInputError(f"storage {storage} was not written by cmt_openmm's replica exchange; {_FRESH}.")
    stored = json.loads(metadata[SETTINGS_KEY])
    if stored == settings:
        return
    system = [k for k in ("system_fingerprint", "topology_fingerprint") if k in settings and stored.get(k) != settings[k]]
    if system:
        what = " and ".join({"system_fingerprint": "System", "topology_fingerprint": "topology"}[k] for k in system)
        raise CMTInputError(f"storage {storage} was written for another system ({stored.get('system', 'unnamed')}: "
                            f"its {what} {'differ' if len(system) > 1 else 'differs'}) than "
                            f"{settings.get('system', 'this one')}; {_FRESH}.")
    changed = sorted(k for k in set(settings) | set(stored) if stored.get(k) != settings.get(k))
    raise CMTInputError(f"storage {storage} was written with other settings ({', '.join(changed)}): {_FRESH}.")


def read_state0_frames(storage: Path, checkpoint: Path, first: int, last: int, chunk: int = 2000):
    """Frames of thermodynamic state 0 for iterations first..last, with u and the mean acceptance."""
    import netCDF4

    with netCDF4.Dataset(storage, "r") as analysis, netCDF4.Dataset(checkpoint, "r") as ckpt:
        state_of = np.asarray(analysis.variables["states"][first : last + 1], dtype=np.int64)
        energies = analysis.variables["energies"]
        replica = np.argmax(state_of == 0, axis=1)  # the replica in state 0 at each iteration
        frames, u = [], []
        for start in range(0, len(replica), chunk):
            rows = np.arange(start, min(start + chunk, len(replica)))
            block = np.asarray(ckpt.variables["positions"][first + rows[0] : first + rows[-1] + 1], dtype=np.float64)
            frames.append(block[rows - start, replica[rows]])
            e = np.asarray(energies[first + rows[0] : first + rows[-1] + 1], dtype=np.float64)
            u.append(e[rows - start, replica[rows], 0])
        accepted = np.asarray(analysis.variables["accepted"][1 : last + 1], dtype=np.float64).sum()
        proposed = np.asarray(analysis.variables["proposed"][1 : last + 1], dtype=np.float64).sum()
    return np.concatenate(frames), np.concatenate(u), (float(accepted / proposed) if proposed > 0 else None)
