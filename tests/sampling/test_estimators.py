"""Error bars are calibrated, not just tolerances: over repeated independent draws, about 68 % of
the 1σ intervals contain the truth.

Importance-weighted samples with a known truth, NumPy only: x ~ q = N(0.3, 1.3²) weighted
towards p = N(0, 1) (bounded weights, ESS ≈ 0.8). Basins are x intervals seen through the angle
φ = 2 arctan(x) (ψ = 0), so every population and ΔF is known exactly. With R = 400 repeats the
coverage of a calibrated 1σ interval is 0.68 ± 0.023, so the band 0.58–0.78 accepts it and
rejects error bars that are twice too large (coverage 0.95) or twice too small (0.38).
"""
import math

import numpy as np
import pytest

from cmt_openmm.sampling.estimators import (basin_free_energies, basin_populations, binned_free_energy,
                                            weighted_mean)

R, N = 400, 1000
LOW, HIGH = 0.58, 0.78

BASINS = {
    "neg": ((-math.pi, 0.0), (-math.pi, math.pi)),  # x < 0
    "low": ((0.0, math.pi / 2), (-math.pi, math.pi)),  # 0 ≤ x < 1
    "high": ((math.pi / 2, -math.pi), (-math.pi, math.pi)),  # x ≥ 1
}


def _Phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


TRUE_POPULATIONS = {"neg": 0.5, "low": _Phi(1.0) - 0.5, "high": 1.0 - _Phi(1.0)}
EDGES = np.linspace(-2.0, 2.0, 9)  # 8 bins of width 0.5 on x (each holds ≥ 40 samples per draw)
TRUE_BIN_F = -np.log(np.diff([_Phi(e) for e in EDGES]) / np.diff(EDGES))


def draw(rng, n=N, mu=0.3, s=1.3):
    """x (n,), normalised importance weights (n,) and angles (n, 2) of one independent draw."""
    x = rng.normal(mu, s, n)
    log_w = -0.5 * x**2 + 0.5 * ((x - mu) / s) ** 2
    w = np.exp(log_w - log_w.max())
    return x, w / w.sum(), np.stack([2.0 * np.arctan(x), np.zeros(n)], axis=1)


def coverage(values, errors, truth) -> np.ndarray:
    """Fraction of repeats whose 1σ interval contains the truth (per column)."""
    return np.mean(np.abs(np.asarray(values) - truth) <= np.asarray(errors), axis=0)


def assert_calibrated(values, errors, truth, what):
    c = np.atleast_1d(coverage(values, errors, truth))
    assert np.all((c >= LOW) & (c <= HIGH)), f"{what}: 1σ coverage {c} outside [{LOW}, {HIGH}]"


@pytest.fixture(scope="module")
def draws():
    rng = np.random.default_rng(2024)
    return [draw(rng) for _ in range(R)]


def test_weighted_mean_delta_and_bootstrap_intervals_cover_68_percent(draws):
    delta = [weighted_mean(np.stack([x, x**2], axis=1), w) for x, w, _ in draws]
    assert_calibrated([e.value for e in delta], [e.error for e in delta], [0.0, 1.0], "weighted_mean delta")
    boot = [weighted_mean(x, w, error="bootstrap", n_bootstrap=200, seed=k) for k, (x, w, _) in enumerate(draws)]
    assert_calibrated([e.value for e in boot], [e.error for e in boot], 0.0, "weighted_mean bootstrap")


def test_basin_population_and_free_energy_intervals_cover_68_percent(draws):
    names = list(BASINS)
    pops = [basin_populations(a, w, BASINS) for _, w, a in draws]
    assert_calibrated([[p[k].value for k in names] for p in pops], [[p[k].error for k in names] for p in pops],
                      [TRUE_POPULATIONS[k] for k in names], "basin populations")
    others = ["low", "high"]
    dF = [basin_free_energies(a, w, BASINS, reference="neg") for _, w, a in draws]
    truth = [-math.log(TRUE_POPULATIONS[k] / TRUE_POPULATIONS["neg"]) for k in others]
    assert_calibrated([[f[k].value for k in others] for f in dF], [[f[k].error for k in others] for f in dF],
                      truth, "basin ΔF")


@pytest.mark.parametrize("method", ["delta", "bootstrap"])
def test_free_energy_bin_intervals_cover_68_percent(draws, method):
    n_bins = len(EDGES) - 1
    values, errors = [], []
    for k, (x, w, _) in enumerate(draws):
        index = np.searchsorted(EDGES, x, side="right") - 1
        index[(x < EDGES[0]) | (x >= EDGES[-1])] = n_bins
        p, _, err = binned_free_energy(index, n_bins, np.diff(EDGES), w, method, 200, k)
        values.append(-np.log(p / np.diff(EDGES)))  # the error is that of −ln(p / volume), before the shift
        errors.append(err)
    assert np.all(np.isfinite(errors))  # every bin is well populated here
    assert_calibrated(values, errors, TRUE_BIN_F, f"free-energy bins ({method})")


def test_correlated_intervals_cover_68_percent():
    """AR(1) series (ρ = 0.9, N = 2000): the statistical-inefficiency error covers the true mean 0."""
    rng = np.random.default_rng(7)
    rho, n = 0.9, 2000
    e = rng.normal(size=(n, 300))
    x = np.empty_like(e)
    x[0] = e[0] / math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + e[t]
    est = [weighted_mean(x[:, j], error="correlated") for j in range(x.shape[1])]
    assert_calibrated([v.value for v in est], [v.error for v in est], 0.0, "correlated weighted_mean")


def test_sparse_free_energy_bins_are_unconstrained():
    """A bin that some bootstrap resampling leaves empty has F = +inf there: its error is infinite,
    never the spread of the resamplings that happened to hit it."""
    rng = np.random.default_rng(3)
    n, n_bins = 2000, 3
    index = rng.integers(0, 2, n)  # bins 0 and 1 well populated
    index[:3] = 2  # bin 2: three samples
    w = np.full(n, 1.0 / n)
    volumes = np.ones(n_bins)
    p, f, err = binned_free_energy(index, n_bins, volumes, w, "bootstrap", 200, 0)
    assert p[2] == pytest.approx(3 / n) and np.isfinite(f[2])
    assert np.all(np.isfinite(err[:2])) and err[2] == np.inf
    # an empty bin: F = +inf, error inf, with either method
    index[:3] = 0
    for method in ("bootstrap", "delta"):
        p, f, err = binned_free_energy(index, n_bins, volumes, w, method, 50, 0)
        assert p[2] == 0.0 and f[2] == np.inf and err[2] == np.inf
    # a bin holding many samples stays finite and agrees with the delta method
    index[:300] = 2
    _, _, boot = binned_free_energy(index, n_bins, volumes, w, "bootstrap", 200, 0)
    _, _, delta = binned_free_energy(index, n_bins, volumes, w, "delta", 0, 0)
    np.testing.assert_allclose(boot, delta, rtol=0.2)


# -- bounded memory (issue 25): blockwise estimates equal the whole-array ones ----------------------


def _angles_and_weights(n, seed=0):
    rng = np.random.default_rng(seed)
    a = np.stack([rng.vonmises(-1.4, 1.0, n), rng.vonmises(1.0, 0.8, n)], axis=1)[:, None, :]
    w = np.exp(rng.normal(0, 1.5, n))
    w[rng.random(n) < 0.05] = 0.0
    return a, w


def test_blockwise_delta_basin_estimates_equal_the_whole_matrix_formulas(monkeypatch):
    """The delta-method populations and free energies run a block of samples at a time (issue 25:
    no N x n_basins float matrices); with blocks of 97 samples they equal the previous
    implementation's whole-matrix formulas (weighted_mean on the indicator matrix) to rounding."""
    from cmt_openmm.sampling import estimators as est

    monkeypatch.setattr(est, "BLOCK_ROWS", 97)
    a, w = _angles_and_weights(5000)
    ind = est.basin_indicators(a, est.ALDP_BASINS)
    names = list(ind)
    matrix = np.stack([ind[k] for k in names], axis=1).astype(np.float64)
    whole = est.weighted_mean(matrix, w, error="delta")
    pops = est.basin_populations(a, w, error="delta")
    np.testing.assert_allclose([pops[k].value for k in names], whole.value, rtol=1e-12, atol=0)
    np.testing.assert_allclose([pops[k].error for k in names], whole.error, rtol=1e-12, atol=0)
    wn = w / w.sum()
    p = wn @ matrix
    r = int(np.argmax(p))
    full = [b for b in range(len(names)) if b != r and p[b] > 0]
    phi = matrix[:, full] / p[full] - matrix[:, [r]] / p[r]
    err = est.weighted_mean(phi, wn, error="delta").error
    dF = est.basin_free_energies(a, w, kT=2.0, error="delta")
    for j, b in enumerate(full):
        assert dF[names[b]].value == pytest.approx(-2.0 * np.log(p[b] / p[r]), rel=1e-12)
        assert dF[names[b]].error == pytest.approx(2.0 * err[j], rel=1e-12)
    assert dF[names[r]] == (0.0, 0.0)


def test_in_place_reverse_ess_and_weights_equal_the_previous_formulas_exactly():
    """reverse_ess and normalized_weights work in place (one N-float array, issue 25) and give the
    previous formulas' values bit for bit, ties and clipping included."""
    import math

    from cmt_openmm.importance import normalized_weights, reverse_ess

    def previous_ess(lw, clip):
        lw = np.array(lw, dtype=float)
        n = lw.size
        k = min(int(math.floor(clip * n)), n - 1)
        if k > 0:
            order = np.argsort(lw)
            lw[order[n - k:]] = lw[order[n - 1 - k]]
        top = lw.max()
        w = np.exp(lw - top)
        return float(w.sum() ** 2 / (n * np.sum(w * w)))

    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(2, 20000))
        lw = rng.normal(0, rng.uniform(0.1, 6), n)
        lw[rng.random(n) < 0.02] = -np.inf
        lw = np.round(lw, 1) if trial % 2 else lw  # ties at the clipping threshold
        for clip in (0.0, 1e-4, 1e-2, 0.3):
            assert reverse_ess(lw, clip) == previous_ess(lw, clip)
        np.testing.assert_array_equal(normalized_weights(lw), np.exp(lw - lw.max()) / np.exp(lw - lw.max()).sum())


def test_free_energy_surface_and_profile_in_blocks_equal_the_previous_implementation(monkeypatch):
    """Bins in blocks and the bootstrap drawn a block of draws at a time (no N-long copies, issue
    25): probabilities and F are the previous implementation's exactly, bootstrap errors to rounding."""
    from cmt_openmm.sampling import estimators as est
    from cmt_openmm.sampling import reweighting as rw
    from cmt_openmm.systems import get_target

    monkeypatch.setattr(est, "BLOCK_ROWS", 101)
    monkeypatch.setattr(rw, "ROWS_PER_BLOCK", 89)
    a, _ = _angles_and_weights(3000, seed=2)
    rng = np.random.default_rng(3)
    target = get_target("toy-double-well")
    ens = rw.ReweightedEnsemble.weights_only(target, rng.normal(0, 1.5, 3000))
    w = ens.weights
    s = a[:, 0]
    edges = np.linspace(-np.pi, np.pi, 31)
    # the previous implementation: one index array over all samples, an N-long count array per resampling
    i = [np.clip(np.searchsorted(edges, s[:, k], side="right") - 1, 0, 29) for k in (0, 1)]
    index = i[0] * 30 + i[1]
    gen = np.random.default_rng(7)
    reps = np.empty((20, 900))
    for r in range(20):
        cw = np.bincount(gen.integers(0, 3000, 3000), minlength=3000) * w
        reps[r] = np.bincount(index, weights=cw, minlength=901)[:900] / cw.sum()
    p = np.bincount(index, weights=w, minlength=901)[:900]
    constrained = (p > 0) & np.all(reps > 0, axis=0)
    vol = np.outer(np.diff(edges), np.diff(edges)).ravel()
    err = np.where(constrained, (-np.log(np.where(constrained, reps, 1.0) / vol)).std(axis=0, ddof=1), np.inf)
    fes = ens.free_energy_surface(s, bins=30, range=[(-np.pi, np.pi)] * 2, n_bootstrap=20, seed=7)
    np.testing.assert_array_equal(fes.probabilities.ravel(), p)
    np.testing.assert_array_equal(np.isinf(fes.error.ravel()), np.isinf(err))
    np.testing.assert_allclose(fes.error.ravel()[constrained], err[constrained], rtol=1e-9)
    assert constrained.sum() > 100
    prof = ens.free_energy_profile(s[:, 0], bins=30, range=(-np.pi, np.pi), error="delta")
    np.testing.assert_array_equal(prof.probabilities, np.bincount(i[0], weights=w, minlength=30))
