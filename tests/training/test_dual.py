"""The CMT dual against brute force on synthetic Gaussian buffers (docs/method.md, "Finding λ, η": its checks)."""
import math

import numpy as np
import pytest
import torch

from cmt_openmm.errors import CMTInputError
from cmt_openmm.training.dual import dual_objective, solve_dual


def _buffer(n, dim, mu, sigma, seed=0):
    """x ~ q = N(0, I_dim); log q exact; log p̃ of N(mu, sigma² I) without its normaliser."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    log_q = -0.5 * np.sum(x**2, axis=1) - 0.5 * dim * math.log(2 * math.pi)
    log_p = -0.5 * np.sum((x - mu) ** 2, axis=1) / sigma**2 + 7.0  # arbitrary constant
    return log_q, log_p


CASES = {
    # name: (mu, sigma, eps_tr, eps_ent, trust active, entropy active)
    "both": ((3.0, 0.0), 0.2, 0.5, 0.3, True, True),
    "trust-only": ((4.0, 0.0), 1.0, 0.5, 1.0, True, False),
    "entropy-only": ((0.0, 0.0), 0.5, 5.0, 0.1, False, True),
    "none": ((0.1, 0.0), 1.0, 0.5, 1.0, False, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dual_matches_grid_search(name):
    mu, sigma, eps_tr, eps_ent, trust, entropy = CASES[name]
    log_q, log_p = _buffer(3000, 2, np.array(mu), sigma)
    sol = solve_dual(log_q, log_p, eps_tr, eps_ent)
    assert sol.trust_active is trust and sol.entropy_active is entropy
    assert sol.target_reached is (not trust and not entropy)

    g_best = dual_objective(log_q, log_p, sol.lam, sol.eta, eps_tr, eps_ent)
    # Brute force: a coarse grid around the solution and out to far values, boundaries included.
    axis = lambda c: np.unique(np.concatenate([[0.0], np.linspace(0, 3 * c + 1, 25), np.geomspace(1e-3, 1e3, 25)]))
    grid = [(l, e) for l in axis(sol.lam) for e in axis(sol.eta)]
    g_grid = np.array([dual_objective(log_q, log_p, l, e, eps_tr, eps_ent) for l, e in grid])
    assert g_best >= g_grid.max() - 1e-9
    # The grid's best point approaches the solution (g is concave, its maximiser unique here).
    lam_g, eta_g = grid[int(np.argmax(g_grid))]
    step = lambda c: (3 * c + 1) / 24
    assert abs(lam_g - sol.lam) <= step(sol.lam) + 1e-9
    assert abs(eta_g - sol.eta) <= step(sol.eta) + 1e-9


@pytest.mark.parametrize("name", sorted(CASES))
def test_active_constraints_hold_exactly(name):
    mu, sigma, eps_tr, eps_ent, _, _ = CASES[name]
    log_q, log_p = _buffer(3000, 2, np.array(mu), sigma, seed=1)
    sol = solve_dual(log_q, log_p, eps_tr, eps_ent)
    if sol.trust_active:
        assert sol.kl == pytest.approx(eps_tr, abs=1e-8)
    else:
        assert sol.kl <= eps_tr + 1e-12
    if sol.entropy_active:
        assert sol.entropy_drop == pytest.approx(eps_ent, abs=1e-8)
    else:
        assert sol.entropy_drop <= eps_ent + 1e-12
    # Weights are normalised; entropy estimate is that of q_i.
    assert np.exp(sol.log_weights).sum() == pytest.approx(1.0, abs=1e-12)
    assert sol.entropy == pytest.approx(-log_q.mean())


def test_weights_match_the_geometric_mixture():
    log_q, log_p = _buffer(2000, 2, np.array([3.0, 0.0]), 0.2)
    sol = solve_dual(log_q, log_p, 0.5, 0.3)
    s = 1.0 + sol.lam + sol.eta
    log_next = (sol.lam * log_q + log_p) / s  # log q_{i+1} up to a constant
    expected = log_next - log_q
    expected -= np.logaddexp.reduce(expected)
    np.testing.assert_allclose(sol.log_weights, expected, atol=1e-10)


@pytest.mark.parametrize("eps_tr", [0.1, 0.5])
def test_ess_between_steps(eps_tr):
    """ESS ≈ exp(−2 KL) for log-normal weights; docs/method.md quotes ≳ 1/(1+2 ε_tr)."""
    log_q, log_p = _buffer(20000, 2, np.array([5.0, 0.0]), 1.0, seed=2)
    sol = solve_dual(log_q, log_p, eps_tr, 10.0)
    assert sol.trust_active and not sol.entropy_active
    assert sol.ess == pytest.approx(math.exp(-2 * eps_tr), rel=0.1)
    assert sol.ess >= 0.7 / (1 + 2 * eps_tr)


def test_failed_energies_get_zero_weight_and_torch_inputs():
    log_q, log_p = _buffer(2000, 2, np.array([3.0, 0.0]), 1.0)
    log_p[::10] = -np.inf
    sol = solve_dual(torch.from_numpy(log_q), torch.from_numpy(log_p), 0.5, 1.0)
    assert np.all(np.isneginf(sol.log_weights[::10]))
    assert np.isfinite(sol.log_weights[1::10]).all()
    assert sol.kl == pytest.approx(0.5, abs=1e-8)
    assert np.isfinite([sol.kl, sol.entropy_drop, sol.ess]).all()


def test_target_already_reached():
    log_q, _ = _buffer(500, 2, np.zeros(2), 1.0)
    sol = solve_dual(log_q, log_q + 3.0, 0.5, 1.0)  # p̃ ∝ q_i
    assert sol.target_reached
    assert sol.kl == pytest.approx(0.0, abs=1e-12) and sol.ess == pytest.approx(1.0)


@pytest.mark.parametrize(
    "log_q, log_p, eps",
    [
        ([0.0, 1.0], [0.0], (0.5, 1.0)),
        ([0.0, np.nan], [0.0, 0.0], (0.5, 1.0)),
        ([0.0, 0.0], [-np.inf, -np.inf], (0.5, 1.0)),
        ([0.0, 0.0], [0.0, np.nan], (0.5, 1.0)),
        ([0.0, 0.0], [0.0, 0.0], (0.0, 1.0)),
        ([], [], (0.5, 1.0)),
    ],
)
def test_bad_inputs_refused(log_q, log_p, eps):
    with pytest.raises(CMTInputError):
        solve_dual(np.array(log_q), np.array(log_p), *eps)


@pytest.mark.parametrize("guess", [1e-12, 1e-3, 1.0, 2.9e4, 3.1e4, 1e9, 1e12])
def test_the_root_is_found_from_any_starting_guess(guess):
    """A decreasing slack with its root at 3e4: the same root from guesses far below, near and
    far above it; a guess near the root finds it in a few evaluations (what the warm start relies on)."""
    from cmt_openmm.training.dual import _decreasing_root

    calls = []

    def f(lam):
        calls.append(lam)
        return 1.0 - lam / 3e4

    assert _decreasing_root(f, guess) == pytest.approx(3e4, rel=1e-12)
    assert all(c >= 0 for c in calls)
    assert len(calls) <= (6 if 2.9e4 <= guess <= 3.1e4 else 40)


def test_no_root_below_the_limit_gives_the_limit_and_a_root_near_zero_is_found():
    from cmt_openmm.training.dual import _MAX_MULTIPLIER, _decreasing_root

    assert _decreasing_root(lambda lam: 1.0, 5.0) == _MAX_MULTIPLIER
    assert _decreasing_root(lambda lam: 1e-6 - lam, 100.0) == pytest.approx(1e-6, rel=1e-6)
    assert _decreasing_root(lambda lam: 1e-6 - lam, 1e-12) == pytest.approx(1e-6, rel=1e-6)


def test_a_solve_with_both_constraints_active_needs_few_inner_evaluations(monkeypatch):
    """The inner λ*(η) solves start from the previous one's root: a solve with both constraints
    active takes well under the ~250 evaluations that bracketing each from 1 took."""
    from cmt_openmm.training import dual

    log_q, log_p = _buffer(4000, 60, 3.0, 0.05, seed=3)
    calls = [0]
    moments = dual._Buffer.moments

    def counted(self, lam, eta):
        calls[0] += 1
        return moments(self, lam, eta)

    monkeypatch.setattr(dual._Buffer, "moments", counted)
    sol = solve_dual(log_q, log_p, 0.5, 0.3)
    assert sol.trust_active and sol.entropy_active and sol.lam > 100
    assert calls[0] < 200  # 312 when each inner solve bracketed from 1
