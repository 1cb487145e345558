"""Data-parallel training over processes: the ranks under ``torchrun`` and the shards of a buffer.

A run under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` set) joins one
``torch.distributed`` process group (:func:`join`: gloo on CPUs, nccl with ``device: cuda``, rank r
on GPU ``LOCAL_RANK``). The work of a step is split by **shards**: a draw of N flow samples is
``n_shards`` independent draws of N/n_shards, shard s from its own random stream seeded by
(seed, s, step). Each rank draws the contiguous block of shards it holds (:class:`Layout`), evaluates
their energies, and shares only what every rank needs: the buffer's log q and log p̃
(:meth:`Layout.gather`, 2N numbers), the gradients of its part of each minibatch
(:meth:`Layout.reduce_gradients`, one all-reduce of the flow's parameters) and the step's counters.
Every rank then solves the same dual and takes the same Adam step, so the weights stay equal on
every rank without being sent.

Because the buffer is defined by (seed, shard, step) and the minibatches by one stream shared by
every rank, a run on R ranks with n_shards = S equals a one-process run with the same seed and S
shards, to float rounding (sums split over ranks), and it resumes on any number of ranks that
divides S. ``n_shards = 1`` in one process is the plain path: one stream draws the buffer and the
minibatches, as before shards existed.

Hand-written rather than DistributedDataParallel: a rank's part of a weighted minibatch varies in
size from step to step (it can be empty), and the dual needs a gather, not a gradient hook.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CMTInputError, CMTPeerLost

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a rank (a slow step) before failing


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes: rank in [0, size), and on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    owns_group: bool = False  # this run created the process group (and destroys it in :func:`leave`)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, reports and progress."""
        return self.rank == 0


def launched() -> World:
    """The world torchrun's environment describes (rank 0 of 1 outside torchrun); joins nothing."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", 1))
    return World(rank=int(env.get("RANK", 0)), size=size, local_rank=int(env.get("LOCAL_RANK", 0)),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", size)))


def elastic_restart() -> bool:
    """True in a process torchrun started again after a failure (``--max-restarts``): it resumes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0


def join(device_type: str) -> World:
    """Join the run's process group (creating it under torchrun); rank 0 of 1 without torchrun.

    device_type: "cpu" (gloo) or "cuda" (nccl; this rank's GPU becomes ``cuda:LOCAL_RANK``).
    """
    world = launched()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), world.local_rank, world.local_size)
    if world.size == 1:
        return World()
    if not dist.is_available():
        raise CMTInputError("this torch has no torch.distributed, so the run cannot be split over processes; "
                            "run it as one process (without torchrun).")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    store = _attempt_store(world)
    if store is None:
        dist.init_process_group(backend, timeout=TIMEOUT)
    else:
        dist.init_process_group(backend, timeout=TIMEOUT, store=store, rank=world.rank, world_size=world.size)
    return World(dist.get_rank(), dist.get_world_size(), world.local_rank, world.local_size, owns_group=True)


def _attempt_store(world: World):
    """A store of this launch attempt alone, where torchrun shares its own store with the ranks
    (``TORCHELASTIC_USE_AGENT_STORE``); None to let ``init_process_group`` read the environment.

    The shared store keeps the keys of an attempt that failed, so the ranks torchrun restarts would
    read their dead peers' addresses (pytorch issue 135712). Each rank counts itself in on joining;
    attempt g's ranks read counts in (g·R, (g+1)·R] and take the prefix g, the same on every node
    (torchrun's restart count is not: each node's agent keeps its own).
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    shared = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=TIMEOUT)
    attempt = (shared.add("cmt_openmm/joined", 1) - 1) // world.size
    return dist.PrefixStore(f"cmt_openmm/attempt_{attempt}", shared)


def peer_lost(world: World, exc: BaseException, run_dir) -> CMTPeerLost | None:
    """The one-sentence error for a collective that failed because another rank stopped (its
    connection closed or reset), or None for any other error."""
    text = str(exc)
    lost = isinstance(exc, getattr(dist, "DistNetworkError", ())) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))
    if world.size == 1 or not lost:
        return None
    where = f"its last checkpoint in {run_dir} is intact: " if run_dir is not None else ""
    return CMTPeerLost(
        f"rank {world.rank} lost contact with the run's other processes (another rank stopped; its own output says "
        f"why); {where}torchrun --max-restarts N restarts the ranks and they resume, or run the same command again "
        f"with --resume.")


def leave(world: World) -> None:
    """Destroy the process group if this run created it."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(world: World, value):
    """Rank 0's ``value`` on every rank (pickled between the run's own processes: a checkpoint, a message)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, 0, device=_collective_device())
    return box[0]


def on_main(world: World, action):
    """``action()`` on rank 0 only, its result on rank 0 (None elsewhere). A CMTInputError it raises
    is raised on every rank, so that no rank waits for one that has given up."""
    error = None
    result = None
    if world.main:
        try:
            result = action()
        except CMTInputError as exc:
            error = str(exc)
    error = broadcast_object(world, error)
    if error is not None:
        raise CMTInputError(error)
    return result


def _collective_device() -> torch.device:
    """Where collectives' tensors live: the current GPU for nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_shards(n_shards: int, processes: int) -> None:
    """Refuse, in one sentence, shards that ``processes`` ranks cannot split evenly."""
    if n_shards % processes:
        raise CMTInputError(
            f"this run draws its samples in {n_shards} shard{'s' if n_shards > 1 else ''}, which {processes} "
            f"processes cannot split evenly; run it on a number of processes that divides {n_shards}, or start "
            f"a new run with shards: auto (one shard per process).")


class Layout:
    """How a run's draws are split: ``n_shards`` random streams over ``world.size`` ranks.

    Rank r holds shards [r·S/R, (r+1)·S/R); a draw of n samples gives shard s
    ``n // S + (s < n % S)`` of them, so the global order is shard 0, 1, …, S−1.
    """

    def __init__(self, world: World, n_shards: int, seed: int, rng: torch.Generator):
        check_shards(n_shards, world.size)
        self.world, self.n_shards, self.seed, self.device = world, n_shards, seed, rng.device
        per_rank = n_shards // world.size
        self.shards = range(world.rank * per_rank, (world.rank + 1) * per_rank)
        self.streams: list[torch.Generator] = [rng]  # one shard: the run's stream; else set per step

    @property
    def sharded(self) -> bool:
        """More than one stream: draws, gathers and fits take the sharded path (even in one process)."""
        return self.n_shards > 1

    def sizes(self, n: int) -> list[int]:
        """The samples each shard draws of a draw of n."""
        return [n // self.n_shards + (s < n % self.n_shards) for s in range(self.n_shards)]

    def local_range(self, n: int) -> tuple[int, int]:
        """[lo, hi): this rank's rows of a global draw of n."""
        sizes = self.sizes(n)
        return sum(sizes[:self.shards.start]), sum(sizes[:self.shards.stop])

    def begin_step(self, step: int) -> None:
        """Set the streams of step ``step`` (counted from 0): one fresh stream per local shard,
        seeded by (seed, shard, step); with one shard the run's own stream goes on."""
        if not self.sharded:
            return
        self.streams = []
        for shard in self.shards:
            seed = int(np.random.SeedSequence([self.seed, shard, step]).generate_state(1, np.uint64)[0] >> 1)
            self.streams.append(torch.Generator(device=self.device).manual_seed(seed))

    def draw(self, sampler, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a global draw of n: ``sampler(k, generator=stream)`` per local shard,
        concatenated; sampler is ``generator.sample`` or ``generator.rsample`` (x, log q)."""
        sizes = self.sizes(n)
        parts = [sampler(sizes[s], generator=stream) for s, stream in zip(self.shards, self.streams)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # -- collectives (identities in one process) --------------------------------------------
    def gather(self, local: torch.Tensor, n: int, repeats: int = 1) -> torch.Tensor:
        """The global tensor, ranks' rows in rank order, of which this rank holds ``local``: its rows
        of ``repeats`` draws of n each (:meth:`local_range`)."""
        if self.world.size == 1:
            return local
        per_rank = self.n_shards // self.world.size
        sizes = self.sizes(n)
        counts = [repeats * sum(sizes[r * per_rank:(r + 1) * per_rank]) for r in range(self.world.size)]
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def reduce_gradients(self, parameters, loss: torch.Tensor | float) -> float:
        """Sum each parameter's gradient and ``loss`` over the ranks (missing gradients count as 0);
        returns the summed loss. Every rank then holds the gradient of the whole minibatch."""
        loss = float(loss)
        if self.world.size == 1:
            return loss
        parameters = [p for p in parameters if p.requires_grad]
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in parameters] + [p.grad.new_tensor([loss])])
        dist.all_reduce(flat)
        offset = 0
        for p in parameters:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        return float(flat[-1])

    def sum(self, *values: float) -> list[float]:
        """The sums over ranks of a few numbers (float64)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, *values: float) -> list[float]:
        """The maxima over ranks of a few numbers (float64)."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values, op) -> list[float]:
        if self.world.size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op)
        return t.tolist()

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Make every rank's weights rank 0's (they start equal; this makes it certain)."""
        if self.world.size == 1:
            return
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)
