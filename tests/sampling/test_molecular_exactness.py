"""Exactness on molecules: flow moves and reweighting reproduce Boltzmann marginals known by quadrature.

The toy tests (test_moves_exactness.py) use one Cartesian particle, where the generator's
density needs no Jacobian; here the generator works in internal coordinates, so these tests
check the density convention itself (coordinates/internal.py: J = prod r^2 prod sin(theta),
seed atoms included).

Molecules (300 K, masses of carbon):
- a bent triatomic B-A-C: two harmonic bonds (r0 = 0.15 nm, sigma = 0.012 nm) and the harmonic
  angle between them (theta0 = 1.9 rad, sigma = 0.15 rad). All three coordinates are seed
  coordinates of the Z-matrix.
- a four-atom chain A-B-C-D: the same bonds and angles, plus a torsion potential
  U(phi) = 2.5 (1 + cos phi) + 1.5 (1 + cos 3 phi) kJ/mol.
The energy is separable, so the exact marginals are 1-D: p(r) ∝ r^2 exp(-U_b(r)/kT),
p(theta) ∝ sin(theta) exp(-U_a(theta)/kT), p(phi) ∝ exp(-U_t(phi)/kT), integrated over bins by
Gauss-Legendre quadrature.

Chains (deliberately poor generator: a perturbed flow, acceptance well below one) and the
statistics of test_moves_exactness.py (batch means, Bonferroni over bins, alpha = 1e-3):
flow moves alone through ``apply_to_simulation`` and through an openmmtools ``MCMCSampler``,
Langevin + flow moves in a plain ``Simulation`` (``FlowMoveReporter``), and ``reweight()``
(independent samples: delta-method standard errors of the weighted bin frequencies).
Negative controls, run in the suite: the same checks with the Jacobian of format 1 (seed
factor r1^2 r2 sin(theta2) missing) and without the Hastings term must fail.
"""
from __future__ import annotations

import io
import math

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from openmmtools import mcmc, states
from scipy import stats

from cmt_openmm.coordinates.internal import InternalCoordinates
from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.sampling.moves import FlowIndependenceMove
from cmt_openmm.sampling.reporters import FlowMoveReporter
from cmt_openmm.sampling.reweighting import reweight
from cmt_openmm.target import Target
from cmt_openmm.units import dihedral_angles, kT
from helpers import (N_BATCHES, R0, SIGMA_R, SIGMA_THETA, THETA0, TORSION, bin_z_scores, chain_molecule,
                     critical_z, perturb_parameters)

TEMPERATURE = 300.0  # the molecules' (helpers.chain_molecule)


# ------------------------------------------------------------------ molecules and exact marginals
def _observables(x: np.ndarray) -> dict[str, np.ndarray]:
    """Bond lengths (nm), angles (rad) and, for 4 atoms, the torsion (rad) of x (T, n, 3)."""
    n = x.shape[1]
    out = {f"r{i}{i + 1}": np.linalg.norm(x[:, i + 1] - x[:, i], axis=-1) for i in range(n - 1)}
    for i in range(n - 2):
        u, v = x[:, i] - x[:, i + 1], x[:, i + 2] - x[:, i + 1]
        cos = np.sum(u * v, -1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
        out[f"theta{i}{i + 1}{i + 2}"] = np.arccos(np.clip(cos, -1.0, 1.0))
    if n == 4:
        out["phi"] = dihedral_angles(x, [[0, 1, 2, 3]])[:, 0]
    return out


def _log_density(name: str, t: np.ndarray) -> np.ndarray:
    """Unnormalised exact log marginal of an observable at points t."""
    kt = kT(TEMPERATURE)
    if name.startswith("r"):
        return 2 * np.log(t) - 0.5 * ((t - R0) / SIGMA_R) ** 2
    if name.startswith("theta"):
        return np.log(np.sin(t)) - 0.5 * ((t - THETA0) / SIGMA_THETA) ** 2
    return -sum(k * (1 + np.cos(n * t)) for n, k in TORSION) / kt


def _edges(name: str) -> np.ndarray:
    """Bin edges of an observable: 4 bins for bonds and angles (none below ~7 % of the mass, so
    that a short chain estimates each well), 6 equal bins on the torsion's circle."""
    if name.startswith("r"):
        return np.concatenate([[1e-3], R0 + SIGMA_R * np.array([-1.5, 0.0, 1.5]), [R0 + 12 * SIGMA_R]])
    if name.startswith("theta"):
        return np.concatenate([[1e-3], THETA0 + SIGMA_THETA * np.array([-1.5, 0.0, 1.5]), [math.pi - 1e-3]])
    return np.linspace(-math.pi, math.pi, 7)


def _quadrature(name: str, lo: float, hi: float, f=lambda t: 1.0) -> float:
    """∫ f(t) exp(log density) dt over [lo, hi] (64-point Gauss-Legendre on each of 8 pieces)."""
    nodes, weights = np.polynomial.legendre.leggauss(64)
    total = 0.0
    for a, b in zip(np.linspace(lo, hi, 9)[:-1], np.linspace(lo, hi, 9)[1:]):
        t = 0.5 * (b - a) * nodes + 0.5 * (b + a)
        total += 0.5 * (b - a) * np.sum(weights * f(t) * np.exp(_log_density(name, t)))
    return total


def _exact_bins(name: str) -> np.ndarray:
    """Exact probabilities of the bins of ``_edges(name)``."""
    edges = _edges(name)
    masses = np.array([_quadrature(name, lo, hi) for lo, hi in zip(edges[:-1], edges[1:])])
    return masses / masses.sum()


def _exact_mean(name: str) -> float:
    """Exact mean of a bond or angle (the torsion is checked by its bins only)."""
    edges = _edges(name)
    return _quadrature(name, edges[0], edges[-1], lambda t: t) / _quadrature(name, edges[0], edges[-1])


def _bin_index(name: str, values: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(_edges(name), values, side="right") - 1, 0, len(_edges(name)) - 2)


def _mean_z(values: np.ndarray, exact: float) -> float:
    """z of a chain's mean against the exact one, standard error from batch means."""
    n = len(values) // N_BATCHES * N_BATCHES
    batch_means = values[:n].reshape(N_BATCHES, -1).mean(axis=1)
    return float((batch_means.mean() - exact) / (batch_means.std(ddof=1) / math.sqrt(N_BATCHES)))


def chain_max_z(x: np.ndarray, burn_in: float = 0.1) -> tuple[float, float]:
    """(max |z| over the bins of every observable of a chain x (T, n, 3), its critical value)."""
    x = x[int(burn_in * len(x)):]
    z = []
    for name, v in _observables(x).items():
        exact = _exact_bins(name)
        z.extend(bin_z_scores(_bin_index(name, v), exact, np.arange(len(exact))))
        if name != "phi":
            z.append(_mean_z(v, _exact_mean(name)))
    z = np.abs(np.array(z))
    return float(z.max()), critical_z(len(z))


def weighted_max_z(x: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """(max |z|, critical value) of self-normalised weighted bin frequencies of independent
    samples x against the exact bins; delta-method standard errors."""
    w = weights / weights.sum()
    z = []
    for name, v in _observables(x).items():
        exact = _exact_bins(name)
        columns = [(_bin_index(name, v)[:, None] == np.arange(len(exact))[None]).astype(float)]
        truth = [exact]
        if name != "phi":
            columns.append(v[:, None])
            truth.append([_exact_mean(name)])
        values = np.concatenate(columns, axis=1)
        estimate = w @ values
        se = np.sqrt((w**2) @ (values - estimate) ** 2)
        z.append((estimate - np.concatenate(truth)) / np.maximum(se, 1e-12))
    z = np.abs(np.concatenate(z))
    return float(z.max()), float(stats.norm.ppf(1 - 1e-3 / (2 * len(z))))


# ------------------------------------------------------------------ generator, chains
def poor_generator(target: Target, seed: int = 0) -> BoltzmannGenerator:
    """A flow on the molecule's internal coordinates, scaled to the target's widths and then
    perturbed: it covers the target, but not well (reverse ESS ~5-40 %, flow-move acceptance
    ~10-45 %). Much poorer generators stay exact too, but their chains stick for so long that
    an affordable chain has no reliable error bar."""
    generator = BoltzmannGenerator.build(target, n_layers=2, hidden=8, seed=seed,
                                         scales={"bond": 1.5 * SIGMA_R, "angle": 1.5 * SIGMA_THETA})
    perturb_parameters(generator.flow, 0.05, seed)
    return generator


def _simulation(target: Target) -> app.Simulation:
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 5.0 / unit.picosecond,
                                                 2.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(7)
    simulation = app.Simulation(target.topology, target.system, integrator,
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(target.positions)
    return simulation


def flow_chain_in_simulation(target, move, n_records: int, moves_per_record: int = 4) -> np.ndarray:
    """Flow moves alone on a Simulation's Context (apply_to_simulation): positions (T, n, 3) nm."""
    simulation = _simulation(target)
    out = np.empty((n_records, target.n_atoms, 3))
    for i in range(n_records):
        move.apply_to_simulation(simulation, n_steps=moves_per_record)
        out[i] = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return out


def flow_chain_in_mcmc_sampler(target, move, n_iterations: int) -> np.ndarray:
    """Flow moves alone in an openmmtools MCMCSampler: positions after each iteration."""
    thermo = states.ThermodynamicState(target.system, TEMPERATURE * unit.kelvin)
    sampler = mcmc.MCMCSampler(thermo, states.SamplerState(target.positions * unit.nanometer), move)
    out = np.empty((n_iterations, target.n_atoms, 3))
    for i in range(n_iterations):
        sampler.run(1)
        out[i] = sampler.sampler_state.positions.value_in_unit(unit.nanometer)
    return out


def langevin_and_flow_chain(target, move, n_records: int, md_steps: int = 20) -> np.ndarray:
    """Langevin MD with flow moves every ``md_steps`` steps (FlowMoveReporter): positions per record."""
    simulation = _simulation(target)
    reporter = FlowMoveReporter(move, io.StringIO(), md_steps)
    simulation.reporters.append(reporter)
    out = np.empty((n_records, target.n_atoms, 3))
    for i in range(n_records):
        simulation.step(md_steps)
        out[i] = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return out


class NoHastingsMove(FlowIndependenceMove):
    """The wrong chain: Metropolis acceptance without the Hastings term log q(x) - log q(x')."""

    @staticmethod
    def _log_acceptance(u_x, u_new, log_q_x, log_q_new):
        return -u_new + u_x


def _format_1_jacobian(self, r, theta):
    """The log|det dx/dz| of generator format 1: seed factor r1^2 r2 sin(theta2) missing."""
    return torch.log(r[:, 1]) + (2 * torch.log(r[:, 2:]) + torch.log(torch.sin(theta[:, 1:]))).sum(-1)


@pytest.fixture(scope="module", params=[3, 4], ids=["triatomic", "four-atom"])
def molecule(request):
    return chain_molecule(request.param)


# ------------------------------------------------------------------ the density itself
def test_triatomic_density_integrates_to_8_pi_squared_over_cartesian_space():
    """With the central atom at the origin (translation removed), ∫ q(x) d^3x_A d^3x_C = 8π², the
    volume of SO(3) in the Haar measure of the density convention. Monte Carlo in Cartesian
    space, independent of the internal-coordinate algebra: each outer atom is drawn from an
    isotropic density g(y) = N(|y|; r0, s) / (4π|y|²)."""
    target = chain_molecule(3)
    generator = poor_generator(target)
    rng = np.random.default_rng(0)
    n, s = 400_000, 0.02
    radius = R0 + s * rng.normal(size=(n, 2))
    direction = rng.normal(size=(n, 2, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    x = np.zeros((n, 3, 3))
    x[:, [0, 2]] = radius[..., None] * direction
    log_g = (-0.5 * ((radius - R0) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
             - np.log(4 * math.pi * radius**2)).sum(-1)
    with torch.no_grad():
        log_q = generator.log_prob(torch.as_tensor(x)).numpy()
    ratio = np.exp(log_q - log_g)
    estimate, se = ratio.mean(), ratio.std() / math.sqrt(n)
    assert abs(estimate - 8 * math.pi**2) < 4 * se, (estimate, se)
    assert se < 0.1 * 8 * math.pi**2, se  # precise enough: format 1 gives ~0.3 instead of 79


# ------------------------------------------------------------------ chains and reweighting
def test_flow_moves_in_a_simulation_reproduce_exact_marginals(molecule):
    move = FlowIndependenceMove(poor_generator(molecule), batch_size=256, seed=3)
    chain = flow_chain_in_simulation(molecule, move, 10_000)
    assert 0.05 < move.n_accepted / move.n_proposed < 0.95
    z, critical = chain_max_z(chain)
    assert z < critical, (z, critical)


def test_flow_moves_in_an_openmmtools_sampler_reproduce_exact_marginals(molecule):
    move = FlowIndependenceMove(poor_generator(molecule, seed=1), n_steps=4, batch_size=256, seed=4)
    chain = flow_chain_in_mcmc_sampler(molecule, move, 2000)
    z, critical = chain_max_z(chain)
    assert z < critical, (z, critical)


def test_langevin_and_flow_moves_reproduce_exact_marginals(molecule):
    move = FlowIndependenceMove(poor_generator(molecule, seed=2), n_steps=2, batch_size=256, seed=5)
    chain = langevin_and_flow_chain(molecule, move, 2500)
    z, critical = chain_max_z(chain)
    assert z < critical, (z, critical)


def test_reweighted_samples_reproduce_exact_marginals(molecule):
    ensemble = reweight(poor_generator(molecule), molecule, 20_000, seed=0, progress=False)
    z, critical = weighted_max_z(ensemble.positions, ensemble.weights)
    assert z < critical, (z, critical)


# ------------------------------------------------------------------ negative controls
def test_format_1_jacobian_fails_the_chain_and_reweighting_tests(molecule, monkeypatch):
    monkeypatch.setattr(InternalCoordinates, "_log_jacobian", _format_1_jacobian)
    move = FlowIndependenceMove(poor_generator(molecule), batch_size=256, seed=3)
    z, critical = chain_max_z(flow_chain_in_simulation(molecule, move, 10_000))
    assert z > critical, (z, critical)
    ensemble = reweight(poor_generator(molecule), molecule, 20_000, seed=0, progress=False)
    z, critical = weighted_max_z(ensemble.positions, ensemble.weights)
    assert z > critical, (z, critical)


def test_chain_without_the_hastings_term_fails(molecule):
    move = NoHastingsMove(poor_generator(molecule), batch_size=256, seed=3)
    z, critical = chain_max_z(flow_chain_in_simulation(molecule, move, 10_000))
    assert z > critical, (z, critical)
