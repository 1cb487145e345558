"""The generator's energy U_q = -kT log q (FlowEnergy): values, forces, the restraint outside the flow's domain."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import evaluate, minus_kT_log_q, particles_only, samples
from helpers import perturbed_generator

from cmt_openmm.export.flow_energy import FlowEnergy
from cmt_openmm.export.force import to_openmm_force
from cmt_openmm.systems import get_target
from cmt_openmm.units import kT


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


def test_fewer_bins_on_bonds_and_angles_export_and_save(target, tmp_path):
    """A generator with linear_bins: its exported energy is -kT log q, its file reloads to the same
    density, and a generator of one n_bins keeps files and payloads without the setting."""
    from cmt_openmm.generator import BoltzmannGenerator

    generator = perturbed_generator(target, scale=0.05, seed=4, n_layers=4, hidden=16, n_bins=6, linear_bins=3,
                                    dtype=torch.float64)
    assert generator.settings["linear_bins"] == 3
    x = samples(generator, 40, seed=2)
    exact = minus_kT_log_q(generator, x)
    energy = FlowEnergy.from_generator(generator)
    assert energy.config["linear_bins"] == 3
    np.testing.assert_allclose(torch.jit.script(energy)(torch.as_tensor(x)).numpy(), exact, rtol=1e-11, atol=1e-9)
    loaded = BoltzmannGenerator.load(generator.save(tmp_path / "g.safetensors"))
    np.testing.assert_allclose(minus_kT_log_q(loaded, x), exact, rtol=0, atol=1e-9)
    plain = BoltzmannGenerator.build(target, n_layers=2, hidden=8, n_bins=6, linear_bins=6)
    assert "linear_bins" not in plain.settings
    assert "linear_bins" not in FlowEnergy.from_generator(plain).config


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
