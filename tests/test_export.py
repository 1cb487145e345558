"""The generator's energy U_q = -kT log q as an OpenMM force, and flow-bridged replica exchange.

A small perturbed (untrained) generator of alanine dipeptide stands in for a trained one:
the force must reproduce ``log_prob`` whatever the flow. What may crash the process
(deserialising a TorchForce with some openmm-torch builds) runs in subprocesses.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import openmm
import pytest
import torch
from helpers import ROOT, load_script, perturbed_generator, random_rotation
from openmm import unit
from scipy import stats

from openmmtools.multistate import MultiStateReporter, ReplicaExchangeSampler

from cmt_openmm.errors import CMTInputError
from cmt_openmm.export.flow_energy import FlowEnergy
from cmt_openmm.export.force import openmmtorch_error, to_openmm_force, torchforce_copies_are_safe
from cmt_openmm.export.ladder import AcceptanceModel, equal_acceptance_ladder, estimate_acceptance, round_trips
from cmt_openmm.systems import get_target
from cmt_openmm.units import kT

KJ = unit.kilojoule_per_mole


@pytest.fixture(scope="module")
def target():
    return get_target("aldp-vacuum")


@pytest.fixture(scope="module")
def generator64(target):
    return perturbed_generator(target, scale=0.05, seed=3, n_layers=2, hidden=16, dtype=torch.float64)


@pytest.fixture(scope="module")
def generator_file(target, tmp_path_factory):
    """A float32 perturbed generator saved in a run directory (run.yaml + generator.safetensors)."""
    import yaml

    from cmt_openmm.runs.presets import get_preset
    from cmt_openmm.runs.run_files import parse_run_config
    from cmt_openmm.generator import BoltzmannGenerator

    run_dir = tmp_path_factory.mktemp("run")
    spec = parse_run_config({**get_preset("aldp-quick"), "system": "aldp-vacuum", "temperature": 300.0}, run_dir)
    (run_dir / "run.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    perturbed_generator(target, scale=0.05, seed=4, n_layers=2, hidden=16, n_bins=4).save(
        run_dir / "generator.safetensors")
    return BoltzmannGenerator.load(run_dir / "generator.safetensors", target), run_dir


def samples(generator, n: int, seed: int) -> np.ndarray:
    """Generator samples (n, 22, 3) nm, each randomly rotated and translated."""
    x, _ = generator.sample(n, torch.Generator().manual_seed(seed))
    x = x.numpy()
    return np.stack([xi @ random_rotation(seed + i).T + 0.3 * (i % 3) for i, xi in enumerate(x)])


def particles_only(target) -> openmm.System:
    system = openmm.System()
    for i in range(target.system.getNumParticles()):
        system.addParticle(target.system.getParticleMass(i))
    return system


def evaluate(system, x, platform="Reference", **parameters):
    """(energy kJ/mol, forces (n, 3) kJ/mol/nm) of ``system`` at x."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(x)
    for name, value in parameters.items():
        context.setParameter(name, value)
    state = context.getState(getEnergy=True, getForces=True)
    forces = state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer)
    return state.getPotentialEnergy().value_in_unit(KJ), forces


def minus_kT_log_q(generator, x) -> np.ndarray:
    with torch.no_grad():
        return -kT(300.0) * generator.log_prob(torch.as_tensor(x)).numpy()


# ------------------------------------------------------------------ the energy and its forces
def test_energy_is_minus_kT_log_q_for_float64_and_float32_flows(target, generator64, generator_file):
    x = samples(generator64, 40, seed=0)
    exact = minus_kT_log_q(generator64, x)
    assert np.isfinite(exact).all()
    energy = FlowEnergy.from_generator(generator64)
    batched = energy(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(batched, exact, rtol=1e-11, atol=1e-9)
    scripted = torch.jit.script(energy)  # what the TorchForce runs: compiled, not traced
    np.testing.assert_allclose(scripted(torch.as_tensor(x)).numpy(), batched, rtol=0, atol=1e-10)
    system = particles_only(target)
    system.addForce(to_openmm_force(generator64, backend="python"))
    for xi, ei in zip(x[:3], exact[:3]):
        assert evaluate(system, xi)[0] == pytest.approx(ei, rel=1e-11, abs=1e-9)
    generator32 = generator_file[0]  # the default: coupling layers in the generator's float32
    x32 = samples(generator32, 40, seed=1)
    with torch.no_grad():
        u32 = FlowEnergy.from_generator(generator32)(torch.as_tensor(x32)).numpy()
    error = np.abs(u32 - minus_kT_log_q(generator32, x32))
    assert error.max() < 2e-3  # kJ/mol, float32 rounding of log q ~ 100 (measured ~5e-5)


def test_energy_of_a_generator_on_cartesian_coordinates():
    toy = get_target("toy-double-well")
    generator = perturbed_generator(toy, scale=0.05, n_layers=2, hidden=8, dtype=torch.float64)
    x, _ = generator.sample(20, torch.Generator().manual_seed(0))
    with torch.no_grad():
        u = FlowEnergy.from_generator(generator)(x)
        np.testing.assert_allclose(u.numpy(), minus_kT_log_q(generator, x), rtol=1e-11, atol=1e-9)
        outside = FlowEnergy.from_generator(generator)(100 * x)  # beyond the toy's box: the wall
    assert torch.isfinite(outside).all() and bool((outside > u.max()).all())


def test_forces_are_the_negative_gradient(target, generator64):
    system = particles_only(target)
    system.addForce(to_openmm_force(generator64, backend="python"))
    x = samples(generator64, 2, seed=2)[1]
    energy, forces = evaluate(system, x)
    xt = torch.tensor(x, requires_grad=True)
    (grad,) = torch.autograd.grad(generator64.log_prob(xt[None])[0], xt)  # the flows' own implementation
    np.testing.assert_allclose(forces, kT(300.0) * grad.numpy(), rtol=1e-8, atol=1e-7)
    rng = np.random.default_rng(0)
    h = 1e-6  # nm: central differences along random directions (small: log q's gradient jumps at spline knots)
    for _ in range(3):
        d = rng.normal(size=x.shape)
        d /= np.linalg.norm(d)
        slope = (evaluate(system, x + h * d)[0] - evaluate(system, x - h * d)[0]) / (2 * h)
        assert slope == pytest.approx(-(forces * d).sum(), rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_force_beside_the_system_on_reference_and_cpu_with_its_scale(target, generator64, backend):
    if backend == "torch" and openmmtorch_error() is not None:
        pytest.skip(f"openmm-torch cannot be imported: {openmmtorch_error()}")
    x = samples(generator64, 1, seed=3)[0]
    u_q = minus_kT_log_q(generator64, x[None])[0]
    system = copy.deepcopy(target.system)
    system.addForce(to_openmm_force(generator64, backend=backend, allow_uncopyable=True))
    flow_only = particles_only(target)
    flow_only.addForce(to_openmm_force(generator64, backend="python", scale_parameter=None))
    _, f_q = evaluate(flow_only, x)
    assert evaluate(flow_only, x)[0] == pytest.approx(u_q, rel=1e-11, abs=1e-9)
    for platform in ("Reference", "CPU"):
        u, f_u = evaluate(target.system, x, platform)
        e1, f1 = evaluate(system, x, platform)
        e3, f3 = evaluate(system, x, platform, lambda_flow=0.3)
        assert e1 == pytest.approx(u + u_q, rel=1e-9, abs=1e-6)
        assert e3 == pytest.approx(u + 0.3 * u_q, rel=1e-9, abs=1e-6)
        np.testing.assert_allclose(f1, f_u + f_q, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(f3, f_u + 0.3 * f_q, rtol=1e-6, atol=1e-4)


def test_python_force_at_scale_zero_skips_the_flow(target, generator64, monkeypatch):
    """At scale 0 (λ = 1 of a bridge) the PythonForce adds exactly nothing and never runs the flow."""
    x = samples(generator64, 1, seed=4)[0]
    u, f_u = evaluate(target.system, x)
    system = copy.deepcopy(target.system)
    system.addForce(to_openmm_force(generator64, backend="python"))
    calls = []
    original = FlowEnergy.forward
    monkeypatch.setattr(FlowEnergy, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    e0, f0 = evaluate(system, x, lambda_flow=0.0)
    assert e0 == u and np.array_equal(f0, f_u) and not calls
    evaluate(system, x, lambda_flow=0.5)
    assert calls


def test_python_force_evaluates_the_flow_once_per_configuration(target, generator64, monkeypatch):
    """The energies of one configuration at every λ of a ladder cost one flow evaluation; a new
    configuration is evaluated afresh (energies and forces equal to an uncached force's)."""
    x, y = samples(generator64, 2, seed=5)
    system = particles_only(target)
    system.addForce(to_openmm_force(generator64, backend="python"))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    other = particles_only(target)  # another force: its own cache
    other.addForce(to_openmm_force(generator64, backend="python"))
    f_q = {id(p): evaluate(other, p)[1] for p in (x, y)}
    calls = []
    original = FlowEnergy.forward
    monkeypatch.setattr(FlowEnergy, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    for positions in (x, y, x):
        context.setPositions(positions)
        u_q = minus_kT_log_q(generator64, positions[None])[0]
        n_calls = len(calls)
        for scale in (1.0, 0.6, 0.3):
            context.setParameter("lambda_flow", scale)
            state = context.getState(getEnergy=True, getForces=True)
            assert state.getPotentialEnergy().value_in_unit(KJ) == pytest.approx(scale * u_q, rel=1e-11, abs=1e-9)
            np.testing.assert_allclose(state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer),
                                       scale * f_q[id(positions)], rtol=1e-12, atol=1e-12)
        assert len(calls) == n_calls + 1


def test_outside_the_flow_domain_the_energy_is_the_documented_finite_restraint(target, generator64):
    energy = FlowEnergy.from_generator(generator64)
    coordinates, scaling = generator64.coordinates, generator64.flow.scaling
    x = samples(generator64, 1, seed=4)[0]
    i, j = int(coordinates._bond_i[coordinates._free[0]]), int(coordinates._bond_j[coordinates._free[0]])
    bond = (x[i] - x[j]) / np.linalg.norm(x[i] - x[j])
    stretched = x.copy()
    stretched[i] += 0.1 * bond  # 0.1 nm: 20 scaled units, far beyond the interval's 6
    xt = torch.as_tensor(np.stack([stretched, -x]))  # and a mirror image: every chiral centre flipped
    assert torch.all(generator64.log_prob(xt) == -np.inf)
    u = energy(xt)
    assert torch.isfinite(u).all()
    z, _ = coordinates(xt)  # the documented value: wall + energy of the nearest in-domain point
    y = scaling.to_flow(z)
    y_c = torch.minimum(torch.maximum(y, scaling.lower), scaling.upper)
    inside = torch.minimum(torch.maximum(y, scaling.lower + 1e-9), scaling.upper - 1e-9)  # not rounded out again
    x_c, _ = coordinates.inverse(scaling.from_flow(inside))
    expected = kT(300.0) * (0.5 * 10.0 * ((y - y_c) ** 2).sum(-1) - generator64.log_prob(x_c))
    np.testing.assert_allclose(u.detach().numpy(), expected.detach().numpy(), rtol=1e-9)
    system = particles_only(target)
    system.addForce(to_openmm_force(generator64, backend="python"))
    e, forces = evaluate(system, stretched)
    assert np.isfinite(e) and np.isfinite(forces).all()
    assert (forces[i] * bond).sum() < 0  # the wall pulls the bond back into the domain
    further = stretched.copy()
    further[i] += 0.01 * bond
    assert evaluate(system, further)[0] > e


# ------------------------------------------------------------------ copies: XML, deepcopy, pickle
_COPY_CHECK = textwrap.dedent("""
    import copy, json, pickle, sys
    import numpy as np, openmm
    system = openmm.XmlSerializer.deserialize(open(sys.argv[1]).read())
    x = np.load(sys.argv[2])
    energies = []
    for s in (system, copy.deepcopy(system), pickle.loads(pickle.dumps(system))):
        context = openmm.Context(s, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(x)
        context.setParameter("lambda_flow", 0.5)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    print(json.dumps(energies))
""")


def _copies_in_subprocess(system, x, tmp_path) -> subprocess.CompletedProcess:
    (tmp_path / "system.xml").write_text(openmm.XmlSerializer.serialize(system))  # serialising is safe
    np.save(tmp_path / "x.npy", x)
    return subprocess.run([sys.executable, "-c", _COPY_CHECK, str(tmp_path / "system.xml"), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_python_force_survives_xml_deepcopy_and_pickle_in_a_fresh_process(target, generator64, tmp_path):
    system = copy.deepcopy(target.system)
    system.addForce(to_openmm_force(generator64, backend="python"))
    x = samples(generator64, 1, seed=5)[0]
    expected = evaluate(system, x, lambda_flow=0.5)[0]
    run = _copies_in_subprocess(system, x, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_allclose(json.loads(run.stdout.strip().splitlines()[-1]), [expected] * 3, rtol=1e-12)
    assert isinstance(to_openmm_force(generator64), openmm.PythonForce) == (not torchforce_copies_are_safe())


def test_torchforce_copies_are_refused_where_they_crash(target, generator64, tmp_path):
    if openmmtorch_error() is not None:
        pytest.skip(f"openmm-torch cannot be imported: {openmmtorch_error()}")
    safe = torchforce_copies_are_safe()
    if not safe:
        with pytest.raises(CMTInputError, match="crashes the process when a System holding a TorchForce"):
            to_openmm_force(generator64, backend="torch")
    system = copy.deepcopy(target.system)
    system.addForce(to_openmm_force(generator64, backend="torch", allow_uncopyable=True))
    x = samples(generator64, 1, seed=6)[0]
    expected = evaluate(system, x, lambda_flow=0.5)[0]
    run = _copies_in_subprocess(system, x, tmp_path)
    if safe:
        assert run.returncode == 0, run.stderr[-2000:]
        np.testing.assert_allclose(json.loads(run.stdout.strip().splitlines()[-1]), [expected] * 3, rtol=1e-9)
    else:  # what the refusal prevents: the copy kills the process
        assert run.returncode != 0


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


def test_ladder_has_equal_acceptance_on_an_exactly_known_family():
    # p_λ(w) ∝ Gamma(k, θ)(w) exp(-λ w) is Gamma(k, θ / (1 + λ θ)): exact samples at every λ
    k, theta, rng = 3.0, 30.0, np.random.default_rng(0)
    draw = lambda lam, n: rng.gamma(k, theta / (1 + lam * theta), n)  # noqa: E731
    pilot = np.linspace(0.0, 1.0, 5)
    w = np.concatenate([draw(lam, 400) for lam in pilot])
    model = AcceptanceModel(pilot, w, np.repeat(np.arange(5), 400))
    lambdas, estimated = equal_acceptance_ladder(model, 6)
    assert lambdas[0] == 0.0 and lambdas[-1] == 1.0 and np.all(np.diff(lambdas) > 0)
    assert np.ptp(estimated) < 0.01
    assert np.diff(lambdas)[0] < np.diff(lambdas)[-1]  # w fluctuates most near λ = 0: states crowd there
    for a, b, est in zip(lambdas[:-1], lambdas[1:], estimated):
        wa, wb = draw(a, 4000), draw(b, 4000)
        exact = np.minimum(1.0, np.exp(-(b - a) * (wa - wb))).mean()
        assert exact == pytest.approx(est, abs=0.05)
    wa, wb = rng.normal(0, 3, 200), rng.normal(-1, 3, 200)  # the O(N log N) sum is the double sum
    log_p = np.full(200, -np.log(200))
    none = np.full(200, -np.inf)
    brute = np.minimum(1, np.exp(-0.4 * (wa[:, None] - wb[None, :]))).mean()
    fast = estimate_acceptance(0.0, 0.4, np.concatenate([wa, wb]), np.r_[log_p, none], np.r_[none, log_p])
    assert fast == pytest.approx(brute, rel=1e-12)
    assert round_trips(np.array([[0, 2], [1, 1], [2, 0], [1, 1], [0, 2], [2, 0], [0, 2]]), 3).tolist() == [2, 1]


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


def test_ladder_estimates_match_a_normal_family_too():
    # w ~ N(-λ σ², σ²) at λ: the exact acceptance of (a, b) is erfc(σ (b - a) / 2)
    sigma, rng = 8.0, np.random.default_rng(1)
    pilot = np.linspace(0.0, 1.0, 4)
    w = np.concatenate([rng.normal(-lam * sigma**2, sigma, 500) for lam in pilot])
    model = AcceptanceModel(pilot, w, np.repeat(np.arange(4), 500))
    lambdas, estimated = equal_acceptance_ladder(model, 5)
    np.testing.assert_allclose(np.diff(lambdas), 0.25, atol=0.03)
    np.testing.assert_allclose(estimated, stats.norm.sf(sigma * 0.25 / np.sqrt(2)) * 2, atol=0.04)


@pytest.mark.slow
def test_bridged_replica_exchange_samples_the_exact_target_at_lambda_one(tmp_path):
    """End to end on a toy with an exact distribution: λ = 1 frames of a bridge from a poor
    (perturbed, untrained) generator reproduce the exact x marginal and mode weights
    (batch-means z-scores, as tests/test_moves_exactness.py). The flow under-covers the wells'
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
