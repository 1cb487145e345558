"""Generator samples with their raw energies, drawn one chunk at a time.

A large ensemble must not be held whole (1e7 alanine-dipeptide samples are 5.3 GB of float64
positions). `reweight` (in memory, or positions streamed into a file), the ``cmt-openmm sample``
files (written as chunks come) and the report's draws all draw through :func:`draw_chunks`, so
one seed gives the same samples and weights whichever keeps what: the ``torch.Generator`` is used
by ``generator.sample`` alone, batch after batch, and a configuration's energy does not depend on
the batch it is evaluated in.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from ..errors import CMTInputError
from ..target import Target
from ..units import as_float64


class Chunk(NamedTuple):
    """Samples ``start`` … ``start + b - 1`` of a draw: positions (b, n_atoms, 3) nm, log_q (b,) (the
    generator's log density), reduced_energy (b,) raw u = U / kT (+inf where evaluation failed),
    invalid (b,) bool (flipped chirality)."""

    start: int
    positions: np.ndarray
    log_q: np.ndarray
    reduced_energy: np.ndarray
    invalid: np.ndarray


def draw_chunks(generator: Any, target: Target, n: int, *, batch_size: int = 1000, seed: int = 0,
                energy: Callable | None = None, progress: bool = False) -> Iterator[Chunk]:
    """``n`` samples of ``generator`` with their energies under ``target``, ``batch_size`` at a time.

    ``generator``: an object with ``sample(b, generator=torch.Generator) -> (x, log_q)`` and
    optionally ``chirality_flipped(x)`` and ``topology_fingerprint``; ``energy``: a callable
    (B, n_atoms, 3) -> u (B,) (default ``make_energy(target, "auto")``, closed at the end);
    ``seed`` seeds the ``torch.Generator`` on the generator's device.
    """
    import torch
    from tqdm.auto import tqdm

    n, batch_size = int(n), int(batch_size)
    if n < 1 or batch_size < 1:
        raise CMTInputError(f"n ({n}) and batch_size ({batch_size}) must be positive integers.")
    fingerprint = getattr(generator, "topology_fingerprint", None)
    if isinstance(fingerprint, str) and fingerprint != target.topology_fingerprint():
        raise CMTInputError(f"the generator was trained on another topology than {target.name}: pass its own target.")
    device = next(iter(generator.parameters()), torch.empty(0)).device if hasattr(generator, "parameters") else "cpu"
    rng = torch.Generator(device=device).manual_seed(int(seed))
    own = energy is None
    if own:  # as the command line: the faster verified backend (torch or OpenMM)
        from ..energy.select import make_energy

        energy = make_energy(target, "auto")
    try:
        with tqdm(total=n, disable=not progress, desc="sampling", unit="sample") as bar:
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                with torch.no_grad():
                    x, log_q = generator.sample(b, generator=rng)
                    flipped = generator.chirality_flipped(x) if hasattr(generator, "chirality_flipped") else None
                positions = as_float64(x)
                u = as_float64(energy(positions)).reshape(-1)
                invalid = np.zeros(b, bool) if flipped is None else np.asarray(as_float64(flipped), bool).reshape(-1)
                yield Chunk(start, positions, as_float64(log_q).reshape(-1), np.where(np.isnan(u), np.inf, u), invalid)
                bar.update(b)
    finally:
        if own:
            energy.close()


def provenance(generator: Any, seed: int, n: int) -> dict:
    """The metadata of a draw: seed, n and the generator's content hash where it has one."""
    out = {"seed": int(seed), "n": int(n)}
    content_hash = getattr(generator, "content_hash", None)
    if callable(content_hash):
        out["generator_hash"] = content_hash()
    return out
