"""Toy targets: OpenMM energies equal the analytic ones, and the exact quantities are exact."""

import math
import pickle

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch
from scipy.integrate import quad, trapezoid
from scipy.special import logsumexp
from scipy.stats import norm

from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems.toys import ToyTarget, double_well_3d, gaussian_mixture

R = 0.00831446261815324  # kJ/(mol K)
MEANS = np.array([[0.6, 0.0], [-0.3, 0.3 * math.sqrt(3.0)], [-0.3, -0.3 * math.sqrt(3.0)]])
SIGMAS = np.array([0.10, 0.08, 0.12])

REFERENCE = openmm.Platform.getPlatformByName("Reference")


@pytest.fixture(scope="module")
def well():
    return double_well_3d(300.0)


@pytest.fixture(scope="module")
def mixture():
    return gaussian_mixture(300.0)


def openmm_energy_and_forces(target, points):
    """U (kJ/mol) and forces (kJ/mol/nm) of single-particle points (n, 3) from a Reference Context."""
    context = openmm.Context(target.system, openmm.VerletIntegrator(0.001), REFERENCE)
    energies, forces = [], []
    for p in points:
        context.setPositions([p])
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)[0])
    return np.array(energies), np.array(forces)


def mixture_energy(points, weights=(0.5, 0.3, 0.2), temperature=300.0):
    """The documented mixture energy, written independently of the library (kJ/mol)."""
    d2 = ((points[:, None, :2] - MEANS[None]) ** 2).sum(-1)
    log_terms = np.log(np.asarray(weights) / (2 * np.pi * SIGMAS**2)) - d2 / (2 * SIGMAS**2)
    return R * temperature * (-logsumexp(log_terms, axis=1) + 0.5 * (points[:, 2] / 0.1) ** 2)


def grid_integral(target, n=91):
    """Trapezoid integral of exp(log_prob) over the box on an n^3 grid (independent of the library's quadrature)."""
    axes = [np.linspace(lo, hi, n) for lo, hi in target.box]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    density = np.exp(target.log_prob(grid)).reshape(n, n, n)
    return trapezoid(trapezoid(trapezoid(density, axes[2]), axes[1]), axes[0])


def mode_boundary(well):
    """The x where the double well's mode label switches from 0 to 1, by bisection on mode_of."""
    lo, hi = -0.2, 0.2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if well.mode_of(np.array([[[mid, 0.0, 0.0]]]))[0] == 0 else (lo, mid)
    return lo


def test_toys_are_minimal_one_particle_targets(well, mixture):
    for target, name in ((well, "toy-double-well"), (mixture, "toy-gaussian-mixture")):
        assert isinstance(target, ToyTarget) and target.name == name
        assert target.n_atoms == 1 and not target.has_molecule and target.constraints == []
        assert target.topology.getNumBonds() == 0 and target.topology.getNumResidues() == 1
        assert target.system.getParticleMass(0).value_in_unit(unit.dalton) > 0
        assert [type(f).__name__ for f in target.system.getForces()] == ["CustomExternalForce"]
        assert target.box.shape == (3, 2) and np.all(target.box[:, 0] < target.positions[0])
        assert np.all(target.positions[0] < target.box[:, 1])
        assert 0 <= target.mass_outside_box < 1e-9
        assert np.isfinite(target.reduced_potential(target.positions))


@pytest.mark.parametrize("name", ["well", "mixture"])
def test_log_prob_integrates_to_one(name, request):
    target = request.getfixturevalue(name)
    assert grid_integral(target) == pytest.approx(1.0, abs=1e-7)


def test_mixture_openmm_energy_equals_the_analytic_expression(mixture):
    rng = np.random.default_rng(0)
    points = np.vstack([rng.uniform(mixture.box[:, 0], mixture.box[:, 1], size=(20, 3)), [[5.0, -4.0, 0.3]]])
    energy, forces = openmm_energy_and_forces(mixture, points)
    np.testing.assert_allclose(energy, mixture_energy(points), rtol=1e-10, atol=1e-9)
    assert np.all(np.isfinite(forces))  # far from every mode too: the log-sum-exp is written stably
    inside = points[:20]
    np.testing.assert_allclose(-(mixture.log_prob(inside[:, None]) + mixture.log_normalizer) * mixture.kT, energy[:20],
                               rtol=1e-10, atol=1e-9)
    h = 1e-5  # forces are -dU/dx of the same expression
    for axis in range(3):
        step = np.eye(3)[axis] * h
        numeric = -(mixture_energy(inside + step) - mixture_energy(inside - step)) / (2 * h)
        np.testing.assert_allclose(forces[:20, axis], numeric, rtol=1e-5, atol=1e-4)


def test_double_well_openmm_energy_equals_the_analytic_expression(well):
    rng = np.random.default_rng(1)
    points = rng.uniform(well.box[:, 0], well.box[:, 1], size=(20, 3))
    energy, forces = openmm_energy_and_forces(well, points)
    np.testing.assert_allclose(-(well.log_prob(points[:, None]) + well.log_normalizer) * well.kT, energy,
                               rtol=1e-10, atol=1e-9)
    # y and z are harmonic with s = 0.1 nm at the design temperature; the x part has the documented
    # quartic shape: wells at about -0.5 and +0.5 nm, barrier of about 5 kT near x = 0.
    np.testing.assert_allclose(forces[:, 1:], -well.kT * points[:, 1:] / 0.01, rtol=1e-10)
    # the documented formula, with the tilt the builder solved for
    tilt = well.factors[0].energy.keywords["tilt"]
    s = points[:, 0] / 0.5
    documented = well.kT * (5.0 * (s**2 - 1) ** 2 + tilt * s + 0.5 * (points[:, 1] ** 2 + points[:, 2] ** 2) / 0.01)
    np.testing.assert_allclose(energy, documented, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(forces[:, 0], -well.kT * (20.0 * s * (s**2 - 1) + tilt) / 0.5, rtol=1e-8, atol=1e-8)
    line = np.linspace(-0.8, 0.8, 1601)
    u_x = np.array([well.reduced_potential([[x, 0.0, 0.0]]) for x in line])
    minima = line[[np.argmin(np.where(line < 0, u_x, np.inf)), np.argmin(np.where(line > 0, u_x, np.inf))]]
    np.testing.assert_allclose(minima, [-0.5, 0.5], atol=0.01)
    barrier = u_x[np.abs(line) < 0.1].max() - u_x.min()
    assert 4.5 < barrier < 6.0


def test_double_well_mode_weights_match_direct_quadrature(well):
    weights = well.mode_weights()
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert weights == pytest.approx([0.75, 0.25], abs=1e-9)  # the design weights
    # mode boundary from mode_of, then scipy quadrature of the OpenMM energy along x (y, z factor out)
    lo = mode_boundary(well)
    u0 = well.reduced_potential([[-0.5, 0.0, 0.0]])

    def density(x):
        return math.exp(u0 - well.reduced_potential([[x, 0.0, 0.0]]))

    left = quad(density, well.box[0, 0], lo, epsabs=0, epsrel=1e-11, limit=200)[0]
    right = quad(density, lo, well.box[0, 1], epsabs=0, epsrel=1e-11, limit=200)[0]
    np.testing.assert_allclose(weights, [left / (left + right), right / (left + right)], atol=1e-8)


def test_mixture_mode_weights_match_direct_quadrature(mixture):
    weights = mixture.mode_weights()
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert weights == pytest.approx([0.5, 0.3, 0.2], abs=1e-6)  # well separated: ~ the component weights
    n = 801
    xs, ys = (np.linspace(lo, hi, n) for lo, hi in mixture.box[:2])
    grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)
    points = np.concatenate([grid, np.zeros((grid.shape[0], 1))], axis=1)[:, None]
    density = np.exp(mixture.log_prob(points)).reshape(n, n)
    labels = mixture.mode_of(points).reshape(n, n)
    direct = [trapezoid(trapezoid(np.where(labels == k, density, 0.0), ys), xs) for k in range(3)]
    np.testing.assert_allclose(weights, np.array(direct) / sum(direct), atol=1e-5)


def test_mode_of_labels_the_mode_centres(well, mixture):
    assert well.mode_of(np.array([[[-0.5, 0.0, 0.0]], [[0.5, 0.1, -0.1]]])).tolist() == [0, 1]
    centres = np.concatenate([MEANS, np.zeros((3, 1))], axis=1)[:, None]
    assert mixture.mode_of(centres).tolist() == [0, 1, 2]


def test_marginals_are_exact(well, mixture):
    for target in (well, mixture):
        for axis in range(3):
            edges = np.linspace(target.box[axis, 0] - 0.2, target.box[axis, 1] + 0.2, 33)
            probs = target.marginal(axis, edges)
            assert probs.shape == (32,) and np.all(probs >= 0)
            assert probs.sum() == pytest.approx(1.0, abs=1e-10)
    # z is N(0, 0.1^2) at the design temperature: bin probabilities are differences of the normal CDF
    edges = np.linspace(-0.5, 0.5, 21)
    for target in (well, mixture):
        np.testing.assert_allclose(target.marginal(2, edges), np.diff(norm.cdf(edges, scale=0.1)), atol=1e-10)
    # the mixture's x marginal is a mixture of 1-D normals
    edges = np.linspace(-1.0, 1.2, 45)
    cdf = sum(w * norm.cdf(edges, loc=m, scale=s) for w, m, s in zip([0.5, 0.3, 0.2], MEANS[:, 0], SIGMAS))
    np.testing.assert_allclose(mixture.marginal(0, edges), np.diff(cdf), atol=1e-9)


def test_box_leaves_less_than_1e_9_outside(mixture):
    # mixture: independent grid integral of the analytic density over a much larger region
    axes = [np.linspace(-2.5, 2.5, 501), np.linspace(-2.5, 2.5, 501)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2)
    points = np.concatenate([grid, np.zeros((grid.shape[0], 1))], axis=1)
    density = np.exp(-mixture_energy(points) / mixture.kT).reshape(501, 501)
    inside = (grid[:, 0] >= mixture.box[0, 0]) & (grid[:, 0] <= mixture.box[0, 1])
    inside &= (grid[:, 1] >= mixture.box[1, 0]) & (grid[:, 1] <= mixture.box[1, 1])
    outside = trapezoid(trapezoid(np.where(inside.reshape(501, 501), 0.0, density), axes[1]), axes[0])
    assert outside / trapezoid(trapezoid(density, axes[1]), axes[0]) < 1e-9
    z_outside = norm.cdf(mixture.box[2, 0], scale=0.1) + norm.sf(mixture.box[2, 1], scale=0.1)
    assert z_outside < 1e-9


def test_double_well_box_leaves_less_than_1e_9_outside(well):
    u0 = well.reduced_potential([[-0.5, 0.0, 0.0]])

    def density(x):
        return math.exp(u0 - well.reduced_potential([[x, 0.0, 0.0]]))

    total = quad(density, -3.0, 3.0, points=[-0.5, 0.5], epsabs=0, epsrel=1e-12, limit=200)[0]
    outside = quad(density, -3.0, well.box[0, 0], epsabs=1e-16, limit=200)[0]
    outside += quad(density, well.box[0, 1], 3.0, epsabs=1e-16, limit=200)[0]
    z_outside = sum(norm.cdf(lo, scale=0.1) + norm.sf(hi, scale=0.1) for lo, hi in well.box[1:])
    assert outside / total + z_outside < 1e-9


def test_with_temperature_keeps_toyness_and_recomputes_exact_quantities(well, mixture):
    for target in (well, mixture):
        hot = target.with_temperature(600.0 * unit.kelvin)
        assert isinstance(hot, ToyTarget) and hot.temperature == 600.0 and hot.name == target.name
        assert hot.system_fingerprint() == target.system_fingerprint()  # same force field
        x = target.positions + 0.05
        assert hot.reduced_potential(x) == pytest.approx(0.5 * target.reduced_potential(x), rel=1e-12)
        assert hot.mode_weights().sum() == pytest.approx(1.0, abs=1e-12)
        assert 0 <= hot.mass_outside_box < 1e-9
        assert np.all(hot.box[:, 1] - hot.box[:, 0] > target.box[:, 1] - target.box[:, 0])
        assert grid_integral(hot) == pytest.approx(1.0, abs=1e-7)
        edges = [-0.3, 0.0, 0.3]
        np.testing.assert_allclose(hot.marginal(2, edges), np.diff(norm.cdf(edges, scale=0.1 * 2**0.5)), atol=1e-10)
    # the double well at 600 K: u' = u / 2, so its weights follow from the square root of the 300 K density
    hot = well.with_temperature(600.0)
    boundary = mode_boundary(hot)
    assert boundary == pytest.approx(mode_boundary(well), abs=1e-12)  # modes are regions of space, not of T
    u0 = well.reduced_potential([[-0.5, 0.0, 0.0]])

    def density(x):
        return math.exp(0.5 * (u0 - well.reduced_potential([[x, 0.0, 0.0]])))

    left = quad(density, -1.5, boundary, epsabs=0, epsrel=1e-11, limit=200)[0]
    right = quad(density, boundary, 1.5, epsabs=0, epsrel=1e-11, limit=200)[0]
    assert hot.mode_weights()[0] < 0.7
    np.testing.assert_allclose(hot.mode_weights(), [left / (left + right), right / (left + right)], atol=1e-8)


def test_torch_inputs_give_torch_outputs(mixture):
    x = torch.zeros(4, 1, 3, dtype=torch.float32)
    x[:, 0, 0] = torch.tensor([0.6, -0.3, -0.3, 9.0])
    log_p, modes = mixture.log_prob(x), mixture.mode_of(x)
    assert isinstance(log_p, torch.Tensor) and log_p.dtype == torch.float64 and log_p.shape == (4,)
    assert isinstance(modes, torch.Tensor) and modes.dtype == torch.int64
    assert torch.isinf(log_p[3]) and log_p[3] < 0  # outside the box
    np.testing.assert_allclose(log_p[:3].numpy(), mixture.log_prob(x.double().numpy())[:3])


def test_pickle_round_trip(mixture):
    copy = pickle.loads(pickle.dumps(mixture))
    x = mixture.positions[None] + np.array([[[0.01, 0.02, -0.03]]])
    assert copy.log_prob(x) == pytest.approx(mixture.log_prob(x))
    np.testing.assert_array_equal(copy.mode_weights(), mixture.mode_weights())


def test_refusals(well):
    with pytest.raises(CMTInputError, match="weights"):
        gaussian_mixture(weights=(0.5, 0.5))
    with pytest.raises(CMTInputError, match="weights"):
        gaussian_mixture(weights=(0.5, 0.6, -0.1))
    with pytest.raises(CMTInputError, match="barrier"):
        double_well_3d(barrier=-1.0)
    with pytest.raises(CMTInputError, match="major_weight"):
        double_well_3d(major_weight=1.0)
    with pytest.raises(CMTInputError, match="cannot hold"):
        double_well_3d(barrier=0.5, major_weight=0.999)
    with pytest.raises(CMTInputError, match="temperature"):
        double_well_3d(0.0)
    with pytest.raises(CMTInputError, match="edges"):
        well.marginal(0, [0.1, 0.0])
    with pytest.raises(CMTInputError, match="axis"):
        well.marginal(3, [0.0, 0.1])
    with pytest.raises(CMTInputError, match="shape"):
        well.log_prob(np.zeros((2, 3)))
    with pytest.raises(CMTInputError, match="shape"):
        well.mode_of(np.zeros((2, 2, 3)))
