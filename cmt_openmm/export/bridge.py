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

:func:`run_bridge_remd` runs it with netCDF storage, resumable (``from_storage``, settings
checked), and writes the λ = 1 frames to an npz like ``reference-md``: ``positions`` (nm),
``reduced_energy`` (U/kT) and ``provenance`` (JSON: ladder, neighbour acceptances, round
trips, flow-move acceptance per state, energy evaluations). ``lambdas="auto"`` first runs a
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
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openmm
import openmm.unit as unit
from openmmtools import cache, mcmc, states
from openmmtools.multistate import MultiStateReporter, ReplicaExchangeSampler

from ..errors import CMTInputError
from ..files import atomic_writer
from ..sampling.moves import FlowIndependenceMove
from ..sampling.reference_md import (SeededLangevinMove, package_version, positive_value, read_state0_frames,
                                     seed_everything)
from .force import resolve_backend, to_openmm_force, torchforce_copies_are_safe
from .ladder import AcceptanceModel, equal_acceptance_ladder, exchange_statistics, pilot_samples

TARGET_GROUP, FLOW_GROUP = 1, 2
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
    lambdas: Any = "auto", steps_per_iteration: int = 500, flow_proposals: int = 10, timestep: Any = 1.0,
    collision_rate: Any = 1.0, seed: int = 0, storage: str | os.PathLike | None = None, resume: bool = True,
    progress: bool = True, n_equilibration: int = 0, platform: str = "Reference", backend: str = "auto",
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
        timestep: fs; collision_rate: 1/ps (floats or Quantities).
        seed: seeds mixing, integrators, velocities and the flow moves.
        storage: netCDF file (default ``out_path`` with ``.nc``); resume: continue it when it exists
            (its settings must match), False deletes it (and its pilot) first.
        n_equilibration: initial iterations left out of the npz.
        platform: OpenMM platform; backend: of the flow force (``"auto"``, ``"python"``, ``"torch"``).
        pilot_iterations: iterations of the pilot for ``lambdas="auto"``.
        minimize: minimise every replica at its state before a fresh run.
        wall: the flow force's restraint outside the flow's domain (kT per scaled unit²).
    """
    n_replicas, n_iterations, steps = int(n_replicas), int(n_iterations), int(steps_per_iteration)
    if n_replicas < 2 or n_iterations < 1 or steps < 0 or int(flow_proposals) < 1 \
            or not 0 <= n_equilibration < n_iterations:
        raise CMTInputError("need n_replicas >= 2, n_iterations >= 1, steps_per_iteration >= 0, flow_proposals >= 1 "
                            "and 0 <= n_equilibration < n_iterations.")
    if out_path is None and storage is None:
        raise CMTInputError("Pass out_path or storage: the run needs a netCDF storage file.")
    timestep_fs = positive_value(timestep, unit.femtosecond, "timestep")
    rate = positive_value(collision_rate, unit.picosecond**-1, "collision_rate")
    backend = resolve_backend(backend)
    if backend == "torch" and not torchforce_copies_are_safe():
        raise CMTInputError("openmmtools copies Systems, which crashes with a TorchForce in this installation; "
                            "use backend='python' or 'auto'.")
    try:
        platform_obj = openmm.Platform.getPlatformByName(platform)
    except openmm.OpenMMException:
        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise CMTInputError(f"OpenMM platform {platform!r} is not available here: use one of {names}.") from None
    storage = Path(storage) if storage is not None else Path(out_path).with_suffix(".nc")
    checkpoint = storage.with_name(storage.stem + "_checkpoint.nc")
    pilot_storage = storage.with_name(storage.stem + "_pilot.nc")
    if not resume:
        pilot_checkpoint = pilot_storage.with_name(pilot_storage.stem + "_checkpoint.nc")
        for path in (storage, checkpoint, pilot_storage, pilot_checkpoint):
            path.unlink(missing_ok=True)
    flow_move = FlowIndependenceMove(generator, n_steps=int(flow_proposals), seed=seed)
    if flow_move.generator_path is None:
        raise CMTInputError("The generator was never saved; save it (generator.save(path)) so that the stored "
                            "replica-exchange moves can refer to it.")
    make_settings = lambda ladder: _settings(generator, target, ladder, steps, flow_proposals,  # noqa: E731
                                             timestep_fs, rate, backend, wall)
    pilot = None
    if not storage.exists():
        if isinstance(lambdas, str) and lambdas == "auto":
            pilot = run_bridge_remd(
                generator, target, None, n_replicas, pilot_iterations, "uniform", steps, flow_proposals,
                timestep_fs, rate, seed + 1, pilot_storage, True, progress, 0, platform, backend, pilot_iterations,
                minimize, wall)
            w, state = pilot_samples(pilot_storage, pilot.lambdas)
            ascending, estimated = equal_acceptance_ladder(AcceptanceModel(pilot.lambdas, w, state), n_replicas)
            ladder = check_ladder(ascending)
            pilot = {key: pilot.provenance[key] for key in (
                "storage", "lambdas", "pair_acceptance", "energy_evaluations", "n_iterations")}
            pilot["estimated_pair_acceptance"] = [float(a) for a in estimated[::-1]]  # storage order, 1 -> 0
        else:
            ladder = _given_ladder(lambdas, n_replicas)

    logger = logging.getLogger("openmmtools.multistate")
    log_level = logger.level
    logger.setLevel(logging.ERROR)  # openmmtools warns "API is experimental" on every sampler and reporter
    numpy_state = np.random.get_state()
    storage.parent.mkdir(parents=True, exist_ok=True)
    # our own reporter, closed explicitly (see reference_md): reopening an open HDF5 file can crash
    reporter = MultiStateReporter(str(storage), checkpoint_interval=1, checkpoint_storage=checkpoint.name)
    ReplicaExchangeSampler._global_citation_silence = True
    try:
        if storage.exists():
            sampler = ReplicaExchangeSampler.from_storage(reporter)
            stored = json.loads(sampler.metadata.get("cmt_openmm_settings", "{}"))
            pilot = json.loads(sampler.metadata.get("cmt_openmm_pilot", "null"))
            ladder = _resumed_ladder(stored, lambdas, storage)
            settings = make_settings(ladder)
            if stored != settings:
                changed = sorted(k for k in settings if stored.get(k) != settings[k])
                raise CMTInputError(f"storage {storage} was written with other settings ({', '.join(changed)}): "
                                    "pass resume=False to start afresh or choose another storage path.")
            if sampler.number_of_iterations < n_iterations:
                sampler.number_of_iterations = n_iterations
        else:
            checkpoint.unlink(missing_ok=True)
            settings = make_settings(ladder)
            seed_everything(seed, 0)
            system = bridge_system(target.system, to_openmm_force(generator, target.temperature, None,
                                                                  backend=backend, wall=wall))
            langevin = SeededLangevinMove(timestep=timestep_fs * unit.femtosecond,
                                          collision_rate=rate / unit.picosecond, n_steps=max(steps, 1))
            moves = [mcmc.SequenceMove([copy.deepcopy(langevin), copy.deepcopy(flow_move)] if steps > 0 and lam > 0
                                       else [copy.deepcopy(flow_move)]) for lam in ladder]
            sampler = ReplicaExchangeSampler(mcmc_moves=moves, number_of_iterations=n_iterations,
                                             replica_mixing_scheme="swap-all", online_analysis_interval=None)
            sampler.create(bridge_states(system, target.temperature, ladder),
                           states.SamplerState(target.positions * unit.nanometer), reporter,
                           metadata={"cmt_openmm_settings": json.dumps(settings),
                                     "cmt_openmm_pilot": json.dumps(pilot)})
        sampler.energy_context_cache = cache.ContextCache(platform=platform_obj, capacity=2)
        sampler.sampler_context_cache = cache.ContextCache(platform=platform_obj, capacity=2)
        seed_everything(seed, sampler.iteration)
        if sampler.iteration == 0 and minimize:
            sampler.minimize()
        _run_iterations(sampler, n_iterations, progress, target.name)
        final_iteration = sampler.iteration
        flows = [m.move_list[-1].statistics for m in sampler._mcmc_moves]
    finally:
        del ReplicaExchangeSampler._global_citation_silence
        reporter.close()
        np.random.set_state(numpy_state)
        logger.setLevel(log_level)
    return _finish(storage, checkpoint, out_path, settings, ladder, flows, final_iteration, n_iterations,
                   n_equilibration, n_replicas, steps, seed, platform, pilot)


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


def _run_iterations(sampler, n_iterations: int, progress: bool, name: str) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=n_iterations, initial=min(sampler.iteration, n_iterations), disable=not progress,
              desc=f"flow-bridged replica exchange {name}", unit="it") as bar:
        while sampler.iteration < n_iterations:
            sampler.run(1)
            bar.update(1)


def _finish(storage, checkpoint, out_path, settings, ladder, flows, final_iteration, n_iterations, n_equilibration,
            n_replicas, steps, seed, platform, pilot) -> BridgeRun:
    """Read the λ = 1 frames and the statistics back from storage; write the npz."""
    positions, u, acceptance = read_state0_frames(storage, checkpoint, n_equilibration + 1, n_iterations)
    exchange = exchange_statistics(storage, n_iterations)
    flow_evaluations = sum(s["n_proposed"] - s["n_chirality_rejected"] - s["n_log_q_failed"] for s in flows)
    langevin_states = int(np.count_nonzero(np.asarray(ladder) > 0))  # λ = 0 runs flow moves only
    evaluations = int(final_iteration * (langevin_states * steps + n_replicas * len(ladder)) + flow_evaluations)
    provenance = {
        **settings, "n_replicas": n_replicas, "n_iterations": n_iterations, "n_iterations_stored": int(final_iteration),
        "n_equilibration": int(n_equilibration), "n_frames": int(positions.shape[0]), "seed": int(seed),
        "platform": platform, "storage": str(storage), "exchange_acceptance": acceptance,
        "pair_acceptance": exchange["pair_acceptance"], "round_trips": exchange["round_trips"],
        "round_trips_per_replica": exchange["round_trips_per_replica"],
        "flow_moves": [{"lambda": float(lam), **s, "acceptance": s["n_accepted"] / max(s["n_proposed"], 1)}
                       for lam, s in zip(ladder, flows)],
        "energy_evaluations": evaluations,
        "pilot": pilot,
        "energy_evaluations_with_pilot": evaluations + (0 if pilot is None else int(pilot["energy_evaluations"])),
        "openmm": openmm.__version__, "openmmtools": package_version("openmmtools"), "cmt_openmm": package_version("cmt_openmm"),
    }
    path = None
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as handle:
            np.savez(handle, positions=positions, reduced_energy=u, provenance=np.array(json.dumps(provenance)))
    return BridgeRun(path, positions, u, ladder, provenance)
