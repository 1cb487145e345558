"""Estimators on weighted samples: expectations with error bars, basin populations and free energies.

Weights are importance weights of generator samples (or uniform for MD frames). The error bars
are one standard error; how each is computed is stated where it is defined. Hand-written on
NumPy: the conventions for failed samples, empty bins and correlated errors are ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from ..errors import CMTInputError
from ..units import as_float64, wrap_angle

__all__ = [
    "ALDP_BASINS",
    "ALDP_HALVES",
    "PHI_POSITIVE",
    "Estimate",
    "FreeEnergyProfile",
    "FreeEnergySurface",
    "aldp_basins",
    "as_weights",
    "basin_free_energies",
    "basin_indicators",
    "basin_populations",
    "binned_free_energy",
    "weighted_mean",
]


class Estimate(NamedTuple):
    """A value with its one-standard-error uncertainty (same shape, same unit)."""

    value: Any
    error: Any


def as_weights(weights: Any, n: int) -> np.ndarray:
    """Weights (n,) normalised to sum 1 (None: uniform), checked finite and non-negative."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = as_float64(weights).reshape(-1)
    if w.shape != (n,):
        raise CMTInputError(f"weights have shape {w.shape}, expected ({n},) (one per sample).")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise CMTInputError("weights must be finite, non-negative and not all zero.")
    return w / w.sum()


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


PHI_POSITIVE = {"phi>0": ((0.0, 2.0 * math.pi / 3.0), (-math.pi, math.pi))}
"""The ALDP φ > 0 basin, αL ∪ C7ax: 0° ≤ φ < 120°, any ψ (radians; [lo, hi) intervals, ψ full
circle). φ ∈ [120°, 180°) belongs to the C5/β region that reaches across φ = ±180°."""


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


def weighted_mean(
    values: Any, weights: Any = None, error: str = "delta", n_bootstrap: int = 200, seed: int = 0
) -> Estimate:
    """Self-normalised weighted mean of values (N, ...) with its standard error.

    ``error="delta"``: the delta-method (linearisation) standard error of the self-normalised
    estimator, sqrt(Σ w̄_i² (f_i - μ)²) — for unweighted samples this is the i.i.d. standard error
    (no autocorrelation correction: thin correlated MD frames first). ``error="bootstrap"``: the
    standard deviation of the estimate over ``n_bootstrap`` resamplings of the N samples with
    replacement (indices drawn with ``numpy.random.default_rng(seed)``).
    """
    f = as_float64(values)
    n = f.shape[0]
    w = as_weights(weights, n)
    flat = f.reshape(n, -1)
    keep = w > 0
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
        raise CMTInputError(f"error must be 'delta' or 'bootstrap', got {error!r}.")
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
    ``basins`` a {name: ((φ_lo, φ_hi), (ψ_lo, ψ_hi))} mapping in radians (default `ALDP_BASINS`).
    """
    indicators = basin_indicators(angles, ALDP_BASINS if basins is None else basins)
    names = list(indicators)
    matrix = np.stack([indicators[k] for k in names], axis=1).astype(np.float64)
    est = weighted_mean(matrix, weights, error=error, n_bootstrap=n_bootstrap, seed=seed)
    return {k: Estimate(float(est.value[i]), float(est.error[i])) for i, k in enumerate(names)}


def basin_free_energies(
    populations: Mapping[str, Estimate], kT: float = 1.0, reference: str | None = None
) -> dict[str, Estimate]:
    """Free-energy differences ΔF_b = -kT ln(p_b / p_ref) with delta-method errors.

    ``populations`` as returned by `basin_populations`; ``kT`` in the unit wanted for the result
    (1.0: units of kT; ``target.kT``: kJ/mol); ``reference`` basin (default: the most populated).
    Error: kT·sqrt((σ_b/p_b)² + (σ_ref/p_ref)²), covariance neglected (it is 0 for b = ref). An
    empty basin gives ΔF = +inf with an infinite error.
    """
    if not populations:
        raise CMTInputError("populations is empty: pass the output of basin_populations.")
    ref = max(populations, key=lambda k: populations[k][0]) if reference is None else reference
    if ref not in populations:
        raise CMTInputError(f"reference basin {ref!r} is not one of {sorted(populations)}.")
    p_ref, s_ref = populations[ref]
    if p_ref <= 0:
        raise CMTInputError(f"reference basin {ref!r} is empty: choose a populated reference basin.")
    out = {}
    for name, (p, s) in populations.items():
        if name == ref:
            out[name] = Estimate(0.0, 0.0)
        elif p <= 0:
            out[name] = Estimate(math.inf, math.inf)
        else:
            out[name] = Estimate(-kT * math.log(p / p_ref), kT * math.hypot(s / p, s_ref / p_ref))
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
    ``error`` (bins,) in kT (+inf / inf in empty bins); ``kT`` in kJ/mol; ``error_method``.
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
    w: (N,) normalised weights; error: "bootstrap" or "delta" (see ReweightedEnsemble).
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
        reps = np.empty((n_bootstrap, n_bins))
        for r in range(n_bootstrap):
            cw = np.bincount(rng.integers(0, n, n), minlength=n) * w
            reps[r] = np.bincount(index, weights=cw, minlength=n_bins + 1)[:n_bins] / max(cw.sum(), 1e-300)
        with np.errstate(divide="ignore"):
            f_reps = -np.log(reps / volumes)
        finite = np.isfinite(f_reps)
        count = finite.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(finite, f_reps, 0.0).sum(axis=0) / count
            sq = np.where(finite, (f_reps - mean) ** 2, 0.0).sum(axis=0)
            err = np.where(count > 1, np.sqrt(sq / (count - 1)), np.inf)
        err = np.where(p > 0, err, np.inf)
    else:
        raise CMTInputError(f"error must be 'bootstrap' or 'delta', got {error!r}.")
    shift = np.min(f_raw[np.isfinite(f_raw)]) if np.isfinite(f_raw).any() else 0.0
    return p, f_raw - shift, err
