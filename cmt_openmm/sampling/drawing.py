"""Generator samples with their raw energies, drawn one chunk at a time.

A large ensemble must not be held whole (1e7 alanine-dipeptide samples are 5.3 GB of float64
positions). `reweight` (in memory, or positions streamed into a file), the ``cmt-openmm sample``
files (written as chunks come) and the report's draws all draw through :func:`draw_chunks`, so
one seed gives the same samples and weights whichever keeps what: the ``torch.Generator`` is used
by ``generator.sample`` alone, batch after batch, and a configuration's energy does not depend on
the batch it is evaluated in.

Under torchrun (``world``: :class:`~cmt_openmm.training.distributed.World` of size R) the
chunks are shared out: rank r draws chunks r, r + R, … and skips the others' on its random stream
(``generator.skip``: the prior's draws alone), so every chunk is the one a single process draws;
each rank sends its chunks to rank 0, which yields them all, in order. The other ranks yield none.
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
                energy: Callable | None = None, progress: bool = False, world: Any = None) -> Iterator[Chunk]:
    """``n`` samples of ``generator`` with their energies under ``target``, ``batch_size`` at a time.

    ``generator``: an object with ``sample(b, generator=torch.Generator) -> (x, log_q)`` and
    optionally ``chirality_flipped(x)`` and ``topology_fingerprint``; ``energy``: a callable
    (B, n_atoms, 3) -> u (B,) (default ``make_energy(target, "auto")``, closed at the end);
    ``seed`` seeds the ``torch.Generator`` on the generator's device; ``world``: the processes
    to share the chunks among (see the module docstring; None: this process alone).
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
    rank, size = (0, 1) if world is None else (world.rank, world.size)
    if size > 1 and not hasattr(generator, "skip"):
        raise CMTInputError("this generator cannot share a draw among processes (it has no skip()); "
                            "sample it in one process.")
    relay = _Relay(target.n_atoms) if size > 1 else None
    try:
        with tqdm(total=n, disable=not progress or rank != 0, desc="sampling", unit="sample") as bar:
            for index, start in enumerate(range(0, n, batch_size)):
                b = min(batch_size, n - start)
                owner = index % size
                if owner != rank:
                    generator.skip(b, generator=rng)
                    chunk = relay.receive(start, b, owner) if rank == 0 else None
                else:
                    chunk = _draw(generator, energy, rng, start, b)
                    if rank != 0:
                        relay.send(chunk)
                if chunk is not None and rank == 0:
                    yield chunk
                bar.update(b)
            if relay is not None:
                relay.finish()
    finally:
        if own:
            energy.close()


def _draw(generator: Any, energy: Callable, rng, start: int, b: int) -> Chunk:
    """Samples start … start + b − 1 of a draw (the stream ``rng`` at their place)."""
    import torch

    with torch.no_grad():
        x, log_q = generator.sample(b, generator=rng)
        flipped = generator.chirality_flipped(x) if hasattr(generator, "chirality_flipped") else None
    positions = as_float64(x)
    u = as_float64(energy(positions)).reshape(-1)
    invalid = np.zeros(b, bool) if flipped is None else np.asarray(as_float64(flipped), bool).reshape(-1)
    return Chunk(start, positions, as_float64(log_q).reshape(-1), np.where(np.isnan(u), np.inf, u), invalid)


class _Relay:
    """Chunks sent from the ranks that draw them to rank 0, one float64 tensor each: positions,
    log q, u and the invalid flag side by side, (b, 3 n_atoms + 3). A rank keeps one send in
    flight, so that it draws its next chunk while rank 0 takes the last."""

    def __init__(self, n_atoms: int):
        self.n_atoms = n_atoms
        self.pending = None  # the send in flight, and its tensor (kept alive until the send completes)
        self.buffer = None

    def send(self, chunk: Chunk) -> None:
        import torch
        import torch.distributed as dist

        packed = np.concatenate([chunk.positions.reshape(len(chunk.log_q), -1), chunk.log_q[:, None],
                                 chunk.reduced_energy[:, None], chunk.invalid[:, None].astype(np.float64)], axis=1)
        self.finish()
        self.buffer = torch.from_numpy(packed)
        self.pending = dist.isend(self.buffer, dst=0)

    def receive(self, start: int, b: int, owner: int) -> Chunk:
        import torch
        import torch.distributed as dist

        packed = torch.empty((b, 3 * self.n_atoms + 3), dtype=torch.float64)
        dist.recv(packed, src=owner)
        packed = packed.numpy()
        return Chunk(start, packed[:, :-3].reshape(b, self.n_atoms, 3).copy(), packed[:, -3].copy(),
                     packed[:, -2].copy(), packed[:, -1] > 0.5)

    def finish(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


def provenance(generator: Any, seed: int, n: int) -> dict:
    """The metadata of a draw: seed, n and the generator's content hash where it has one."""
    out = {"seed": int(seed), "n": int(n)}
    content_hash = getattr(generator, "content_hash", None)
    if callable(content_hash):
        out["generator_hash"] = content_hash()
    return out
