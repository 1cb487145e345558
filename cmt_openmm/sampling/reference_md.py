"""Reference data for the metrics: temperature replica exchange with openmmtools (`reference-md`).

`run_reference_md` runs a geometric temperature ladder with Langevin dynamics between exchange
attempts through the shared driver :func:`~cmt_openmm.sampling.replica_exchange.run_replica_exchange`
(netCDF storage, resume with a settings check, seeding, progress) and writes the frames of the
target temperature (thermodynamic state 0) to an ``.npz``. Given a trained generator, each
replica's Langevin segment is followed by independence Metropolis–Hastings moves with the
generator as proposal (:class:`~cmt_openmm.sampling.moves.FlowIndependenceMove`, exact at every
temperature of the ladder): ``cmt-openmm mcmc``, the way to use a generator whose reweighted
samples cannot be trusted on their own. The npz holds:

- ``positions`` (n_frames, n_atoms, 3) float64, nm — one frame per iteration after
  ``n_equilibration``;
- ``reduced_energy`` (n_frames,) float64 — u = U / kT at the target temperature;
- ``provenance`` — a JSON string (system, fingerprints, temperature, ladder, iterations, steps,
  timestep, seed, exchange acceptance, openmm/openmmtools versions; with flow moves the
  generator's content hash, the proposals per iteration and, per temperature, their counts and
  acceptance in ``flow_moves``).

A fresh run is reproducible for a given seed and platform; a resumed run is reseeded from
(seed, iteration) (see :mod:`cmt_openmm.sampling.replica_exchange`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm.unit as unit
from openmmtools import mcmc, states

from ..energy.openmm.platforms import resolve_md_platform
from ..errors import CMTInputError
from ..files import c_stdout_silenced
from ..target import Target
from ..units import kelvin
from .moves import FlowIndependenceMove
# SeededLangevinMove is also importable from here: storage written before the driver existed
# names this module for it, and openmmtools imports the move from the stored module name.
from .replica_exchange import (ReplicaExchangeOptions, SeededLangevinMove, positive_value, run_replica_exchange,
                               write_frames)

__all__ = ["run_reference_md", "load_reference", "temperature_ladder", "ReferenceMD", "SeededLangevinMove"]


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


def _settings(target: Target, temperatures, steps_per_iteration, timestep_fs, collision_rate, minimize,
              flow: dict) -> dict:
    return {**flow,
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
    platform: str = "auto",
    minimize: bool = True,
    generator: Any = None,
    flow_attempts: int = 20,
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
        platform: OpenMM platform name, or ``"auto"``: the faster of Reference and CPU for this System,
            timed on a few steps (:mod:`cmt_openmm.energy.openmm.platforms`; recorded in the provenance).
        minimize: minimise the starting structure of every replica before a fresh run.
        generator: a saved generator of ``target`` (e.g. ``Run.generator``): each replica's Langevin
            segment is then followed by ``flow_attempts`` flow proposals (`FlowIndependenceMove`).
            The storage refers to the generator's file and content hash; resuming with another
            generator is refused.

    Example (two replicas of a toy for 50 short iterations; reference data takes thousands):
        >>> import cmt_openmm, os, tempfile, numpy as np
        >>> from cmt_openmm.sampling.reference_md import run_reference_md
        >>> toy = cmt_openmm.get_target("toy-double-well")
        >>> out = os.path.join(tempfile.mkdtemp(), "reference.npz")
        >>> md = run_reference_md(toy, out, n_replicas=2, t_max=600.0, n_iterations=50, steps_per_iteration=50,
        ...                       timestep=2.0, progress=False)
        >>> md.positions.shape, md.reduced_energy.shape, md.provenance["temperatures"]
        ((50, 1, 3), (50,), [300.0, 600.0])
        >>> bool(np.allclose(md.reduced_energy, [toy.reduced_potential(x) for x in md.positions]))   # u at 300 K
        True
        >>> sorted(os.listdir(os.path.dirname(out)))        # the storage lets a longer run resume
        ['reference.nc', 'reference.npz', 'reference_checkpoint.nc']
    """
    if not isinstance(target, Target):
        raise CMTInputError("target must be a cmt_openmm Target: build it with get_target or Target.from_pdb.")
    n_iterations, steps_per_iteration = int(n_iterations), int(steps_per_iteration)
    if n_iterations < 1 or steps_per_iteration < 1 or not 0 <= n_equilibration < n_iterations:
        raise CMTInputError("need n_iterations >= 1, steps_per_iteration >= 1 and 0 <= n_equilibration < n_iterations.")
    timestep_fs = positive_value(timestep, unit.femtosecond, "timestep")
    rate = positive_value(collision_rate, unit.picosecond**-1, "collision_rate")
    temperatures = temperature_ladder(target.temperature, kelvin(t_max), int(n_replicas))
    out_path = Path(out_path)
    platform = resolve_md_platform(platform, target.system, target.positions)
    if generator is not None and int(flow_attempts) < 1:
        raise CMTInputError(f"flow_attempts must be at least 1, got {flow_attempts}.")
    flow = {} if generator is None else {"flow_generator": generator.content_hash(), "flow_attempts": int(flow_attempts)}
    settings = _settings(target, temperatures, steps_per_iteration, timestep_fs, rate, minimize, flow)
    options = ReplicaExchangeOptions(
        n_iterations=n_iterations, storage=Path(storage) if storage is not None else out_path.with_suffix(".nc"),
        seed=seed, resume=resume, progress=progress, n_equilibration=n_equilibration, platform=platform,
        minimize=minimize, context_cache_capacity=4, citations=progress,
        description=f"{_sampler_name(len(temperatures), generator)} {target.name}")

    def ladder():
        move = SeededLangevinMove(timestep=timestep_fs * unit.femtosecond, collision_rate=rate / unit.picosecond,
                                  n_steps=steps_per_iteration)
        if generator is not None:
            flow_move = FlowIndependenceMove(generator, n_steps=int(flow_attempts), seed=seed, target=target)
            move = mcmc.SequenceMove([move, flow_move])
        return [states.ThermodynamicState(target.system, t * unit.kelvin) for t in temperatures], move

    run = run_replica_exchange(ladder=ladder, start=states.SamplerState(target.positions * unit.nanometer),
                               settings=settings, options=options)
    extra = {} if generator is None else {"flow_moves": _flow_statistics(run.mcmc_moves, temperatures)}
    provenance = run.provenance(**extra)
    write_frames(out_path, run.positions, run.reduced_energy, provenance)
    return ReferenceMD(out_path, run.positions, run.reduced_energy, provenance)


def _sampler_name(n_replicas: int, generator: Any) -> str:
    """What the progress bar calls the run: MD or replica exchange, with or without flow moves."""
    return ("MD" if n_replicas == 1 else "replica exchange") + ("" if generator is None else " + flow moves")


def _flow_statistics(moves: list, temperatures) -> list[dict]:
    """Per thermodynamic state (state 0 first): its temperature (K), the flow move's counts and acceptance."""
    out = []
    for move, t in zip(moves, temperatures, strict=True):
        stats = move.move_list[-1].statistics
        out.append({"temperature": float(t), **stats, "acceptance": stats["n_accepted"] / max(stats["n_proposed"], 1)})
    return out


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
        with c_stdout_silenced():  # mdtraj's DCD plugin prints on the process's stdout from C
            trajectory = mdtraj.load(str(path), top=top) if top is not None or path.suffix.lower() in (".pdb", ".h5") \
                else mdtraj.load(str(path))
    except Exception as error:  # mdtraj raises many types for unreadable or mismatched files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CMTInputError(f"mdtraj cannot read {path} with the run's topology ({message}); pass a trajectory of "
                            "this system (DCD, XTC, TRR, netCDF, HDF5 or PDB).") from None
    return np.asarray(trajectory.xyz, dtype=np.float64)
