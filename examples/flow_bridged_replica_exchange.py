"""Flow-bridged replica exchange for alanine dipeptide: states from the generator (λ = 0) to the target (λ = 1).

Each state has the potential U_λ = (1 - λ) U_q + λ U, U_q = -kT log q the generator's energy
as an OpenMM force (``cmt_openmm.export.to_openmm_force``). At λ = 0 the flow's own
independence moves accept every proposal, so fresh independent configurations enter the
ladder there and diffuse up to λ = 1 through exchanges, while Langevin dynamics and flow moves
run in every state. Everything is plain openmmtools: a ``ReplicaExchangeSampler`` over
``CompoundThermodynamicState``s that differ only in two global parameters, with netCDF storage
and ``--resume``. The λ's come from a short pilot on a uniform ladder, placed so that every
neighbour pair has the same estimated exchange acceptance.

(``cmt-openmm bridge-remd RUN_DIR --out frames.npz`` does all of this from a run directory.)

    python examples/flow_bridged_replica_exchange.py --generator runs/aldp/generator.safetensors
    python examples/flow_bridged_replica_exchange.py --generator g.safetensors --resume --iterations 50
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import openmm
import torch
from openmm import unit
from openmmtools import cache, mcmc, multistate, states

from cmt_openmm.coordinates.backbone import ramachandran_angles
from cmt_openmm.export import to_openmm_force
from cmt_openmm.export.flow_bridged_remd import bridge_states, bridge_system
from cmt_openmm.export.ladder import AcceptanceModel, equal_acceptance_ladder, exchange_statistics, pilot_samples
from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.sampling.moves import FlowIndependenceMove
from cmt_openmm.systems import get_target


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True, help="a saved BoltzmannGenerator (.safetensors)")
    parser.add_argument("--storage", default="bridge.nc", help="netCDF storage (the pilot goes beside it)")
    parser.add_argument("--resume", action="store_true", help="extend the run stored in --storage")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--pilot-iterations", type=int, default=30)
    parser.add_argument("--replicas", type=int, default=6)
    parser.add_argument("--md-steps", type=int, default=500, help="Langevin steps (1 fs) per iteration")
    parser.add_argument("--flow-attempts", type=int, default=10, help="flow proposals per iteration")
    parser.add_argument("--platform", default="Reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="3 replicas, a few iterations, for tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations, args.pilot_iterations, args.replicas, args.md_steps, args.flow_attempts = 3, 2, 3, 10, 4
    return args


def make_sampler(generator, target, lambdas, args, storage: str) -> multistate.ReplicaExchangeSampler:
    """A replica-exchange sampler over the bridge states ``lambdas`` (state 0: λ = 1), stored in ``storage``."""
    flow_force = to_openmm_force(generator, target.temperature, scale_parameter=None)  # U_q, no scale of its own
    system = bridge_system(target.system, flow_force)  # lambda_target * U + lambda_flow * U_q
    thermodynamic_states = bridge_states(system, target.temperature, lambdas)
    move = mcmc.SequenceMove([
        mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, collision_rate=1.0 / unit.picosecond,
                                  n_steps=args.md_steps),
        FlowIndependenceMove(generator, n_steps=args.flow_attempts, seed=args.seed),  # exact at every λ
    ])
    sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=args.iterations)
    use_platform(sampler, args.platform)
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    sampler.create(thermodynamic_states, states.SamplerState(target.positions * unit.nanometer), storage=reporter)
    return sampler


def use_platform(sampler: multistate.MultiStateSampler, platform: str) -> None:
    platform = openmm.Platform.getPlatformByName(platform)
    sampler.energy_context_cache = cache.ContextCache(platform=platform)
    sampler.sampler_context_cache = cache.ContextCache(platform=platform)


def choose_lambdas(generator, target, args) -> np.ndarray:
    """A short pilot on a uniform ladder, then λ's with equal estimated neighbour acceptance (1 -> 0)."""
    pilot_storage = args.storage.replace(".nc", "") + "_pilot.nc"
    uniform = np.linspace(1.0, 0.0, args.replicas)
    pilot_args = argparse.Namespace(**{**vars(args), "iterations": args.pilot_iterations})
    pilot = make_sampler(generator, target, uniform, pilot_args, pilot_storage)
    pilot.run()
    pilot._reporter.close()
    w, state = pilot_samples(pilot_storage, uniform)
    ascending, estimated = equal_acceptance_ladder(AcceptanceModel(uniform, w, state), args.replicas)
    print(f"pilot neighbour acceptance {exchange_statistics(pilot_storage)['pair_acceptance']}")
    print(f"chosen λ's {np.round(ascending[::-1], 4).tolist()}, estimated acceptance {np.round(estimated, 3).tolist()}")
    return ascending[::-1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a small flow evaluated one configuration at a time: threads only add overhead
    if args.resume:
        sampler = multistate.ReplicaExchangeSampler.from_storage(args.storage)
        use_platform(sampler, args.platform)
        sampler.extend(args.iterations)
        generator = sampler._mcmc_moves[0].move_list[-1].generator
        target = get_target(generator.target_name, temperature=generator.temperature or 300.0)
    else:
        if os.path.exists(args.storage):
            raise SystemExit(f"{args.storage} exists: pass --resume to extend it, or another --storage.")
        generator = BoltzmannGenerator.load(args.generator)
        target = get_target(generator.target_name, temperature=generator.temperature or 300.0)
        sampler = make_sampler(generator, target, choose_lambdas(generator, target, args), args, args.storage)
        sampler.run()
    summary = report(sampler, args.storage, target)
    sampler._reporter.close()
    return summary


def report(sampler: multistate.MultiStateSampler, storage: str, target) -> dict:
    """Per state: λ, flow-move acceptance; per neighbour pair: exchange acceptance; round trips."""
    exchange = exchange_statistics(storage)
    x = np.stack([s.positions.value_in_unit(unit.nanometer) for s in sampler.sampler_states])
    phi = ramachandran_angles(target.topology, x)[:, 0, 0]
    at_target = int(np.flatnonzero(sampler._replica_thermodynamic_states == 0)[0])
    summary = {"iteration": sampler.iteration, "states": [], **exchange}
    print(f"iteration {sampler.iteration}; replica at λ = 1 has φ = {np.degrees(phi[at_target]):.0f}°")
    for thermo, move in zip(sampler._thermodynamic_states, sampler._mcmc_moves):
        flow = move.move_list[-1].statistics
        summary["states"].append(dict(lambda_target=thermo.lambda_target, **flow))
        print(f"  λ = {thermo.lambda_target:.3f}: flow acceptance {flow['n_accepted']}/{flow['n_proposed']}")
    print(f"  neighbour exchange acceptance {exchange['pair_acceptance']}, round trips {exchange['round_trips']}")
    return summary


if __name__ == "__main__":
    main()
