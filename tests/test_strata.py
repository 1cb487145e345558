"""Stratified CMT weights: strata masses follow the Hölder bound, shapes follow the dual."""
import math

import numpy as np
import pytest
from scipy.special import logsumexp

from cmt_openmm.errors import CMTInputError
from cmt_openmm.metrics import ramachandran_angles
from cmt_openmm.systems import get_target
from cmt_openmm.toys import double_well_3d
from cmt_openmm.training.config import TrainConfig
from cmt_openmm.training.strata import phi_sign_labels, stratified_log_weights, stratifier


def _normal_logpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))


# 1-D: target p̃ = 0.9 N(−2, 0.5²) + 0.1 N(2, 0.5²); strata x < 0 and x ≥ 0. The flow q has the
# right shape in the big basin, but in the small one it sits 2σ off and is 1.5 times wider
# (in ALDP's φ > 0 states seven coordinates sit 1σ off). Wider, so that the importance
# estimates of the tempered stratum masses have finite variance.
def log_p(x):
    return np.logaddexp(math.log(0.9) + _normal_logpdf(x, -2, 0.5), math.log(0.1) + _normal_logpdf(x, 2, 0.5))


def log_q(x, m_small=0.05, mu_small=3.0, width_small=0.75):
    return np.logaddexp(math.log(1 - m_small) + _normal_logpdf(x, -2, 0.5), math.log(m_small) + _normal_logpdf(x, mu_small, width_small))


def _sample_q(n, rng, m_small=0.05, mu_small=3.0, width_small=0.75):
    small = rng.random(n) < m_small
    return np.where(small, rng.normal(mu_small, width_small, n), rng.normal(-2, 0.5, n))


def _dual_log_weights(lq, lp, lam, eta):
    log_w = (lp - (1 + eta) * lq) / (1 + lam + eta)
    return log_w - logsumexp(log_w)


GRID = np.linspace(-12, 12, 240_001)


def _integral(log_f, where):
    return np.trapezoid(np.where(where, np.exp(log_f), 0.0), GRID)


@pytest.mark.parametrize("lam, eta", [(2.0, 0.5), (4.0, 0.0), (1.0, 1.0)])
def test_small_basin_gets_the_hoelder_mass_not_the_drained_one(lam, eta):
    rng = np.random.default_rng(0)
    x = _sample_q(400_000, rng)
    lq, lp = log_q(x), log_p(x)
    labels = (x >= 0).astype(int)
    dual = _dual_log_weights(lq, lp, lam, eta)
    out = stratified_log_weights(lq, lp, labels, lam, eta, dual)

    a, b, gamma = lam / (1 + lam + eta), 1 / (1 + lam + eta), 1 / (1 + eta)
    small = GRID >= 0
    # the dual's target q^a p̃^b: the small basin's share, drained by the width mismatch
    geo = log_q(GRID) * a + log_p(GRID) * b
    drained = _integral(geo, small) / _integral(geo, np.ones_like(small))
    # the Hölder bound per stratum: q(S)^a (∫_S p̃^γ)^(1−a)
    def bound(s):
        return _integral(log_q(GRID), s) ** a * _integral(gamma * log_p(GRID), s) ** (1 - a)
    ideal = bound(small) / (bound(small) + bound(~small))

    w_dual, w_out = np.exp(dual), np.exp(out)
    assert w_dual[labels == 1].sum() == pytest.approx(drained, rel=0.03)
    assert w_out[labels == 1].sum() == pytest.approx(ideal, rel=0.03)
    assert ideal > 1.1 * drained  # one step moves the small basin by 10 % or more here
    assert logsumexp(out) == pytest.approx(0.0, abs=1e-12)
    # inside each stratum the shape is the dual's: weight ratios unchanged
    for s in (0, 1):
        inside = labels == s
        np.testing.assert_allclose(out[inside] - dual[inside], (out - dual)[inside][0], atol=1e-10)


def test_right_shapes_leave_the_weights_alone():
    # q's shapes are exactly p's (η = 0, so γ = 1), only the masses are off: Hölder is tight
    rng = np.random.default_rng(1)
    x = _sample_q(400_000, rng, m_small=0.3, mu_small=2.0, width_small=0.5)
    lq, lp = log_q(x, 0.3, 2.0, 0.5), log_p(x)
    labels = (x >= 0).astype(int)
    dual = _dual_log_weights(lq, lp, 3.0, 0.0)
    out = stratified_log_weights(lq, lp, labels, 3.0, 0.0, dual)
    assert np.exp(out[labels == 1]).sum() == pytest.approx(np.exp(dual[labels == 1]).sum(), rel=0.01)


def test_without_trust_region_nothing_changes():
    rng = np.random.default_rng(2)
    x = _sample_q(5_000, rng)
    lq, lp = log_q(x), log_p(x)
    labels = rng.integers(0, 3, size=x.size)
    dual = _dual_log_weights(lq, lp, 0.0, 0.7)
    np.testing.assert_allclose(stratified_log_weights(lq, lp, labels, 0.0, 0.7, dual), dual, atol=1e-10)
    one = np.zeros(x.size, dtype=int)
    np.testing.assert_allclose(stratified_log_weights(lq, lp, one, 2.0, 0.7, dual), dual, atol=1e-10)


def test_failed_energies_keep_weight_zero():
    rng = np.random.default_rng(3)
    x = _sample_q(2_000, rng)
    lq, lp = log_q(x), log_p(x)
    lp[:10] = -np.inf
    labels = (x >= 0).astype(int)
    labels[:10] = 7  # a stratum whose samples all failed
    dual = np.full(x.size, -np.inf)
    ok = np.isfinite(lp)
    dual[ok] = _dual_log_weights(lq[ok], lp[ok], 1.0, 0.5)
    out = stratified_log_weights(lq, lp, labels, 1.0, 0.5, dual)
    assert np.all(out[:10] == -np.inf) and np.all(np.isfinite(out[10:]))
    assert logsumexp(out) == pytest.approx(0.0, abs=1e-12)


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
    with pytest.raises(CMTInputError, match="strata_floor needs strata"):
        TrainConfig.from_dict({"cmt": {"strata_floor": 0.1}})
    with pytest.raises(CMTInputError, match=r"in \[0, 1\)"):
        TrainConfig.from_dict({"cmt": {"strata": "phi-sign", "strata_floor": 1.0}})


def test_floor_mixes_the_strata_masses_with_uniform():
    rng = np.random.default_rng(5)
    x = _sample_q(20_000, rng)
    lq, lp = log_q(x), log_p(x)
    labels = (x >= 0).astype(int)
    dual = _dual_log_weights(lq, lp, 2.0, 0.5)
    plain = stratified_log_weights(lq, lp, labels, 2.0, 0.5, dual)
    floored = stratified_log_weights(lq, lp, labels, 2.0, 0.5, dual, floor=0.2)
    small = np.exp(plain[labels == 1]).sum()
    assert np.exp(floored[labels == 1]).sum() == pytest.approx(0.8 * small + 0.1, rel=1e-10)
    assert logsumexp(floored) == pytest.approx(0.0, abs=1e-12)
    inside = labels == 1
    np.testing.assert_allclose(floored[inside] - plain[inside], (floored - plain)[inside][0], atol=1e-10)


def test_cmt_trainer_fits_to_the_stratified_weights(monkeypatch):
    from cmt_openmm.training import cmt as cmt_module
    from cmt_openmm.training import train

    seen = []
    original = cmt_module.fit_to_buffer

    def spy(generator, optimizer, x, log_weights, *args):
        seen.append((x.detach().numpy().copy(), np.asarray(log_weights)))
        return original(generator, optimizer, x, log_weights, *args)

    monkeypatch.setattr(cmt_module, "fit_to_buffer", spy)
    solved, solve_dual = [], cmt_module.solve_dual
    monkeypatch.setattr(cmt_module, "solve_dual", lambda *a: solved.append(solve_dual(*a)) or solved[-1])
    target = get_target("aldp-vacuum", 300.0)
    config = TrainConfig.from_dict({
        "method": "cmt", "seed": 0, "max_steps": 2, "flow": {"n_layers": 2, "hidden": 16},
        "cmt": {"n_samples": 400, "fit_steps": 2, "strata": "phi-sign"},
    })
    result = train(target, config, None, progress=False)
    assert len(seen) == 2
    for (x, fitted), sol, record in zip(seen, solved, result.history):
        labels = phi_sign_labels(target.topology, x)
        assert set(labels) == {0, 1}  # the untrained flow samples both φ halves
        w_fit, w_dual = np.exp(fitted), np.exp(sol.log_weights)
        assert record["strata_tv"] == pytest.approx(0.5 * np.abs(w_fit - w_dual).sum())
        # same shape inside each stratum, different stratum masses (the trust region binds)
        ok = np.isfinite(sol.log_weights)
        assert np.array_equal(np.isfinite(fitted), ok)  # failed energies stay at weight 0
        for s in (0, 1):
            inside = (labels == s) & ok
            shift = np.median(fitted[inside] - sol.log_weights[inside])
            np.testing.assert_allclose(fitted[inside], sol.log_weights[inside] + shift, rtol=1e-12, atol=1e-9)
        assert sol.lam > 0 and record["strata_tv"] > 1e-4
