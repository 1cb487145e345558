"""openmmtools temperature replica exchange for alanine dipeptide, with flow moves.

Each replica applies Langevin dynamics followed by Boltzmann-generator independence moves
(``SequenceMove([LangevinDynamicsMove, FlowIndependenceMove])``); the flow move is exact at
every temperature of the ladder because it uses that state's reduced potential. Everything is
stored in a netCDF file, and ``--resume`` extends a stored run (the generator is found again
through the path and content hash stored with the move).

    python examples/replica_exchange_with_flow_moves.py --generator runs/aldp/generator.safetensors
    python examples/replica_exchange_with_flow_moves.py --generator g.safetensors --resume --iterations 50
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import openmm
from openmm import unit
from openmmtools import cache, mcmc, multistate, states

from cmt_openmm.coordinates.backbone import ramachandran_angles
from cmt_openmm.sampling.estimators import aldp_basins, basin_indicators
from cmt_openmm.sampling.moves import FlowIndependenceMove
from cmt_openmm.systems import get_target


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True, help="a saved BoltzmannGenerator (.safetensors)")
    parser.add_argument("--system", help="built-in target to simulate (default: the one the "
                                          "generator was trained for)")
    parser.add_argument("--storage", default="replica_exchange.nc", help="netCDF storage file")
    parser.add_argument("--resume", action="store_true", help="extend the run stored in --storage")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--min-temperature", type=float, default=300.0, help="K")
    parser.add_argument("--max-temperature", type=float, default=500.0, help="K")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--md-steps", type=int, default=500, help="Langevin steps (1 fs) per iteration")
    parser.add_argument("--flow-attempts", type=int, default=20, help="flow proposals per iteration")
    parser.add_argument("--platform", default="Reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="2 replicas, 3 iterations, for tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations, args.replicas, args.md_steps, args.flow_attempts = 3, 2, 20, 4
    return args


def use_platform(sampler: multistate.MultiStateSampler, platform: str) -> None:
    """Run all Contexts on ``platform`` (openmmtools picks the fastest by default: CPU here)."""
    platform = openmm.Platform.getPlatformByName(platform)
    sampler.energy_context_cache = cache.ContextCache(platform=platform)
    sampler.sampler_context_cache = cache.ContextCache(platform=platform)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.resume:
        sampler = multistate.ReplicaExchangeSampler.from_storage(args.storage)
        use_platform(sampler, args.platform)
        sampler.extend(args.iterations)
    else:
        flow = FlowIndependenceMove(args.generator, n_steps=args.flow_attempts, seed=args.seed)
        args.system = args.system or flow.generator.target_name
        target = get_target(args.system)
        temperatures = np.geomspace(args.min_temperature, args.max_temperature, args.replicas)
        thermodynamic_states = [states.ThermodynamicState(target.system, t * unit.kelvin)
                                for t in temperatures]
        sampler_states = [states.SamplerState(target.positions * unit.nanometer)
                          for _ in temperatures]
        move = mcmc.SequenceMove([
            mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond,
                                      collision_rate=1.0 / unit.picosecond, n_steps=args.md_steps),
            flow,
        ])
        sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move,
                                                    number_of_iterations=args.iterations)
        use_platform(sampler, args.platform)
        if os.path.exists(args.storage):
            raise SystemExit(f"{args.storage} exists: pass --resume to extend it, or another --storage.")
        reporter = multistate.MultiStateReporter(args.storage, checkpoint_interval=1)
        sampler.create(thermodynamic_states, sampler_states, storage=reporter)
        sampler.run()

    summary = report(sampler, args.system or sampler._mcmc_moves[0].move_list[-1].generator.target_name)
    sampler._reporter.close()
    return summary


def report(sampler: multistate.MultiStateSampler, system: str) -> dict:
    """Print per temperature: flow acceptance, and the φ > 0 fraction of the current replicas."""
    target = get_target(system)
    x = np.stack([s.positions.value_in_unit(unit.nanometer) for s in sampler.sampler_states])
    phi_positive = basin_indicators(ramachandran_angles(target.topology, x)[:, 0],
                                    aldp_basins(include_halves=True))["phi>0"]
    state_of_replica = sampler._replica_thermodynamic_states
    summary = {"iteration": sampler.iteration, "states": []}
    print(f"iteration {sampler.iteration}")
    for k, (thermo, move) in enumerate(zip(sampler._thermodynamic_states, sampler._mcmc_moves)):
        flow = move.move_list[-1].statistics
        rate = flow["n_accepted"] / max(flow["n_proposed"], 1)
        replica = int(np.flatnonzero(state_of_replica == k)[0])
        summary["states"].append(dict(temperature=thermo.temperature.value_in_unit(unit.kelvin),
                                      phi_positive=bool(phi_positive[replica]), **flow))
        print(f"  T = {thermo.temperature.value_in_unit(unit.kelvin):6.1f} K: flow acceptance "
              f"{flow['n_accepted']}/{flow['n_proposed']} ({rate:.1%}); current replica in "
              f"{'phi > 0' if phi_positive[replica] else 'phi < 0'}")
    return summary


if __name__ == "__main__":
    main()
