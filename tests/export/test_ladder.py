"""Lambda ladders of equal exchange acceptance (export/ladder.py) on exactly known families."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cmt_openmm.export.ladder import (
    AcceptanceModel,
    equal_acceptance_ladder,
    estimate_acceptance,
    round_trips,
)


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


def test_ladder_estimates_match_a_normal_family_too():
    # w ~ N(-λ σ², σ²) at λ: the exact acceptance of (a, b) is erfc(σ (b - a) / 2)
    sigma, rng = 8.0, np.random.default_rng(1)
    pilot = np.linspace(0.0, 1.0, 4)
    w = np.concatenate([rng.normal(-lam * sigma**2, sigma, 500) for lam in pilot])
    model = AcceptanceModel(pilot, w, np.repeat(np.arange(4), 500))
    lambdas, estimated = equal_acceptance_ladder(model, 5)
    np.testing.assert_allclose(np.diff(lambdas), 0.25, atol=0.03)
    np.testing.assert_allclose(estimated, stats.norm.sf(sigma * 0.25 / np.sqrt(2)) * 2, atol=0.04)
