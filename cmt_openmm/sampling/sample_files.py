"""The files of ``cmt-openmm sample``, written while the samples are drawn, in bounded memory.

Holding every sample (1e7 alanine-dipeptide samples are 5.3 GB of float64 positions) fails
late and loses everything. Here positions go to the npz (and the DCD of all samples) as each
chunk is drawn (:mod:`.drawing`, :mod:`.npz_stream`); only the per-sample numbers stay in memory
(log q, u, invalid and the weights: ~33 bytes a sample). Resampled frames are read back from the
npz a block at a time. Every file is written under a temporary name beside its final one and
moved there (``os.replace``) once complete (the npz, DCD and PDB together, when all three are), so
a killed ``sample`` leaves no half-written file under a final name; an exception (SIGTERM or
SIGINT turned into one by the command line) removes the temporary files too. SIGKILL leaves them
(``.NAME.tmp-PID.npz`` beside the output): the next ``sample`` writing to the same files removes
those whose process is gone (:func:`remove_stale_temporaries`; never those of a live process, nor
one whose file is still locked by its writer, e.g. on another host of a shared file system).

It starts again rather than resuming: the per-sample log q, energies and flags are written only at
the end (they are held in memory), the zip member of the positions has no size or CRC until it is
closed, and the DCD is mdtraj's; keeping the killed run's chunks would mean re-reading the 5 GB of
positions for their CRC and re-evaluating their energies, which is most of the cost of drawing them.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
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
    removed = remove_stale_temporaries(out, dcd, pdb, weights)
    with contextlib.ExitStack() as files:  # each file moved to its final name as the block ends without error
        temporary = lambda path: _locked(files.enter_context(atomic_writer(path)))  # noqa: E731
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
        if removed:
            summary["removed_temporaries"] = [str(p) for p in removed]
        arrays = ensemble.npz_arrays()
        frames = None
        if resample is not None:
            frames = ensemble.resample_indices(resample, seed=seed)
            arrays["resampled_indices"] = frames
            distinct = len(np.unique(frames))
            summary.update(resampled=int(len(frames)), resampled_distinct=distinct, resampled_note=(
                f"the {len(frames):,} resampled frames hold {distinct:,} distinct sample{'s' * (distinct != 1)} "
                f"(resampling repeats samples in proportion to their weights) and carry no more information than "
                f"the N_eff = {ensemble.n_effective:,.0f} effective samples of the {int(n):,} drawn."))
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


def remove_stale_temporaries(*paths: str | os.PathLike | None) -> list[Path]:
    """Remove the temporaries ``.NAME.tmp-PID.EXT`` of ``paths`` (those of
    :func:`~cmt_openmm.files.atomic_writer`) that a killed writer left; returns those removed.

    One is removed only when its process ``PID`` no longer runs on this host and no process holds
    the lock its writer takes (:func:`_locked`; released when the writer dies), so a live
    ``sample`` writing the same output, here or on another host sharing the file system, keeps its file.
    """
    removed = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        name = re.compile(rf"\.{re.escape(path.stem)}\.tmp-(\d+){re.escape(path.suffix)}")
        for entry in path.parent.glob(f".{glob.escape(path.stem)}.tmp-*{glob.escape(path.suffix)}"):
            match = name.fullmatch(entry.name)
            if match and not _running(int(match.group(1))) and not _held(entry):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (ours, another user's, or a zombie)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked(handle):
    """Take an exclusive ``flock`` on a temporary file's ``handle`` (held until it is closed, or its
    process dies), so that no other ``sample`` takes the file for stale; returns ``handle``."""
    with contextlib.suppress(OSError):  # a file system without locks: the PID check alone
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def _held(path: Path) -> bool:
    """Whether another process holds the lock of :func:`_locked` on ``path``."""
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


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
