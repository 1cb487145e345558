"""An ordinary OpenMM script for alanine dipeptide, with Boltzmann-generator moves added.

Everything below is the usual PDB -> ForceField -> Simulation -> reporters -> step() script;
the two lines marked "flow moves" are all that is added. Every ``--flow-interval`` MD steps
the reporter attempts ``--flow-attempts`` independence Metropolis–Hastings moves with the
generator as proposal (exact: the chain still samples the Boltzmann distribution of this
System at the integrator's temperature) and logs the acceptance to a CSV file.

The System must be the one the generator was trained for: the same atoms, force field and
constraints. The common setup is HBonds constraints with a 2 fs time step (a generator trained
on the HBonds System keeps every X-H bond at its constraint length); a generator trained without
constraints needs an unconstrained System, hence 1 fs. The script reads which from the generator
(a mismatch would be refused in one sentence by the move).

    python examples/openmm_simulation_with_flow_moves.py --generator runs/aldp/generator.safetensors
    python examples/openmm_simulation_with_flow_moves.py --generator g.safetensors --tiny
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.sampling.moves import FlowIndependenceMove
from cmt_openmm.sampling.reporters import FlowMoveReporter
from cmt_openmm.systems import aldp_pdb_path

FORCEFIELDS = {"aldp-vacuum": ["amber99sbildn.xml"],
               "aldp-obc": ["amber99sbildn.xml", "amber99_obc.xml"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True, help="a saved BoltzmannGenerator (.safetensors)")
    parser.add_argument("--system", choices=sorted(FORCEFIELDS), default="aldp-vacuum",
                        help="force field the generator was trained for")
    parser.add_argument("--steps", type=int, default=500_000, help="MD steps (2 fs with HBonds, else 1 fs)")
    parser.add_argument("--flow-interval", type=int, default=1000, help="MD steps between flow moves")
    parser.add_argument("--flow-attempts", type=int, default=50,
                        help="flow proposals per flow move (one inverse flow pass per move, "
                             "then ~one energy per proposal)")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--platform", default="Reference",
                        help="OpenMM platform (Reference is the fastest for 22 atoms on a CPU)")
    parser.add_argument("--flow-log", default="flow_moves.csv", help="acceptance log (CSV)")
    parser.add_argument("--report-interval", type=int, default=10_000, help="MD steps between state reports")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a few hundred steps, for tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.flow_interval, args.flow_attempts, args.report_interval = 200, 50, 4, 100
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    pdb = app.PDBFile(str(aldp_pdb_path()))
    generator = BoltzmannGenerator.load(args.generator)
    hbonds = bool(generator.coordinates.constraints)  # trained with X-H constraints: simulate with them
    forcefield = app.ForceField(*FORCEFIELDS[args.system])
    system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                                     constraints=app.HBonds if hbonds else None)
    integrator = openmm.LangevinMiddleIntegrator(args.temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 (2.0 if hbonds else 1.0) * unit.femtosecond)
    integrator.setRandomNumberSeed(args.seed + 1)
    simulation = app.Simulation(pdb.topology, system, integrator,
                                openmm.Platform.getPlatformByName(args.platform))
    simulation.context.setPositions(pdb.positions)
    simulation.context.setVelocitiesToTemperature(args.temperature * unit.kelvin, args.seed + 2)
    simulation.reporters.append(app.StateDataReporter(sys.stdout, args.report_interval, step=True,
                                                      potentialEnergy=True, temperature=True,
                                                      speed=True))

    # flow moves (1/2): the generator as an exact Metropolis–Hastings proposal
    move = FlowIndependenceMove(generator, n_steps=args.flow_attempts, seed=args.seed)
    # flow moves (2/2): applied every flow_interval steps, acceptance logged
    simulation.reporters.append(FlowMoveReporter(move, args.flow_log, args.flow_interval))

    simulation.step(args.steps)

    simulation.reporters[-1].close()
    stats = move.statistics
    rate = stats["n_accepted"] / max(stats["n_proposed"], 1)
    print(f"flow moves: {stats['n_accepted']} of {stats['n_proposed']} accepted ({rate:.1%}); "
          f"log in {args.flow_log}")
    x = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
    assert np.isfinite(x.value_in_unit(unit.nanometer)).all()
    return stats


if __name__ == "__main__":
    main()
