"""Flow-bridged Hamiltonian replica exchange: states U_λ = (1 - λ) U_q + λ U between the generator and the target.

λ = 1 is the target (the System's own U); λ = 0 is the generator's own distribution q
(U_q = -kT log q, :mod:`cmt_openmm.export.flow_energy`), which ``FlowIndependenceMove``
samples exactly and independently: its acceptance uses the state's reduced potential, so at
λ = 0 it accepts every proposal up to rounding, and at every λ it is exact for U_λ. Replicas
run openmmtools' ``ReplicaExchangeSampler`` with Langevin dynamics followed by flow moves in
every state; configurations that the flow proposes at λ = 0 diffuse up the ladder to the target.

One System serves every state (:func:`bridge_system`): the target's potential forces inside a
``CustomCVForce`` with energy ``lambda_target * (U_1 + U_2 + ...)`` (force group 1) and the flow
force (:func:`~cmt_openmm.export.force.to_openmm_force`, no scale of its own) inside one with
``lambda_flow * U_q`` (group 2); a :class:`FlowBridgeState` (an openmmtools
``GlobalParameterState``) sets lambda_target = λ and lambda_flow = 1 - λ, so all states are
compatible and share Contexts. States are stored in the order λ = 1 (state 0, the target, as in
``reference-md``) down to λ = 0.

:func:`run_bridge_remd` runs it through the shared driver
:func:`~cmt_openmm.sampling.replica_exchange.run_replica_exchange` (netCDF storage, resumable,
settings checked, seeded), and writes the λ = 1 frames to an npz like ``reference-md``:
``positions`` (nm), ``reduced_energy`` (U/kT) and ``provenance`` (JSON: ladder, neighbour
acceptances, round trips, flow-move acceptance per state, energy evaluations). ``lambdas="auto"`` first runs a
short pilot on a uniform ladder (storage ``<storage>_pilot.nc``, resumable too) and places the
λ's for equal estimated neighbour acceptance (:mod:`cmt_openmm.export.ladder`).

Every state runs Langevin + flow moves except λ = 0, which runs flow moves only: there the
target is the generator's own density, its flow proposals are independent exact draws accepted
with probability one, and Langevin steps (one flow-force evaluation each, milliseconds in a
PythonForce) would add nothing. Energy evaluations are counted as one per Langevin step and
replica at λ > 0, one per flow proposal that reaches the energy, and K per replica and
iteration for the energy matrix (both CustomCVForces change with λ, so openmmtools evaluates
every state); every one of them evaluates U and U_q. Minimisation is not counted.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openmm
import openmm.unit as unit
from openmmtools import mcmc, states

from ..energy.openmm.platforms import resolve_md_platform
from ..errors import CMTInputError
from ..sampling.moves import FlowIndependenceMove
from ..sampling.replica_exchange import (SETTINGS_KEY, ReplicaExchangeOptions, ReplicaExchangeRun, SeededLangevinMove,
                                         positive_value, run_replica_exchange, stored_metadata, write_frames)
from .force import resolve_backend, to_openmm_force, torchforce_copies_are_safe
from .ladder import AcceptanceModel, equal_acceptance_ladder, exchange_statistics, pilot_samples

TARGET_GROUP, FLOW_GROUP = 1, 2
_PILOT_KEY = "cmt_openmm_pilot"  # the storage metadata entry of the pilot's summary (JSON)
_KEEP_OUTSIDE = ("CMMotionRemover", "AndersenThermostat")


class FlowBridgeState(states.GlobalParameterState):
    """openmmtools composable state of a bridged System: ``lambda_target`` and ``lambda_flow``.

    ``FlowBridgeState.at(λ)`` is the state U_λ = (1 - λ) U_q + λ U.
    """

    lambda_target = states.GlobalParameterState.GlobalParameter("lambda_target", standard_value=1.0)
    lambda_flow = states.GlobalParameterState.GlobalParameter("lambda_flow", standard_value=1.0)

    @classmethod
    def at(cls, lam: float) -> FlowBridgeState:
        return cls(lambda_target=float(lam), lambda_flow=1.0 - float(lam))


def bridge_system(system: openmm.System, flow_force: openmm.Force) -> openmm.System:
    """A new System with energy lambda_target * U(system) + lambda_flow * U(flow_force) (module docstring).

    ``flow_force``: the force of :func:`~cmt_openmm.export.force.to_openmm_force` made with
    ``scale_parameter=None`` (it is taken over, not copied). Particles, masses and constraints are
    the System's; its CMMotionRemover stays outside the CustomCVForces.
    """
    if system.usesPeriodicBoundaryConditions():
        raise CMTInputError("Flow-bridged replica exchange supports non-periodic Systems only (as the generators do).")
    own = flow_force.getGlobalParameters() if isinstance(flow_force, openmm.PythonForce) else \
        [flow_force.getGlobalParameterName(i) for i in range(getattr(flow_force, "getNumGlobalParameters", int)())]
    if len(own):
        raise CMTInputError("The flow force has its own scale parameter, which the bridge would apply twice; "
                            "make it with to_openmm_force(..., scale_parameter=None).")
    bridged = openmm.System()
    for i in range(system.getNumParticles()):
        bridged.addParticle(system.getParticleMass(i))
    for k in range(system.getNumConstraints()):
        bridged.addConstraint(*system.getConstraintParameters(k))
    inside, outside = [], []
    for force in system.getForces():
        (outside if type(force).__name__ in _KEEP_OUTSIDE else inside).append(copy.deepcopy(force))
    if not inside:
        raise CMTInputError("The System has no potential-energy forces to bridge to.")
    names = [f"u{k}" for k in range(len(inside))]
    target = openmm.CustomCVForce(f"lambda_target*({'+'.join(names)})")
    target.addGlobalParameter("lambda_target", 1.0)
    for name, force in zip(names, inside):
        target.addCollectiveVariable(name, force)
    target.setForceGroup(TARGET_GROUP)
    target.setName("cmt_openmm bridge: target")
    flow = openmm.CustomCVForce("lambda_flow*u_flow")
    flow.addGlobalParameter("lambda_flow", 1.0)
    flow.addCollectiveVariable("u_flow", flow_force)
    flow.setForceGroup(FLOW_GROUP)
    flow.setName("cmt_openmm bridge: flow")
    bridged.addForce(target)
    bridged.addForce(flow)
    for force in outside:
        bridged.addForce(force)
    return bridged


def bridge_states(system: openmm.System, temperature: float, lambdas: Sequence[float]) -> list:
    """``CompoundThermodynamicState``s of a :func:`bridge_system` at ``temperature`` (K), one per λ (in order)."""
    base = states.ThermodynamicState(system, float(temperature) * unit.kelvin)
    return [states.CompoundThermodynamicState(copy.deepcopy(base), [FlowBridgeState.at(lam)]) for lam in lambdas]


def check_ladder(lambdas) -> np.ndarray:
    """λ's as a float array, strictly decreasing from 1 to 0 (the storage order); refuses anything else."""
    lam = np.asarray(lambdas, dtype=np.float64).reshape(-1)
    if lam.size < 2 or not np.all(np.isfinite(lam)):
        raise CMTInputError("A λ ladder needs at least two finite values, from 1 (the target) to 0 (the flow).")
    lam = np.sort(lam)[::-1]
    if lam[0] != 1.0 or lam[-1] != 0.0 or np.any(np.diff(lam) >= 0):
        raise CMTInputError(f"The λ ladder {lam.tolist()} must contain 1 and 0 and distinct values in between.")
    return lam


@dataclass
class BridgeRun:
    """What :func:`run_bridge_remd` wrote: the npz path (None for a pilot), the λ = 1 frames (nm),
    u = U/kT at λ = 1, the ladder (storage order, 1 -> 0) and the provenance."""

    path: Path | None
    positions: np.ndarray
    reduced_energy: np.ndarray
    lambdas: np.ndarray
    provenance: dict


def _settings(generator, target, lambdas, steps, flow_proposals, timestep_fs, rate, backend, wall) -> dict:
    return {
        "system": target.name, "system_fingerprint": target.system_fingerprint(),
        "topology_fingerprint": target.topology_fingerprint(), "temperature": float(target.temperature),
        "generator_hash": generator.content_hash(), "lambdas": [float(x) for x in lambdas],
        "steps_per_iteration": int(steps), "flow_proposals": int(flow_proposals), "timestep_fs": float(timestep_fs),
        "collision_rate_per_ps": float(rate), "backend": backend, "wall": float(wall), "mixing": "swap-all",
        "lambda0_moves": "flow",
    }


def run_bridge_remd(
    generator, target, out_path: str | os.PathLike | None, n_replicas: int = 4, n_iterations: int = 1000,
    lambdas: Any = "auto", steps_per_iteration: int = 500, flow_proposals: int = 10, timestep: Any = None,
    collision_rate: Any = 1.0, seed: int = 0, storage: str | os.PathLike | None = None, resume: bool = True,
    progress: bool = True, n_equilibration: int = 0, platform: str = "auto", backend: str = "auto",
    pilot_iterations: int = 50, minimize: bool = True, wall: float = 10.0,
) -> BridgeRun:
    """Flow-bridged replica exchange between ``generator`` (λ = 0) and ``target`` (λ = 1).

    Args:
        generator: a saved ``BoltzmannGenerator`` of ``target`` (the stored moves refer to its
            file; ``load_generator(run_dir)`` gives one).
        target: the ``Target`` (its System and temperature; non-periodic).
        out_path: the ``.npz`` of λ = 1 frames (None: write nothing, e.g. for a pilot).
        n_replicas: states and replicas; n_iterations: total iterations (a resumed run continues to it).
        lambdas: ``"auto"`` (pilot + equal acceptance), ``"uniform"``, or the λ's (1 and 0 included).
        steps_per_iteration: Langevin steps per iteration (0: flow moves only);
            flow_proposals: flow proposals per iteration and replica.
        timestep: fs (default 2 where the System constrains every bond to hydrogen, else 1);
            collision_rate: 1/ps (floats or Quantities).
        seed: seeds mixing, integrators, velocities and the flow moves.
        storage: netCDF file (default ``out_path`` with ``.nc``); resume: continue it when it exists
            (its settings must match), False deletes it (and its pilot) first.
        n_equilibration: initial iterations left out of the npz.
        platform: OpenMM platform, or ``"auto"``: the faster of Reference and CPU for the target's System
            (:mod:`cmt_openmm.energy.openmm.platforms`); backend: of the flow force (``"auto"``, ``"python"``, ``"torch"``).
        pilot_iterations: iterations of the pilot for ``lambdas="auto"``.
        minimize: minimise every replica at its state before a fresh run.
        wall: the flow force's restraint outside the flow's domain (kT per scaled unit²).

    Example (an untrained flow on a toy, two states, five iterations of flow moves only):
        >>> import cmt_openmm, os, tempfile
        >>> toy = cmt_openmm.get_target("toy-double-well")
        >>> folder = tempfile.mkdtemp()
        >>> generator = cmt_openmm.BoltzmannGenerator.build(toy, n_layers=2, hidden=8)
        >>> bg = cmt_openmm.load_generator(generator.save(os.path.join(folder, "toy.safetensors")))   # knows its file
        >>> run = cmt_openmm.run_bridge_remd(bg, toy, os.path.join(folder, "bridge.npz"), n_replicas=2, n_iterations=5,
        ...                                  lambdas="uniform", steps_per_iteration=0, flow_proposals=20,
        ...                                  backend="python", minimize=False, progress=False)
        >>> run.positions.shape, run.provenance["lambdas"]   # the λ = 1 frames: the target's
        ((5, 1, 3), [1.0, 0.0])
        >>> [moves["acceptance"] for moves in run.provenance["flow_moves"]][-1]   # at λ = 0 the flow is exact
        1.0
    """
    n_replicas, n_iterations, steps = int(n_replicas), int(n_iterations), int(steps_per_iteration)
    if n_replicas < 2 or n_iterations < 1 or steps < 0 or int(flow_proposals) < 1 \
            or not 0 <= n_equilibration < n_iterations:
        raise CMTInputError("need n_replicas >= 2, n_iterations >= 1, steps_per_iteration >= 0, flow_proposals >= 1 "
                            "and 0 <= n_equilibration < n_iterations.")
    if out_path is None and storage is None:
        raise CMTInputError("Pass out_path or storage: the run needs a netCDF storage file.")
    timestep_fs = positive_value(target.langevin_timestep_fs if timestep is None else timestep, unit.femtosecond,
                                 "timestep")
    rate = positive_value(collision_rate, unit.picosecond**-1, "collision_rate")
    backend = resolve_backend(backend)
    platform = resolve_md_platform(platform, target.system, target.positions)
    if backend == "torch" and not torchforce_copies_are_safe():
        raise CMTInputError("openmmtools copies Systems, which crashes with a TorchForce in this installation; "
                            "use backend='python' or 'auto'.")
    options = ReplicaExchangeOptions(
        n_iterations=n_iterations, storage=Path(storage) if storage is not None else Path(out_path).with_suffix(".nc"),
        seed=seed, resume=resume, progress=progress, n_equilibration=n_equilibration, platform=platform,
        minimize=minimize, context_cache_capacity=2, description=f"flow-bridged replica exchange {target.name}")
    storage = options.storage
    pilot_storage = storage.with_name(storage.stem + "_pilot.nc")
    if not resume:
        pilot_checkpoint = pilot_storage.with_name(pilot_storage.stem + "_checkpoint.nc")
        for path in (storage, options.checkpoint, pilot_storage, pilot_checkpoint):
            path.unlink(missing_ok=True)
    flow_move = FlowIndependenceMove(generator, n_steps=int(flow_proposals), seed=seed)
    if flow_move.generator_path is None:
        raise CMTInputError("The generator was never saved; save it (generator.save(path)) so that the stored "
                            "replica-exchange moves can refer to it.")
    stored = stored_metadata(storage)
    if stored is None:
        pilot = None
        if isinstance(lambdas, str) and lambdas == "auto":
            pilot_run = run_bridge_remd(
                generator, target, out_path=None, n_replicas=n_replicas, n_iterations=pilot_iterations,
                lambdas="uniform", steps_per_iteration=steps, flow_proposals=flow_proposals, timestep=timestep_fs,
                collision_rate=rate, seed=seed + 1, storage=pilot_storage, resume=True, progress=progress,
                n_equilibration=0, platform=platform, backend=backend, minimize=minimize, wall=wall)
            w, state = pilot_samples(pilot_storage, pilot_run.lambdas)
            ascending, estimated = equal_acceptance_ladder(AcceptanceModel(pilot_run.lambdas, w, state), n_replicas)
            ladder = check_ladder(ascending)
            pilot = {key: pilot_run.provenance[key] for key in (
                "storage", "lambdas", "pair_acceptance", "energy_evaluations", "n_iterations")}
            pilot["estimated_pair_acceptance"] = [float(a) for a in estimated[::-1]]  # storage order, 1 -> 0
        else:
            ladder = _given_ladder(lambdas, n_replicas)
    else:
        ladder = _resumed_ladder(json.loads(stored.get(SETTINGS_KEY, "{}")), lambdas, storage)
        pilot = json.loads(stored.get(_PILOT_KEY, "null"))
    settings = _settings(generator, target, ladder, steps, flow_proposals, timestep_fs, rate, backend, wall)

    def bridged_ladder():
        system = bridge_system(target.system, to_openmm_force(generator, target.temperature, None,
                                                              backend=backend, wall=wall))
        langevin = SeededLangevinMove(timestep=timestep_fs * unit.femtosecond,
                                      collision_rate=rate / unit.picosecond, n_steps=max(steps, 1))
        moves = [mcmc.SequenceMove([copy.deepcopy(langevin), copy.deepcopy(flow_move)] if steps > 0 and lam > 0
                                   else [copy.deepcopy(flow_move)]) for lam in ladder]
        return bridge_states(system, target.temperature, ladder), moves

    run = run_replica_exchange(ladder=bridged_ladder, start=states.SamplerState(target.positions * unit.nanometer),
                               settings=settings, options=options, metadata={_PILOT_KEY: json.dumps(pilot)})
    return _finish(run, out_path, ladder, steps, pilot)


def _given_ladder(lambdas, n_replicas: int) -> np.ndarray:
    if isinstance(lambdas, str):
        if lambdas != "uniform":
            raise CMTInputError(f"lambdas must be 'auto', 'uniform' or a list of λ's, not {lambdas!r}.")
        return np.linspace(1.0, 0.0, n_replicas)
    ladder = check_ladder(lambdas)
    if len(ladder) != n_replicas:
        raise CMTInputError(f"The ladder has {len(ladder)} λ's but n_replicas is {n_replicas}; make them agree.")
    return ladder


def _resumed_ladder(stored: dict, lambdas, storage: Path) -> np.ndarray:
    """The stored run's ladder; an explicitly given one must agree with it."""
    if "lambdas" not in stored:
        raise CMTInputError(f"{storage} is not a flow-bridged replica-exchange storage of cmt_openmm; pass "
                            "resume=False or another storage path.")
    ladder = check_ladder(stored["lambdas"])
    if not isinstance(lambdas, str) and not np.array_equal(check_ladder(lambdas), ladder):
        raise CMTInputError(f"storage {storage} was run with λ's {ladder.tolist()}: pass resume=False to start "
                            "afresh or choose another storage path.")
    return ladder


def _finish(run: ReplicaExchangeRun, out_path, ladder, steps: int, pilot) -> BridgeRun:
    """The provenance (exchange and flow-move statistics, energy evaluations) of a run; writes the npz."""
    o = run.options
    exchange = exchange_statistics(o.storage, o.n_iterations)
    flows = [m.move_list[-1].statistics for m in run.mcmc_moves]
    flow_evaluations = sum(s["n_proposed"] - s["n_chirality_rejected"] - s["n_log_q_failed"] for s in flows)
    langevin_states = int(np.count_nonzero(np.asarray(ladder) > 0))  # λ = 0 runs flow moves only
    evaluations = int(run.n_iterations_stored * (langevin_states * steps + run.n_replicas * len(ladder))
                      + flow_evaluations)
    provenance = run.provenance(
        pair_acceptance=exchange["pair_acceptance"], round_trips=exchange["round_trips"],
        round_trips_per_replica=exchange["round_trips_per_replica"],
        flow_moves=[{"lambda": float(lam), **s, "acceptance": s["n_accepted"] / max(s["n_proposed"], 1)}
                    for lam, s in zip(ladder, flows)],
        energy_evaluations=evaluations,
        pilot=pilot,
        energy_evaluations_with_pilot=evaluations + (0 if pilot is None else int(pilot["energy_evaluations"])),
    )
    path = None if out_path is None else write_frames(out_path, run.positions, run.reduced_energy, provenance)
    return BridgeRun(path, run.positions, run.reduced_energy, ladder, provenance)
