"""Reference data for the metrics: temperature replica exchange with openmmtools (`reference-md`).

`run_reference_md` runs openmmtools' `ReplicaExchangeSampler` over a geometric temperature
ladder (Langevin dynamics between exchange attempts, netCDF storage through
`MultiStateReporter`, resumable with `ReplicaExchangeSampler.from_storage`) and writes the
frames of the target temperature (thermodynamic state 0) to an ``.npz``:

- ``positions`` (n_frames, n_atoms, 3) float64, nm — one frame per iteration after
  ``n_equilibration``;
- ``reduced_energy`` (n_frames,) float64 — u = U / kT at the target temperature;
- ``provenance`` — a JSON string (system, fingerprints, temperature, ladder, iterations, steps,
  timestep, seed, exchange acceptance, openmm/openmmtools versions).

Only openmmtools' public sampler API is used; this module adds the seeding, the settings
check on resume, the progress bar and the export. Seeding: the run seeds NumPy's global
generator (replica mixing, restored afterwards) and numba's (openmmtools' jitted swap-all
mixing), and `SeededLangevinMove` draws the integrator's and the velocities' random seeds
from it, so a fresh run is reproducible for a given seed and platform. A resumed run is
reseeded from (seed, iteration): statistically sound, not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm
import openmm.unit as unit
from openmmtools import cache, mcmc, states
from openmmtools.multistate import MultiStateReporter, ReplicaExchangeSampler

from ..errors import CMTInputError
from ..files import atomic_writer
from ..target import Target
from ..units import kelvin

__all__ = ["run_reference_md", "load_reference", "temperature_ladder", "ReferenceMD", "SeededLangevinMove",
           "seed_everything", "positive_value", "package_version", "read_state0_frames"]

_SEED_MAX = 2**31 - 1


def temperature_ladder(t_min: float, t_max: float, n_replicas: int) -> np.ndarray:
    """Geometric temperatures (n_replicas,) in K from ``t_min`` (state 0) to ``t_max``."""
    if n_replicas < 1:
        raise CMTInputError(f"n_replicas must be at least 1, got {n_replicas}.")
    if n_replicas == 1:
        return np.array([t_min])
    if t_max <= t_min:
        raise CMTInputError(f"t_max ({t_max} K) must exceed the target temperature ({t_min} K) with several replicas.")
    return t_min * (t_max / t_min) ** (np.arange(n_replicas) / (n_replicas - 1))


@dataclass
class ReferenceMD:
    """What `run_reference_md` wrote: the npz path, the frames (nm), u at state 0 and the provenance."""

    path: Path
    positions: np.ndarray
    reduced_energy: np.ndarray
    provenance: dict


class SeededLangevinMove(mcmc.LangevinDynamicsMove):
    """`LangevinDynamicsMove` (BAOAB, `LangevinMiddleIntegrator`) whose randomness is seeded.

    The integrator's random-number seed and the velocities drawn from the Maxwell-Boltzmann
    distribution before each segment come from NumPy's global generator, which
    `run_reference_md` seeds. Serialises like its parent (openmmtools storage, deepcopy).
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


def _settings(target: Target, temperatures, steps_per_iteration, timestep_fs, collision_rate, minimize) -> dict:
    return {
        "system": target.name,
        "system_fingerprint": target.system_fingerprint(),
        "topology_fingerprint": target.topology_fingerprint(),
        "temperature": target.temperature,
        "temperatures": [float(t) for t in temperatures],
        "steps_per_iteration": int(steps_per_iteration),
        "timestep_fs": float(timestep_fs),
        "collision_rate_per_ps": float(collision_rate),
        "minimize": bool(minimize),
        "mixing": "swap-all",
    }


def positive_value(x: Any, u: unit.Unit, name: str) -> float:
    if unit.is_quantity(x):
        if not x.unit.is_compatible(u):
            raise CMTInputError(f"{name} {x} has the wrong unit: pass {u} or a float in {u}.")
        x = x.value_in_unit(u)
    value = float(x)
    if not (math.isfinite(value) and value > 0):
        raise CMTInputError(f"{name} must be a finite positive number, got {value}.")
    return value


def run_reference_md(
    target: Target,
    out_path: str | os.PathLike,
    n_replicas: int = 4,
    t_max: Any = 600.0,
    n_iterations: int = 1000,
    steps_per_iteration: int = 500,
    timestep: Any = 1.0,
    seed: int = 0,
    storage: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    n_equilibration: int = 0,
    collision_rate: Any = 1.0,
    platform: str = "Reference",
    minimize: bool = True,
) -> ReferenceMD:
    """Temperature replica exchange for ``target``; writes the target-temperature frames to ``out_path``.

    Args:
        target: the system (non-periodic; state 0 is ``target.temperature``).
        out_path: the ``.npz`` to write (see the module docstring for its arrays).
        n_replicas, t_max: a geometric ladder from ``target.temperature`` to ``t_max`` (K).
        n_iterations: total exchange iterations (a resumed run continues up to this number).
        steps_per_iteration: Langevin steps between exchange attempts.
        timestep: fs (float or Quantity); collision_rate: 1/ps (float or Quantity).
        seed: seeds mixing, integrators and velocities (see the module docstring).
        storage: the netCDF file (default: ``out_path`` with suffix ``.nc``; a
            ``<name>_checkpoint.nc`` file sits beside it, written every iteration).
        resume: continue from ``storage`` when it exists (its settings must match, else
            `CMTInputError`); False deletes it and starts afresh.
        progress: show a tqdm bar over iterations.
        n_equilibration: initial iterations left out of the npz (still stored in the netCDF).
        platform: OpenMM platform name (Reference is the fastest for small molecules on CPUs).
        minimize: minimise the starting structure of every replica before a fresh run.
    """
    from tqdm.auto import tqdm

    if not isinstance(target, Target):
        raise CMTInputError("target must be a cmt_openmm Target: build it with get_target or Target.from_pdb.")
    n_iterations, steps_per_iteration = int(n_iterations), int(steps_per_iteration)
    if n_iterations < 1 or steps_per_iteration < 1 or not 0 <= n_equilibration < n_iterations:
        raise CMTInputError("need n_iterations >= 1, steps_per_iteration >= 1 and 0 <= n_equilibration < n_iterations.")
    timestep_fs = positive_value(timestep, unit.femtosecond, "timestep")
    rate = positive_value(collision_rate, unit.picosecond**-1, "collision_rate")
    temperatures = temperature_ladder(target.temperature, kelvin(t_max), int(n_replicas))
    out_path = Path(out_path)
    storage = Path(storage) if storage is not None else out_path.with_suffix(".nc")
    checkpoint = storage.with_name(storage.stem + "_checkpoint.nc")
    settings = _settings(target, temperatures, steps_per_iteration, timestep_fs, rate, minimize)
    try:
        platform_obj = openmm.Platform.getPlatformByName(platform)
    except openmm.OpenMMException:
        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise CMTInputError(f"OpenMM platform {platform!r} is not available here: use one of {names}.") from None

    logger = logging.getLogger("openmmtools.multistate")
    log_level = logger.level
    logger.setLevel(logging.ERROR)  # openmmtools warns "API is experimental" on every sampler and reporter
    numpy_state = np.random.get_state()
    if storage.exists() and not resume:
        for path in (storage, checkpoint):
            path.unlink(missing_ok=True)
    storage.parent.mkdir(parents=True, exist_ok=True)
    # Our own reporter, closed explicitly: a sampler left to the garbage collector keeps the
    # netCDF files open, and reopening an open HDF5 file can crash the process.
    reporter = MultiStateReporter(str(storage), checkpoint_interval=1, checkpoint_storage=checkpoint.name)
    ReplicaExchangeSampler._global_citation_silence = not progress  # its citations go to stdout
    try:
        if storage.exists():
            sampler = ReplicaExchangeSampler.from_storage(reporter)
            stored = json.loads(sampler.metadata.get("cmt_openmm_settings", "{}"))
            if stored != settings:
                changed = sorted(k for k in settings if stored.get(k) != settings[k])
                raise CMTInputError(
                    f"storage {storage} was written with other settings ({', '.join(changed)}): "
                    "pass resume=False to start afresh or choose another storage path."
                )
            if sampler.number_of_iterations < n_iterations:
                sampler.number_of_iterations = n_iterations
        else:
            checkpoint.unlink(missing_ok=True)
            seed_everything(seed, 0)
            move = SeededLangevinMove(
                timestep=timestep_fs * unit.femtosecond,
                collision_rate=rate / unit.picosecond,
                n_steps=steps_per_iteration,
            )
            sampler = ReplicaExchangeSampler(
                mcmc_moves=move, number_of_iterations=n_iterations, replica_mixing_scheme="swap-all",
                online_analysis_interval=None,
            )
            thermo = [states.ThermodynamicState(target.system, t * unit.kelvin) for t in temperatures]
            sampler_state = states.SamplerState(target.positions * unit.nanometer)
            sampler.create(thermo, sampler_state, reporter, metadata={"cmt_openmm_settings": json.dumps(settings)})
        sampler.energy_context_cache = cache.ContextCache(platform=platform_obj, capacity=4)
        sampler.sampler_context_cache = cache.ContextCache(platform=platform_obj, capacity=4)
        seed_everything(seed, sampler.iteration)
        if sampler.iteration == 0 and minimize:
            sampler.minimize()
        with tqdm(total=n_iterations, initial=min(sampler.iteration, n_iterations), disable=not progress,
                  desc=f"replica exchange {target.name}", unit="it") as bar:
            while sampler.iteration < n_iterations:
                sampler.run(1)
                bar.update(1)
        final_iteration = sampler.iteration
    finally:
        del ReplicaExchangeSampler._global_citation_silence  # back to openmmtools' own setting
        reporter.close()
        np.random.set_state(numpy_state)
        logger.setLevel(log_level)

    positions, u, acceptance = read_state0_frames(storage, checkpoint, n_equilibration + 1, n_iterations)
    provenance = {
        **settings,
        "n_replicas": len(temperatures),
        "n_iterations": n_iterations,
        "n_iterations_stored": int(final_iteration),
        "n_equilibration": int(n_equilibration),
        "n_frames": int(positions.shape[0]),
        "seed": int(seed),
        "platform": platform,
        "storage": str(storage),
        "exchange_acceptance": acceptance,
        "openmm": openmm.__version__,
        "openmmtools": package_version("openmmtools"),
        "cmt_openmm": package_version("cmt_openmm"),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_path) as handle:
        np.savez(handle, positions=positions, reduced_energy=u, provenance=np.array(json.dumps(provenance)))
    return ReferenceMD(out_path, positions, u, provenance)


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        import cmt_openmm

        return getattr(cmt_openmm, "__version__", "unknown") if package == "cmt_openmm" else "unknown"


def read_state0_frames(storage: Path, checkpoint: Path, first: int, last: int, chunk: int = 2000):
    """Frames of thermodynamic state 0 for iterations first..last, with u and the mean acceptance."""
    import netCDF4

    with netCDF4.Dataset(storage, "r") as analysis, netCDF4.Dataset(checkpoint, "r") as ckpt:
        states = np.asarray(analysis.variables["states"][first : last + 1], dtype=np.int64)
        energies = analysis.variables["energies"]
        replica = np.argmax(states == 0, axis=1)  # the replica in state 0 at each iteration
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


def load_reference(path: str | os.PathLike, topology: Any = None) -> tuple[np.ndarray, dict]:
    """Reference frames (n_frames, n_atoms, 3) nm and provenance.

    ``path``: an npz of `run_reference_md` (or any npz with a ``positions`` array in nm), or a
    trajectory mdtraj reads (DCD, XTC, TRR, netCDF, HDF5, PDB, ...; provenance ``{}``), whose
    topology is ``topology`` (an OpenMM Topology; a PDB needs none).
    """
    path = Path(path)
    if not path.is_file():
        raise CMTInputError(f"reference file {path} does not exist: create it with `cmt-openmm reference-md` "
                            "or pass your own trajectory.")
    if path.suffix.lower() != ".npz":
        positions = _trajectory_positions(path, topology)
        provenance: dict = {}
    else:
        try:
            with np.load(path, allow_pickle=False) as data:
                if "positions" not in data:
                    raise CMTInputError(f"{path} has no 'positions' array: pass an npz with positions in nm.")
                positions = np.asarray(data["positions"], dtype=np.float64)
                provenance = json.loads(str(data["provenance"])) if "provenance" in data else {}
        except (OSError, ValueError) as error:
            raise CMTInputError(f"{path} is not a readable npz ({type(error).__name__}); pass the npz of "
                                "`cmt-openmm reference-md` or a trajectory file.") from None
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise CMTInputError(f"{path}: positions have shape {positions.shape}, expected (n_frames, n_atoms, 3) in nm.")
    return positions, provenance


def _trajectory_positions(path: Path, topology: Any) -> np.ndarray:
    """Frames (n, n_atoms, 3) nm of a trajectory file, read by mdtraj with ``topology``."""
    import mdtraj

    top = None if topology is None else mdtraj.Topology.from_openmm(topology)
    try:
        trajectory = mdtraj.load(str(path), top=top) if top is not None or path.suffix.lower() in (".pdb", ".h5") \
            else mdtraj.load(str(path))
    except Exception as error:  # mdtraj raises many types for unreadable or mismatched files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CMTInputError(f"mdtraj cannot read {path} with the run's topology ({message}); pass a trajectory of "
                            "this system (DCD, XTC, TRR, netCDF, HDF5 or PDB).") from None
    return np.asarray(trajectory.xyz, dtype=np.float64)
