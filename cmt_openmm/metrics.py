"""Evaluation metrics of the Boltzmann-generator lineage: ESS, EUBO, Ramachandran histograms, basins.

Definitions follow ``docs/method.md`` (Metrics). All functions take NumPy arrays or torch
tensors and return NumPy values (float64); log-weights are ``log w = log p̃(x) - log q(x)``
with ``log p̃ = -u`` the raw reduced energy (``-inf`` marks a failed evaluation, i.e. weight 0).

Hand-written on NumPy because every estimator here is a few lines and the conventions (how
weights are clipped, which KL direction, how empty bins are treated, where angles wrap) must be
exactly the ones this project documents; the Ramachandran angles themselves agree with
``mdtraj.compute_phi`` / ``compute_psi`` (tested).

Example:
    >>> import numpy as np
    >>> float(reverse_ess(np.zeros(10)))
    1.0
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from cmt_openmm.errors import CMTInputError

__all__ = [
    "Estimate",
    "reverse_ess",
    "forward_ess",
    "eubo",
    "backbone_dihedrals",
    "ramachandran_angles",
    "ramachandran_histogram",
    "ramachandran_tv",
    "histogram_tv",
    "histogram_kl",
    "ALDP_BASINS",
    "ALDP_HALVES",
    "aldp_basins",
    "basin_populations",
    "basin_free_energies",
    "weighted_mean",
]

KL_EPSILON = 1e-10
"""Added to every bin of both histograms (then renormalised) before a KL divergence."""


class Estimate(NamedTuple):
    """A value with its one-standard-error uncertainty (same shape, same unit)."""

    value: Any
    error: Any


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _log_weights(log_w: Any, name: str = "log_w") -> np.ndarray:
    lw = _as_numpy(log_w).reshape(-1)
    if lw.size == 0:
        raise CMTInputError(f"{name} is empty: pass at least one log-weight.")
    if np.isnan(lw).any():
        raise CMTInputError(f"{name} contains NaN: mark failed samples with -inf (weight 0), not NaN.")
    return lw


def normalized_weights(log_w: Any) -> np.ndarray:
    """Self-normalised weights w̄ = softmax(log w) (N,); all-zero when no weight is positive.

    A +inf log-weight (q = 0 where p̃ > 0) gets all the mass, shared among such samples.
    """
    lw = _log_weights(log_w)
    if np.isposinf(lw).any():
        w = np.isposinf(lw).astype(np.float64)
        return w / w.sum()
    top = lw.max()
    if not np.isfinite(top):
        return np.zeros_like(lw)
    w = np.exp(lw - top)
    return w / w.sum()


def reverse_ess(log_w: Any, clip_fraction: float = 0.0) -> float:
    """Normalised reverse effective sample size (Σw)² / (N Σw²) ∈ [0, 1] of N flow samples.

    ``log_w`` (N,): log p̃(x) - log q(x) for x ~ q; -inf (failed energy, flipped chirality) counts
    as weight 0 but still counts in N. ``clip_fraction`` ∈ [0, 1]: the k = floor(clip_fraction·N)
    largest log-weights are set to the value of the (k+1)-th largest before computing the ESS
    (as TA-BG reports it, e.g. clip_fraction=1e-4). Returns 0.0 when no weight is positive.
    """
    if not 0.0 <= clip_fraction <= 1.0:
        raise CMTInputError(f"clip_fraction must lie in [0, 1], got {clip_fraction}.")
    lw = _log_weights(log_w).copy()
    n = lw.size
    k = min(int(math.floor(clip_fraction * n)), n - 1)
    if k > 0:
        order = np.argsort(lw)
        threshold = lw[order[n - 1 - k]]
        lw[order[n - k:]] = threshold
    if np.isposinf(lw).any():
        return float(np.isposinf(lw).sum() / n)
    top = lw.max()
    if not np.isfinite(top):
        return 0.0
    w = np.exp(lw - top)
    return float(w.sum() ** 2 / (n * np.sum(w * w)))


def forward_ess(log_w_ref: Any) -> float:
    """Normalised forward ESS estimated on N reference samples x_i ~ p (e.g. MD), in [0, 1].

    Estimator (FAB lineage): ESS = 1 / ( (1/N) Σ_i w_i · (1/N) Σ_i 1/w_i ) with
    w_i = p̃(x_i) / q(x_i). It is consistent for the reverse ESS (E_q w)² / E_q w² because
    E_q w² = Z·E_p w and Z = 1 / E_p[1/w]. A reference sample the flow cannot produce
    (log w = +inf) or with a failed energy (log w = -inf) gives 0.
    """
    lw = _log_weights(log_w_ref, "log_w_ref")
    if not np.all(np.isfinite(lw)):
        return 0.0
    n = lw.size
    log_mean_w = np.logaddexp.reduce(lw) - math.log(n)
    log_mean_inv_w = np.logaddexp.reduce(-lw) - math.log(n)
    return float(min(1.0, math.exp(-(log_mean_w + log_mean_inv_w))))


def eubo(log_p_ref: Any, log_q_ref: Any) -> float:
    """Evidence upper bound E_p[log p̃(x) - log q(x)] on reference samples (lower is better).

    ``log_p_ref`` = -u (unnormalised, reduced) and ``log_q_ref`` = the generator's Cartesian log
    density, both (N,). Only comparable within one density convention; +inf when the flow
    gives a reference sample zero density.
    """
    lp, lq = _as_numpy(log_p_ref).reshape(-1), _as_numpy(log_q_ref).reshape(-1)
    if lp.shape != lq.shape or lp.size == 0:
        raise CMTInputError(f"log_p_ref {lp.shape} and log_q_ref {lq.shape} must be non-empty and of equal length.")
    if np.isnan(lp).any() or np.isnan(lq).any():
        raise CMTInputError("log_p_ref or log_q_ref contains NaN: mark failures with -inf.")
    with np.errstate(invalid="ignore"):
        d = lp - lq
    if np.isnan(d).any():  # -inf - (-inf): a sample neither density supports
        return math.inf
    return float(d.mean())


# ---------------------------------------------------------------------------------------------
# Ramachandran angles
# ---------------------------------------------------------------------------------------------


def backbone_dihedrals(topology: Any) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """Backbone (φ, ψ) atom quadruples of every residue that has both, in chain order.

    φ_i = C(i-1)-N(i)-CA(i)-C(i) and ψ_i = N(i)-CA(i)-C(i)-N(i+1), found from atom names
    (``N``, ``CA``, ``C``) of consecutive residues of one chain; when the topology has bonds,
    the peptide bonds C(i-1)-N(i) and C(i)-N(i+1) must be among them. Caps (ACE, NME) supply
    the outer C / N, so alanine dipeptide gives one pair. Accepts an `openmm.app.Topology` or
    an `mdtraj.Topology`.
    """
    if hasattr(topology, "to_openmm"):  # mdtraj.Topology
        topology = topology.to_openmm()
    bonds = {frozenset((a.index, b.index)) for a, b in topology.bonds()}

    def linked(i: int | None, j: int | None) -> bool:
        return i is not None and j is not None and (not bonds or frozenset((i, j)) in bonds)

    pairs = []
    for chain in topology.chains():
        residues = list(chain.residues())
        names = [{atom.name: atom.index for atom in residue.atoms()} for residue in residues]
        for k, atoms in enumerate(names):
            n, ca, c = atoms.get("N"), atoms.get("CA"), atoms.get("C")
            if n is None or ca is None or c is None:
                continue
            prev_c = names[k - 1].get("C") if k > 0 else None
            next_n = names[k + 1].get("N") if k + 1 < len(names) else None
            if linked(prev_c, n) and linked(c, next_n):
                pairs.append(((prev_c, n, ca, c), (n, ca, c, next_n)))
    return pairs


def dihedral(x: Any, quadruples: Any) -> np.ndarray:
    """Dihedral angles (B, K) in [-π, π) of atom quadruples (K, 4) in configurations x (B, n, 3).

    IUPAC sign convention (the one of mdtraj and OpenMM's PeriodicTorsionForce).
    """
    x = _as_numpy(x)
    if x.ndim == 2:
        x = x[None]
    q = np.asarray(quadruples, dtype=np.int64).reshape(-1, 4)
    p0, p1, p2, p3 = (x[:, q[:, k]] for k in range(4))
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = np.cross(b0, b1), np.cross(b1, b2)
    b1_hat = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    angle = np.arctan2(np.sum(np.cross(n1, n2) * b1_hat, axis=-1), np.sum(n1 * n2, axis=-1))
    return wrap_angle(angle)


def wrap_angle(angle: Any) -> np.ndarray:
    """Angles mapped onto [-π, π)."""
    a = _as_numpy(angle)
    return np.mod(a + np.pi, 2.0 * np.pi) - np.pi


def ramachandran_angles(topology: Any, x: Any) -> np.ndarray:
    """(φ, ψ) of every backbone pair: x (B, n_atoms, 3) nm -> (B, n_pairs, 2) radians in [-π, π)."""
    pairs = backbone_dihedrals(topology)
    if not pairs:
        raise CMTInputError("the topology has no backbone (φ, ψ) pair: Ramachandran metrics need a peptide.")
    quads = [quad for pair in pairs for quad in pair]
    angles = dihedral(x, quads)
    return angles.reshape(angles.shape[0], len(pairs), 2)


def _weights(weights: Any, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = _as_numpy(weights).reshape(-1)
    if w.shape != (n,):
        raise CMTInputError(f"weights have shape {w.shape}, expected ({n},) (one per sample).")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise CMTInputError("weights must be finite, non-negative and not all zero.")
    return w / w.sum()


def ramachandran_histogram(angles: Any, weights: Any = None, bins: int = 100) -> np.ndarray:
    """Normalised (φ, ψ) histogram(s) on [-π, π)² with bins×bins bins.

    ``angles`` (B, 2) -> (bins, bins), or (B, n_pairs, 2) -> (n_pairs, bins, bins); axis -2 is
    φ, axis -1 is ψ. ``weights`` (B,), non-negative, any normalisation (None: uniform). Every
    histogram sums to 1.
    """
    a = wrap_angle(angles)
    single = a.ndim == 2
    if single:
        a = a[:, None, :]
    if a.ndim != 3 or a.shape[-1] != 2:
        raise CMTInputError(f"angles have shape {a.shape}, expected (B, 2) or (B, n_pairs, 2).")
    w = _weights(weights, a.shape[0])
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    hists = np.stack(
        [np.histogram2d(a[:, k, 0], a[:, k, 1], bins=(edges, edges), weights=w)[0] for k in range(a.shape[1])]
    )
    hists /= hists.sum(axis=(-2, -1), keepdims=True)
    return hists[0] if single else hists


def _check_pair(p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    p, q = _as_numpy(p), _as_numpy(q)
    if p.shape != q.shape:
        raise CMTInputError(f"histograms have shapes {p.shape} and {q.shape}: compare histograms with the same bins.")
    return p, q


def histogram_tv(p: Any, q: Any, axis: int | Sequence[int] | None = None) -> np.ndarray | float:
    """Total variation ½ Σ |P - Q| of two normalised histograms (summed over ``axis``; None: all)."""
    p, q = _check_pair(p, q)
    tv = 0.5 * np.abs(p - q).sum(axis=None if axis is None else tuple(np.atleast_1d(axis)))
    return float(tv) if np.ndim(tv) == 0 else tv


def histogram_kl(p: Any, q: Any, axis: int | Sequence[int] | None = None, epsilon: float = KL_EPSILON) -> np.ndarray | float:
    """KL(P ‖ Q) = Σ P log(P / Q) of two histograms (P: reference, Q: model).

    ``epsilon`` (default 1e-10) is added to every bin of both, which are then renormalised over
    ``axis`` (None: all axes), so bins empty in Q give a large finite penalty instead of +inf.
    """
    p, q = _check_pair(p, q)
    ax = None if axis is None else tuple(np.atleast_1d(axis))
    p = (p + epsilon) / (p + epsilon).sum(axis=ax, keepdims=True)
    q = (q + epsilon) / (q + epsilon).sum(axis=ax, keepdims=True)
    kl = np.sum(p * np.log(p / q), axis=ax)
    return float(kl) if np.ndim(kl) == 0 else kl


def ramachandran_tv(angles_model: Any, angles_ref: Any, weights_model: Any = None, bins: int = 100) -> float:
    """Ramachandran TV averaged over backbone pairs (the "Ram TV" of method.md's tables).

    ``angles_model`` (B, n_pairs, 2) with optional importance weights; ``angles_ref`` (M, n_pairs, 2)
    unweighted reference (MD) angles.
    """
    pm = ramachandran_histogram(angles_model, weights_model, bins)
    pr = ramachandran_histogram(angles_ref, None, bins)
    return float(np.mean(histogram_tv(pm, pr, axis=(-2, -1))))


# ---------------------------------------------------------------------------------------------
# Basins
# ---------------------------------------------------------------------------------------------

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


def aldp_basins(include_halves: bool = False) -> dict[str, tuple[tuple[float, float], tuple[float, float]]]:
    """A copy of `ALDP_BASINS`, plus the `ALDP_HALVES` boxes when ``include_halves``."""
    return {**ALDP_BASINS, **(ALDP_HALVES if include_halves else {})}


def _in_interval(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Membership of angles in the circular interval [lo, hi); lo > hi wraps, lo == hi is the full circle."""
    a, lo, hi = wrap_angle(a), float(wrap_angle(lo)), float(wrap_angle(hi))
    return (a >= lo) & (a < hi) if lo < hi else (a >= lo) | (a < hi)


def basin_indicators(angles: Any, basins: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Boolean membership (B,) of (φ, ψ) angles (B, 2) in each named box."""
    a = _as_numpy(angles)
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
    f = _as_numpy(values)
    n = f.shape[0]
    w = _weights(weights, n)
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
