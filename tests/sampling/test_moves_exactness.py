"""Exactness of FlowIndependenceMove: chains reproduce exact toy distributions (issue 4 §3).

Statistical design. A chain (fixed seed, burn-in dropped) is cut into ``N_BATCHES`` batches;
for each bin of the observable (histogram bins of x, or mode labels) the estimate is the chain
mean of the bin indicator and its standard error comes from the spread of the batch means
(batch means: valid under autocorrelation once a batch is much longer than the integrated
autocorrelation time, so the error bar shrinks with the chain's effective sample size, not
its length). Each bin gives z = (estimate - exact) / SE; the chain passes when
max |z| < t_{N_BATCHES-1}(1 - ALPHA / (2 n_bins)) (Bonferroni over bins, Student t for the
estimated SE): a correct chain fails with probability <= ALPHA = 1e-3 for a random seed, and
the seeds are fixed, so the test is deterministic. The same test, run on a chain whose
acceptance lacks the Hastings term log q(x) - log q(x'), must fail by a wide margin, which
shows the test has the power to catch a wrong chain.

Chains: flow moves alone (openmmtools ``apply``, at two temperatures), Langevin + flow moves
(``SequenceMove``), flow moves between ``Simulation.step`` calls (plain OpenMM), each on the
toy double well (x-histogram and mode weights) or the Gaussian mixture (mode weights); and, as
a slow test, alanine dipeptide basin populations of a Langevin + flow chain and of reweighted
samples, each against replica-exchange reference frames (not against each other: both share the
generator's log q, so a density error would cancel). tests/sampling/test_molecular_exactness.py checks
the density convention itself on molecules with exact marginals.

The proposals are deliberately poor: a stand-in Gaussian proposal (exact log density, the
generator interface) off-centre and too wide (acceptance ~5-15 %), and a BoltzmannGenerator
trained for a few seconds. (An untrained generator is too poor for a fast test: its
importance ratio p/q reaches e^8 in the wells' outer flanks, where an independence chain then
sticks for thousands of steps, so a chain of affordable length has no reliable error bar.)
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import openmm
import openmm.app
import pytest
import torch
from openmm import unit
from openmmtools import cache, mcmc, states

from cmt_openmm.systems import toys
from cmt_openmm.coordinates import CartesianCoordinates
from cmt_openmm.sampling.moves import FlowIndependenceMove
from helpers import bin_z_scores, critical_z

class GaussianProposal(torch.nn.Module):
    """Stand-in generator: independent Gaussian (mean, sigma per coordinate) with exact log q.

    Same interface as BoltzmannGenerator as far as the move is concerned.
    """

    def __init__(self, n_atoms: int, mean, sigma, box=None):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64).reshape(n_atoms, 3))
        self.register_buffer("sigma", torch.as_tensor(sigma, dtype=torch.float64).expand(n_atoms, 3).clone())
        box = np.tile([-10.0, 10.0], (3 * n_atoms, 1)) if box is None else box
        self.coordinates = CartesianCoordinates(n_atoms, box)

    def sample(self, n, generator=None):
        eps = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float64)
        x = self.mean + self.sigma * eps
        return x, self.log_prob(x)

    def log_prob(self, x):
        x = torch.as_tensor(x, dtype=torch.float64)
        normal = torch.distributions.Normal(self.mean, self.sigma)
        return normal.log_prob(x).sum(dim=(-1, -2))

    def chirality_flipped(self, x):
        return torch.zeros(len(x), dtype=torch.bool)

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps([self.mean.tolist(), self.sigma.tolist()]).encode()).hexdigest()

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(dict(mean=self.mean.tolist(), sigma=self.sigma.tolist()), f)

    @classmethod
    def load(cls, path, target=None) -> "GaussianProposal":
        with open(path) as f:
            data = json.load(f)
        return cls(len(data["mean"]), data["mean"], data["sigma"])


class NoHastingsMove(FlowIndependenceMove):
    """The wrong chain: Metropolis acceptance without the Hastings term."""

    @staticmethod
    def _log_acceptance(u_x, u_new, log_q_x, log_q_new):
        return -u_new + u_x


class SeededLangevinMove(mcmc.LangevinDynamicsMove):
    """openmmtools' Langevin move with a fixed integrator seed, so that chains are reproducible."""

    def __init__(self, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def _get_integrator(self, thermodynamic_state):
        integrator = super()._get_integrator(thermodynamic_state)
        integrator.setRandomNumberSeed(self.seed)
        return integrator


def x_bins(target, values: np.ndarray, n_inner: int = 8):
    """Bin index of x in (-inf, -0.8, ..., 0.8, inf) and the exact bin probabilities."""
    inner = np.linspace(-0.8, 0.8, n_inner + 1)
    lo, hi = target.box[0]
    edges = np.concatenate([[min(lo, inner[0] - 1)], inner, [max(hi, inner[-1] + 1)]])
    exact = target.marginal(0, edges)
    exact = exact / exact.sum()
    return np.digitize(values, inner), exact


def run_chain(target, move, n_iterations: int, langevin_steps: int = 0, temperature=None,
              seed: int = 0, timestep_fs: float = 5.0) -> np.ndarray:
    """Positions (n_iterations, n_atoms, 3) nm after each application of the move, preceded
    by ``langevin_steps`` Langevin steps when > 0."""
    thermo = states.ThermodynamicState(target.system, (temperature or target.temperature) * unit.kelvin)
    sampler_state = states.SamplerState(target.positions * unit.nanometer)
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
    if langevin_steps:
        langevin = SeededLangevinMove(seed + 1, timestep=timestep_fs * unit.femtosecond,
                                      collision_rate=20.0 / unit.picosecond, n_steps=langevin_steps)
        move = mcmc.SequenceMove([langevin, move])
    out = np.empty((n_iterations, target.n_atoms, 3))
    for i in range(n_iterations):
        move.apply(thermo, sampler_state, context_cache=context_cache)
        out[i] = sampler_state.positions.value_in_unit(unit.nanometer)
    return out


def poor_gaussian(target) -> GaussianProposal:
    """Off-centre and too wide in x (one broad bump over both wells), too wide in y, z:
    q covers p, but badly (acceptance ~15 %)."""
    return GaussianProposal(target.n_atoms, [[0.2, 0.05, 0.0]], torch.tensor([[0.45, 0.15, 0.15]]))


def max_abs_z(target, chain: np.ndarray, burn_in: float = 0.1) -> tuple[float, float]:
    """(max |z| over x-bins and modes, its critical value)."""
    chain = chain[int(burn_in * len(chain)):]
    xb, exact_x = x_bins(target, chain[:, 0, 0])
    z_x = bin_z_scores(xb, exact_x, np.arange(len(exact_x)))
    weights = target.mode_weights()
    z_m = bin_z_scores(np.asarray(target.mode_of(chain)), weights, np.arange(len(weights)))
    return float(np.abs(np.concatenate([z_x, z_m])).max()), critical_z(len(exact_x) + len(weights))


@pytest.fixture(scope="module")
def double_well():
    return toys.double_well_3d(300.0)


@pytest.mark.parametrize("temperature", [300.0, 450.0])
def test_flow_moves_alone_reproduce_exact_marginals(double_well, temperature):
    target = double_well.with_temperature(temperature)
    move = FlowIndependenceMove(poor_gaussian(target), n_steps=10, batch_size=256, seed=1)
    chain = run_chain(target, move, 3000, temperature=temperature)
    z, crit = max_abs_z(target, chain)
    assert 0.05 < move.n_accepted / move.n_proposed < 0.6
    assert z < crit, f"max |z| = {z:.2f} >= {crit:.2f} at {temperature} K"


def test_chain_without_hastings_term_fails_the_same_test(double_well):
    move = NoHastingsMove(poor_gaussian(double_well), n_steps=10, batch_size=256, seed=1)
    chain = run_chain(double_well, move, 3000)
    z, crit = max_abs_z(double_well, chain)
    assert z > 2 * crit, f"the wrong chain passed: max |z| = {z:.2f}, critical {crit:.2f}"


def test_langevin_plus_flow_moves_reproduce_exact_marginals(double_well):
    move = FlowIndependenceMove(poor_gaussian(double_well), n_steps=2, batch_size=256, seed=2)
    chain = run_chain(double_well, move, 2000, langevin_steps=10, seed=2)
    z, crit = max_abs_z(double_well, chain)
    assert z < crit, f"max |z| = {z:.2f} >= {crit:.2f}"
    wrong = NoHastingsMove(poor_gaussian(double_well), n_steps=2, batch_size=256, seed=2)
    z_wrong, _ = max_abs_z(double_well, run_chain(double_well, wrong, 2000, langevin_steps=10, seed=2))
    assert z_wrong > crit, f"the wrong chain passed: max |z| = {z_wrong:.2f}, critical {crit:.2f}"


def test_gaussian_mixture_mode_weights():
    target = toys.gaussian_mixture(300.0)
    proposal = GaussianProposal(1, [[0.0, 0.0, 0.0]], torch.tensor([[0.6, 0.6, 0.2]]))
    move = FlowIndependenceMove(proposal, n_steps=10, batch_size=256, seed=3)
    chain = run_chain(target, move, 3000)[300:]
    weights = target.mode_weights()
    z = bin_z_scores(np.asarray(target.mode_of(chain)), weights, np.arange(len(weights)))
    assert np.abs(z).max() < critical_z(len(weights)), z


def test_briefly_trained_boltzmann_generator_reproduces_exact_marginals(double_well):
    """The real generator (a few seconds of CMT on the toy: ESS ~ 75 %) as proposal."""
    from cmt_openmm.runs.presets import get_preset
    from cmt_openmm.training import train

    config = {k: v for k, v in get_preset("toy-quick").items()
              if k not in ("system", "temperature", "report")}
    generator = train(double_well, config, progress=False).generator
    move = FlowIndependenceMove(generator, n_steps=10, batch_size=256, seed=4)
    chain = run_chain(double_well, move, 2000)
    z, crit = max_abs_z(double_well, chain)
    assert 0.3 < move.n_accepted / move.n_proposed < 0.95
    assert z < crit, f"max |z| = {z:.2f} >= {crit:.2f}"


# ------------------------------------------------------------------ alanine dipeptide (slow)
# ~7 min of CMT on 2 shared cores: reverse ESS ~ 1 %, flow acceptance in the chain ~ 5 %.
ALDP_TRAINING = {"method": "cmt", "seed": 0, "budget": 1_000_000, "max_steps": 62,
                 "flow": {"n_layers": 6, "hidden": 64, "n_bins": 8},
                 "cmt": {"eps_tr": 0.5, "eps_ent": 1.0, "n_samples": 2_000, "batch_size": 256,
                         "lr": 1e-3}}


def aldp_basin_comparison(target, generator, reference_positions: np.ndarray, n_samples: int = 40_000,
                          n_iterations: int = 4_000, seed: int = 0) -> dict:
    """Basin populations of a Langevin + flow chain and of reweighted generator samples, each
    against replica-exchange reference frames, for the φ halves and the named basins. Errors:
    the chain's and the reference's from pymbar's statistical inefficiency (correlated frames),
    the reweighted samples' by the delta method (independent samples)."""
    from cmt_openmm.coordinates.backbone import ramachandran_angles
    from cmt_openmm.sampling.estimators import aldp_basins, basin_populations
    from cmt_openmm.sampling.reweighting import reweight

    basins = aldp_basins(include_halves=True)

    def populations(x, weights=None, error="correlated"):
        return basin_populations(ramachandran_angles(target.topology, x)[:, 0], weights, basins, error=error)

    ensemble = reweight(generator, target, n_samples, seed=seed, progress=False)
    move = FlowIndependenceMove(generator, n_steps=20, batch_size=256, seed=seed)
    chain = run_chain(target, move, n_iterations, langevin_steps=100, seed=seed,
                      timestep_fs=1.0)[n_iterations // 10:]
    reference = populations(reference_positions)
    return {"chain": populations(chain), "reweighted": populations(ensemble.positions, ensemble.weights, "delta"),
            "reference": reference, "acceptance": move.n_accepted / move.n_proposed,
            "reweighting_reliable": ensemble.reliable, "n_effective": ensemble.n_effective}


@pytest.mark.slow
def test_aldp_chain_and_reweighted_populations_agree_with_replica_exchange(tmp_path):
    """Langevin + flow chain and reweighted samples of a briefly trained generator, per basin,
    each against 4-replica temperature replica exchange (an estimator that does not share the
    generator's log q, so a density error cannot cancel): within 4 combined standard errors. The
    reweighted estimates are compared when they are reliable (N·ESS >= 100) and must say they
    are not otherwise."""
    from cmt_openmm.sampling.reference_md import run_reference_md
    from cmt_openmm.systems import get_target
    from cmt_openmm.training import train

    target = get_target("aldp-vacuum")
    reference = run_reference_md(target, tmp_path / "ref.npz", n_replicas=6, t_max=900.0, n_iterations=4000,
                                 steps_per_iteration=500, n_equilibration=400, progress=False)
    generator = train(target, ALDP_TRAINING, progress=False).generator
    result = aldp_basin_comparison(target, generator, reference.positions)
    text = "\n".join(f"{k}: {v}" for k, v in result.items())
    print(text)  # shown with pytest -s
    assert result["acceptance"] > 0.002, f"the flow moves were (almost) never accepted:\n{text}"
    estimators = ["chain"] + (["reweighted"] if result["reweighting_reliable"] else [])
    assert result["reweighting_reliable"] == (result["n_effective"] >= 100)
    for name, (p_ref, se_ref) in result["reference"].items():
        for estimator in estimators:
            p, se = result[estimator][name]
            assert abs(p - p_ref) <= 4.0 * np.hypot(se, se_ref), f"{estimator}: {name} disagrees:\n{text}"


def test_plain_openmm_simulation_with_flow_moves_reproduces_exact_marginals(double_well):
    """The Simulation path (u from the Context energy and the integrator's temperature)."""
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 20 / unit.picosecond,
                                                 5 * unit.femtosecond)
    integrator.setRandomNumberSeed(2)
    simulation = openmm.app.Simulation(double_well.topology, double_well.system, integrator,
                                       openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(double_well.positions)
    move = FlowIndependenceMove(poor_gaussian(double_well), n_steps=2, batch_size=256, seed=2)
    chain = []
    for _ in range(3000):
        simulation.step(10)
        move.apply_to_simulation(simulation)
        state = simulation.context.getState(getPositions=True)
        chain.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    z, crit = max_abs_z(double_well, np.array(chain))
    assert z < crit, f"max |z| = {z:.2f} >= {crit:.2f}"
