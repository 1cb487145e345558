"""φ-sign strata with a floor: masses floored, shapes (ratios inside a stratum) kept."""
import numpy as np
import pytest
from scipy.special import logsumexp

from cmt_openmm.errors import CMTInputError
from cmt_openmm.coordinates.backbone import ramachandran_angles
from cmt_openmm.systems import get_target
from cmt_openmm.systems.toys import double_well_3d
from cmt_openmm.training.config import TrainConfig
from cmt_openmm.training.strata import floored_log_weights, phi_sign_labels, stratifier


def _random_log_weights(n, rng):
    log_w = rng.normal(scale=3.0, size=n)
    return log_w - logsumexp(log_w)


@pytest.mark.parametrize("floor", [0.05, 0.1, 0.5])
def test_floor_mixes_the_strata_masses_with_uniform(floor):
    rng = np.random.default_rng(0)
    log_w = _random_log_weights(3000, rng)
    labels = rng.choice(3, size=3000, p=[0.9, 0.095, 0.005])
    out = floored_log_weights(log_w, labels, floor)
    assert logsumexp(out) == pytest.approx(0.0, abs=1e-12)
    for s in range(3):
        inside = labels == s
        before, after = np.exp(log_w[inside]).sum(), np.exp(out[inside]).sum()
        assert after == pytest.approx((1 - floor) * before + floor / 3, rel=1e-10)
        assert after >= floor / 3
        # the dual's shape inside the stratum is kept: one common shift of the log-weights
        np.testing.assert_allclose(out[inside] - log_w[inside], (out - log_w)[inside][0], atol=1e-10)


def test_one_stratum_is_left_alone():
    rng = np.random.default_rng(1)
    log_w = _random_log_weights(500, rng)
    np.testing.assert_allclose(floored_log_weights(log_w, np.zeros(500, int), 0.3), log_w, atol=1e-12)


def test_weight_zero_stays_zero_and_empty_strata_get_nothing():
    rng = np.random.default_rng(2)
    log_w = _random_log_weights(400, rng)
    labels = rng.integers(0, 2, size=400)
    log_w[:10] = -np.inf  # failed energies
    labels[:10] = 7  # a stratum whose samples all failed: nothing to give mass to
    out = floored_log_weights(log_w, labels, 0.2)
    assert np.all(out[:10] == -np.inf) and np.all(np.isfinite(out[10:]))
    assert logsumexp(out) == pytest.approx(0.0, abs=1e-12)
    log_w -= logsumexp(log_w)  # what is left, normalised
    for s in (0, 1):  # K = 2: the failed-only stratum does not count
        inside = labels == s
        assert np.exp(out[inside]).sum() == pytest.approx(0.8 * np.exp(log_w[inside]).sum() + 0.1, rel=1e-10)


def test_phi_sign_labels_follow_the_backbone_phi():
    target = get_target("aldp-vacuum", 300.0)
    x = np.asarray(target.positions)[None]
    rng = np.random.default_rng(4)
    noisy = x + rng.normal(scale=0.005, size=(8, *x.shape[1:]))
    batch = np.concatenate([noisy, -noisy])  # the mirror image flips the sign of every dihedral
    labels = phi_sign_labels(target.topology, batch)
    phi = ramachandran_angles(target.topology, batch)[:, 0, 0]
    np.testing.assert_array_equal(labels, (phi >= 0).astype(int))
    np.testing.assert_array_equal(labels[:8], 1 - labels[8:])


def test_strata_need_a_peptide_and_a_known_name():
    toy = double_well_3d()
    with pytest.raises(CMTInputError, match="needs a peptide"):
        stratifier("phi-sign", toy.topology)
    assert stratifier("none", toy.topology) is None
    with pytest.raises(CMTInputError, match="one of none, phi-sign"):
        TrainConfig.from_dict({"cmt": {"strata": "rmsd"}})
    for bad in (0.0, 1.0):
        with pytest.raises(CMTInputError, match=r"in \(0, 1\)"):
            TrainConfig.from_dict({"cmt": {"strata": "phi-sign", "strata_floor": bad}})


def test_cmt_trainer_fits_to_the_floored_weights(monkeypatch):
    from cmt_openmm.training import cmt as cmt_module
    from cmt_openmm.training import train

    seen, fit_to_buffer = [], cmt_module.fit_to_buffer
    solved, solve_dual = [], cmt_module.solve_dual

    def spy_fit(generator, optimizer, x, log_weights, *args):
        seen.append((x.detach().numpy().copy(), np.asarray(log_weights)))
        return fit_to_buffer(generator, optimizer, x, log_weights, *args)

    monkeypatch.setattr(cmt_module, "fit_to_buffer", spy_fit)
    monkeypatch.setattr(cmt_module, "solve_dual", lambda *a: solved.append(solve_dual(*a)) or solved[-1])
    target = get_target("aldp-vacuum", 300.0)
    config = TrainConfig.from_dict({
        "method": "cmt", "seed": 0, "max_steps": 2, "flow": {"n_layers": 2, "hidden": 16},
        "cmt": {"n_samples": 400, "fit_steps": 2, "strata": "phi-sign", "strata_floor": 0.3},
    })
    result = train(target, config, None, progress=False)
    assert len(seen) == len(solved) == 2
    for (x, fitted), sol, record in zip(seen, solved, result.history):
        labels = phi_sign_labels(target.topology, x)
        assert set(labels) == {0, 1}  # the untrained flow samples both φ halves
        expected = floored_log_weights(sol.log_weights, labels, 0.3)
        np.testing.assert_array_equal(fitted, expected)
        assert min(np.exp(fitted[labels == s]).sum() for s in (0, 1)) >= 0.15 - 1e-12
        assert record["strata_tv"] == pytest.approx(0.5 * np.abs(np.exp(fitted) - np.exp(sol.log_weights)).sum())


def test_phi_sign_strata_cover_the_c_terminal_phi_of_an_uncapped_peptide(tmp_path, monkeypatch):
    """ELIL (zwitterion, no caps): its last residue has a φ but no ψ; the strata label its sign too,
    bit by bit as mdtraj's φ (a basin there is otherwise left to the trust region's drain)."""
    import mdtraj
    import torch

    from cmt_openmm.generator import BoltzmannGenerator

    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    target = get_target("elil")
    x, _ = BoltzmannGenerator.build(target, n_layers=1, hidden=4).sample(500, torch.Generator().manual_seed(0))
    labels = stratifier("phi-sign", target.topology)(x.numpy())
    _, phi = mdtraj.compute_phi(mdtraj.Trajectory(x.numpy(), mdtraj.Topology.from_openmm(target.topology)))
    assert phi.shape[1] == 3 and ramachandran_angles(target.topology, x.numpy()).shape[1] == 2
    assert np.array_equal(labels, ((phi >= 0) * (1 << np.arange(3))).sum(axis=1))


def test_phi_sign_strata_of_a_longer_peptide_and_the_floor_over_many_labels(tmp_path, monkeypatch):
    """ala4 (3 backbone φ): labels agree with mdtraj's φ signs bit by bit, and with 2^3 labels the
    floor still gives every label present at least floor / K of the fit, K the labels present."""
    import mdtraj
    import torch

    from cmt_openmm.generator import BoltzmannGenerator

    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    target = get_target("ala4")
    x, _ = BoltzmannGenerator.build(target, n_layers=1, hidden=4).sample(2000, torch.Generator().manual_seed(0))
    labels = stratifier("phi-sign", target.topology)(x.numpy())
    _, phi = mdtraj.compute_phi(mdtraj.Trajectory(x.numpy(), mdtraj.Topology.from_openmm(target.topology)))
    assert phi.shape[1] == 3
    assert np.array_equal(labels, ((phi >= 0) * (1 << np.arange(3))).sum(axis=1))
    assert len(np.unique(labels)) == 8  # the untrained flow's φ are uniform: every label appears
    log_w = np.where(labels == 0, 0.0, -12.0)  # the dual puts nearly all mass on one label
    w = np.exp(floored_log_weights(log_w, labels, 0.1))
    assert w.sum() == pytest.approx(1.0)
    masses = np.bincount(labels, weights=w, minlength=8)
    assert masses.min() >= 0.1 / 8 * (1 - 1e-9) and masses[0] > 0.9
