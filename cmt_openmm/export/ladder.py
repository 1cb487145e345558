"""λ ladders of flow-bridged replica exchange with equal exchange acceptance, and a run's exchange statistics.

The bridge states are u_λ(x) = u_q(x) + λ w(x) with w = (U - U_q)/kT, u_q = U_q/kT (one
temperature). A swap of x (at λ = a) and x' (at λ = b) is accepted with probability
min(1, exp(-(b - a)(w(x) - w(x')))), so the expected acceptance of a neighbour pair is

    A(a, b) = E_{x ~ p_a, x' ~ p_b} min(1, exp(-(b - a)(w(x) - w(x')))).

:func:`equal_acceptance_ladder` estimates A for any pair from the w's of a short pilot run on
any ladder: the pilot's samples, pooled with MBAR weights (:func:`mbar_free_energies`), give
p_λ for every λ between 0 and 1 (reweighting: p_λ(n) ∝ exp(-λ w_n) / Σ_k N_k exp(f_k - λ_k w_n)),
and A(a, b) is then an O(N log N) double sum over sorted w (:func:`estimate_acceptance`).
The ladder is then placed greedily from λ = 0 so that every neighbour pair has the same
estimated acceptance, bisecting on that acceptance until the last state lands on λ = 1.
Where the pilot's neighbours barely overlap the estimate between them rests on few samples:
the chosen ladder is then a better pilot for a second round.

:func:`exchange_statistics` reads a run's netCDF storage: acceptance per neighbour pair and
round trips per replica (state 0 -> state K-1 -> state 0).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from ..errors import CMTInputError


def _reduced_offsets(lambdas: np.ndarray, w: np.ndarray) -> np.ndarray:
    """λ_k w_n (K, N), with 0 where λ_k = 0 (also for w = inf: u_0 does not depend on w)."""
    lam = np.asarray(lambdas, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        out = lam * w[None, :]
    return np.where(lam == 0.0, 0.0, out)


def mbar_free_energies(lambdas, w, counts) -> np.ndarray:
    """MBAR reduced free energies f_k (K,), f_0 = 0, of the states λ_k from pooled samples.

    ``w`` (N,): w = u_1 - u_0 of every pooled sample (+inf allowed); ``counts`` (K,): samples
    drawn from each state. Minimises MBAR's convex objective (L-BFGS with its gradient).
    """
    from scipy.optimize import minimize

    lambdas, w = np.asarray(lambdas, dtype=np.float64), np.asarray(w, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    u = _reduced_offsets(lambdas, w)[present]  # (K', N)
    log_counts = np.log(counts[present])

    def objective(g: np.ndarray) -> tuple[float, np.ndarray]:
        f = np.concatenate([[0.0], g])
        a = log_counts[:, None] + f[:, None] - u  # (K', N)
        lse = logsumexp(a, axis=0)
        value = float(np.sum(lse) - np.dot(counts[present], f))
        grad = np.exp(a - lse[None, :]).sum(1) - counts[present]
        return value, grad[1:]

    k = int(present.sum())
    f_present = np.zeros(k)
    if k > 1:
        result = minimize(objective, np.zeros(k - 1), jac=True, method="L-BFGS-B",
                          options={"maxiter": 1000, "gtol": 1e-10})
        f_present[1:] = result.x
    # the states without samples: f_k = -log sum_n exp(-u_kn) / sum_j N_j exp(f_j - u_jn)
    log_denominator = logsumexp((log_counts + f_present)[:, None] - u, axis=0)
    f = -logsumexp(-_reduced_offsets(lambdas, w) - log_denominator[None, :], axis=1)
    return f - f[0]


def estimate_acceptance(a: float, b: float, w: np.ndarray, log_p_a: np.ndarray, log_p_b: np.ndarray) -> float:
    """A(a, b) (a < b) from samples w (N,) with normalised log weights at a and at b (module docstring)."""
    order = np.argsort(w, kind="stable")
    ws = np.asarray(w, dtype=np.float64)[order]
    return _sorted_acceptance(float(b - a), ws, np.searchsorted(ws, ws, side="left"), log_p_a[order], log_p_b[order])


def _sorted_acceptance(delta: float, ws: np.ndarray, first: np.ndarray, la: np.ndarray, lb: np.ndarray) -> float:
    """:func:`estimate_acceptance` on sorted w (``first``: index of the first sample equal to each)."""
    finite = np.isfinite(ws)
    w0 = np.where(finite, ws, 0.0)
    sure = _suffix_logsumexp(lb)[first]  # p_b mass at w' >= w_n: the swap is accepted for sure
    # p_b mass at w' < w_n times exp(-delta (w_n - w')): prefix sums of log p_b + delta w'
    shifted = np.where(finite & np.isfinite(lb), lb + delta * w0, -np.inf)
    maybe = np.where(finite, _prefix_logsumexp(shifted)[first] - delta * w0, -np.inf)
    total = logsumexp(la + np.logaddexp(sure, maybe))
    return float(min(1.0, max(0.0, math.exp(total))))


def _prefix_logsumexp(x: np.ndarray) -> np.ndarray:
    """(N + 1,): entry i is logsumexp(x[:i]) (-inf for i = 0)."""
    return np.concatenate([[-np.inf], np.logaddexp.accumulate(x)]) if len(x) else np.array([-np.inf])


def _suffix_logsumexp(x: np.ndarray) -> np.ndarray:
    """(N + 1,): entry i is logsumexp(x[i:]) (-inf for i = N)."""
    return _prefix_logsumexp(x[::-1])[::-1]


class AcceptanceModel:
    """A(a, b) for any 0 <= a < b <= 1 from pooled pilot samples (``w``: (N,), ``state``: (N,)
    index into the pilot's ``lambdas``)."""

    def __init__(self, lambdas, w, state) -> None:
        self.lambdas = np.asarray(lambdas, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        state = np.asarray(state, dtype=np.int64)
        if w.shape != state.shape or w.size == 0:
            raise CMTInputError("The pilot run has no samples to choose a ladder from; run more pilot iterations.")
        self.counts = np.bincount(state, minlength=len(self.lambdas)).astype(np.float64)
        self.f = mbar_free_energies(self.lambdas, w, self.counts)
        order = np.argsort(w, kind="stable")
        self.w = w[order]
        self._first = np.searchsorted(self.w, self.w, side="left")
        present = self.counts > 0
        u = _reduced_offsets(self.lambdas, self.w)
        self._log_denominator = logsumexp((np.log(np.maximum(self.counts, 1e-300)) + self.f)[present, None]
                                          - u[present], axis=0)

    def log_weights(self, lam: float) -> np.ndarray:
        """Normalised log weights (N,) of the sorted pooled samples at λ."""
        log_w = -_reduced_offsets(np.array([float(lam)]), self.w)[0] - self._log_denominator
        return log_w - logsumexp(log_w)

    def __call__(self, a: float, b: float) -> float:
        return _sorted_acceptance(float(b - a), self.w, self._first, self.log_weights(a), self.log_weights(b))


def _greedy(model: AcceptanceModel, target: float, limit: int) -> list[float]:
    """λ's from 0 upwards, each the largest next λ with estimated acceptance >= target (at most limit + 1)."""
    ladder = [0.0]
    while ladder[-1] < 1.0 and len(ladder) <= limit:
        a = ladder[-1]
        if model(a, 1.0) >= target:
            ladder.append(1.0)
            break
        lo, hi = a, 1.0
        for _ in range(20):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if model(a, mid) >= target else (lo, mid)
        ladder.append(max(lo, a + 1e-9 * (1.0 - a) + 1e-12))
    return ladder


def equal_acceptance_ladder(model: AcceptanceModel, n_states: int) -> tuple[np.ndarray, np.ndarray]:
    """(λ's ascending from 0 to 1 (n_states,), their estimated neighbour acceptances (n_states - 1,))."""
    if n_states < 2:
        raise CMTInputError(f"A bridge needs at least 2 states (λ = 0 and λ = 1), got {n_states}.")
    lo, hi = 0.0, 1.0  # bisection on the common acceptance
    best = None
    for _ in range(20):
        target = 0.5 * (lo + hi)
        ladder = _greedy(model, target, n_states - 1)
        if ladder[-1] >= 1.0 and len(ladder) <= n_states:
            lo, best = target, ladder
        else:
            hi = target
    if best is None:
        best = list(np.linspace(0.0, 1.0, n_states))
    if len(best) < n_states:  # the flow is good enough: fewer states would do, spread the rest evenly
        widths = np.diff(best)
        while len(best) < n_states:
            i = int(np.argmax(widths))
            best.insert(i + 1, 0.5 * (best[i] + best[i + 1]))
            widths = np.diff(best)
    lambdas = np.array(best, dtype=np.float64)
    lambdas[0], lambdas[-1] = 0.0, 1.0
    return lambdas, np.array([model(a, b) for a, b in zip(lambdas[:-1], lambdas[1:])])


# ---------------------------------------------------------------------------------------------
# Reading a run's storage
# ---------------------------------------------------------------------------------------------
def pilot_samples(storage: str | Path, lambdas, first_iteration: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(w (N,), state (N,)) of every replica and stored iteration >= ``first_iteration`` of a
    bridge run whose states are ``lambdas`` (in the storage's state order)."""
    import netCDF4

    lambdas = np.asarray(lambdas, dtype=np.float64)
    one, zero = int(np.argmax(lambdas == 1.0)), int(np.argmax(lambdas == 0.0))
    if lambdas[one] != 1.0 or lambdas[zero] != 0.0:
        raise CMTInputError("A bridge ladder must contain λ = 0 and λ = 1.")
    with netCDF4.Dataset(str(storage), "r") as data:
        energies = np.asarray(data.variables["energies"][first_iteration:], dtype=np.float64)  # (T, R, K)
        states = np.asarray(data.variables["states"][first_iteration:], dtype=np.int64)  # (T, R)
    with np.errstate(invalid="ignore"):
        w = (energies[:, :, one] - energies[:, :, zero]).reshape(-1)
    w = np.where(np.isnan(w), np.inf, w)
    return w, states.reshape(-1)


def round_trips(states: np.ndarray, n_states: int) -> np.ndarray:
    """Completed round trips (R,) of each replica from state 0 to state n_states - 1 and back to 0
    (counted from its first visit to state 0), from its state index per iteration ``states`` (T, R)."""
    states = np.asarray(states, dtype=np.int64)
    trips = np.zeros(states.shape[1], dtype=np.int64)
    if n_states < 2:
        return trips
    for r in range(states.shape[1]):
        phase = 0  # 0: state 0 not yet visited; 1: left state 0, top not reached; 2: top reached
        for s in states[:, r]:
            if s == 0:
                trips[r] += phase == 2
                phase = 1
            elif s == n_states - 1 and phase == 1:
                phase = 2
    return trips


def exchange_statistics(storage: str | Path, last_iteration: int | None = None) -> dict:
    """From a replica-exchange netCDF storage (any openmmtools ladder): ``pair_acceptance``
    (K - 1,) of neighbour states (None where never proposed), ``round_trips`` per replica,
    ``round_trips_per_replica`` (mean) and ``n_iterations``."""
    import netCDF4

    with netCDF4.Dataset(str(storage), "r") as data:
        stop = None if last_iteration is None else last_iteration + 1
        states = np.asarray(data.variables["states"][:stop], dtype=np.int64)
        accepted = np.asarray(data.variables["accepted"][1:stop], dtype=np.float64).sum(0)
        proposed = np.asarray(data.variables["proposed"][1:stop], dtype=np.float64).sum(0)
    k = accepted.shape[0]
    pairs = []
    for i in range(k - 1):
        n = proposed[i, i + 1] + proposed[i + 1, i]
        pairs.append(float((accepted[i, i + 1] + accepted[i + 1, i]) / n) if n > 0 else None)
    trips = round_trips(states, k)
    return {"pair_acceptance": pairs, "round_trips": trips.tolist(),
            "round_trips_per_replica": float(trips.mean()) if trips.size else 0.0,
            "n_iterations": int(states.shape[0] - 1)}
