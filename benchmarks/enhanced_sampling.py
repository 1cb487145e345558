"""Enhanced sampling with a Boltzmann generator: φ transitions of a peptide per energy evaluation.

Four samplers of a peptide (default ALDP; any run's own system with ``--generator RUN_DIR``) at
300 K get the same number of OpenMM energy evaluations:

- Langevin MD alone (``LangevinMiddleIntegrator``, Reference platform): one evaluation per step;
- Langevin MD + flow moves (:class:`cmt_openmm.FlowIndependenceMove` applied to the
  ``Simulation`` every ``--flow-interval`` MD steps, ``--flow-proposals`` proposals each):
  one evaluation per MD step and per proposal;
- openmmtools temperature replica exchange (``cmt_openmm.sampling.reference_md.run_reference_md``,
  geometric ladder, Langevin between swaps): n_replicas × (steps per iteration + 1)
  evaluations per iteration (the +1: each replica's energy for the swap matrix, which
  openmmtools computes once per replica for a temperature ladder); the frames of the 300 K
  state are analysed;
- flow-bridged replica exchange (``cmt_openmm.export.flow_bridged_remd.run_bridge_remd``, ``--samplers bridge``):
  the same number of replicas on a λ ladder from the generator's own energy U_q = -kT log q
  (λ = 0) to the target (λ = 1), placed for equal exchange acceptance by a pilot run (its
  evaluations count), Langevin + flow moves in every state but λ = 0 (flow moves only); each
  iteration costs (n_replicas − 1) × steps + n_replicas × (evaluated flow proposals + n_replicas)
  evaluations of U (and as many of U_q: the flow's network, which on ALDP in vacuum costs far
  more wall time than U); the λ = 1 frames are analysed.

For each, residue by residue (every backbone φ; one for ALDP): transitions between the φ < 0 and
φ > 0 basins per 1e6 evaluations and per wall second (summed over residues), and the φ > 0 basin
population (αL ∪ C7ax, 0° ≤ φ < 120°) with a block-averaging standard error (20 blocks).
Transitions are counted between cores with a buffer, so that recrossings of the boundary are not
counted (``cmt_openmm.analysis.metrics.phi_transitions``). The reweighted generator's own estimate of the
population (independent samples, delta-method error) is printed beside them. For the replica
exchanges: round trips per replica (state 0 -> last state -> state 0) and the exchange
acceptance of every neighbour pair; for all: the φ > 0 population against the evaluations spent
(at 1/10, 1/4, 1/2 and all of the budget) and the evaluations each needed to converge: the first
budget fraction from which every later estimate of every residue lies within 1σ (its block error
and the reference's error in quadrature) of the reference population (``--reference VALUE ERROR
[VALUE ERROR ...]``, one pair per residue, from a long run; default the reweighted generator's
estimates), with the ratio against temperature replica exchange (a lower bound where replica
exchange never converged). Prints the tables, writes ``results.json``.

    python -m benchmarks.enhanced_sampling --generator runs/demo --evaluations 1e6
    python -m benchmarks.enhanced_sampling --generator runs/ala4 --samplers md md+flow remd --evaluations 1e6
    python -m benchmarks.enhanced_sampling --generator runs/demo --samplers bridge --remd-steps 10 --evaluations 1e5
    python -m benchmarks.enhanced_sampling --tiny      # trains a tiny generator; a smoke run
    python -m benchmarks.enhanced_sampling --tiny --generator g.safetensors --samplers bridge --evaluations 600
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import torch

from cmt_openmm import Run
from cmt_openmm.analysis.metrics import phi_transitions, state_effective_samples
from cmt_openmm.coordinates.backbone import in_phi_positive_basin, phi_angles
from cmt_openmm.errors import CMTInputError
from cmt_openmm.runs.run_files import build_target
from cmt_openmm.sampling.estimators import MIN_EFFECTIVE_SAMPLES, Estimate, weighted_mean

N_BLOCKS = 20
CONVERGENCE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)  # 0.1: the target is convergence with 1/10 of T-REMD


def phi_of(target, positions: np.ndarray) -> np.ndarray:
    """Every backbone φ (radians) of configurations (B, n_atoms, 3) nm: (B, n_phi)."""
    return phi_angles(target.topology, positions)


def population(phi: np.ndarray) -> tuple[list[float], list[float]]:
    """φ > 0 basin population of a time series, per residue (``phi`` (T,) or (T, n_phi)), with its
    block-averaging standard error."""
    inside = in_phi_positive_basin(phi).astype(float).reshape(len(phi), -1)
    blocks = np.array_split(inside, N_BLOCKS) if len(inside) >= N_BLOCKS else [inside]
    means = np.stack([b.mean(axis=0) for b in blocks])
    errors = means.std(axis=0, ddof=1) / math.sqrt(len(means)) if len(means) > 1 else np.full(means.shape[1], np.nan)
    return inside.mean(axis=0).tolist(), errors.tolist()


def convergence(phi: np.ndarray, spent: np.ndarray, budget: float) -> list[dict]:
    """φ > 0 populations (± block error, per residue) of the frames recorded within each fraction
    of the budget (``spent``: evaluations spent when each frame was recorded)."""
    rows = []
    n_phi = np.asarray(phi).reshape(len(phi), -1).shape[1]
    for fraction in CONVERGENCE_FRACTIONS:
        keep = spent <= fraction * budget + 1e-9
        pop, err = population(phi[keep]) if keep.any() else ([float("nan")] * n_phi, [float("nan")] * n_phi)
        rows.append({"fraction": fraction, "evaluations": int(spent[keep].max()) if keep.any() else 0,
                     "frames": int(keep.sum()), "phi_positive": pop, "phi_positive_error": err})
    return rows


def evaluations_to_converge(convergence_rows: list[dict], reference: list[Estimate]) -> int | None:
    """Evaluations after which every residue's φ > 0 estimate stays within 1σ of its ``reference``
    (σ: the standard error of the difference, the estimate's block error and the reference's in
    quadrature): those of the first budget fraction from which every later one agrees (None: it
    never did). A fraction without a usable error bar (no visit, no frames) does not agree."""
    converged_from = None
    for row in convergence_rows:
        agrees = all(
            math.isfinite(value) and math.isfinite(error) and value > 0
            and abs(value - ref.value) <= math.hypot(error, ref.error)
            for value, error, ref in zip(np.atleast_1d(row["phi_positive"]), np.atleast_1d(row["phi_positive_error"]),
                                         reference, strict=True))
        if not agrees:
            converged_from = None
        elif converged_from is None:
            converged_from = row["evaluations"]
    return converged_from


def leg_result(name: str, target, phi: np.ndarray, evaluations: int, wall: float, spent=None, **extra) -> dict:
    by_residue = phi_transitions(phi)
    transitions = sum(by_residue)
    pop, err = population(phi)
    spent = np.linspace(evaluations / max(len(phi), 1), evaluations, len(phi)) if spent is None else np.asarray(spent)
    return {
        "sampler": name, "evaluations": int(evaluations), "wall_s": wall, "frames": len(phi),
        "transitions": transitions, "transitions_by_residue": by_residue,
        "transitions_per_1e6_evaluations": transitions / evaluations * 1e6,
        "transitions_per_wall_s": transitions / wall if wall > 0 else None,
        "phi_positive": pop, "phi_positive_error": err,
        "convergence": convergence(phi, spent, evaluations), **extra,
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
    phis, spent, evaluations, md_steps, since_flow = [], [], 0, 0, 0
    start = time.perf_counter()
    with tqdm(total=budget, desc="MD + flow" if move else "MD", unit="eval", unit_scale=True, mininterval=1.0) as bar:
        while evaluations < budget:
            n = min(stride, budget - evaluations)
            sim.step(n)
            md_steps += n
            since_flow += n
            evaluations += n
            phis.append(positions_of(sim))
            spent.append(evaluations)
            if move is not None and since_flow >= interval and evaluations < budget:
                stats = move.apply_to_simulation(sim, n_steps=min(args.flow_proposals, budget - evaluations))
                evaluations += stats["n_proposed"]
                since_flow = 0
                phis.append(positions_of(sim))
                spent.append(evaluations)
            bar.n = evaluations
            bar.refresh() if len(phis) % 200 == 0 else None
    wall = time.perf_counter() - start
    phi = phi_of(target, np.stack(phis))
    if move is None:
        return leg_result("Langevin MD", target, phi, evaluations, wall, spent, md_steps=md_steps)
    s = move.statistics
    return leg_result("Langevin MD + flow moves", target, phi, evaluations, wall, spent, md_steps=md_steps,
                      flow_proposals=s["n_proposed"], flow_accepted=s["n_accepted"],
                      flow_acceptance=s["n_accepted"] / max(s["n_proposed"], 1))


def run_remd(target, args, seed: int, workdir: Path) -> dict:
    from cmt_openmm.export.ladder import exchange_statistics
    from cmt_openmm.sampling.reference_md import run_reference_md

    per_iteration = args.replicas * (args.remd_steps + 1)
    iterations = max(2, int(args.evaluations) // per_iteration)
    start = time.perf_counter()
    result = run_reference_md(target, workdir / f"remd-seed{seed}.npz", n_replicas=args.replicas, t_max=args.t_max,
                              n_iterations=iterations, steps_per_iteration=args.remd_steps, timestep=args.timestep,
                              collision_rate=args.friction, seed=seed, resume=False, minimize=False)
    wall = time.perf_counter() - start
    phi = phi_of(target, result.positions)
    exchange = exchange_statistics(result.provenance["storage"], iterations)
    name = f"replica exchange ({args.replicas} replicas, {target.temperature:g}-{args.t_max:g} K)"
    return leg_result(name, target, phi, iterations * per_iteration, wall, per_iteration * np.arange(1, len(phi) + 1),
                      iterations=iterations,
                      exchange_acceptance=result.provenance.get("exchange_acceptance"),
                      pair_acceptance=exchange["pair_acceptance"], round_trips=exchange["round_trips"],
                      round_trips_per_replica=exchange["round_trips_per_replica"])


def run_bridge(target, generator, args, seed: int, workdir: Path) -> dict:
    """Flow-bridged replica exchange at the budget: pilot (uniform ladder) + main run on the chosen ladder."""
    from cmt_openmm.export.flow_bridged_remd import run_bridge_remd

    k = args.replicas
    # an upper bound (every proposal evaluated); the λ = 0 state runs flow moves only
    per_iteration = (k - 1) * args.remd_steps + k * (args.flow_proposals + k)
    pilot = max(2, min(args.bridge_pilot, int(0.25 * args.evaluations) // per_iteration))
    iterations = max(2, (int(args.evaluations) - pilot * per_iteration) // per_iteration)
    start = time.perf_counter()
    result = run_bridge_remd(generator, target, workdir / f"bridge-seed{seed}.npz", n_replicas=k,
                             n_iterations=iterations, lambdas="auto", steps_per_iteration=args.remd_steps,
                             flow_proposals=args.flow_proposals, timestep=args.timestep, collision_rate=args.friction,
                             seed=seed, resume=False, progress=True, pilot_iterations=pilot, minimize=False)
    wall = time.perf_counter() - start
    p = result.provenance
    phi = phi_of(target, result.positions)
    spent = p["pilot"]["energy_evaluations"] + (p["energy_evaluations"] / iterations) * np.arange(1, len(phi) + 1)
    flows = p["flow_moves"]
    return leg_result(f"flow-bridged replica exchange ({k} replicas, λ = 1..0)", target, phi,
                      p["energy_evaluations_with_pilot"], wall, spent, iterations=iterations, pilot_iterations=pilot,
                      lambdas=p["lambdas"], exchange_acceptance=p["exchange_acceptance"],
                      pair_acceptance=p["pair_acceptance"], round_trips=p["round_trips"],
                      round_trips_per_replica=p["round_trips_per_replica"],
                      estimated_pair_acceptance=p["pilot"]["estimated_pair_acceptance"],
                      flow_acceptance_per_state=[f["acceptance"] for f in flows],
                      flow_acceptance_at_flow=flows[-1]["acceptance"])


def get_generator(args, target, workdir: Path):
    """(generator, where it came from): a run directory, a .safetensors file, or a fresh quick training."""
    if args.generator:
        path = Path(args.generator)
        if path.is_dir():
            return Run.open(path).generator, str(path)
        from cmt_openmm.generator import BoltzmannGenerator

        return BoltzmannGenerator.load(path, target), str(path)
    overrides = {"system": args.system, "temperature": args.temperature}
    if args.tiny:
        overrides.update(max_steps=3, flow={"n_layers": 2, "hidden": 16, "n_bins": 4},
                         cmt={"n_samples": 256, "fit_steps": 4, "batch_size": 64})
    run_dir = workdir / "generator_run"
    run = Run.from_preset(run_dir, args.train_preset, **overrides)
    run.train(progress=True, report=False)
    return run.generator, str(run_dir)


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
    p.add_argument("--bridge-pilot", dest="bridge_pilot", type=int, default=50,
                   help="pilot iterations of the flow-bridged replica exchange (at most a quarter of the budget)")
    p.add_argument("--reweight-samples", dest="reweight_samples", type=int, default=None,
                   help="independent generator samples reweighted (default 20000; --tiny 1000)")
    p.add_argument("--samplers", nargs="+", default=["md", "md+flow", "remd", "bridge"],
                   help="md, md+flow, remd (temperatures), bridge (flow-bridged λ ladder)")
    p.add_argument("--reference", nargs="+", type=float, metavar="VALUE ERROR",
                   help="φ > 0 population of a long run and its error, one pair per residue with a φ, to judge "
                        "convergence against (default: the reweighted generator's estimates)")
    p.add_argument("--out", default="runs/bench_enhanced_sampling")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny generator, 2e4 evaluations "
                                                       "(an explicit --evaluations or --reweight-samples wins)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    explicit = set(argv if argv is not None else sys.argv[1:])
    if args.reweight_samples is None:
        args.reweight_samples = 1000 if args.tiny else 20_000
    if args.tiny:
        args.remd_steps = 20
        if "--evaluations" not in explicit:
            args.evaluations = 2e4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.generator) if args.generator and Path(args.generator).is_dir() else None
    try:
        target = Run.open(run_dir).target if run_dir else build_target(args.system, args.temperature)
    except CMTInputError as error:  # not a run directory, an unknown system: one sentence, no traceback
        raise SystemExit(str(error)) from None
    if run_dir:  # the table and results.json name the run's own system and temperature
        args.system, args.temperature = target.name, float(target.temperature)
    generator, source = get_generator(args, target, out)

    from cmt_openmm import FlowIndependenceMove, reweight

    ens = reweight(generator, target, args.reweight_samples, seed=12345)
    flow_pop = generator_populations(phi_of(target, ens.positions), ens.weights)
    reference = reference_estimates(args.reference, len(flow_pop)) if args.reference else flow_pop
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
                elif sampler == "bridge":
                    row = run_bridge(target, generator, args, seed, Path(tmp))
                else:
                    raise SystemExit(f"unknown sampler {sampler!r}: use md, md+flow, remd, bridge")
                row["seed"] = seed
                row["evaluations_to_converge"] = evaluations_to_converge(row["convergence"], reference)
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = format_table(rows, flow_pop, ens.ess, args, source, reference)
    print("\n" + table)
    results = {"settings": vars(args), "generator": source, "generator_reweighted": {
        "n": len(ens), "ess": ens.ess, "phi_positive": [e.value for e in flow_pop],
        "phi_positive_error": [e.error for e in flow_pop], "effective_samples": [e.n_effective for e in flow_pop]},
        "reference": {"phi_positive": [e.value for e in reference], "phi_positive_error": [e.error for e in reference],
                      "source": reference_source(args)},
        "runs": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


class ReweightedPopulation(NamedTuple):
    """A reweighted φ > 0 population, its delta-method error and the effective samples it rests on."""

    value: float
    error: float
    n_effective: float


def generator_populations(phi: np.ndarray, weights: np.ndarray) -> list[ReweightedPopulation]:
    """The reweighted generator's φ > 0 population of every residue (``phi`` (N, n_phi), ``weights``
    (N,)), with the effective samples of its basin (`state_effective_samples`)."""
    if not weights.any():
        return [ReweightedPopulation(float("nan"), float("nan"), 0.0)] * phi.shape[1]
    populations = []
    for series in phi.T:
        inside = in_phi_positive_basin(series)
        e = weighted_mean(inside.astype(float), weights)
        populations.append(ReweightedPopulation(e.value, e.error, state_effective_samples(weights, inside)))
    return populations


def reference_estimates(values: list[float], n_phi: int) -> list[Estimate]:
    """``--reference V1 E1 V2 E2 ...`` as one Estimate per residue."""
    if len(values) != 2 * n_phi:
        raise SystemExit(f"--reference needs a population and its error for each of the {n_phi} residue(s) "
                         f"with a φ ({2 * n_phi} numbers), got {len(values)}.")
    return [Estimate(values[2 * k], values[2 * k + 1]) for k in range(n_phi)]


def population_cells(values, errors, transitions=None) -> str:
    """`population_cell` of every residue, joined with " / "."""
    transitions = [None] * len(values) if transitions is None else transitions
    return " / ".join(population_cell(v, e, t) for v, e, t in zip(values, errors, transitions, strict=True))


def generator_cell(population: ReweightedPopulation) -> str:
    """A reweighted population, marked unreliable when its basin rests on few effective samples."""
    cell = f"{population.value:.4f} ± {population.error:.4f}"
    n = population.n_effective
    return cell if n >= MIN_EFFECTIVE_SAMPLES else f"{cell} (unreliable: {n:.0f} effective samples)"


def population_cell(value: float, error: float, transitions: int | None = None) -> str:
    """A φ > 0 population with its block error, or why there is none: a chain that never visited
    φ > 0, or never crossed between the basins, has no error bar to give (not 0.0000 ± 0.0000)."""
    if value is None or not math.isfinite(value):
        return "n/a (no frames)"
    if value == 0.0:
        return "never visited (unconverged)"
    cell = f"{value:.4f} ± {error:.4f}"
    return cell + " (no transitions: unreliable)" if transitions == 0 else cell


def format_table(rows, flow_pop, ess, args, source, reference) -> str:
    lines = [f"{args.system} ({args.temperature:g} K), {int(args.evaluations):,} energy evaluations per sampler; "
             f"generator {source}; φ > 0 of each residue with a φ, in chain order",
             "",
             "| sampler | seed | evaluations | wall (s) | φ transitions | per 1e6 evals | per wall s | φ>0 population | acceptance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r.get("flow_acceptance", r.get("exchange_acceptance"))
        lines.append(f"| {r['sampler']} | {r['seed']} | {r['evaluations']:,} | {r['wall_s']:.1f} | {r['transitions']} "
                     f"| {r['transitions_per_1e6_evaluations']:.1f} | {r['transitions_per_wall_s']:.3g} "
                     f"| {population_cells(r['phi_positive'], r['phi_positive_error'], r['transitions_by_residue'])} "
                     f"| {'–' if acc is None else f'{acc:.3f}'} |")
    lines.append(f"| generator, reweighted ({args.reweight_samples:,} independent samples, ESS {100 * ess:.2f} %) | | | | | | "
                 f"| {' / '.join(generator_cell(e) for e in flow_pop)} | |")
    exchanges = [r for r in rows if "round_trips" in r]
    if exchanges:
        lines += ["", "| replica exchange | seed | round trips / replica | neighbour exchange acceptance (state 0 = target) |"
                  " flow acceptance per state |", "|---|---|---|---|---|"]
        for r in exchanges:
            pairs = ", ".join("–" if a is None else f"{a:.2f}" for a in r["pair_acceptance"])
            flow = ", ".join(f"{a:.2f}" for a in r.get("flow_acceptance_per_state", [])) or "–"
            ladder = f" (λ = {', '.join(f'{x:.3g}' for x in r['lambdas'])})" if "lambdas" in r else ""
            lines.append(f"| {r['sampler']}{ladder} | {r['seed']} | {r['round_trips_per_replica']:.2f} | {pairs} | {flow} |")
    lines += ["", "φ > 0 population against evaluations spent (fraction of the budget: population ± block error):", "",
              "| sampler | seed | " + " | ".join(f"{f:g}" for f in CONVERGENCE_FRACTIONS) + " |",
              "|---|---|" + "---|" * len(CONVERGENCE_FRACTIONS)]
    for r in rows:
        cells = " | ".join(f"{population_cells(c['phi_positive'], c['phi_positive_error'])} ({c['evaluations']:,})"
                           for c in r["convergence"])
        lines.append(f"| {r['sampler']} | {r['seed']} | {cells} |")
    lines += ["", convergence_summary(rows, reference, args)]
    md = [r for r in rows if r["sampler"] == "Langevin MD"]
    flow = [r for r in rows if r["sampler"].startswith("Langevin MD + flow")]
    if md and flow:
        a = np.mean([r["transitions_per_1e6_evaluations"] for r in flow])
        b = np.mean([r["transitions_per_1e6_evaluations"] for r in md])
        lines += ["", f"flow moves / MD transitions per evaluation: {a / b:.1f}x" if b > 0 else
                  f"flow moves: {a:.1f} transitions per 1e6 evaluations; MD alone: none observed"]
    return "\n".join(lines)


def reference_source(args) -> str:
    """Where the reference φ > 0 population comes from."""
    return "--reference" if args.reference else "the reweighted generator"


def convergence_summary(rows, reference, args) -> str:
    """Evaluations each sampler needed to converge, and how many times fewer than temperature
    replica exchange of the same seed (``>``: a lower bound, replica exchange never converged)."""
    within = " / ".join(f"{e.value:.4f} ± {e.error:.4f}" for e in reference)
    lines = [f"Evaluations to converge (every later φ > 0 estimate of every residue within 1σ of {within}, "
             f"{reference_source(args)}; σ of the difference):", "",
             "| sampler | seed | evaluations to converge | x fewer than T-REMD |", "|---|---|---|---|"]
    remd = {r["seed"]: r for r in rows if r["sampler"].startswith("replica exchange")}
    for r in rows:
        need = r["evaluations_to_converge"]
        cell = f"{need:,}" if need is not None else f"> {r['evaluations']:,} (not converged)"
        ratio = "–"
        other = remd.get(r["seed"])
        if need is not None and other is not None and other is not r:
            other_need = other["evaluations_to_converge"]
            ratio = f"{other_need / need:.1f}x" if other_need is not None else f"> {other['evaluations'] / need:.1f}x"
        lines.append(f"| {r['sampler']} | {r['seed']} | {cell} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
