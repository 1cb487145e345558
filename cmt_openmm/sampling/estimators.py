"""Estimators on weighted samples: expectations with error bars, basin populations and free energies.

Weights are importance weights of generator samples (or uniform for MD frames). The error bars
are one standard error; how each is computed is stated where it is defined:

- ``"delta"``: linearisation of the self-normalised estimator, Var ≈ Σ w̄_i² φ_i² with φ_i the
  estimator's influence function (f_i − μ for a mean); independent samples.
- ``"bootstrap"``: the standard deviation over resamplings of the N samples with replacement;
  independent samples.
- ``"correlated"``: the delta-method variance times the statistical inefficiency g of the
  influence series in sample order (pymbar's ``timeseries.statistical_inefficiency``), for
  time-correlated frames such as MD or replica exchange; for unweighted frames this is the
  familiar sqrt(var · g / N).

An error bar is only as good as the effective number of samples behind it: below
`MIN_EFFECTIVE_SAMPLES` (Kish's N_eff = (Σw)² / Σw² = N · ESS, or N / g for a correlated series)
the errors themselves are unreliable (see `effective_samples`). Hand-written on NumPy: the
conventions for failed samples, empty bins and correlated errors are ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from ..coordinates.backbone import PHI_POSITIVE_BASIN
from ..errors import CMTInputError
from ..units import as_float64, wrap_angle

__all__ = [
    "ALDP_BASINS",
    "ALDP_HALVES",
    "PHI_POSITIVE",
    "Estimate",
    "FreeEnergyProfile",
    "FreeEnergySurface",
    "MIN_EFFECTIVE_SAMPLES",
    "aldp_basins",
    "as_weights",
    "basin_free_energies",
    "basin_indicators",
    "basin_populations",
    "binned_free_energy",
    "effective_samples",
    "statistical_inefficiency",
    "weighted_mean",
]

MIN_EFFECTIVE_SAMPLES = 100.0
"""Fewest effective samples (N · ESS for importance weights, N / g for a correlated series) at
which an estimate and its error bar count as reliable.

With fewer, a handful of samples carry the weight: the delta-method and bootstrap errors are
computed from those same few samples and are themselves unreliable (a tiny ESS can give
"0.0000 ± 0.0000" for a population that is not known to better than a few percent), and 1σ
delta-method intervals cover the truth far less often than 68 % until N_eff reaches a few
hundred (coverage figures: benchmarks/RESULTS.md). `LowESSWarning` and the report use this value."""


class Estimate(NamedTuple):
    """A value with its one-standard-error uncertainty (same shape, same unit)."""

    value: Any
    error: Any


def as_weights(weights: Any, n: int) -> np.ndarray:
    """Weights (n,) normalised to sum 1 (None: uniform), checked finite and non-negative."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w, total = _checked_weights(weights, n)
    return w / total


def _checked_weights(weights: Any, n: int) -> tuple[np.ndarray, float]:
    """Weights (n,) as given (not copied) and their sum, checked finite, non-negative and not all
    zero: ``w / total`` are the normalised weights, which a blockwise estimate divides a block at a time."""
    w = as_float64(weights).reshape(-1)
    if w.shape != (n,):
        raise CMTInputError(f"weights have shape {w.shape}, expected ({n},) (one per sample).")
    total = w.sum()
    if not np.isfinite(total) or w.min() < 0 or total <= 0:
        raise CMTInputError("weights must be finite, non-negative and not all zero.")
    return w, total


# Boxes in degrees: {name: ((phi_lo, phi_hi), (psi_lo, psi_hi))}, each interval [lo, hi) on the
# circle; lo > hi wraps through ±180°. The five named basins partition the torus.
_ALDP_BASINS_DEG = {
    "C5": ((120.0, -120.0), (30.0, -120.0)),  # β region (φ≈-155°, ψ≈160°), reaches across φ=±180°
    "C7eq": ((-120.0, 0.0), (30.0, -120.0)),  # φ≈-83°, ψ≈73°
    "alphaR": ((120.0, 0.0), (-120.0, 30.0)),  # φ≈-70°, ψ≈-40° (with the bridge region)
    "alphaL": ((0.0, 120.0), (-20.0, 150.0)),  # φ≈60°, ψ≈40°
    "C7ax": ((0.0, 120.0), (150.0, -20.0)),  # φ≈70°, ψ≈-70°
}
_ALDP_HALVES_DEG = {
    "phi<0": ((-180.0, 0.0), (-180.0, 180.0)),
    "phi>0": ((0.0, 180.0), (-180.0, 180.0)),
}

ALDP_BASINS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    name: tuple(tuple(math.radians(v) for v in interval) for interval in box)  # type: ignore[misc]
    for name, box in _ALDP_BASINS_DEG.items()
}
"""Alanine dipeptide basins as (φ, ψ) boxes in radians; intervals [lo, hi), lo > hi wraps.

C5, C7eq, αR (φ < 0 side, with φ ∈ [120°, 180°) counted as C5/αR) and αL, C7ax (φ ∈ [0°, 120°));
together they cover the whole torus. See `ALDP_HALVES` for the plain φ < 0 / φ > 0 split.
"""

ALDP_HALVES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    name: tuple(tuple(math.radians(v) for v in interval) for interval in box)  # type: ignore[misc]
    for name, box in _ALDP_HALVES_DEG.items()
}
"""The literal φ < 0 ([-180°, 0°)) and φ ≥ 0 ([0°, 180°)) halves, in radians."""


PHI_POSITIVE = {"phi>0": (PHI_POSITIVE_BASIN, (-math.pi, math.pi))}
"""The φ > 0 basin, αL ∪ C7ax: φ in :data:`~cmt_openmm.coordinates.backbone.PHI_POSITIVE_BASIN`
(0° ≤ φ < 120°), any ψ (radians; [lo, hi) intervals, ψ full circle)."""


def aldp_basins(include_halves: bool = False) -> dict[str, tuple[tuple[float, float], tuple[float, float]]]:
    """A copy of `ALDP_BASINS`, plus the `ALDP_HALVES` boxes when ``include_halves``."""
    return {**ALDP_BASINS, **(ALDP_HALVES if include_halves else {})}


def _in_interval(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Membership of angles in the circular interval [lo, hi); lo > hi wraps, lo == hi is the full circle."""
    a, lo, hi = wrap_angle(a), float(wrap_angle(lo)), float(wrap_angle(hi))
    return (a >= lo) & (a < hi) if lo < hi else (a >= lo) | (a < hi)


def basin_indicators(angles: Any, basins: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Boolean membership (B,) of (φ, ψ) angles (B, 2) in each named box."""
    a = as_float64(angles)
    if a.ndim == 3 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 2 or a.shape[1] != 2:
        raise CMTInputError(f"angles have shape {a.shape}, expected (B, 2) (φ, ψ of one backbone pair).")
    return {
        name: _in_interval(a[:, 0], *box[0]) & _in_interval(a[:, 1], *box[1]) for name, box in basins.items()
    }


def effective_samples(weights: Any = None, n: int | None = None) -> float:
    """Kish's effective number of samples (Σw)² / Σw² = N · ESS of weights (N,) (None: ``n``).

    For importance weights this is N times the normalised reverse ESS; for uniform weights N.
    For a correlated series divide by its `statistical_inefficiency`.
    """
    if weights is None:
        if n is None:
            raise CMTInputError("effective_samples needs weights or the number of samples n.")
        return float(n)
    w = as_weights(weights, np.asarray(weights).reshape(-1).shape[0])  # a new array: squared in place
    return float(1.0 / np.sum(np.square(w, out=w)))


def statistical_inefficiency(series: Any) -> float:
    """Statistical inefficiency g = 1 + 2τ ≥ 1 of a time series (N,), so that N / g samples are effective.

    pymbar's ``timeseries.statistical_inefficiency`` (integrated autocorrelation, summed until
    the autocorrelation function first goes negative; pymbar 4, whose import banners
    ``cmt_openmm/__init__.py`` drops). A constant series gives 1, and g is capped at N (one
    effective sample). Like every such estimate it is too small when the series is not much
    longer than its slowest relaxation (a basin visited a handful of times).
    """
    x = as_float64(series).reshape(-1)
    n = x.size
    if n < 2 or not np.all(np.isfinite(x)) or np.ptp(x) == 0:
        return 1.0
    from pymbar import timeseries
    from pymbar.utils import ParameterError

    try:
        g = float(timeseries.statistical_inefficiency(x))
    except ParameterError:  # zero sample variance after rounding: nothing is correlated
        return 1.0
    return float(min(max(g, 1.0), n))


def weighted_mean(
    values: Any, weights: Any = None, error: str = "delta", n_bootstrap: int = 200, seed: int = 0
) -> Estimate:
    """Self-normalised weighted mean of values (N, ...) with its standard error.

    ``error="delta"``: the delta-method (linearisation) standard error of the self-normalised
    estimator, sqrt(Σ w̄_i² (f_i - μ)²) — for unweighted samples this is the i.i.d. standard error.
    ``error="bootstrap"``: the standard deviation of the estimate over ``n_bootstrap``
    resamplings of the N samples with replacement (indices drawn with
    ``numpy.random.default_rng(seed)``). Both assume independent samples (generator draws).
    ``error="correlated"``: for a time series (MD frames in time order, usually unweighted):
    sqrt(g · Σ w̄_i² (f_i - μ)²), g the `statistical_inefficiency` (pymbar) of the series
    w̄_i (f_i - μ) per component; unweighted, sqrt(var · g / N) with var the population variance.
    """
    f = as_float64(values)
    n = f.shape[0]
    w = as_weights(weights, n)
    flat = f.reshape(n, -1)
    keep = w > 0
    if error == "correlated":  # keep every frame in place: the order is the time axis
        mean = w[keep] @ flat[keep]
        h = np.where(keep[:, None], flat - mean, 0.0) * w[:, None]
        g = np.array([statistical_inefficiency(h[:, j]) for j in range(h.shape[1])])
        err = np.sqrt(g * np.sum(h * h, axis=0))
        return _shaped(f, mean, err)
    flat, w = flat[keep], w[keep]
    mean = w @ flat
    if error == "delta":
        err = np.sqrt((w**2) @ (flat - mean) ** 2)
    elif error == "bootstrap":
        rng = np.random.default_rng(seed)
        reps = np.empty((n_bootstrap, flat.shape[1]))
        for r in range(n_bootstrap):
            cw = np.bincount(rng.integers(0, n, n), minlength=n)[keep] * w
            total = cw.sum()
            reps[r] = (cw @ flat) / total if total > 0 else np.nan
        reps = reps[np.all(np.isfinite(reps), axis=1)]
        err = reps.std(axis=0, ddof=1) if len(reps) > 1 else np.full_like(mean, np.nan)
    else:
        raise CMTInputError(f"error must be 'delta', 'bootstrap' or 'correlated', got {error!r}.")
    return _shaped(f, mean, err)


def _shaped(f: np.ndarray, mean: np.ndarray, err: np.ndarray) -> Estimate:
    shape = f.shape[1:]
    if shape == ():
        return Estimate(float(mean[0]), float(err[0]))
    return Estimate(mean.reshape(shape), err.reshape(shape))


def basin_populations(
    angles: Any,
    weights: Any = None,
    basins: Mapping[str, Any] | None = None,
    error: str = "delta",
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Weighted population of each basin, with its standard error (see `weighted_mean`).

    ``angles`` (B, 2) or (B, 1, 2) (φ, ψ), ``weights`` (B,) non-negative (None: uniform),
    ``basins`` a {name: ((φ_lo, φ_hi), (ψ_lo, ψ_hi))} mapping in radians (default `ALDP_BASINS`),
    ``error`` "delta", "bootstrap" (independent samples) or "correlated" (MD frames in time order).
    """
    basins = ALDP_BASINS if basins is None else basins
    if error == "delta":  # a block of samples at a time: bounded memory for any N
        a = _pair_angles(angles)
        w = _block_weights(weights, a.shape[0])
        p = _block_sum(a, w, lambda m, wb: wb @ m, basins)
        var = _block_sum(a, w, lambda m, wb: (wb * wb) @ (m - p) ** 2, basins)
        return {k: Estimate(float(p[i]), float(np.sqrt(var[i]))) for i, k in enumerate(basins)}
    indicators = basin_indicators(angles, basins)
    names = list(indicators)
    matrix = np.stack([indicators[k] for k in names], axis=1).astype(np.float64)
    est = weighted_mean(matrix, weights, error=error, n_bootstrap=n_bootstrap, seed=seed)
    return {k: Estimate(float(est.value[i]), float(est.error[i])) for i, k in enumerate(names)}


BLOCK_ROWS = 1 << 16
"""Samples per block where the delta-method basin estimates run through the samples in turn: a
few tens of MB of temporaries whatever N (they used to take ~200 bytes a sample)."""


def _pair_angles(angles: Any) -> np.ndarray:
    """(N, 2) (φ, ψ) of one backbone pair, a view of (N, 2) or (N, 1, 2) float64 angles."""
    a = as_float64(angles)
    a = a[:, 0] if a.ndim == 3 and a.shape[1] == 1 else a
    if a.ndim != 2 or a.shape[1] != 2:
        raise CMTInputError(f"angles have shape {a.shape}, expected (B, 2) (φ, ψ of one backbone pair).")
    return a


def _block_weights(weights: Any, n: int) -> tuple[np.ndarray | None, float]:
    """(weights as given, their sum) for `_block_sum` (None: uniform), checked as `as_weights` does."""
    return (None, float(n)) if weights is None else _checked_weights(weights, n)


def _block_sum(a: np.ndarray, w: tuple[np.ndarray | None, float], term, basins: Mapping[str, Any]) -> np.ndarray:
    """Σ over blocks of ``term(indicators, weights)``: indicators (b, n_basins) float64 of a block of
    angles ``a`` (N, 2) in ``basins``, weights (b,) the block's normalised weights (``w``: raw weights
    and their sum, from `_block_weights`); samples of weight 0 contribute nothing (as if left out)."""
    raw, norm = w
    total = None
    for start in range(0, len(a), BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        ind = basin_indicators(a[rows], basins)
        wb = np.full(len(a[rows]), 1.0 / norm) if raw is None else raw[rows] / norm
        part = term(np.stack(list(ind.values()), axis=1).astype(np.float64), wb)
        total = part if total is None else total + part
    return total


def basin_free_energies(
    angles: Any,
    weights: Any = None,
    basins: Mapping[str, Any] | None = None,
    kT: float = 1.0,
    reference: str | None = None,
    error: str = "delta",
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Free-energy differences ΔF_b = -kT ln(p_b / p_ref) of basins, with their standard errors.

    ``angles``, ``weights`` and ``basins`` as for `basin_populations`; ``kT`` in the unit wanted
    for the result (1.0: units of kT; ``target.kT``: kJ/mol); ``reference`` basin (default: the
    most populated). ΔF and its error come from the weights and indicators directly, so the
    (negative) covariance between the basins' populations is included:

    - ``"delta"``: Var(ΔF_b) ≈ kT² Σ w̄_i² φ_i² with the influence function
      φ_i = 1_b(x_i) / p_b − 1_ref(x_i) / p_ref (the normalising constant cancels in the ratio);
    - ``"correlated"``: the same times the statistical inefficiency of the series w̄_i φ_i (MD frames);
    - ``"bootstrap"``: the standard deviation of ΔF over resamplings; infinite when basin b is
      empty in some resampling (ΔF unbounded there).

    An empty basin gives ΔF = +inf with an infinite error; the reference gives Estimate(0, 0).
    """
    if error not in ("delta", "bootstrap", "correlated"):
        raise CMTInputError(f"error must be 'delta', 'bootstrap' or 'correlated', got {error!r}.")
    if error == "delta":
        return _delta_free_energies(_pair_angles(angles), weights, ALDP_BASINS if basins is None else basins, kT,
                                    reference)
    indicators = basin_indicators(angles, ALDP_BASINS if basins is None else basins)
    if not indicators:
        raise CMTInputError("basins is empty: name at least one (φ, ψ) box.")
    names = list(indicators)
    matrix = np.stack([indicators[k] for k in names], axis=1).astype(np.float64)
    n = matrix.shape[0]
    w = as_weights(weights, n)
    p = w @ matrix
    r, full = _reference_basin(names, p, reference)
    err = np.zeros(len(names))
    if full and error in ("delta", "correlated"):
        phi = matrix[:, full] / p[full] - matrix[:, [r]] / p[r]  # influence of ln p_b − ln p_ref
        err[full] = weighted_mean(phi, w, error=error).error
    elif full:
        rng = np.random.default_rng(seed)
        reps = np.empty((n_bootstrap, len(full)))
        for k in range(n_bootstrap):
            cw = np.bincount(rng.integers(0, n, n), minlength=n) * w
            pb = cw @ matrix
            with np.errstate(divide="ignore", invalid="ignore"):
                reps[k] = np.log(pb[r]) - np.log(pb[full])
        finite = np.isfinite(reps).all(axis=0) & (n_bootstrap > 1)  # a basin emptied by a resampling: unbounded
        err[full] = np.where(finite, np.where(finite, reps, 0.0).std(axis=0, ddof=min(1, n_bootstrap - 1)), np.inf)
    return _free_energies(names, p, r, err, kT)


def _reference_basin(names: list[str], p: np.ndarray, reference: str | None) -> tuple[int, list[int]]:
    """The reference basin's index (default: the most populated) and the other populated basins'."""
    r = int(np.argmax(p)) if reference is None else (names.index(reference) if reference in names else -1)
    if r < 0:
        raise CMTInputError(f"reference basin {reference!r} is not one of {sorted(names)}.")
    if p[r] <= 0:
        raise CMTInputError(f"reference basin {names[r]!r} is empty: choose a populated reference basin.")
    return r, [b for b in range(len(names)) if b != r and p[b] > 0]


def _delta_free_energies(a: np.ndarray, weights: Any, basins: Mapping[str, Any], kT: float,
                         reference: str | None) -> dict[str, Estimate]:
    """`basin_free_energies` with delta-method errors, a block of samples at a time (three passes:
    populations, the influence function's mean, its variance)."""
    if not basins:
        raise CMTInputError("basins is empty: name at least one (φ, ψ) box.")
    names = list(basins)
    w = _block_weights(weights, a.shape[0])
    p = _block_sum(a, w, lambda m, wb: wb @ m, basins)
    r, full = _reference_basin(names, p, reference)
    err = np.zeros(len(names))
    if full:
        # influence of ln p_b − ln p_ref, and its weighted mean and variance
        phi = lambda m: m[:, full] / p[full] - m[:, [r]] / p[r]  # noqa: E731
        mean = _block_sum(a, w, lambda m, wb: wb @ phi(m), basins)[: len(full)]
        var = _block_sum(a, w, lambda m, wb: (wb * wb) @ (phi(m) - mean) ** 2, basins)[: len(full)]
        err[full] = np.sqrt(var)
    return _free_energies(names, p, r, err, kT)


def _free_energies(names: list[str], p: np.ndarray, r: int, err: np.ndarray, kT: float) -> dict[str, Estimate]:
    out = {}
    for b, name in enumerate(names):
        if b == r:
            out[name] = Estimate(0.0, 0.0)
        elif p[b] <= 0:
            out[name] = Estimate(math.inf, math.inf)
        else:
            out[name] = Estimate(float(-kT * math.log(p[b] / p[r])), float(kT * err[b]))
    return out


# ---------------------------------------------------------------------------------------------
# Free energies along collective variables
# ---------------------------------------------------------------------------------------------


class _KilojoulesPerMole:
    """F and its error in kJ/mol from the kT-unit fields ``free_energy``, ``error`` and ``kT``."""

    free_energy: np.ndarray
    error: np.ndarray
    kT: float

    @property
    def free_energy_kjmol(self) -> np.ndarray:
        """F in kJ/mol."""
        return self.free_energy * self.kT

    @property
    def error_kjmol(self) -> np.ndarray:
        """Standard error of F in kJ/mol."""
        return self.error * self.kT


@dataclass
class FreeEnergyProfile(_KilojoulesPerMole):
    """F(s) = -kT ln ρ(s) along a CV, shifted so that its minimum is 0.

    ``edges`` (bins+1,) and ``centers`` (bins,) in the CV's unit; ``probabilities`` (bins,) the
    weighted bin probabilities (mass outside the range not included); ``free_energy`` and
    ``error`` (bins,) in kT (+inf / inf in empty bins; an infinite error also where a bootstrap
    resampling empties the bin, see `binned_free_energy`); ``kT`` in kJ/mol; ``error_method``.
    """

    edges: np.ndarray
    centers: np.ndarray
    probabilities: np.ndarray
    free_energy: np.ndarray
    error: np.ndarray
    kT: float
    error_method: str


@dataclass
class FreeEnergySurface(_KilojoulesPerMole):
    """F(s1, s2) = -kT ln ρ(s1, s2) on a 2-D grid, minimum 0; arrays (bins1, bins2), axis 0 = s1.

    ``edges`` is a pair of edge arrays; other fields as in `FreeEnergyProfile`.
    """

    edges: tuple[np.ndarray, np.ndarray]
    probabilities: np.ndarray
    free_energy: np.ndarray
    error: np.ndarray
    kT: float
    error_method: str


def binned_free_energy(index: np.ndarray, n_bins: int, volumes: np.ndarray, w: np.ndarray, error: str,
                       n_bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin probabilities p (n_bins,), F = −ln(p / volume) (kT, minimum 0) and its standard error.

    index: (N,) bin of each sample (n_bins: outside every bin); volumes: (n_bins,) bin sizes;
    w: (N,) normalised weights; error: "bootstrap" or "delta" (see ReweightedEnsemble). The error
    is that of −ln p_bin itself (the shift to minimum 0 is not included).

    Empty bins are unconstrained: F = +inf with an infinite error. With ``"bootstrap"`` a bin
    that is empty in any resampling also gets an infinite error: −ln p is +inf in that
    resampling, so the bootstrap distribution of F has no finite spread (dropping those
    resamplings would make the sparsest bins look the most precise). In practice bins holding
    fewer than about 5–10 samples (200 resamplings) are reported as unconstrained.
    """
    p = np.bincount(index, weights=w, minlength=n_bins + 1)[:n_bins]
    with np.errstate(divide="ignore"):
        f_raw = -np.log(p / volumes)
    if error == "delta":
        s_b = np.bincount(index, weights=w * w, minlength=n_bins + 1)[:n_bins]
        var_p = np.clip(s_b * (1 - 2 * p) + p * p * np.sum(w * w), 0.0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.where(p > 0, np.sqrt(var_p) / p, np.inf)
    elif error == "bootstrap":
        rng = np.random.default_rng(seed)
        n = len(w)
        reps = np.zeros((n_bootstrap, n_bins))
        for r in range(n_bootstrap):
            # a resampling's bins: the weights of the samples drawn, summed a block of draws at a time
            # (draws in blocks are the same stream as all at once; no N-long count array)
            total = 0.0
            for start in range(0, n, BLOCK_ROWS):
                drawn = rng.integers(0, n, min(BLOCK_ROWS, n - start))
                wd = w[drawn]
                reps[r] += np.bincount(index[drawn], weights=wd, minlength=n_bins + 1)[:n_bins]
                total += wd.sum()
            reps[r] /= max(total, 1e-300)
        constrained = (p > 0) & np.all(reps > 0, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            f_reps = -np.log(np.where(constrained, reps, 1.0) / volumes)
            sd = f_reps.std(axis=0, ddof=1) if n_bootstrap > 1 else np.full(n_bins, np.inf)
        err = np.where(constrained, sd, np.inf)
    else:
        raise CMTInputError(f"error must be 'bootstrap' or 'delta', got {error!r}.")
    shift = np.min(f_raw[np.isfinite(f_raw)]) if np.isfinite(f_raw).any() else 0.0
    return p, f_raw - shift, err
