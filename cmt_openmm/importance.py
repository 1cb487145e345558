"""Importance weights of generator samples: normalised weights, reverse and forward ESS, EUBO.

Definitions follow docs/method.md, "Metrics". Log-weights are ``log w = log p̃(x) − log q(x)`` with
``log p̃ = −u`` the raw reduced energy; ``−inf`` marks a failed evaluation (weight 0, still
counted in N). One home for these estimators, used by training records, reweighted ensembles
and reports alike. Hand-written on NumPy: each is a few lines, and the conventions (clipping,
failed samples, +inf weights) must be exactly the documented ones.

>>> import numpy as np
>>> float(reverse_ess(np.zeros(10)))                            # equal weights: every sample counts
1.0
>>> float(reverse_ess(np.array([0.0, -np.inf, -np.inf, -np.inf])))   # one sample of four carries all
0.25
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import CMTInputError
from .units import as_float64

__all__ = ["CLIP_FRACTION", "eubo", "forward_ess", "normalized_weights", "reverse_ess"]

CLIP_FRACTION = 1e-4
"""Fraction of the largest log-weights clipped in the "clipped" reverse ESS (TA-BG's report)."""


def _log_weights(log_w: Any, name: str = "log_w") -> np.ndarray:
    lw = as_float64(log_w).reshape(-1)
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
    w = np.subtract(lw, top)  # in place from here: one array of N floats (the values of exp(lw - top) / sum)
    np.exp(w, out=w)
    w /= w.sum()
    return w


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
    if k > 0:  # the k largest set to the (k+1)-th largest: every value above it becomes it
        np.minimum(lw, np.partition(lw, n - 1 - k)[n - 1 - k], out=lw)
    if np.isposinf(lw).any():
        return float(np.isposinf(lw).sum() / n)
    top = lw.max()
    if not np.isfinite(top):
        return 0.0
    lw -= top  # in place from here: N floats in all (24 bytes a sample before), the same values
    np.exp(lw, out=lw)
    total = lw.sum()
    lw *= lw
    return float(total ** 2 / (n * lw.sum()))


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
    lp, lq = as_float64(log_p_ref).reshape(-1), as_float64(log_q_ref).reshape(-1)
    if lp.shape != lq.shape or lp.size == 0:
        raise CMTInputError(f"log_p_ref {lp.shape} and log_q_ref {lq.shape} must be non-empty and of equal length.")
    if np.isnan(lp).any() or np.isnan(lq).any():
        raise CMTInputError("log_p_ref or log_q_ref contains NaN: mark failures with -inf.")
    with np.errstate(invalid="ignore"):
        d = lp - lq
    if np.isnan(d).any():  # -inf - (-inf): a sample neither density supports
        return math.inf
    return float(d.mean())
