"""What an ensemble's importance log-weights alone give: ESS, reliability, resampling indices, the low-ESS warning.

:class:`EnsembleWeights` is the base class of :class:`~.reweighting.ReweightedEnsemble` holding
every method that needs only ``log_weights`` (and ``invalid``, ``target``, ``metadata``): the
normalised weights, reverse ESS, N · ESS and whether it is reliable, the summary, systematic
resampling indices, and :meth:`~EnsembleWeights.weights_only`, an ensemble of log-weights without
positions or energies (what the report keeps of a large draw). :class:`LowESSWarning` and
:func:`warn_if_low_ess` are the one check on N · ESS behind `reweight`, `reweight_to` and the report.

Split from :mod:`.reweighting` (which re-exports ``LowESSWarning`` and ``warn_if_low_ess``, so
imports from there keep working) to keep that module about drawing, evaluating and exporting
samples; this module imports nothing from it. Not meant to be instantiated on its own: use
``ReweightedEnsemble`` (``ReweightedEnsemble.weights_only`` for a weights-only ensemble).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..errors import CMTInputError
from ..importance import normalized_weights, reverse_ess
from ..target import Target
from ..units import as_float64
from .estimators import MIN_EFFECTIVE_SAMPLES, effective_samples

__all__ = ["EnsembleWeights", "LowESSWarning", "warn_if_low_ess", "effective_samples_about", "warn_if_thin_estimate"]


class LowESSWarning(UserWarning):
    """The effective sample size collapsed: the reweighted estimates are unreliable."""


def warn_if_low_ess(ens: "EnsembleWeights", what: str, min_effective_samples: float = MIN_EFFECTIVE_SAMPLES,
                    ess_fraction: float = 0.0, stacklevel: int = 3) -> None:
    """Warn (`LowESSWarning`) when N · ESS < ``min_effective_samples`` or ESS < ``ess_fraction``.

    The one check behind `reweight`, `ReweightedEnsemble.reweight_to` and the report; ``what``
    names the ensemble in the message; ``stacklevel`` as for `warnings.warn` (3: the caller of
    the function that calls this one).
    """
    n_eff = ens.n_effective
    reasons = ([f"fewer than {min_effective_samples:g} effective samples"] if n_eff < min_effective_samples else []) + (
        [f"an ESS below {ess_fraction:.0%}"] if ens.ess < ess_fraction else [])
    if reasons:
        warnings.warn(
            f"{what}: ESS {ens.ess:.2%}, N·ESS = {n_eff:.1f} effective of {len(ens)} samples "
            f"({' and '.join(reasons)}); estimates and their error bars rest on a few samples and are unreliable, "
            f"so draw more samples, use a better generator or sample closer to that state.",
            LowESSWarning,
            stacklevel=stacklevel,
        )


def effective_samples_about(weights: np.ndarray, values: np.ndarray, mean: Any) -> np.ndarray:
    """Effective samples a weighted mean rests on, per component (shape of ``mean``): the fewer of the
    Kish counts (Σw)² / Σw² of the weights (N,) of the samples above ``mean`` and of those below it
    (``values`` (N, ...)).

    The estimate and its delta-method error are sums of w̄_i (f_i − μ) over both sides; where one
    side's weight sits on a few samples, so do they, whatever N · ESS of the whole draw. For a
    state's indicator this is the smaller of the counts inside and outside the state (the
    report's rule); a component with no sample off its mean counts the whole draw's.
    """
    w = np.asarray(weights, dtype=float)
    f = np.asarray(values, dtype=float).reshape(len(w), -1)
    mu = np.broadcast_to(np.asarray(mean, dtype=float).reshape(-1), f.shape[1:])
    counts = []
    for j in range(f.shape[1]):
        sides = [w[side] for side in (f[:, j] > mu[j], f[:, j] < mu[j]) if w[side].any()]
        counts.append(min(map(effective_samples, sides)) if len(sides) == 2 else effective_samples(w))
    return np.asarray(counts).reshape(np.shape(mean))


def warn_if_thin_estimate(n_effective: np.ndarray, min_effective_samples: float, stacklevel: int = 3) -> None:
    """Warn (`LowESSWarning`) when an estimate rests on fewer than ``min_effective_samples``
    (`effective_samples_about`; the fewest component of an array)."""
    fewest = float(np.min(n_effective))
    if fewest < min_effective_samples:
        warnings.warn(f"this estimate rests on {fewest:.1f} effective samples (the fewer of those above and below "
                      f"its value), under {min_effective_samples:g}: its value and error bar are unreliable, so draw "
                      "more samples or use a better generator.", LowESSWarning, stacklevel=stacklevel)


class EnsembleWeights:
    """The log-weights side of a `~.reweighting.ReweightedEnsemble` (its base class; see the module docstring).

    Subclasses set ``target``, ``positions``, ``log_q``, ``reduced_energy``, ``invalid``,
    ``log_weights``, ``metadata`` and ``_angles`` (as `weights_only` does).
    """

    @classmethod
    def weights_only(cls, target: Target, log_weights: Any, invalid: Any = None, failed_energies: int = 0,
                     metadata: dict | None = None, angles: Any = None) -> EnsembleWeights:
        """An ensemble of log-weights (N,) alone (and, for peptides, ``angles``, their
        `~cmt_openmm.coordinates.backbone.BackboneAngles`): no positions, log q or energies
        (``log_q`` and ``reduced_energy`` are None), 8 bytes a sample plus the angles' 8 per backbone
        dihedral. What the report keeps of a large draw; ``failed_energies`` counts the samples
        whose energy failed, which the energies would have told. Methods that need the energies
        (`reweight_to`, `npz_arrays`) say so in one sentence."""
        lw = as_float64(log_weights).reshape(-1)
        bad = np.zeros(len(lw), bool) if invalid is None else np.asarray(invalid, bool).reshape(-1)
        if bad.shape != lw.shape:
            raise CMTInputError(f"invalid must have shape ({len(lw)},), one per log-weight.")
        self = cls.__new__(cls)
        self.target, self.positions, self.log_q, self.reduced_energy = target, None, None, None
        self.invalid, self.log_weights, self.metadata, self._angles = bad, lw, dict(metadata or {}), angles
        self._failed_energies = int(failed_energies)
        return self

    @property
    def failed_energies(self) -> int:
        """Samples whose energy failed (u not finite)."""
        if self.reduced_energy is None:
            return self._failed_energies
        return int(np.sum(~np.isfinite(self.reduced_energy)))

    def _energies_kept(self, what: str) -> np.ndarray:
        """The reduced energies, or a one-sentence refusal naming ``what`` needed them."""
        if self.reduced_energy is None:
            raise CMTInputError(f"{what} needs the samples' energies and log q, which this ensemble does not keep (it "
                                "holds log-weights only): draw it with reweight(), which keeps them.")
        return self.reduced_energy

    # -- weights ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.log_weights)

    @property
    def weights(self) -> np.ndarray:
        """Self-normalised weights w̄ (N,), summing to 1 (all 0 when no sample has a positive weight)."""
        return normalized_weights(self.log_weights)

    @property
    def ess(self) -> float:
        """Normalised reverse ESS (Σw)² / (N Σw²) in [0, 1]."""
        return reverse_ess(self.log_weights)

    @property
    def n_effective(self) -> float:
        """Effective number of samples N · ESS = (Σw)² / Σw² (Kish); 0 when no weight is positive."""
        return len(self) * self.ess

    @property
    def reliable(self) -> bool:
        """Whether N · ESS reaches :data:`~cmt_openmm.sampling.estimators.MIN_EFFECTIVE_SAMPLES`."""
        return self.n_effective >= MIN_EFFECTIVE_SAMPLES

    def ess_clipped(self, clip_fraction: float = 1e-4) -> float:
        """Reverse ESS with the largest ``clip_fraction`` of log-weights clipped (TA-BG's report)."""
        return reverse_ess(self.log_weights, clip_fraction)

    @property
    def n_failed(self) -> int:
        """Samples with weight 0 by construction (failed energy, invalid, non-finite log q)."""
        return int(np.isneginf(self.log_weights).sum())

    def summary(self) -> dict:
        """JSON-able numbers: n, ESS (raw and clipped at 1e-4), failed samples, temperature."""
        return {
            "n": len(self),
            "ess": self.ess,
            "ess_clipped_1e-4": self.ess_clipped(1e-4),
            "n_failed": self.n_failed,
            "n_invalid": int(self.invalid.sum()),
            "temperature": self.target.temperature,
            "target": self.target.name,
        }

    def _require_weight(self) -> np.ndarray:
        w = self.weights
        if not w.any():
            raise CMTInputError("no sample has a positive weight (all energies failed?): draw more or better samples.")
        return w

    # -- resampling ------------------------------------------------------------------------
    def resample_indices(self, n: int | None = None, seed: int = 0) -> np.ndarray:
        """Systematic resampling: n indices (default N) drawn in proportion to the weights.

        One uniform offset u ~ U[0, 1) from ``numpy.random.default_rng(seed)``; sample i is taken
        ⌊n w̄_i⌋ or ⌊n w̄_i⌋ + 1 times: unbiased for weighted means, with less resampling noise
        than multinomial resampling.
        """
        w = self._require_weight()
        n = len(self) if n is None else int(n)
        if n < 1:
            raise CMTInputError(f"n must be at least 1, got {n}.")
        u = (np.random.default_rng(seed).random() + np.arange(n)) / n
        cdf = np.cumsum(w)
        cdf[-1] = 1.0
        return np.searchsorted(cdf, u, side="right")
