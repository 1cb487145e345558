"""Reweighted ensembles on toy targets with exact answers: expectations, free energies, other
temperatures and systems, resampling, exports."""
import inspect
import math

import mdtraj as md
import numpy as np
import pytest
import torch

from cmt_openmm.sampling.estimators import weighted_mean
from cmt_openmm.errors import CMTInputError
from cmt_openmm.sampling.reweighting import LowESSWarning, ReweightedEnsemble, reweight
from cmt_openmm.systems.toys import double_well_3d

N = 20_000


class GaussianProposal:
    """A deliberately imperfect proposal: one broad Gaussian over both wells of the double well."""

    def __init__(self, mean=(0.05, 0.01, 0.0), scale=(0.45, 0.13, 0.12)):
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.scale = torch.tensor(scale, dtype=torch.float64)

    def sample(self, n, generator=None):
        z = torch.randn(n, 1, 3, generator=generator, dtype=torch.float64)
        x = self.mean + self.scale * z
        return x, self.log_prob(x)

    def log_prob(self, x):
        z = (x[:, 0] - self.mean) / self.scale
        return (-0.5 * z**2 - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


@pytest.fixture(scope="module")
def toy():
    return double_well_3d(300.0)


@pytest.fixture(scope="module")
def ensemble(toy):
    return reweight(GaussianProposal(), toy, N, batch_size=4096, seed=1, progress=False)


def exact_mean_x(target):
    edges = np.linspace(*target.box[0], 20001)
    return float(np.sum(target.marginal(0, edges) * 0.5 * (edges[1:] + edges[:-1])))


def test_samples_energies_and_weights(ensemble, toy):
    assert len(ensemble) == N and ensemble.positions.shape == (N, 1, 3)
    u = np.array([toy.reduced_potential(x) for x in ensemble.positions[:5]])
    np.testing.assert_allclose(ensemble.reduced_energy[:5], u, rtol=1e-6)
    np.testing.assert_allclose(ensemble.log_weights, -ensemble.reduced_energy - ensemble.log_q)
    assert 0.05 < ensemble.ess < 0.5  # imperfect (~17 %), but usable
    assert ensemble.ess_clipped(1e-4) >= ensemble.ess
    # same seed and batches, same samples
    runs = [reweight(GaussianProposal(), toy, 30, batch_size=20, seed=5, progress=False, min_effective_samples=0)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].positions, runs[1].positions)
    np.testing.assert_array_equal(runs[0].log_weights, runs[1].log_weights)


def test_failed_and_invalid_samples_get_zero_weight(toy):
    x = np.zeros((4, 1, 3))
    ens = ReweightedEnsemble(toy, x, [0.0, 0.0, 0.0, np.nan], [1.0, np.inf, 1.0, 1.0], invalid=[False, False, True, False])
    assert ens.log_weights[0] == -1.0 and np.isneginf(ens.log_weights[1:]).all()
    assert ens.n_failed == 3 and ens.ess == pytest.approx(0.25)
    dead = ReweightedEnsemble(toy, x, np.zeros(4), np.full(4, np.inf))
    with pytest.raises(CMTInputError):
        dead.expectation(lambda p: p[:, 0, 0])
    with pytest.raises(CMTInputError):
        ReweightedEnsemble(toy, np.zeros((4, 2, 3)), np.zeros(4), np.zeros(4))


def test_expectation_matches_quadrature(ensemble, toy):
    exact = exact_mean_x(toy)
    for method in ("bootstrap", "delta"):
        est = ensemble.expectation(lambda x: x[:, 0, 0], error=method, seed=2)
        assert 0 < est.error < 0.02
        assert abs(est.value - exact) < 4 * est.error, (method, est, exact)
    boot, delta = (ensemble.expectation(lambda x: x[:, 0, 0], error=m) for m in ("bootstrap", "delta"))
    assert boot.error == pytest.approx(delta.error, rel=0.25)
    # vector observables, torch outputs, batching and precomputed values agree
    vec = ensemble.expectation(lambda x: torch.as_tensor(x[:, 0, :2]), error="delta", batch_size=999)
    assert vec.value.shape == (2,) and vec.value[0] == pytest.approx(delta.value)
    pre = ensemble.expectation(ensemble.positions[:, 0, 0], error="delta")
    assert pre == delta
    # the left-well population against the exact mode weight
    left = ensemble.expectation(lambda x: np.asarray(toy.mode_of(x) == 0, dtype=float))
    assert abs(left.value - toy.mode_weights()[0]) < 4 * left.error


def test_an_estimate_resting_on_a_few_samples_warns_though_the_draw_has_thousands(toy):
    """The whole draw has N·ESS ≈ 4,000, but the rare state's weight sits on 3 samples: its population
    (a precise-looking number) warns, the bulk's mean does not; a state's count is the smaller of the
    Kish counts inside and outside it, as the report's."""
    import warnings

    from cmt_openmm.analysis.metrics import state_effective_samples
    from cmt_openmm.sampling.ensemble_weights import effective_samples_about

    rng = np.random.default_rng(1)
    n = 4_000
    log_w = np.zeros(n)
    rare = np.zeros(n, bool)
    rare[:40] = True  # 1 % of the samples in the rare state...
    log_w[:40] = np.log(np.r_[[30.0, 20.0, 10.0], np.full(37, 1e-3)])  # ...whose weight three of them carry
    x = np.zeros((n, 1, 3))
    x[:, 0, 0] = np.where(rare, 0.5, rng.normal(-0.3, 0.05, n))
    ens = ReweightedEnsemble(toy, x, np.zeros(n), -log_w)
    assert ens.n_effective > 3_000
    w = ens.weights
    inside = effective_samples_about(w, rare.astype(float), w @ rare)
    kish = lambda v: v.sum() ** 2 / (v @ v)
    assert inside == pytest.approx(min(kish(w[rare]), kish(w[~rare]))) == pytest.approx(state_effective_samples(w, rare))
    assert inside < 3
    with pytest.warns(LowESSWarning, match=r"rests on 2\.\d effective samples"):
        population = ens.expectation(rare.astype(float), error="delta")
    assert 0 < population.error < population.value
    bulk = ~rare
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowESSWarning)
        ens.expectation(np.where(bulk, x[:, 0, 0], -0.3), error="delta")  # thousands on each side of its mean
        ens.expectation(rare.astype(float), error="delta", min_effective_samples=0)  # the check turned off
    # unweighted, a continuous observable rests on about half the samples on each side
    values = x[bulk, 0, 0]
    flat = effective_samples_about(np.full(len(values), 1.0 / len(values)), values, values.mean())
    assert flat == pytest.approx(len(values) / 2, rel=0.05)
    assert effective_samples_about(w, np.ones(n), 1.0) == pytest.approx(ens.n_effective)  # no sample off the mean


def _check_profile(profile, target, min_prob=5e-3):
    exact_p = target.marginal(0, profile.edges)
    ok = exact_p > min_prob
    exact_f = -np.log(exact_p[ok] / np.diff(profile.edges)[ok])
    f, err = profile.free_energy[ok], profile.error[ok]
    ref = np.argmin(exact_f)  # align both at the exact minimum
    d = (f - f[ref]) - (exact_f - exact_f[ref])
    tol = 4 * np.sqrt(err**2 + err[ref] ** 2) + 1e-12
    assert np.all(np.abs(d) < tol), (d, tol)


def test_free_energy_profile_matches_exact_marginal(ensemble, toy):
    profile = ensemble.free_energy_profile(lambda x: x[:, 0, 0], bins=24, range=(-1.0, 1.0), seed=3)
    assert profile.free_energy.shape == (24,) and np.nanmin(profile.free_energy) == 0.0
    assert profile.probabilities.sum() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(profile.free_energy_kjmol, profile.free_energy * toy.kT)
    _check_profile(profile, toy)
    _check_profile(ensemble.free_energy_profile(ensemble.positions[:, 0, 0], bins=24, range=(-1, 1), error="delta"), toy)


def test_free_energy_surface(ensemble, toy):
    fes = ensemble.free_energy_surface(lambda x: x[:, 0, :2], bins=(20, 10), range=[(-1, 1), (-0.3, 0.3)])
    assert fes.free_energy.shape == (20, 10) and fes.error.shape == (20, 10)
    assert np.nanmin(fes.free_energy) == 0.0
    # x and y are independent: the surface's x-marginal is the exact x-marginal
    px = fes.probabilities.sum(axis=1)
    exact = toy.marginal(0, fes.edges[0])
    assert np.abs(px - exact).max() < 0.02
    i, j = np.unravel_index(np.argmin(fes.free_energy), fes.free_energy.shape)
    assert fes.edges[0][i] < 0  # the deeper, left well
    assert np.isfinite(fes.error[i, j]) and fes.error[i, j] < 0.2


def test_reweight_to_another_temperature(ensemble, toy):
    hot_target = toy.with_temperature(450.0)
    hot = ensemble.reweight_to(450.0)
    assert hot.target.temperature == 450.0
    np.testing.assert_allclose(hot.reduced_energy, ensemble.reduced_energy * 300.0 / 450.0)
    left = hot.expectation(lambda x: np.asarray(toy.mode_of(x) == 0, dtype=float), seed=4)
    assert abs(left.value - hot_target.mode_weights()[0]) < 4 * left.error
    assert abs(hot_target.mode_weights()[0] - toy.mode_weights()[0]) > 4 * left.error  # the change is resolved
    _check_profile(hot.free_energy_profile(lambda x: x[:, 0, 0], bins=24, range=(-1.0, 1.0), seed=5), hot_target)
    # a Target of the same System at the new temperature takes the same shortcut
    np.testing.assert_allclose(ensemble.reweight_to(hot_target).reduced_energy, hot.reduced_energy)


def test_reweight_to_another_system_and_ess_warning(ensemble, toy):
    other = double_well_3d(300.0, barrier=3.0, major_weight=0.6)  # same topology, another System
    moved = ensemble.reweight_to(other)
    u = np.array([other.reduced_potential(x) for x in ensemble.positions[:5]])
    np.testing.assert_allclose(moved.reduced_energy[:5], u, rtol=1e-6)
    left = moved.expectation(lambda x: np.asarray(other.mode_of(x) == 0, dtype=float), seed=6)
    assert abs(left.value - other.mode_weights()[0]) < 4 * left.error
    with pytest.warns(LowESSWarning):
        ensemble.reweight_to(3.0)
    from cmt_openmm.systems.toys import gaussian_mixture
    import openmm.app as app

    mixture = gaussian_mixture(300.0)
    mixture.topology = app.Topology()  # a different topology
    mixture.topology.addAtom("Q", app.element.carbon, mixture.topology.addResidue("X", mixture.topology.addChain()))
    with pytest.raises(CMTInputError):
        ensemble.reweight_to(mixture)


def test_reweight_warns_when_a_few_samples_carry_the_weight(ensemble, toy):
    """reweight() and reweight_to() share one low-ESS check: N·ESS below 100 effective samples warns."""
    import warnings

    far = GaussianProposal(mean=(0.9, 0.2, 0.2), scale=(0.08, 0.05, 0.05))  # misses the wells: ESS ≪ 1 %
    with pytest.warns(LowESSWarning, match="effective") as record:
        poor = reweight(far, toy, 2000, seed=0, progress=False)
    assert poor.n_effective == pytest.approx(len(poor) * poor.ess) and poor.n_effective < 100
    assert not poor.reliable and f"{poor.n_effective:.1f} effective of 2000" in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowESSWarning)
        good = reweight(GaussianProposal(), toy, 2000, seed=0, progress=False)  # ~350 effective samples
        assert good.reliable and good.n_effective > 100
        ensemble.reweight_to(310.0)
    with pytest.warns(LowESSWarning, match="fewer than 1e"):
        ensemble.reweight_to(310.0, min_effective_samples=1e9)  # the same check as reweight()


def test_reweight_to_a_temperature_refuses_an_energy(ensemble):
    with pytest.raises(CMTInputError, match="energy= is only used with a Target") as info:
        ensemble.reweight_to(450.0, energy=lambda x: np.zeros(len(x)))
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".") and ". " not in msg


def test_systematic_resampling_keeps_weighted_means(ensemble):
    idx = ensemble.resample_indices(seed=7)
    counts = np.bincount(idx, minlength=N)
    expected = N * ensemble.weights
    assert np.all((counts >= np.floor(expected)) & (counts <= np.floor(expected) + 1))
    # the resampled mean differs from the weighted mean far less than the estimator's own error
    x = ensemble.resample(seed=7)
    weighted = ensemble.expectation(lambda p: p[:, 0, :], error="delta")
    assert np.all(np.abs(x[:, 0, :].mean(axis=0) - weighted.value) < 0.5 * weighted.error)
    assert ensemble.resample(500, seed=8).shape == (500, 1, 3)
    np.testing.assert_array_equal(ensemble.resample_indices(100, seed=9), ensemble.resample_indices(100, seed=9))


def test_exports_round_trip(ensemble, toy, tmp_path):
    small = ReweightedEnsemble(toy, ensemble.positions[:50], ensemble.log_q[:50], ensemble.reduced_energy[:50])
    small.save_dcd(tmp_path / "s.dcd", tmp_path / "s.pdb")
    traj = md.load(str(tmp_path / "s.dcd"), top=str(tmp_path / "s.pdb"))
    np.testing.assert_allclose(traj.xyz, small.positions, atol=1e-5)
    assert small.to_mdtraj().n_frames == 50

    small.save_weights(tmp_path / "w.npy")
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), small.weights)
    small.save_weights(tmp_path / "w.csv")
    table = np.loadtxt(tmp_path / "w.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 2], small.weights)
    np.testing.assert_array_equal(table[:, 1], small.log_weights)
    with pytest.raises(CMTInputError):
        small.save_weights(tmp_path / "w.txt")

    small.save_npz(tmp_path / "samples.npz")
    with np.load(tmp_path / "samples.npz") as data:
        assert {"positions", "log_q", "reduced_energy", "log_weights"} <= set(data.files)
        assert data["positions"].shape == (50, 1, 3)
    back = ReweightedEnsemble.load_npz(tmp_path / "samples.npz", toy)
    np.testing.assert_array_equal(back.log_weights, small.log_weights)
    with pytest.warns(LowESSWarning):  # 50 samples: fewer than 100 effective
        hot = small.reweight_to(400.0)
    hot.save_npz(tmp_path / "hot.npz")
    assert ReweightedEnsemble.load_npz(tmp_path / "hot.npz", toy).target.temperature == 400.0


def test_mdtraj_observables_and_ramachandran_on_aldp():
    from cmt_openmm.systems import get_target

    target = get_target("aldp-vacuum")
    rng = np.random.default_rng(0)
    x = target.positions[None] + 0.02 * rng.normal(size=(40, target.n_atoms, 3))
    ens = ReweightedEnsemble(target, x, rng.normal(size=40), rng.normal(size=40))
    phi_md = ens.expectation(lambda t: md.compute_phi(t)[1][:, 0], trajectory=True, error="delta")
    angles = ens.ramachandran_angles()
    assert angles.shape == (40, 1, 2)
    phi = weighted_mean(angles[:, 0, 0], ens.weights, error="delta")
    assert phi_md.value == pytest.approx(phi.value, abs=1e-5)
    fes = ens.free_energy_surface(angles[:, 0], bins=10, range=[(-np.pi, np.pi)] * 2, n_bootstrap=20)
    assert fes.free_energy.shape == (10, 10)


def test_reweight_a_boltzmann_generator(toy):
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems import get_target

    gen = BoltzmannGenerator.build(toy, n_layers=2, hidden=16, seed=0)
    with torch.no_grad():  # "random-ish" weights: an untrained, imperfect generator
        noise = torch.Generator().manual_seed(1)
        for p in gen.flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    with pytest.warns(LowESSWarning):  # a random flow: a few dozen effective samples
        ens = reweight(gen, toy, N, batch_size=5000, seed=0, progress=False)
    assert ens.positions.shape == (N, 1, 3) and ens.n_failed == 0
    with torch.no_grad():
        np.testing.assert_allclose(gen.log_prob(torch.tensor(ens.positions[:64])).numpy(), ens.log_q[:64], atol=1e-4)
    assert 0.001 < ens.ess < 0.5
    est = ens.expectation(lambda x: x[:, 0, 0], seed=1)
    assert abs(est.value - exact_mean_x(toy)) < 4 * est.error
    assert ens.metadata["generator_hash"] == gen.content_hash()
    with pytest.raises(CMTInputError, match="another topology"):
        reweight(gen, get_target("aldp-vacuum"), 10, progress=False)


def test_default_energy_is_chosen_as_on_the_command_line(toy, monkeypatch):
    """reweight() without energy= builds make_energy(target, "auto") as `cmt-openmm sample` does
    (Run.energy with the default EnergyConfig), closes it, and weights as OpenMM does."""
    from cmt_openmm.energy import OpenMMEnergy
    from cmt_openmm.energy import select
    from cmt_openmm.training.config import EnergyConfig

    calls, made, original = [], [], select.make_energy

    def recording(target, backend="auto", **kwargs):
        calls.append((target, backend, kwargs))
        made.append(original(target, backend, **kwargs))
        return made[-1]

    monkeypatch.setattr(select, "make_energy", recording)
    chosen = reweight(GaussianProposal(), toy, 2000, seed=3, progress=False)
    config, defaults = EnergyConfig(), inspect.signature(original).parameters
    assert [(t, b) for t, b, _ in calls] == [(toy, config.backend)] and calls[0][2] == {}
    assert all(defaults[key].default == getattr(config, key) for key in ("platform", "n_workers", "compile"))
    with OpenMMEnergy(toy) as energy:
        reference = reweight(GaussianProposal(), toy, 2000, seed=3, progress=False, energy=energy)
    np.testing.assert_array_equal(chosen.positions, reference.positions)
    np.testing.assert_allclose(chosen.reduced_energy, reference.reduced_energy, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(chosen.weights, reference.weights, rtol=1e-6, atol=1e-12)


def test_a_weights_only_ensemble_gives_weights_and_refuses_what_needs_energies():
    """What the report keeps of a large draw (issue 25): log-weights (and angles) only; its ESS and
    weights are those of the full ensemble, and reweight_to / npz_arrays refuse in one sentence."""
    from cmt_openmm.errors import CMTInputError
    from cmt_openmm.sampling.reweighting import ReweightedEnsemble
    from cmt_openmm.systems import get_target

    toy = get_target("toy-double-well")
    rng = np.random.default_rng(0)
    full = ReweightedEnsemble(toy, None, rng.normal(size=500), np.append(rng.normal(size=499), np.inf),
                              rng.random(500) < 0.1)
    lean = ReweightedEnsemble.weights_only(toy, full.log_weights, full.invalid, full.failed_energies)
    assert len(lean) == 500 and lean.failed_energies == full.failed_energies == 1 and lean.ess == full.ess
    np.testing.assert_array_equal(lean.weights, full.weights)
    pooled = ReweightedEnsemble.concatenate([lean, full])
    assert pooled.reduced_energy is None and pooled.failed_energies == 2 and len(pooled) == 1000
    for call in (lambda: lean.reweight_to(600.0), lean.npz_arrays):
        with pytest.raises(CMTInputError, match="does not keep"):
            call()
