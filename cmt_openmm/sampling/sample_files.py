"""The files of ``cmt-openmm sample``, written while the samples are drawn, in bounded memory.

Holding every sample (1e7 alanine-dipeptide samples are 5.3 GB of float64 positions) fails
late and loses everything. Here positions go to the npz (and the DCD of all samples) as each
chunk is drawn (:mod:`.drawing`, :mod:`.npz_stream`); only the per-sample numbers stay in memory
(log q, u, invalid and the weights: ~33 bytes a sample). Resampled frames are read back from the
npz a block at a time. Every file is written under a temporary name beside its final one and
moved there (``os.replace``) once complete (the npz, DCD and PDB together, when all three are), so
a killed ``sample`` leaves no half-written file under a final name; an exception (SIGTERM or
SIGINT turned into one by the command line) removes the temporary files too, SIGKILL leaves them
(``.NAME.tmp-PID.npz`` beside the output; a new run does not resume them).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..files import atomic_writer
from ..target import Target
from .drawing import draw_chunks, provenance
from .estimators import MIN_EFFECTIVE_SAMPLES
from .npz_stream import NpzWriter, iter_rows
from .reweighting import ROWS_PER_BLOCK, ReweightedEnsemble, warn_if_low_ess


def write_samples(generator: Any, target: Target, n: int, out: str | os.PathLike, *,
                  pdb: str | os.PathLike | None = None, dcd: str | os.PathLike | None = None,
                  weights: str | os.PathLike | None = None, resample: int | None = None, seed: int = 0,
                  batch_size: int = 1000, temperature: float | None = None, energy: Callable | None = None,
                  progress: bool = True, min_effective_samples: float = MIN_EFFECTIVE_SAMPLES,
                  world: Any = None) -> tuple[ReweightedEnsemble, dict]:
    """Draw ``n`` samples (:func:`~.drawing.draw_chunks`) and write them as they come: ``out`` (the
    `ReweightedEnsemble.save_npz` file; with ``resample``, also ``resampled_indices``), ``weights``
    (.npy/.csv), ``dcd`` (every sample, or the ``resample`` systematically resampled frames) and
    ``pdb`` (its first frame). ``temperature`` (K) reweights to another temperature. Under torchrun
    (``world``), this is rank 0's part; the other ranks draw with :func:`~.drawing.draw_chunks`.

    Returns the ensemble (without positions: they are in ``out``) and the summary (n, ESS, failed
    samples, the files written; with ``resample``, how many frames are distinct).
    """
    out = Path(out)
    with contextlib.ExitStack() as files:  # each file moved to its final name as the block ends without error
        temporary = lambda path: files.enter_context(atomic_writer(path))  # noqa: E731
        npz = files.enter_context(NpzWriter(temporary(out)))
        every_frame = _DcdFrames(temporary(dcd).name) if dcd and resample is None else None
        if every_frame is not None:
            files.callback(every_frame.close)  # before the DCD is moved to its final name
        log_q, u, invalid = np.empty(int(n)), np.empty(int(n)), np.empty(int(n), bool)
        first = None
        with npz.stream("positions", (int(n), target.n_atoms, 3), np.float64) as positions:
            for chunk in draw_chunks(generator, target, n, batch_size=batch_size, seed=seed, energy=energy,
                                     progress=progress, world=world):
                rows = slice(chunk.start, chunk.start + len(chunk.log_q))
                positions.write(chunk.positions)
                if every_frame is not None:
                    every_frame.write(chunk.positions)
                first = chunk.positions[:1].copy() if first is None else first
                log_q[rows], u[rows], invalid[rows] = chunk.log_q, chunk.reduced_energy, chunk.invalid
        ensemble = ReweightedEnsemble(target, None, log_q, u, invalid, provenance(generator, seed, n))
        warn_if_low_ess(ensemble, f"reweighting {int(n)} generator samples to {target.name}", min_effective_samples)
        if temperature is not None:
            ensemble = ensemble.reweight_to(temperature)
        summary = {"out": str(out), **ensemble.summary(), "generator_hash": ensemble.metadata.get("generator_hash")}
        arrays = ensemble.npz_arrays()
        frames = None
        if resample is not None:
            frames = ensemble.resample_indices(resample, seed=seed)
            arrays["resampled_indices"] = frames
            distinct = len(np.unique(frames))
            summary.update(resampled=int(len(frames)), resampled_distinct=distinct, resampled_note=(
                f"the {len(frames):,} resampled frames hold {distinct:,} distinct samples (resampling repeats samples "
                f"in proportion to their weights) and carry no more information than the N_eff = "
                f"{ensemble.n_effective:,.0f} effective samples of the {int(n):,} drawn."))
        npz.add(**arrays)
        npz.close()
        if frames is not None and (dcd or pdb):
            first = _write_resampled(npz.handle.name, frames, temporary(dcd).name if dcd else None)
        if weights:
            ensemble.save_weights(weights)  # atomically, on its own
            summary["weights"] = str(weights)
        if dcd:
            summary["dcd"] = str(dcd)
            summary["dcd_frames"] = "resampled, unweighted" if frames is not None else "all samples, weights in the npz"
        if pdb:
            _mdtraj(first, target).save_pdb(temporary(pdb).name)
            summary["pdb"] = str(pdb)
    return ensemble, summary


def _mdtraj(x: np.ndarray, target: Target):
    """An `mdtraj.Trajectory` of positions (B, n_atoms, 3) nm, as `ReweightedEnsemble.to_mdtraj` makes it."""
    import mdtraj

    return mdtraj.Trajectory(x.astype(np.float32), mdtraj.Topology.from_openmm(target.topology))


class _DcdFrames:
    """A DCD file written a block of frames at a time, with the bytes `mdtraj.Trajectory.save_dcd` writes."""

    def __init__(self, path: str):
        from mdtraj.formats import DCDTrajectoryFile

        self._file = DCDTrajectoryFile(path, "w", force_overwrite=True)

    def write(self, x: np.ndarray) -> None:
        """Append frames x (B, n_atoms, 3) nm (stored as float32 Å)."""
        from mdtraj.utils import in_units_of

        self._file.write(xyz=in_units_of(x.astype(np.float32), "nanometers", self._file.distance_unit))

    def close(self) -> None:
        self._file.close()


def _write_resampled(npz_path: str, frames: np.ndarray, dcd_path: str | None) -> np.ndarray:
    """Write the positions of ``frames`` (sorted sample indices, repeats allowed) from the npz at
    ``npz_path`` to ``dcd_path`` (when given), reading the npz a block at a time; returns the first
    frame (1, n_atoms, 3)."""
    dcd = None if dcd_path is None else _DcdFrames(dcd_path)
    first = None
    try:
        for start, block in iter_rows(npz_path, "positions", ROWS_PER_BLOCK):
            lo, hi = np.searchsorted(frames, [start, start + len(block)])
            if hi > lo:
                x = block[frames[lo:hi] - start]
                first = x[:1].copy() if first is None else first
                if dcd is None:
                    break  # only the first frame was wanted
                dcd.write(x)
    finally:
        if dcd is not None:
            dcd.close()
    return first
