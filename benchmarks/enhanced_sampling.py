"""Enhanced sampling with a Boltzmann generator: φ transitions of alanine dipeptide per energy evaluation.

Three samplers of ALDP at 300 K get the same number of OpenMM energy evaluations:

- Langevin MD alone (``LangevinMiddleIntegrator``, Reference platform): one evaluation per step;
- Langevin MD + flow moves (:class:`cmt_openmm.FlowIndependenceMove` applied to the
  ``Simulation`` every ``--flow-interval`` MD steps, ``--flow-proposals`` proposals each):
  one evaluation per MD step and per proposal;
- openmmtools temperature replica exchange (``cmt_openmm.sampling.reference_md.run_reference_md``,
  geometric ladder, Langevin between swaps): n_replicas × (steps per iteration + 1)
  evaluations per iteration (the +1: each replica's energy for the swap matrix, which
  openmmtools computes once per replica for a temperature ladder); the frames of the 300 K
  state are analysed.

For each: transitions between the φ < 0 and φ > 0 basins per 1e6 evaluations and per wall
second, and the φ > 0 basin population (αL ∪ C7ax, 0° ≤ φ < 120°) with a block-averaging
standard error (20 blocks). Transitions are counted between cores with a buffer, so that
recrossings of the boundary are not counted: φ > 0 core 20°..100°, φ < 0 core φ ≤ -20° or
φ ≥ 140° (the C5 region wraps across ±180°). The reweighted generator's own estimate of the
population (independent samples, delta-method error) is printed beside them. Prints a table,
writes ``results.json``.

    python benchmarks/enhanced_sampling.py --generator runs/demo --evaluations 1e6
    python benchmarks/enhanced_sampling.py --tiny      # trains a tiny generator; a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openmm  # noqa: E402
import openmm.app as app  # noqa: E402
import openmm.unit as unit  # noqa: E402

from cmt_openmm.coordinates.backbone import ramachandran_angles  # noqa: E402
from cmt_openmm.sampling.estimators import Estimate, weighted_mean  # noqa: E402
from cmt_openmm.cli.main import run_training  # noqa: E402
from cmt_openmm.cli.run_files import build_target, load_run, parse_run_config
from cmt_openmm.generator import load_generator  # noqa: E402
from cmt_openmm.cli.presets import get_preset  # noqa: E402
from cmt_openmm.sampling.estimators import PHI_POSITIVE  # noqa: E402

PHI_POS_CORE = (math.radians(20.0), math.radians(100.0))
PHI_NEG_CORE = (math.radians(-20.0), math.radians(140.0))  # φ <= -20° or φ >= 140°
N_BLOCKS = 20


def phi_of(target, positions: np.ndarray) -> np.ndarray:
    """φ (radians) of configurations (B, n_atoms, 3) nm."""
    return ramachandran_angles(target.topology, positions)[:, 0, 0]


def count_transitions(phi: np.ndarray) -> int:
    """Core-to-core transitions between the φ < 0 and φ > 0 basins of a time series."""
    state = np.full(phi.shape, -1)
    state[(phi >= PHI_POS_CORE[0]) & (phi <= PHI_POS_CORE[1])] = 1
    state[(phi <= PHI_NEG_CORE[0]) | (phi >= PHI_NEG_CORE[1])] = 0
    visited = state[state >= 0]
    return int(np.count_nonzero(np.diff(visited))) if visited.size else 0


def population(phi: np.ndarray) -> tuple[float, float]:
    """φ > 0 basin population of a time series with its block-averaging standard error."""
    lo, hi = PHI_POSITIVE["phi>0"][0]
    inside = ((phi >= lo) & (phi < hi)).astype(float)
    blocks = np.array_split(inside, N_BLOCKS) if inside.size >= N_BLOCKS else [inside]
    means = np.array([b.mean() for b in blocks])
    error = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return float(inside.mean()), error


def leg_result(name: str, target, phi: np.ndarray, evaluations: int, wall: float, **extra) -> dict:
    transitions = count_transitions(phi)
    pop, err = population(phi)
    return {
        "sampler": name, "evaluations": int(evaluations), "wall_s": wall, "frames": int(phi.size),
        "transitions": transitions,
        "transitions_per_1e6_evaluations": transitions / evaluations * 1e6,
        "transitions_per_wall_s": transitions / wall if wall > 0 else None,
        "phi_positive": pop, "phi_positive_error": err, **extra,
    }


def make_simulation(target, args, seed: int) -> app.Simulation:
    integrator = openmm.LangevinMiddleIntegrator(target.temperature * unit.kelvin, args.friction / unit.picosecond,
                                                 args.timestep * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 1)
    sim = app.Simulation(target.topology, target.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(target.positions * unit.nanometer)
    sim.context.setVelocitiesToTemperature(target.temperature * unit.kelvin, seed + 1)
    return sim


def positions_of(sim: app.Simulation) -> np.ndarray:
    return sim.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def run_md(target, args, seed: int, move=None) -> dict:
    """Langevin MD (with flow moves when ``move`` is given) until the evaluation budget is spent."""
    from tqdm.auto import tqdm

    sim = make_simulation(target, args, seed)
    budget, stride = int(args.evaluations), args.stride
    interval = args.flow_interval if move is not None else None
    phis, evaluations, md_steps, since_flow = [], 0, 0, 0
    start = time.perf_counter()
    with tqdm(total=budget, desc="MD + flow" if move else "MD", unit="eval", unit_scale=True, mininterval=1.0) as bar:
        while evaluations < budget:
            n = min(stride, budget - evaluations)
            sim.step(n)
            md_steps += n
            since_flow += n
            evaluations += n
            phis.append(positions_of(sim))
            if move is not None and since_flow >= interval and evaluations < budget:
                stats = move.apply_to_simulation(sim, n_steps=min(args.flow_proposals, budget - evaluations))
                evaluations += stats["n_proposed"]
                since_flow = 0
                phis.append(positions_of(sim))
            bar.n = evaluations
            bar.refresh() if len(phis) % 200 == 0 else None
    wall = time.perf_counter() - start
    phi = phi_of(target, np.stack(phis))
    if move is None:
        return leg_result("Langevin MD", target, phi, evaluations, wall, md_steps=md_steps)
    s = move.statistics
    return leg_result("Langevin MD + flow moves", target, phi, evaluations, wall, md_steps=md_steps,
                      flow_proposals=s["n_proposed"], flow_accepted=s["n_accepted"],
                      flow_acceptance=s["n_accepted"] / max(s["n_proposed"], 1))


def run_remd(target, args, seed: int, workdir: Path) -> dict:
    from cmt_openmm.sampling.reference_md import run_reference_md

    per_iteration = args.replicas * (args.remd_steps + 1)
    iterations = max(2, int(args.evaluations) // per_iteration)
    start = time.perf_counter()
    result = run_reference_md(target, workdir / f"remd-seed{seed}.npz", n_replicas=args.replicas, t_max=args.t_max,
                              n_iterations=iterations, steps_per_iteration=args.remd_steps, timestep=args.timestep,
                              collision_rate=args.friction, seed=seed, resume=False, minimize=False)
    wall = time.perf_counter() - start
    phi = phi_of(target, result.positions)
    return leg_result(f"replica exchange ({args.replicas} replicas, {target.temperature:g}-{args.t_max:g} K)", target, phi,
                      iterations * per_iteration, wall, iterations=iterations,
                      exchange_acceptance=result.provenance.get("exchange_acceptance"))


def get_generator(args, target, workdir: Path):
    """(generator, where it came from): a run directory, a .safetensors file, or a fresh quick training."""
    if args.generator:
        path = Path(args.generator)
        if path.is_dir():
            _, run_target = load_run(path)
            return load_generator(path, target=run_target), str(path)
        from cmt_openmm.generator import BoltzmannGenerator

        return BoltzmannGenerator.load(path, target), str(path)
    preset = get_preset(args.train_preset)
    preset.update(system=args.system, temperature=args.temperature)
    if args.tiny:
        preset.update(max_steps=3, flow={"n_layers": 2, "hidden": 16, "n_bins": 4},
                      cmt={"n_samples": 256, "fit_steps": 4, "batch_size": 64})
    run_dir = workdir / "generator_run"
    run_training(parse_run_config(preset), run_dir, progress=True, report=False)
    return load_generator(run_dir, target=target), str(run_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", help="run directory or .safetensors of a trained generator (default: train one)")
    p.add_argument("--train-preset", dest="train_preset", default="aldp-quick")
    p.add_argument("--system", default="aldp-vacuum")
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--evaluations", type=float, default=1e6, help="energy evaluations per sampler")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--friction", type=float, default=1.0, help="1/ps")
    p.add_argument("--stride", type=int, default=10, help="MD steps between recorded frames")
    p.add_argument("--flow-interval", dest="flow_interval", type=int, default=50, help="MD steps between flow moves")
    p.add_argument("--flow-proposals", dest="flow_proposals", type=int, default=5, help="proposals per flow move")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--t-max", dest="t_max", type=float, default=600.0)
    p.add_argument("--remd-steps", dest="remd_steps", type=int, default=50, help="MD steps per exchange iteration")
    p.add_argument("--reweight-samples", dest="reweight_samples", type=int, default=20_000)
    p.add_argument("--samplers", nargs="+", default=["md", "md+flow", "remd"])
    p.add_argument("--out", default="runs/bench_enhanced_sampling")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny generator, 2e4 evaluations")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.tiny:
        args.evaluations, args.reweight_samples, args.remd_steps = 2e4, 1000, 20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = build_target(args.system, args.temperature)
    generator, source = get_generator(args, target, out)

    from cmt_openmm import FlowIndependenceMove, reweight

    ens = reweight(generator, target, args.reweight_samples, seed=12345)
    lo, hi = PHI_POSITIVE["phi>0"][0]
    phi_gen = phi_of(target, ens.positions)
    flow_pop = weighted_mean(((phi_gen >= lo) & (phi_gen < hi)).astype(float), ens.weights) \
        if ens.weights.any() else Estimate(float("nan"), float("nan"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for sampler in args.samplers:
                print(f"\n=== {sampler}, seed {seed} ===", flush=True)
                if sampler == "md":
                    row = run_md(target, args, seed)
                elif sampler == "md+flow":
                    move = FlowIndependenceMove(generator, n_steps=args.flow_proposals, batch_size=64, seed=seed)
                    row = run_md(target, args, seed, move)
                elif sampler == "remd":
                    row = run_remd(target, args, seed, Path(tmp))
                else:
                    raise SystemExit(f"unknown sampler {sampler!r}: use md, md+flow, remd")
                row["seed"] = seed
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = format_table(rows, flow_pop, ens.ess, args, source)
    print("\n" + table)
    results = {"settings": vars(args), "generator": source, "generator_reweighted": {
        "n": len(ens), "ess": ens.ess, "phi_positive": flow_pop.value, "phi_positive_error": flow_pop.error},
        "runs": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


def format_table(rows, flow_pop, ess, args, source) -> str:
    lines = [f"ALDP ({args.system}, {args.temperature:g} K), {int(args.evaluations):,} energy evaluations per sampler; "
             f"generator {source}",
             "",
             "| sampler | seed | evaluations | wall (s) | φ transitions | per 1e6 evals | per wall s | φ>0 population | acceptance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r.get("flow_acceptance", r.get("exchange_acceptance"))
        lines.append(f"| {r['sampler']} | {r['seed']} | {r['evaluations']:,} | {r['wall_s']:.1f} | {r['transitions']} "
                     f"| {r['transitions_per_1e6_evaluations']:.1f} | {r['transitions_per_wall_s']:.3g} "
                     f"| {r['phi_positive']:.4f} ± {r['phi_positive_error']:.4f} | {'–' if acc is None else f'{acc:.3f}'} |")
    lines.append(f"| generator, reweighted ({args.reweight_samples:,} independent samples, ESS {100 * ess:.2f} %) | | | | | | "
                 f"| {flow_pop.value:.4f} ± {flow_pop.error:.4f} | |")
    md = [r for r in rows if r["sampler"] == "Langevin MD"]
    flow = [r for r in rows if r["sampler"].startswith("Langevin MD + flow")]
    if md and flow:
        a = np.mean([r["transitions_per_1e6_evaluations"] for r in flow])
        b = np.mean([r["transitions_per_1e6_evaluations"] for r in md])
        lines += ["", f"flow moves / MD transitions per evaluation: {a / b:.1f}x" if b > 0 else
                  f"flow moves: {a:.1f} transitions per 1e6 evaluations; MD alone: none observed"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
