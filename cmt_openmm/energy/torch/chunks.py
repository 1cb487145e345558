"""Chunks of configurations: their sizes, the thread pool that runs them, and the terms evaluated on one.

:class:`~.energy.TorchEnergy` evaluates a batch as chunks of configurations; this module holds
what decides and runs a chunk apart from the energy's own state: the element budgets a chunk's
tensors stay near (CPU, GPU, compiled), the size of a compiled chunk
(:func:`_compiled_chunk_size`), the lasting pool of single-threaded torch threads, each bound to
its own CPU, that runs the chunks (:func:`_pool`), and the sum of the terms' energies and
gradients on one chunk (:func:`_evaluate_terms`, :func:`_evaluate_batch_last`). Kept apart from
:mod:`.energy` so that the class reads as its interface and evaluation paths; it imports only
:mod:`.geometry` and :mod:`.term` (no import of :mod:`.energy`, which re-exports these names).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from .geometry import PairGeometry
from .term import ForceTerm

# Elements per configuration x configurations per chunk. torch runs an elementwise operation on
# one thread below 32768 elements (its grain size); chunks stay below it and threads take whole
# chunks, which keeps every core busy without OpenMP's spinning threads (which slow small
# operations down by orders of magnitude when other processes share the cores). Tensors of a
# chunk stay near 256 KB: larger ones cost page faults on every allocation.
_ELEMENT_BUDGET = 32768
# GPUs run one chunk at a time and need many configurations per kernel to fill the device: chunks of
# 2**24 elements per tensor (for aldp's 22 atoms ~34,600 configurations, 134 MB per float64 (n, n)
# tensor); benchmarks/gpu_check.py measures the throughput it gives.
_DEVICE_ELEMENT_BUDGET = 2**24
_COMPILED_ELEMENT_BUDGET = 4 * 32768  # with gradients; twice that for energies only
_FULL_BATCH = 1024  # the smallest batch whose compiled chunks should keep every thread busy


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools() -> None:  # a forked child has none of its parent's threads: start its own
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _pool(n_threads: int) -> ThreadPoolExecutor:
    """A lasting pool of ``n_threads`` threads whose torch operations run on one core each.
    Threads are kept: a fresh thread starts with a cold malloc arena, and its first chunks
    page-fault their memory in. When the pool has one thread per CPU this process may use, each
    thread is bound to its own CPU (:func:`_bind_to_cpu`)."""
    n_threads = max(1, n_threads)
    with _POOLS_LOCK:
        if n_threads not in _POOLS:
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            cpus = iter(cpus if len(cpus) == n_threads > 1 else [None] * n_threads)
            _POOLS[n_threads] = ThreadPoolExecutor(
                n_threads, thread_name_prefix="TorchEnergy", initializer=_bind_to_cpu, initargs=(cpus, threading.Lock())
            )
        return _POOLS[n_threads]


def _bind_to_cpu(cpus: Iterator[int | None], lock: threading.Lock) -> None:
    """Pool thread initializer: one torch thread, and the next CPU of ``cpus`` (None: unbound).

    Unbound, threads woken together after an idle spell are placed on the waking thread's CPU and
    share it for milliseconds before the scheduler spreads them. A thread is bound only when every
    CPU gets one, so no other CPU is left idle beside a busy one.
    """
    torch.set_num_threads(1)
    with lock:
        cpu = next(cpus)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # Linux: 0 is the calling thread


def _compiled_chunk_size(n_squared: int, n_threads: int, gradient: bool) -> int:
    """Configurations per compiled chunk (one shape, compiled once) for n_squared = n_atoms^2.

    A power of two (at least 16: whole AVX-512 registers of float64), so batches of 1k, 4k, 16k
    split into whole chunks with no padded configurations; the one nearest the element budget
    (twice as large without gradients, whose kernels keep fewer intermediates), and at most
    ``_FULL_BATCH / n_threads``, so a batch of 1,024 gives every thread a chunk. Fewer, larger
    chunks save calls: each costs Python time under the GIL (guards, wrappers) for which the
    pool threads queue; with gradients, chunks larger than the budget were slower once other
    work had evicted the caches.
    """
    budget = _COMPILED_ELEMENT_BUDGET * (1 if gradient else 2)
    fits = max(16.0, budget / max(1, n_squared))
    widest = max(16, _FULL_BATCH // max(1, n_threads))
    return max(16, min(2 ** round(math.log2(fits)), 2 ** int(math.log2(widest))))


def _rounded(size: int) -> int:
    """A chunk size: ``size`` rounded down to a multiple of 8 (at least 8)."""
    return max(8, size // 8 * 8)


def _evaluate_terms(
    x: torch.Tensor, terms: list[ForceTerm], dense: bool, gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of the terms' energies (b,) on positions x (b, n, 3) and, if asked, dE/dx (b, n, 3)."""
    energy, grad = _evaluate_batch_last(x.permute(2, 1, 0).contiguous(), terms, dense, gradient)
    return energy, (grad.permute(2, 1, 0) if gradient else None)


def _evaluate_batch_last(
    X: torch.Tensor, terms: list[ForceTerm], dense: bool, gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_evaluate_terms` on positions X (3, n, b), batch last; dE/dX (3, n, b)."""
    geometry = PairGeometry(X, dense)
    energy = geometry.zeros()
    for term in terms:
        energy += term(geometry, gradient)
    return energy, (geometry.gradient() if gradient else None)
