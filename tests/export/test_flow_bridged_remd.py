"""Flow-bridged replica exchange: states, the CLI, the example, the benchmark, and (slow) exactness."""
from __future__ import annotations

import argparse
import json

import numpy as np
import openmm
import pytest
from export_helpers import evaluate, minus_kT_log_q, samples
from helpers import load_script, perturbed_generator
from openmm import unit
from openmmtools.multistate import MultiStateReporter, ReplicaExchangeSampler

from cmt_openmm.export.force import to_openmm_force
from cmt_openmm.systems import get_target
from cmt_openmm.units import kT


# ------------------------------------------------------------------ the bridge
def test_bridge_states_apply_lambda_and_flow_moves_accept_everything_at_lambda_zero(target, generator_file):
    from openmmtools import cache, states

    from cmt_openmm.export.flow_bridged_remd import bridge_states, bridge_system
    from cmt_openmm.sampling.moves import FlowIndependenceMove

    generator = generator_file[0]
    system = bridge_system(target.system, to_openmm_force(generator, scale_parameter=None, backend="python"))
    lambdas = [1.0, 0.4, 0.0]
    thermodynamic_states = bridge_states(system, 300.0, lambdas)
    x = samples(generator, 1, seed=7)[0]
    u, u_q = evaluate(target.system, x)[0], minus_kT_log_q(generator, x[None])[0]
    for lam, state in zip(lambdas, thermodynamic_states):
        context = state.create_context(openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(x)
        assert state.reduced_potential(context) == pytest.approx((lam * u + (1 - lam) * u_q) / kT(300.0), abs=1e-4)
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
    move = FlowIndependenceMove(generator, n_steps=40, batch_size=40, seed=0)
    sampler_state = states.SamplerState(x * unit.nanometer)
    move.apply(thermodynamic_states[-1], sampler_state, context_cache)
    assert move.n_proposed == 40 and move.n_accepted >= 38  # acceptance exp(rounding ~1e-5 kT)
    move.reset_statistics()
    move.apply(thermodynamic_states[0], sampler_state, context_cache)  # the untrained flow at the target
    assert move.n_accepted < 40


def test_timestep_is_2_fs_where_bonds_to_hydrogen_are_constrained_unless_given(target, tmp_path, monkeypatch):
    from openmm import app

    from cmt_openmm.cli import flow_bridged_remd as cli_bridge
    from cmt_openmm.export import flow_bridged_remd
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems import aldp_pdb_path
    from cmt_openmm.target import Target

    class Stop(Exception):
        pass

    def stop(*, settings, **_):
        raise Stop(settings["timestep_fs"])

    monkeypatch.setattr(flow_bridged_remd, "run_replica_exchange", stop)  # the settings, without running
    hbonds = Target.from_pdb(aldp_pdb_path(), ["amber99sbildn.xml"], 300.0, constraints=app.HBonds, name="hbonds")
    for system_target, timestep, expected in ((hbonds, None, 2.0), (target, None, 1.0), (hbonds, 1.5, 1.5)):
        generator = BoltzmannGenerator.build(system_target, n_layers=1, hidden=4)
        path = generator.save(tmp_path / f"{system_target.name}.safetensors")
        with pytest.raises(Stop) as stopped:
            flow_bridged_remd.run_bridge_remd(BoltzmannGenerator.load(path, system_target), system_target,
                                              tmp_path / "x.npz", n_replicas=2, lambdas="uniform", backend="python",
                                              progress=False, **({} if timestep is None else {"timestep": timestep}))
        assert stopped.value.args[0] == expected
    sub = argparse.ArgumentParser().add_subparsers()
    assert cli_bridge.add_parser(sub).parse_args(["run", "--out", "x.npz"]).timestep is None  # the default above


def _bridge_cli(monkeypatch, argv, capsys):
    """``cmt-openmm bridge-remd ...`` through the real entry point (registered here if main.py does not yet)."""
    import importlib

    from cmt_openmm.cli import flow_bridged_remd

    cli = importlib.import_module("cmt_openmm.cli.main")

    original = cli.build_parser

    def build_parser():
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "bridge-remd" not in sub.choices:
            flow_bridged_remd.add_parser(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bridge_remd_writes_lambda_one_frames_resumes_and_refuses_changes(generator_file, tmp_path, monkeypatch,
                                                                            capsys):
    run_dir = generator_file[1]
    out = tmp_path / "bridge.npz"
    argv = ["bridge-remd", str(run_dir), "--out", str(out), "--replicas", "3", "--steps-per-iteration", "5",
            "--flow-proposals", "3", "--pilot-iterations", "2", "--no-minimize", "--quiet"]
    code, stdout, err = _bridge_cli(monkeypatch, argv + ["--iterations", "2"], capsys)
    assert code == 0, err
    with np.load(out) as data:
        assert data["positions"].shape == (2, 22, 3) and data["reduced_energy"].shape == (2,)
        provenance = json.loads(str(data["provenance"]))
    lambdas = provenance["lambdas"]
    assert lambdas[0] == 1.0 and lambdas[-1] == 0.0 and len(lambdas) == 3
    assert provenance["pilot"]["lambdas"] == [1.0, 0.5, 0.0] and len(provenance["pair_acceptance"]) == 2
    at_flow = provenance["flow_moves"][-1]
    assert at_flow["lambda"] == 0.0 and at_flow["n_proposed"] == 6 and at_flow["n_accepted"] >= 5
    assert json.loads(stdout)["n_frames"] == 2 and (tmp_path / "bridge.json").is_file()
    # Langevin (5 steps) at λ = 1 and 0.5 only; every replica evaluates the 3 states; the flow proposals
    flow_evaluations = sum(m["n_proposed"] - m["n_chirality_rejected"] - m["n_log_q_failed"]
                           for m in provenance["flow_moves"])
    assert provenance["energy_evaluations"] == 2 * (2 * 5 + 3 * 3) + flow_evaluations
    reporter = MultiStateReporter(str(out.with_suffix(".nc")), open_mode="r")
    try:
        moves = ReplicaExchangeSampler.from_storage(reporter)._mcmc_moves
    finally:
        reporter.close()
        capsys.readouterr()  # openmmtools' citation notice
    assert [[type(m).__name__ for m in move.move_list] for move in moves] == \
        [["SeededLangevinMove", "FlowIndependenceMove"]] * 2 + [["FlowIndependenceMove"]]
    code, stdout, err = _bridge_cli(monkeypatch, argv + ["--iterations", "3"], capsys)  # resumes
    assert code == 0, err
    resumed = json.loads(stdout)
    assert resumed["n_frames"] == 3 and resumed["lambdas"] == lambdas and resumed["pilot"] == provenance["pilot"]
    assert resumed["flow_moves"][-1]["n_proposed"] == 9
    changed = [a if a != "5" else "6" for a in argv]
    code, _, err = _bridge_cli(monkeypatch, changed + ["--iterations", "4"], capsys)
    assert code == 2 and "other settings (steps_per_iteration)" in err


def test_example_runs_tiny_and_resumes(generator_file, tmp_path):
    example = load_script("examples/flow_bridged_replica_exchange.py")
    path = str(generator_file[1] / "generator.safetensors")
    storage = str(tmp_path / "bridge.nc")
    summary = example.main(["--generator", path, "--tiny", "--storage", storage])
    assert summary["iteration"] == 3 and len(summary["states"]) == 3 and len(summary["pair_acceptance"]) == 2
    assert summary["states"][-1]["lambda_target"] == 0.0
    assert summary["states"][-1]["n_accepted"] >= summary["states"][-1]["n_proposed"] - 1
    resumed = example.main(["--generator", path, "--storage", storage, "--resume", "--iterations", "1"])
    assert resumed["iteration"] == 4


@pytest.mark.filterwarnings("ignore:reweighting 100 generator samples")  # the tiny reweighting beside it
def test_enhanced_sampling_benchmark_runs_the_bridge_at_tiny_size(generator_file, tmp_path):
    bench = load_script("benchmarks/enhanced_sampling.py")
    path = str(generator_file[1] / "generator.safetensors")
    assert bench.main(["--tiny", "--generator", path, "--samplers", "bridge", "--evaluations", "700",
                       "--replicas", "3", "--reweight-samples", "100", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["runs"]
    assert 0 < row["evaluations"] <= 700 * 1.1 and row["frames"] >= 2
    assert len(row["lambdas"]) == 3 and len(row["pair_acceptance"]) == 2 and len(row["round_trips"]) == 3
    assert row["flow_acceptance_at_flow"] > 0.9
    assert [c["fraction"] for c in row["convergence"]] == [0.1, 0.25, 0.5, 1.0]
    assert "round trips / replica" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_bridged_replica_exchange_samples_the_exact_target_at_lambda_one(tmp_path):
    """End to end on a toy with an exact distribution: λ = 1 frames of a bridge from a poor
    (perturbed, untrained) generator reproduce the exact x marginal and mode weights
    (batch-means z-scores, as tests/sampling/test_moves_exactness.py). The flow under-covers the wells'
    outer tails by ~e^7, so Langevin steps do the local sampling there; flow moves and exchanges
    carry replicas between the wells."""
    from helpers import bin_z_scores, critical_z

    from cmt_openmm.export.flow_bridged_remd import run_bridge_remd
    from cmt_openmm.generator import BoltzmannGenerator

    toy = get_target("toy-double-well")
    perturbed_generator(toy, scale=0.1, seed=5, n_layers=2, hidden=8).save(tmp_path / "g.safetensors")
    generator = BoltzmannGenerator.load(tmp_path / "g.safetensors", toy)
    run = run_bridge_remd(generator, toy, tmp_path / "frames.npz", n_replicas=3, n_iterations=1200,
                          lambdas=[1.0, 0.5, 0.0], steps_per_iteration=10, flow_proposals=3, timestep=5.0,
                          collision_rate=20.0, seed=3, progress=False, minimize=False, n_equilibration=100)
    x = run.positions[:, 0, 0]
    inner = np.linspace(-0.8, 0.8, 9)
    lo, hi = toy.box[0]
    exact = toy.marginal(0, np.concatenate([[min(lo, -1.8)], inner, [max(hi, 1.8)]]))
    z_x = bin_z_scores(np.digitize(x, inner), exact / exact.sum(), np.arange(len(exact)))
    weights = toy.mode_weights()
    z_m = bin_z_scores(np.asarray(toy.mode_of(run.positions)), weights, np.arange(len(weights)))
    z = np.abs(np.concatenate([z_x, z_m])).max()
    assert z < critical_z(len(exact) + len(weights)), f"max |z| = {z:.2f}"
    assert run.provenance["flow_moves"][-1]["acceptance"] > 0.99
    assert min(run.provenance["pair_acceptance"]) > 0.05 and run.provenance["round_trips_per_replica"] > 5
