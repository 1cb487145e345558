"""The CMT dual: Lagrange multipliers (λ, η) of one annealing step from a buffer of samples.

Given N samples x_n ~ q_i with their flow log-densities b_n = log q_i(x_n) and target
log-densities a_n = log p̃(x_n) = −u(x_n), the next distribution on the annealing path is the
geometric mixture q_{i+1} ∝ q_i^{λ/s} p̃^{1/s}, s = 1 + λ + η, with (λ, η) maximising the
concave dual (docs/method.md, "Finding λ, η")

    log w_n(λ,η) = (a_n − (1+η) b_n) / s,    log Z = logmeanexp_n log w_n
    g(λ,η)       = −s log Z − λ ε_tr + η (H(q_i) − ε_ent),   H(q_i) ≈ −mean_n b_n.

Its partial derivatives are the constraint slacks, which is what the solver uses:
∂g/∂λ = KL̂(q_{i+1}‖q_i) − ε_tr and ∂g/∂η = (Ĥ(q_i) − Ĥ(q_{i+1})) − ε_ent, with
KL̂ = Σ w̄ (log w − log Z) and Ĥ(q_{i+1}) = −Σ w̄ log q_{i+1}, log q_{i+1} = b + log w − log Z.

Solver (hand-written: a 2-D concave problem that needs exact boundary handling, not a library
call). The maximisation is nested 1-D root finding. For fixed η, ∂g/∂λ decreases in λ (g is
concave), so λ*(η) = 0 when the trust region already holds at λ = 0 and otherwise the root of
KL̂(λ, η) = ε_tr (Brent, bracketed from the λ* of the η tried before). The profile
h(η) = g(λ*(η), η) is concave with h'(η) = ∂g/∂η at (λ*(η), η) (envelope theorem), so η* = 0
when the entropy drop at η = 0 is within ε_ent and otherwise the root of drop = ε_ent (Brent).
The boundary cases λ = 0, η = 0 and λ = η = 0 ("target reached") are thus decided explicitly,
and an active constraint holds to solver tolerance rather than approximately. Everything is
float64 and in log-space (logsumexp).

Failed energies (a_n = −inf) get weight 0 and enter only the entropy estimate of q_i (they
are still samples of q_i).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from ..errors import CMTInputError

_MAX_MULTIPLIER = 1e12  # λ, η beyond this are treated as "infinitely" constrained
_XTOL = 1e-12
_MIN_GUESS = 1e-9  # below this a bracket's lower end is 0


@dataclass(frozen=True)
class DualSolution:
    """Solution of one annealing step's dual.

    lam, eta: Lagrange multipliers of the trust region and the entropy constraint (≥ 0).
    log_weights: (N,) float64 normalised log w̄ (logsumexp = 0), −inf for failed energies;
        w̄ ∝ q_{i+1}/q_i on the buffer.
    kl: estimated KL(q_{i+1} ‖ q_i) on the buffer.
    entropy: estimated H(q_i) = −mean log q_i (nats, in the density space of log_q).
    entropy_drop: estimated H(q_i) − H(q_{i+1}).
    ess: effective sample size of w̄, as a fraction of N: 1 / (N Σ w̄²).
    trust_active, entropy_active: λ > 0, η > 0.
    """

    lam: float
    eta: float
    log_weights: np.ndarray
    kl: float
    entropy: float
    entropy_drop: float
    ess: float
    trust_active: bool
    entropy_active: bool

    @property
    def target_reached(self) -> bool:
        """λ = η = 0: the next distribution is the target itself."""
        return self.lam == 0.0 and self.eta == 0.0


class _Buffer:
    """The buffer's numbers and the dual's quantities at a given (λ, η).

    The solver evaluates :meth:`moments` ~130–200 times per step, so it works on the finite
    entries only, in two reused scratch arrays, with one exponential pass and two weighted sums
    (float64 throughout). The sums are ``np.einsum`` rather than ``@``: numpy's ``@`` calls the
    BLAS, whose dot product spreads over all cores above ~10,000 entries; with the cores busy
    (the training's own threads, or other runs) its threads wait on each other, and the dual of a
    large step slowed down many times over (benchmarks/RESULTS.md, "Session 21")."""

    def __init__(self, log_q: np.ndarray, log_p: np.ndarray):
        self.log_q = log_q
        self.log_p = log_p
        self.ok = np.isfinite(log_p)
        self.n = log_q.shape[0]
        self._log_n = math.log(self.n)
        self.entropy = -float(np.mean(log_q))
        self._a, self._b = log_p[self.ok], log_q[self.ok]  # finite log p̃ and their log q
        self._c = np.empty_like(self._a)  # scratch: log w − max log w
        self._w = np.empty_like(self._a)  # scratch: w / max w

    def _log_w_ok(self, lam: float, eta: float) -> np.ndarray:
        """Unnormalised log w_n(λ, η) of the finite entries."""
        return (self._a - (1.0 + eta) * self._b) / (1.0 + lam + eta)

    def log_w(self, lam: float, eta: float) -> np.ndarray:
        """Unnormalised log w_n(λ, η), (N,); −inf where the energy failed."""
        out = np.full(self.n, -np.inf)
        out[self.ok] = self._log_w_ok(lam, eta)
        return out

    def moments(self, lam: float, eta: float) -> tuple[float, float, float]:
        """(log Z, KL̂(q_{i+1}‖q_i), entropy drop) at (λ, η).

        With c = log w − max log w and w = e^c: log Z = max + log Σw − log N,
        log(q_{i+1}/q_i) = log w − log Z = c − log Σw + log N, so
        KL̂ = Σ w c / Σw − log Σw + log N and Ĥ(q_{i+1}) = −Σ w log q_i / Σw − KL̂."""
        c, w = self._c, self._w
        np.multiply(self._b, -(1.0 + eta), out=c)
        c += self._a
        c /= 1.0 + lam + eta
        top = float(c.max())
        c -= top
        np.exp(c, out=w)
        total = float(w.sum())
        log_total = math.log(total)
        log_z = top + log_total - self._log_n
        kl = float(np.einsum("i,i->", w, c)) / total - log_total + self._log_n
        entropy_next = -float(np.einsum("i,i->", w, self._b)) / total - kl
        return log_z, max(kl, 0.0), self.entropy - entropy_next

    def stats(self, lam: float, eta: float) -> tuple[np.ndarray, float, float, float]:
        """(normalised log w̄ (N,), log Z, KL̂(q_{i+1}‖q_i), entropy drop) at (λ, η)."""
        log_z, kl, drop = self.moments(lam, eta)
        return self.log_w(lam, eta) - (log_z + math.log(self.n)), log_z, kl, drop

    def g(self, lam: float, eta: float, eps_tr: float, eps_ent: float) -> float:
        """The dual objective g(λ, η) of docs/method.md, "Finding λ, η"."""
        log_z = self.moments(lam, eta)[0]
        return -(1.0 + lam + eta) * log_z - lam * eps_tr + eta * (self.entropy - eps_ent)


def _decreasing_root(f, guess: float = 1.0, limit: float = _MAX_MULTIPLIER) -> float:
    """Smallest root in (0, limit] of a non-increasing f with f(0) > 0; limit if none.

    The bracket grows (or shrinks) by factors of 4 from ``guess``, so a guess near the root (the
    root of a nearby solve) brackets it in one or two evaluations."""
    hi = min(max(guess, _MIN_GUESS), limit)
    if f(hi) > 0.0:
        while True:
            if hi >= limit:
                return limit
            lo, hi = hi, min(hi * 4.0, limit)
            if f(hi) <= 0.0:
                break
    else:
        lo = hi / 4.0
        while f(lo) <= 0.0:
            if lo < _MIN_GUESS:
                lo = 0.0  # f(0) > 0
                break
            hi, lo = lo, lo / 4.0
    return float(brentq(f, lo, hi, xtol=_XTOL * max(1.0, lo), rtol=1e-14, maxiter=500))


def _as_float64(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise CMTInputError(f"{name} must be a non-empty 1-D array of log-densities, got shape {arr.shape}.")
    return arr


def solve_dual(log_q, log_p, eps_tr: float, eps_ent: float) -> DualSolution:
    """Solve the CMT dual for one annealing step.

    log_q: (N,) log q_i(x_n) of buffer samples x_n ~ q_i (finite), tensor or array.
    log_p: (N,) unnormalised target log-density −u(x_n); −inf marks a failed energy.
    eps_tr: trust-region size ε_tr > 0 (nats); eps_ent: allowed entropy drop ε_ent > 0 (nats).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=4000)
    >>> log_q = -0.5 * x**2 - 0.5 * np.log(2 * np.pi)
    >>> sol = solve_dual(log_q, -0.5 * (x - 3.0) ** 2, eps_tr=0.5, eps_ent=1.0)
    >>> sol.trust_active, round(sol.kl, 6)
    (True, 0.5)
    """
    log_q = _as_float64(log_q, "log_q")
    log_p = _as_float64(log_p, "log_p")
    if log_q.shape != log_p.shape:
        raise CMTInputError(f"log_q and log_p must have the same length, got {log_q.size} and {log_p.size}.")
    if not np.all(np.isfinite(log_q)):
        raise CMTInputError("log_q contains non-finite values; buffer samples must come from the flow's support.")
    if np.any(np.isnan(log_p)) or np.any(log_p == np.inf):
        raise CMTInputError("log_p must be finite or −inf (failed energy), not NaN or +inf.")
    if not np.any(np.isfinite(log_p)):
        raise CMTInputError("every energy in the buffer failed (log_p = −inf); check the system and the flow's samples.")
    if not (eps_tr > 0.0 and eps_ent > 0.0 and math.isfinite(eps_tr) and math.isfinite(eps_ent)):
        raise CMTInputError(f"eps_tr and eps_ent must be positive and finite, got {eps_tr} and {eps_ent}.")

    buf = _Buffer(log_q, log_p)

    last_lam = 1.0  # λ*(η) of the previous η the outer solve tried: the next one's bracket starts there

    def lam_star(eta: float) -> float:
        nonlocal last_lam

        def slack(lam: float) -> float:
            return buf.moments(lam, eta)[1] - eps_tr

        if slack(0.0) <= 0.0:
            return 0.0
        last_lam = _decreasing_root(slack, last_lam)
        return last_lam

    def entropy_slack(eta: float) -> float:
        return buf.moments(lam_star(eta), eta)[2] - eps_ent

    eta = 0.0 if entropy_slack(0.0) <= 0.0 else _decreasing_root(entropy_slack)
    lam = lam_star(eta)
    log_wbar, _, kl, drop = buf.stats(lam, eta)
    ess = float(1.0 / (buf.n * np.sum(np.exp(2.0 * log_wbar[buf.ok]))))
    return DualSolution(
        lam=lam,
        eta=eta,
        log_weights=log_wbar,
        kl=kl,
        entropy=buf.entropy,
        entropy_drop=drop,
        ess=ess,
        trust_active=lam > 0.0,
        entropy_active=eta > 0.0,
    )


def dual_objective(log_q, log_p, lam: float, eta: float, eps_tr: float, eps_ent: float) -> float:
    """g(λ, η) on a buffer (for checks and plots); see the module docstring."""
    return _Buffer(_as_float64(log_q, "log_q"), _as_float64(log_p, "log_p")).g(lam, eta, eps_tr, eps_ent)
