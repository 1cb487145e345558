"""φ-sign strata with a floor: masses floored, shapes (ratios inside a stratum) kept."""
import numpy as np
import pytest
from scipy.special import logsumexp

from cmt_openmm.errors import CMTInputError
from cmt_openmm.coordinates.backbone import ramachandran_angles
from cmt_openmm.systems import get_target
from cmt_openmm.systems.toys import double_well_3d
from cmt_openmm.training.config import TrainConfig
from cmt_openmm.training.dual import solve_dual
from cmt_openmm.training.strata import (floored_log_weights, holder_log_weights, phi_basin_labels, phi_sign_labels,
                                       phi_sign_turn_labels, stratifier)


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
    for name in ("phi-sign-turns", "phi-basin"):
        with pytest.raises(CMTInputError, match="needs a peptide"):
            stratifier(name, toy.topology)
    with pytest.raises(CMTInputError, match="one of none, phi-sign, phi-sign-turns"):
        TrainConfig.from_dict({"cmt": {"strata": "rmsd"}})
    with pytest.raises(CMTInputError, match="cmt.strata_mass holder sets the masses of strata, and cmt.strata is none"):
        TrainConfig.from_dict({"cmt": {"strata_mass": "holder"}})
    with pytest.raises(CMTInputError, match="one of dual, holder"):
        TrainConfig.from_dict({"cmt": {"strata": "phi-sign", "strata_mass": "bound"}})
    for bad in (0.0, 1.0):
        with pytest.raises(CMTInputError, match=r"in \(0, 1\)"):
            TrainConfig.from_dict({"cmt": {"strata": "phi-sign", "strata_floor": bad}})


def _spy_on_the_fit(monkeypatch):
    """Lists that fill, per CMT step, with (buffer x, fitted log-weights) and (dual solution, its arguments)."""
    from cmt_openmm.training import cmt as cmt_module

    seen, fit_to_buffer = [], cmt_module.fit_to_buffer
    solved, solve = [], cmt_module.solve_dual

    def spy_fit(generator, optimizer, x, log_weights, *args):
        seen.append((x.detach().numpy().copy(), np.asarray(log_weights)))
        return fit_to_buffer(generator, optimizer, x, log_weights, *args)

    monkeypatch.setattr(cmt_module, "fit_to_buffer", spy_fit)
    monkeypatch.setattr(cmt_module, "solve_dual", lambda *a: solved.append((solve(*a), a)) or solved[-1][0])
    return seen, solved


@pytest.mark.parametrize("strata_mass", ["dual", "holder"])
def test_cmt_trainer_fits_to_the_floored_weights(monkeypatch, strata_mass):
    from cmt_openmm.training import train

    seen, solved = _spy_on_the_fit(monkeypatch)
    target = get_target("aldp-vacuum", 300.0)
    config = TrainConfig.from_dict({
        "method": "cmt", "seed": 0, "max_steps": 2, "flow": {"n_layers": 2, "hidden": 16},
        "cmt": {"n_samples": 400, "fit_steps": 2, "strata": "phi-sign", "strata_floor": 0.3,
                "strata_mass": strata_mass},
    })
    result = train(target, config, None, progress=False)
    assert len(seen) == len(solved) == 2
    for (x, fitted), (sol, (log_q, log_p, *_)), record in zip(seen, solved, result.history):
        labels = phi_sign_labels(target.topology, x)
        assert set(labels) == {0, 1}  # the untrained flow samples both φ halves
        masses = sol.log_weights
        if strata_mass == "holder":
            masses = holder_log_weights(masses, labels, log_q.double().numpy(), log_p.double().numpy(), sol.lam,
                                        sol.eta)
            assert not np.allclose(masses, sol.log_weights)  # an untrained flow's shapes are wrong
        expected = floored_log_weights(masses, labels, 0.3)
        np.testing.assert_array_equal(fitted, expected)
        assert min(np.exp(fitted[labels == s]).sum() for s in (0, 1)) >= 0.15 - 1e-12
        assert record["strata_tv"] == pytest.approx(0.5 * np.abs(np.exp(fitted) - np.exp(sol.log_weights)).sum())


def _buffer(rng, n=4000):
    """log q, log p̃ (n,) of a buffer and its labels (3 strata)."""
    log_q = rng.normal(scale=2.0, size=n)
    return log_q, log_q + rng.normal(scale=1.5, size=n), rng.choice(3, size=n, p=[0.7, 0.25, 0.05])


def test_holder_masses_are_the_bound_and_keep_each_stratum_shape():
    rng = np.random.default_rng(5)
    log_q, log_p, labels = _buffer(rng)
    sol = solve_dual(log_q, log_p, 0.5, 1e9)  # no entropy constraint: η = 0, γ = 1
    assert sol.eta == 0.0 and sol.lam > 0.0
    out = holder_log_weights(sol.log_weights, labels, log_q, log_p, sol.lam, sol.eta)
    assert logsumexp(out) == pytest.approx(0.0, abs=1e-12)
    a = sol.lam / (1 + sol.lam)
    bound = np.array([(labels == s).sum() ** a * np.exp(log_p - log_q)[labels == s].sum() ** (1 - a)
                      for s in range(3)])
    for s in range(3):
        inside = labels == s
        assert np.exp(out[inside]).sum() == pytest.approx(bound[s] / bound.sum(), rel=1e-9)
        np.testing.assert_allclose(out[inside] - sol.log_weights[inside], (out - sol.log_weights)[inside][0],
                                   atol=1e-10)  # the dual's shape inside the stratum, shifted
    # Hölder: Σ_S r^(1−a) ≤ N_S^a (Σ_S r)^(1−a), r = p̃ / q: the dual's unnormalised mass is at most the bound
    dual = np.array([np.exp((1 - a) * (log_p - log_q)[labels == s]).sum() for s in range(3)])
    assert np.all(dual <= bound * (1 + 1e-9)) and np.all(dual < 0.99 * bound)  # the shapes here are wrong


def _dual_log_weights(log_q, log_p, lam, eta):
    """The dual's normalised log w̄ at given multipliers (method.md)."""
    log_w = (log_p - (1 + eta) * log_q) / (1 + lam + eta)
    return log_w - logsumexp(log_w)


@pytest.mark.parametrize("lam, eta", [(0.7, 0.0), (0.7, 0.4), (3.0, 1.5)])
def test_holder_masses_equal_the_duals_where_the_flow_has_each_strata_shape(lam, eta):
    """p̃^γ / q constant inside each stratum (the flow's shape right, only the masses off): the bound is
    attained and the Hölder masses are the dual's."""
    rng = np.random.default_rng(6)
    log_q, _, labels = _buffer(rng)
    log_p = (1 + eta) * (log_q + np.array([0.0, 1.3, -2.0])[labels])
    log_w = _dual_log_weights(log_q, log_p, lam, eta)
    np.testing.assert_allclose(holder_log_weights(log_w, labels, log_q, log_p, lam, eta), log_w, atol=1e-9)


def test_holder_masses_raise_a_stratum_the_flow_has_not_shaped():
    """Stratum 1's p̃ / q spreads widely (its shape is wrong), stratum 0's is flat: the dual drains
    stratum 1 by the Hölder gap; its bound gives it more."""
    rng = np.random.default_rng(7)
    n = 4000
    labels = (rng.random(n) < 0.2).astype(int)
    log_q = rng.normal(size=n)
    log_p = log_q + np.where(labels == 1, rng.normal(scale=2.0, size=n), 0.0)
    sol = solve_dual(log_q, log_p, 0.5, 1e9)
    out = holder_log_weights(sol.log_weights, labels, log_q, log_p, sol.lam, sol.eta)
    assert np.exp(out[labels == 1]).sum() > 1.2 * np.exp(sol.log_weights[labels == 1]).sum()


def test_holder_masses_keep_weight_zero():
    rng = np.random.default_rng(8)
    log_q, log_p, labels = _buffer(rng, 500)
    log_p[:5] = -np.inf  # failed energies
    sol = solve_dual(log_q, log_p, 0.5, 1e9)
    out = holder_log_weights(sol.log_weights, labels, log_q, log_p, sol.lam, sol.eta)
    assert np.all(out[:5] == -np.inf) and np.all(np.isfinite(out[5:]))
    assert logsumexp(out) == pytest.approx(0.0, abs=1e-12)


def test_phi_sign_turn_labels_add_a_bit_per_turn_hydrogen_bond():
    from cmt_openmm.coordinates.backbone import turn_hydrogen_bonds

    target = get_target("ala4")
    pairs = turn_hydrogen_bonds(target.topology)
    x = np.repeat(np.asarray(target.positions)[None], 4, axis=0)
    for k, (o, h, _) in enumerate(pairs):  # configuration k + 1 forms turn k (and perhaps what the first forms)
        x[k + 1, h] = x[k + 1, o] + np.array([0.0, 0.0, 0.2])
    labels = phi_sign_turn_labels(target.topology, x)
    phi = phi_sign_labels(target.topology, x)
    np.testing.assert_array_equal(labels % 8, phi)  # 3 backbone φ: the low 3 bits
    turns = labels >> 3
    for k in range(len(pairs)):
        assert turns[k + 1] & (1 << k)
    assert len(np.unique(turns)) == 4
    np.testing.assert_array_equal(stratifier("phi-sign-turns", target.topology)(x), labels)


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


def test_phi_basin_strata_label_the_basin_and_floor_it_where_phi_sign_strata_do_not(tmp_path, monkeypatch):
    """ala4 (3 backbone φ): phi-basin labels agree bit by bit with mdtraj's φ in [0°, 120°), the
    reports' φ > 0 basin, so the β edge (120° ≤ φ < 180°) is not in it; and where the dual puts a
    φ ≥ 0 stratum's mass on the β edge, only phi-basin's floor gives the basin itself ≥ floor / K."""
    import mdtraj
    import torch

    from cmt_openmm.generator import BoltzmannGenerator

    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    target = get_target("ala4")
    x, _ = BoltzmannGenerator.build(target, n_layers=1, hidden=4).sample(2000, torch.Generator().manual_seed(0))
    labels = stratifier("phi-basin", target.topology)(x.numpy())
    _, phi = mdtraj.compute_phi(mdtraj.Trajectory(x.numpy(), mdtraj.Topology.from_openmm(target.topology)))
    in_basin = (phi >= 0) & (phi < 2 * np.pi / 3)
    assert np.array_equal(labels, (in_basin * (1 << np.arange(3))).sum(axis=1))
    assert np.array_equal(labels, phi_basin_labels(target.topology, x.numpy()))
    beta_edge = phi >= 2 * np.pi / 3
    assert beta_edge.any(axis=0).all()  # the untrained flow's φ are uniform: every residue has a β edge

    # the dual: the φ < 0 region and the β edge hold the weight, the basin samples nearly none
    log_w = np.where(in_basin.any(axis=1), -12.0, 0.0)
    floor, sign_labels = 0.1, phi_sign_labels(target.topology, x.numpy())
    for name, strata_labels in (("phi-basin", labels), ("phi-sign", sign_labels)):
        w = np.exp(floored_log_weights(log_w, strata_labels, floor))
        k = len(np.unique(strata_labels))
        basin_mass = [w[in_basin[:, j]].sum() for j in range(3)]
        if name == "phi-basin":
            assert min(basin_mass) >= floor / k * (1 - 1e-9)
        else:  # φ ≥ 0 strata meet their floor with β-edge samples and leave the basin thin
            assert max(basin_mass) < 0.1 * floor / k


def test_holder_turns_masses_per_turn_pattern_and_the_floor_over_the_phi_strata(monkeypatch, tmp_path):
    """strata_mass holder-turns on ala4: the fit's weights are the Hölder masses of each φ-basin stratum
    cut by its turn pattern, then the floor over the 2^3 φ strata alone (not over the finer labels)."""
    from cmt_openmm.training import train
    from cmt_openmm.training.strata import turn_pattern

    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    seen, solved = _spy_on_the_fit(monkeypatch)
    target = get_target("ala4")
    config = TrainConfig.from_dict({
        "method": "cmt", "seed": 0, "max_steps": 2, "flow": {"n_layers": 2, "hidden": 16},
        "cmt": {"n_samples": 600, "fit_steps": 2, "strata": "phi-basin", "strata_floor": 0.3,
                "strata_mass": "holder-turns"},
    })
    train(target, config, None, progress=False)
    assert len(seen) == len(solved) == 2
    for (x, fitted), (sol, (log_q, log_p, *_)) in zip(seen, solved):
        strata, turns = phi_basin_labels(target.topology, x), turn_pattern(target.topology, x)
        assert len(np.unique(turns)) > 1 and len(np.unique(strata)) == 8
        log_q, log_p = log_q.double().numpy(), log_p.double().numpy()
        masses = holder_log_weights(sol.log_weights, strata + (turns << 3), log_q, log_p, sol.lam, sol.eta)
        np.testing.assert_allclose(fitted, floored_log_weights(masses, strata, 0.3), atol=1e-12)
        assert min(np.exp(fitted[strata == s]).sum() for s in range(8)) >= 0.3 / 8 - 1e-12
        # the Hölder masses per turn pattern differ from those per φ stratum alone
        coarse = floored_log_weights(holder_log_weights(sol.log_weights, strata, log_q, log_p, sol.lam, sol.eta),
                                     strata, 0.3)
        assert not np.allclose(fitted, coarse)


def test_holder_turns_is_refused_where_the_strata_already_hold_the_turns():
    with pytest.raises(CMTInputError, match="phi-sign-turns already does"):
        TrainConfig.from_dict({"cmt": {"strata": "phi-sign-turns", "strata_mass": "holder-turns"}})
    with pytest.raises(CMTInputError, match="cmt.strata is none"):
        TrainConfig.from_dict({"cmt": {"strata_mass": "holder-turns"}})
