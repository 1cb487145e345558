"""Reweighted ensembles: a trained generator's samples with importance weights towards a Target.

`reweight(generator, target, n)` draws N samples x ~ q in batches, evaluates their raw OpenMM reduced
energies u(x) and returns a `ReweightedEnsemble` with log-weights ``log w = -u(x) - log q(x)``
(``-inf`` where the energy failed or the sample's chirality is flipped: weight 0, still counted in
N). From it: ESS, self-normalised expectations of any observable with error bars, free-energy
profiles and surfaces along collective variables, systematic resampling to an unweighted ensemble,
reweighting to another temperature or another System of the same topology without retraining, and
export (mdtraj, DCD + PDB, weights as .npy/.csv, the ``cmt-openmm sample`` npz).

Large draws are streamed (:mod:`.drawing`): ``reweight(..., out=path)`` writes positions into the
npz as they are drawn and returns the ensemble with its positions memory-mapped from that file,
and ``reweight(..., positions=False)`` keeps only the weights and, for peptides, the backbone
angles; an ensemble without positions says so in one sentence when a method needs them.

Error bars (one standard error) are computed one of two ways, always stated by the ``error``
argument: ``"bootstrap"`` (default; the standard deviation over ``n_bootstrap`` resamplings of
the N samples with replacement, seeded) or ``"delta"`` (linearisation of the self-normalised
estimator: Var ≈ Σ w̄_i² (f_i - μ)²). Both treat the N samples as independent, which they are
for a generator. In free-energy profiles and surfaces an empty bin, or with ``"bootstrap"`` a bin
left empty by some resampling, is unconstrained: F = +inf or an infinite error.

Both error bars are meaningless when a handful of samples carry the weight: `reweight` and
`ReweightedEnsemble.reweight_to` warn with `LowESSWarning` when the effective number of samples
N · ESS falls below ``min_effective_samples`` (default :data:`~.estimators.MIN_EFFECTIVE_SAMPLES`,
100), `expectation` when its own estimate rests on fewer (a rare state's population can), and the
report marks such estimates unreliable. Hand-written: NumPy on top of :mod:`.estimators`.

What the log-weights alone give (weights, ESS, `reliable`, `summary`, `resample_indices`,
`ReweightedEnsemble.weights_only`) and the low-ESS warning live in :mod:`.ensemble_weights`, the
base class `EnsembleWeights`; ``LowESSWarning`` and ``warn_if_low_ess`` are importable from here too.
"""

from __future__ import annotations

import builtins
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..coordinates.backbone import BackboneAngles, is_peptide
from ..errors import CMTInputError
from ..files import atomic_writer
from ..target import Target
from ..units import as_float64, kelvin
from .drawing import draw_chunks, provenance
from .ensemble_weights import (EnsembleWeights, LowESSWarning, effective_samples_about, warn_if_low_ess,
                               warn_if_thin_estimate)
from .estimators import (MIN_EFFECTIVE_SAMPLES, Estimate, FreeEnergyProfile, FreeEnergySurface, binned_free_energy,
                         weighted_mean)
from .npz_stream import NpzWriter, open_memmap

__all__ = [
    "reweight",
    "ReweightedEnsemble",
    "FreeEnergyProfile",
    "FreeEnergySurface",
    "LowESSWarning",
    "warn_if_low_ess",
]

ROWS_PER_BLOCK = 65_536
"""Configurations per block where positions are read or converted in turn (angles, CSV rows):
a few MB of temporaries for a peptide, whatever the ensemble's size."""


class ReweightedEnsemble(EnsembleWeights):
    """N configurations with log q, raw reduced energies and importance log-weights towards ``target``.

    Args:
        target: the Target whose Boltzmann distribution the weights point to.
        positions: (N, n_atoms, 3) nm (an array or a memory map), or None for an ensemble whose
            positions were streamed to a file (then methods that need them say so);
        log_q: (N,) generator log density (Cartesian convention);
        reduced_energy: (N,) raw u = U / kT of ``target`` (+inf where evaluation failed);
        invalid: (N,) bool, samples to give weight 0 (e.g. flipped chirality); default none.
        metadata: JSON-able provenance (seed, generator hash, ...), saved with `save_npz`.
        angles: the samples' `BackboneAngles` when already computed (peptides).

    Attributes: ``positions``, ``log_q``, ``reduced_energy``, ``invalid``, ``log_weights`` (N,)
    = -u - log q, -inf where invalid, u not finite or log q not finite.

    Example (an untrained flow on a toy whose mode 0 holds 75 % of the probability at 300 K, 62.7 % at 600 K):
        >>> import cmt_openmm
        >>> toy = cmt_openmm.get_target("toy-double-well")
        >>> bg = cmt_openmm.BoltzmannGenerator.build(toy, n_layers=2, hidden=8, bound=3.0)
        >>> ens = cmt_openmm.reweight(bg, toy, 4000, seed=0, progress=False)
        >>> p0, hot = (e.expectation(lambda x: toy.mode_of(x) == 0) for e in (ens, ens.reweight_to(600.0)))
        >>> len(ens), ens.reliable, round(p0.value, 2), round(hot.value, 2), round(p0.error, 2)   # ± 1 s.e.
        (4000, True, 0.76, 0.62, 0.02)
    """

    def __init__(
        self,
        target: Target,
        positions: Any,
        log_q: Any,
        reduced_energy: Any,
        invalid: Any = None,
        metadata: dict | None = None,
        angles: BackboneAngles | None = None,
    ) -> None:
        lq, u = as_float64(log_q).reshape(-1), as_float64(reduced_energy).reshape(-1)
        x = None if positions is None else positions if isinstance(positions, np.memmap) else as_float64(positions)
        if x is not None and (x.ndim != 3 or x.shape[1:] != (target.n_atoms, 3)):
            raise CMTInputError(f"positions have shape {x.shape}, expected (N, {target.n_atoms}, 3) in nm.")
        n = len(lq) if x is None else x.shape[0]
        bad = np.zeros(n, bool) if invalid is None else np.asarray(as_float64(invalid), bool).reshape(-1)
        if not (lq.shape == u.shape == bad.shape == (n,)):
            raise CMTInputError(f"log_q, reduced_energy and invalid must each have shape ({n},), one per configuration.")
        self.target = target
        self.positions, self.log_q, self.reduced_energy, self.invalid = x, lq, u, bad
        self.metadata = dict(metadata or {})
        self._angles = angles
        with np.errstate(invalid="ignore"):
            lw = -u - lq
        self.log_weights = np.where(bad | ~np.isfinite(u) | ~np.isfinite(lq), -np.inf, lw)

    @classmethod
    def concatenate(cls, ensembles: Sequence[ReweightedEnsemble]) -> ReweightedEnsemble:
        """One ensemble holding every sample of ``ensembles`` (same target; metadata dropped;
        positions and angles where every part has them; log-weights only where a part has no energies)."""
        target = ensembles[0].target
        cat = lambda name: np.concatenate([getattr(e, name) for e in ensembles])  # noqa: E731
        positions = None if any(e.positions is None for e in ensembles) else cat("positions")
        angles = (None if any(e._angles is None for e in ensembles)
                  else BackboneAngles.concatenate([e._angles for e in ensembles]))
        if any(e.reduced_energy is None for e in ensembles):
            return cls.weights_only(target, cat("log_weights"), cat("invalid"),
                                    sum(e.failed_energies for e in ensembles), angles=angles)
        return cls(target, positions, cat("log_q"), cat("reduced_energy"), cat("invalid"), angles=angles)

    def _positions(self, what: str) -> np.ndarray:
        """The positions, or a one-sentence refusal naming ``what`` needed them."""
        if self.positions is None:
            raise CMTInputError(f"{what} needs the samples' positions, which this ensemble does not keep (they were "
                                "streamed to a file): load that file with ReweightedEnsemble.load_npz(path, target, "
                                "mmap=True), or draw with positions kept.")
        return self.positions

    # -- observables -----------------------------------------------------------------------
    def _evaluate(self, observable: Callable | Any, trajectory: bool, batch_size: int | None, mask: np.ndarray):
        """Values (N, ...) of an observable (array or callable) with rows outside ``mask`` set to 0."""
        n = len(self)
        if not callable(observable):
            values = as_float64(observable)
            if values.shape[:1] != (n,):
                raise CMTInputError(f"observable values have shape {values.shape}, expected ({n}, ...).")
            return np.where(mask.reshape((n,) + (1,) * (values.ndim - 1)), values, 0.0)
        idx = np.flatnonzero(mask)
        step = len(idx) if batch_size is None else int(batch_size)
        parts = []
        for start in range(0, len(idx), max(step, 1)):
            rows = idx[start : start + step]
            arg = self.to_mdtraj(rows) if trajectory else self._positions("a callable observable")[rows]
            parts.append(as_float64(observable(arg)))
        values = np.concatenate(parts)
        if values.shape[:1] != (len(idx),):
            raise CMTInputError("the observable must return one value (or array) per configuration: shape (B, ...).")
        full = np.zeros((n,) + values.shape[1:])
        full[idx] = values
        return full

    def expectation(
        self,
        observable: Callable | Any,
        error: str = "bootstrap",
        n_bootstrap: int = 200,
        seed: int = 0,
        trajectory: bool = False,
        batch_size: int | None = None,
        min_effective_samples: float = MIN_EFFECTIVE_SAMPLES,
    ) -> Estimate:
        """Self-normalised estimate of E_p[f] with its standard error (see the module docstring).

        ``observable``: a callable on positions (B, n_atoms, 3) nm -> (B, ...) (numpy or torch),
        or, with ``trajectory=True``, on an `mdtraj.Trajectory` of B frames -> (B, ...); or
        precomputed values (N, ...). Only samples with a positive weight are evaluated, in
        batches of ``batch_size`` (None: all at once). Returns ``Estimate(value, error)``
        (floats for a scalar observable, arrays of shape (...) otherwise). Warns (`LowESSWarning`)
        when the estimate rests on fewer than ``min_effective_samples``: the fewer of the effective
        samples above and below its value (`effective_samples_about`; a rare state's population can
        rest on a few samples while the whole draw has thousands).
        """
        w = self._require_weight()
        values = self._evaluate(observable, trajectory, batch_size, w > 0)
        estimate = weighted_mean(values, w, error=error, n_bootstrap=n_bootstrap, seed=seed)
        warn_if_thin_estimate(effective_samples_about(w, values, estimate.value), min_effective_samples)
        return estimate

    def ramachandran_angles(self) -> np.ndarray:
        """Backbone (φ, ψ) of every sample: (N, n_pairs, 2) radians in [-π, π) (`backbone_angles`)."""
        return self.backbone_angles("ramachandran_angles()").pairs

    def backbone_angles(self, what: str = "backbone_angles()") -> BackboneAngles:
        """The samples' `BackboneAngles`: computed once, in blocks of :data:`ROWS_PER_BLOCK`
        configurations, then kept (``what`` names the caller when positions are missing)."""
        if self._angles is None:
            x = self._positions(what)
            self._angles = BackboneAngles.concatenate([BackboneAngles.of(self.target.topology, x[i : i + ROWS_PER_BLOCK])
                                                       for i in range(0, len(self), ROWS_PER_BLOCK)])
        return self._angles

    # -- free energies ---------------------------------------------------------------------
    def _cv(self, cv: Callable | Any, dim: int, trajectory: bool, w: np.ndarray) -> np.ndarray:
        """CV values (N,) or (N, 2): a callable's are computed for the samples of positive weight
        ``w`` (0 elsewhere); given values are used as they are, without a copy (a sample of weight 0
        adds nothing to any bin, whichever bin its value falls in)."""
        if callable(cv):
            values = self._evaluate(cv, trajectory, None, w > 0)
        else:
            values = as_float64(cv)
            if values.shape[:1] != (len(self),):
                raise CMTInputError(f"observable values have shape {values.shape}, expected ({len(self)}, ...).")
        values = values.reshape(len(self), -1) if dim == 2 else values.reshape(len(self))
        if dim == 2 and values.shape[1] != 2:
            raise CMTInputError(f"a 2-D free-energy surface needs two CV values per sample, got {values.shape[1]}.")
        return values

    def free_energy_profile(
        self,
        cv: Callable | Any,
        bins: int | Sequence[float] = 50,
        range: tuple[float, float] | None = None,
        error: str = "bootstrap",
        n_bootstrap: int = 200,
        seed: int = 0,
        trajectory: bool = False,
    ) -> FreeEnergyProfile:
        """1-D free-energy profile F(s) = -kT ln ρ(s) (kT and kJ/mol) with per-bin standard errors.

        ``cv``: values (N,) or a callable like `expectation`'s observable returning (B,);
        ``bins``: a count or edges; ``range``: (lo, hi) (default: the span of samples with
        positive weight; use (-π, π) for a torsion). Errors: the bootstrap (or delta-method)
        standard error of -ln p_bin; empty bins have F = +inf, and bins left empty by some
        bootstrap resampling (a few samples) an infinite error: unconstrained, not precise.
        """
        w = self._require_weight()
        s = self._cv(cv, 1, trajectory, w)
        edges = np.histogram_bin_edges(_edge_data(s, w, bins, range), bins=bins, range=range)
        n_bins = len(edges) - 1
        index = np.empty(len(s), np.int64)
        for start in builtins.range(0, len(s), ROWS_PER_BLOCK):  # in blocks: a few MB of temporaries
            b = s[start : start + ROWS_PER_BLOCK]
            i = np.clip(np.searchsorted(edges, b, side="right") - 1, 0, None)
            i[b == edges[-1]] = n_bins - 1
            i[(b < edges[0]) | (b > edges[-1]) | ~np.isfinite(b)] = n_bins
            index[start : start + ROWS_PER_BLOCK] = i
        del s
        p, f, err = binned_free_energy(index, n_bins, np.diff(edges), w, error, n_bootstrap, seed)
        return FreeEnergyProfile(edges, 0.5 * (edges[1:] + edges[:-1]), p, f, err, self.target.kT, error)

    def free_energy_surface(
        self,
        cv2: Callable | Any,
        bins: int | Sequence[Any] = 50,
        range: Sequence[tuple[float, float]] | None = None,
        error: str = "bootstrap",
        n_bootstrap: int = 200,
        seed: int = 0,
        trajectory: bool = False,
    ) -> FreeEnergySurface:
        """2-D free-energy surface F(s1, s2) (e.g. s = (φ, ψ) of `ramachandran_angles()[:, 0]`).

        ``cv2``: values (N, 2) or a callable returning (B, 2); ``bins``/``range`` as for
        `numpy.histogram2d`; errors as in `free_energy_profile`.
        """
        w = self._require_weight()
        s = self._cv(cv2, 2, trajectory, w)
        data = _edge_data(s, w, bins, range)
        _, e1, e2 = np.histogram2d(data[:, 0], data[:, 1], bins=bins, range=range)
        n1, n2 = len(e1) - 1, len(e2) - 1
        index = np.empty(len(s), np.int64)
        for start in builtins.range(0, len(s), ROWS_PER_BLOCK):  # in blocks: a few MB of temporaries
            b = s[start : start + ROWS_PER_BLOCK]
            idx = []
            for k, e in enumerate((e1, e2)):
                i = np.clip(np.searchsorted(e, b[:, k], side="right") - 1, 0, len(e) - 2)
                idx.append((i, (b[:, k] < e[0]) | (b[:, k] > e[-1]) | ~np.isfinite(b[:, k])))
            index[start : start + ROWS_PER_BLOCK] = np.where(idx[0][1] | idx[1][1], n1 * n2,
                                                             idx[0][0] * n2 + idx[1][0])
        del s, data
        volumes = np.outer(np.diff(e1), np.diff(e2)).ravel()
        p, f, err = binned_free_energy(index, n1 * n2, volumes, w, error, n_bootstrap, seed)
        shape = (n1, n2)
        return FreeEnergySurface((e1, e2), p.reshape(shape), f.reshape(shape), err.reshape(shape), self.target.kT, error)

    # -- resampling ------------------------------------------------------------------------
    def resample(self, n: int | None = None, seed: int = 0) -> np.ndarray:
        """Unweighted configurations (n, n_atoms, 3) nm by systematic resampling (see `resample_indices`)."""
        return np.array(self._positions("resample()")[self.resample_indices(n, seed)])

    # -- other targets ---------------------------------------------------------------------
    def reweight_to(
        self,
        new: Target | Any,
        energy: Callable | None = None,
        batch_size: int = 1000,
        progress: bool = False,
        ess_warning: float = 0.01,
        min_effective_samples: float = MIN_EFFECTIVE_SAMPLES,
    ) -> ReweightedEnsemble:
        """The same samples reweighted to another temperature or another System (same topology).

        ``new``: a temperature (K or Quantity) — u is rescaled by kT_old / kT_new, no energy
        evaluation, so ``energy`` must not be given — or a Target with the same topology
        (energies evaluated with ``energy``, default ``make_energy(new, "auto")`` as on the command line;
        a Target with the same System only rescales). Warns (`LowESSWarning`) when the new ESS is below
        ``ess_warning`` or N · ESS below ``min_effective_samples``.
        """
        if energy is not None and not isinstance(new, Target):
            raise CMTInputError(
                f"energy= is only used with a Target, but {new!r} is a temperature (reweighting to it only rescales "
                f"the stored energies); drop energy= or pass a Target whose System energy should evaluate."
            )
        if isinstance(new, Target):
            if new.topology_fingerprint() != self.target.topology_fingerprint():
                raise CMTInputError(
                    f"{new.name} has another topology than {self.target.name}: reweighting needs the same atoms and bonds."
                )
            target = new
            same_system = energy is None and new.system_fingerprint() == self.target.system_fingerprint()
        else:
            target = self.target.with_temperature(kelvin(new))
            same_system = True
        if same_system:
            u = self._energies_kept("reweight_to()") * (self.target.kT / target.kT)
        else:
            u = _energies(target, self._positions("reweighting to another System"), energy, batch_size, progress)
        out = ReweightedEnsemble(
            target, self.positions, self.log_q, u, self.invalid,
            {**self.metadata, "reweighted_from": {"target": self.target.name, "temperature": self.target.temperature}},
            angles=self._angles,
        )
        warn_if_low_ess(out, f"reweighting to {target.name} at {target.temperature:g} K", min_effective_samples,
                         ess_warning)
        return out

    # -- export ----------------------------------------------------------------------------
    def to_mdtraj(self, indices: Any = None):
        """An `mdtraj.Trajectory` of the samples (or of ``indices``), positions in nm."""
        import mdtraj

        x = self._positions("to_mdtraj()")
        x = x if indices is None else x[np.asarray(indices)]
        return mdtraj.Trajectory(x.astype(np.float32), mdtraj.Topology.from_openmm(self.target.topology))

    def save_dcd(self, path_dcd: str | os.PathLike, path_pdb: str | os.PathLike | None = None) -> None:
        """Write the samples as a DCD trajectory and (optionally) the first one as a topology PDB.

        DCD stores single-precision Å: positions round-trip to ~1e-6 nm. Weights are not in
        the DCD: write them with `save_weights`.
        """
        traj = self.to_mdtraj()
        traj.save_dcd(str(path_dcd))
        if path_pdb is not None:
            traj[0].save_pdb(str(path_pdb))

    def save_weights(self, path: str | os.PathLike) -> None:
        """Normalised weights w̄ (N,) as ``.npy``, or ``.csv`` with columns index, log_weight, weight
        (written atomically; the CSV a block of rows at a time)."""
        path = Path(path)
        if path.suffix not in (".npy", ".csv"):
            raise CMTInputError(f"weights file {path.name} must end in .npy or .csv.")
        w = self.weights
        with atomic_writer(path) as handle:
            if path.suffix == ".npy":
                np.save(handle, w)
                return
            handle.write(b"index,log_weight,weight\n")
            for i in range(0, len(w), ROWS_PER_BLOCK):
                rows = np.column_stack([np.arange(i, min(i + ROWS_PER_BLOCK, len(w))), self.log_weights[i : i + ROWS_PER_BLOCK],
                                        w[i : i + ROWS_PER_BLOCK]])
                np.savetxt(handle, rows, delimiter=",", fmt=["%d", "%.17g", "%.17g"])

    def npz_arrays(self) -> dict:
        """The ``cmt-openmm sample`` file's arrays but the positions, in its order: log_q,
        reduced_energy (raw, +inf where failed), log_weights (N,), invalid (N,) bool, temperature
        (K), and ``metadata`` (JSON: target name, fingerprints, summary, provenance)."""
        self._energies_kept("npz_arrays()")
        meta = {
            **self.metadata,
            **self.summary(),
            "topology_fingerprint": self.target.topology_fingerprint(),
            "system_fingerprint": self.target.system_fingerprint(),
        }
        return {"log_q": self.log_q, "reduced_energy": self.reduced_energy, "log_weights": self.log_weights,
                "invalid": self.invalid, "temperature": np.float64(self.target.temperature),
                "metadata": np.array(json.dumps(meta, default=float))}

    def save_npz(self, path: str | os.PathLike) -> None:
        """The ``cmt-openmm sample`` file: positions (N, n_atoms, 3) nm and `npz_arrays`."""
        positions = self._positions("save_npz()")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as handle:
            npz = NpzWriter(handle)
            npz.add(positions=positions, **self.npz_arrays())
            npz.close()

    @classmethod
    def load_npz(cls, path: str | os.PathLike, target: Target, mmap: bool = False) -> ReweightedEnsemble:
        """Read a `save_npz` file back for ``target`` (its topology must match; the file's
        temperature is applied to ``target`` when it differs); ``mmap``: positions memory-mapped
        from the file (read when used), for files larger than memory."""
        positions = open_memmap(path, "positions") if mmap else None
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["metadata"])) if "metadata" in data else {}
            fingerprint = meta.get("topology_fingerprint")
            if fingerprint is not None and fingerprint != target.topology_fingerprint():
                raise CMTInputError(f"{path} holds samples of another topology than {target.name}: pass the right target.")
            if "temperature" in data and not math.isclose(float(data["temperature"]), target.temperature):
                target = target.with_temperature(float(data["temperature"]))
            invalid = data["invalid"] if "invalid" in data else None
            positions = data["positions"] if positions is None else positions
            return cls(target, positions, data["log_q"], data["reduced_energy"], invalid, meta)


def _edge_data(s: np.ndarray, w: np.ndarray, bins: Any, range: Any) -> np.ndarray:
    """The CV values (of the samples of positive weight) that bin edges are computed from: none
    when ``range`` and the number of bins (or the edges) fix them, so that no copy is made."""
    if range is not None and not isinstance(bins, str):
        return s[:0]
    return s[w > 0]


def _energies(target: Target, positions: np.ndarray, energy: Callable | None, batch_size: int, progress: bool):
    from tqdm.auto import tqdm

    own = energy is None
    if own:  # as the command line: the faster verified backend (torch or OpenMM)
        from ..energy.select import make_energy

        energy = make_energy(target, "auto")
    try:
        parts = []
        for start in tqdm(range(0, len(positions), batch_size), disable=not progress, desc="energies", unit="batch"):
            parts.append(as_float64(energy(positions[start : start + batch_size])).reshape(-1))
    finally:
        if own:
            energy.close()
    u = np.concatenate(parts) if parts else np.zeros(0)
    return np.where(np.isnan(u), np.inf, u)


def reweight(
    generator: Any,
    target: Target,
    n: int,
    batch_size: int = 1000,
    seed: int = 0,
    energy: Callable | None = None,
    progress: bool = True,
    min_effective_samples: float = MIN_EFFECTIVE_SAMPLES,
    out: str | os.PathLike | None = None,
    positions: bool = True,
) -> ReweightedEnsemble:
    """Draw ``n`` samples from ``generator`` in batches and weight them towards ``target``.

    ``generator``: a `BoltzmannGenerator` (or any object with ``sample(n, generator) -> (x, log_q)``
    and optionally ``chirality_flipped(x)``); samples with flipped chirality get weight 0.
    ``energy``: a callable (B, n_atoms, 3) -> u (B,) (default: ``make_energy(target, "auto")``,
    the faster verified backend as on the command line, closed afterwards). ``seed`` seeds the
    ``torch.Generator`` used for sampling. Raw energies are used (never regularised). Warns
    (`LowESSWarning`) when the effective number of samples N · ESS is below ``min_effective_samples``:
    the estimates and their error bars then rest on a few samples (see `ReweightedEnsemble.reliable`;
    0 turns the warning off, e.g. for draws that are pooled before use).

    Memory: by default every position is kept (N × n_atoms × 24 bytes). ``out`` (an ``.npz``
    path) writes the `save_npz` file as the batches come, atomically, and returns the ensemble
    with its positions memory-mapped from it; ``positions=False`` keeps none, only the weights
    and (peptides) the backbone angles. Either way the samples and weights are those of the
    in-memory draw with the same arguments (:mod:`.drawing`).
    """
    if out is not None:
        from .sample_files import write_samples

        write_samples(generator, target, n, out, batch_size=batch_size, seed=seed, energy=energy, progress=progress,
                      min_effective_samples=min_effective_samples)
        return ReweightedEnsemble.load_npz(out, target, mmap=True)
    keep_angles = not positions and is_peptide(target)
    x = angles = None
    log_q, u, invalid = np.empty(int(n)), np.empty(int(n)), np.empty(int(n), bool)
    for chunk in draw_chunks(generator, target, n, batch_size=batch_size, seed=seed, energy=energy, progress=progress):
        rows = slice(chunk.start, chunk.start + len(chunk.log_q))
        if positions:
            x = np.empty((int(n),) + chunk.positions.shape[1:]) if x is None else x
            x[rows] = chunk.positions
        if keep_angles:
            a = BackboneAngles.of(target.topology, chunk.positions)
            angles = BackboneAngles.empty(n, a) if angles is None else angles
            angles.put(rows, a)
        log_q[rows], u[rows], invalid[rows] = chunk.log_q, chunk.reduced_energy, chunk.invalid
    ensemble = ReweightedEnsemble(target, x, log_q, u, invalid, provenance(generator, seed, n), angles=angles)
    warn_if_low_ess(ensemble, f"reweighting {int(n)} generator samples to {target.name}", min_effective_samples)
    return ensemble
