"""How much memory a :class:`~.energy.TorchEnergy` chunk may hold, and whether the torch backend fits at all.

A chunk's need is its configurations x the bytes per configuration of its terms
(:func:`bytes_per_configuration`): the largest term's tensor size (n_atoms^2 elements for terms
on the distance matrix, ``ForceTerm.width`` otherwise) x bytes per element x
``ForceTerm.live_tensors``, how many such tensors an evaluation with gradients holds at once
(measured as peak resident memory over one tensor's size: 26 for OBC, 64 for a CustomGBForce
differentiated by autograd, 36 for pair lists). :func:`chunk_bytes` gives the bytes a chunk may
hold, ``CHUNK_BYTES`` on CPUs (where ``n_threads`` chunks are in flight) or less where less memory
is available, and refuses in one sentence (a :class:`~cmt_openmm.errors.CMTInputError`, so that
``make_energy("auto")`` falls back to OpenMM) when even one configuration per chunk would need more
than ``CHUNK_BYTES_SAFETY`` x the budget or than the memory available. Chunks are then planned to
fit (:meth:`~.energy.TorchEnergy._planned_size`), down to one configuration.

Example (alanine dipeptide in OBC1: 26 tensors of 22 x 22 float64 per configuration):
    >>> import cmt_openmm, torch
    >>> from cmt_openmm.energy.torch import memory
    >>> energy = cmt_openmm.TorchEnergy(cmt_openmm.get_target("aldp-implicit"), verify=False)
    >>> memory.bytes_per_configuration(energy.terms, 22, torch.float64) == 26 * 22**2 * 8
    True
    >>> memory.format_bytes(26 * 2603**2 * 8)   # a 2,603-atom protein in OBC2: refused on CPUs
    '1.41 GB'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...errors import CMTInputError

if TYPE_CHECKING:
    from .term import ForceTerm

__all__ = ["CHUNK_BYTES", "CHUNK_BYTES_SAFETY", "DEVICE_CHUNK_BYTES", "available_memory", "bytes_per_configuration",
           "chunk_bytes", "format_bytes"]

# Bytes of live tensors per chunk on CPUs (host memory): 256 MiB keeps two threads' chunks under
# 1 GB; small systems never reach it (the element budgets of .energy decide their chunks).
CHUNK_BYTES = 256 * 2**20
DEVICE_CHUNK_BYTES = 8 * 2**30  # GPUs: one chunk at a time, in device memory
# Refuse when one configuration needs more than CHUNK_BYTES_SAFETY x the budget: a 2,603-atom
# protein in OBC2 needs ~1.4 GB per configuration (torch would page or die; OpenMM needs a few MB)
CHUNK_BYTES_SAFETY = 4


def bytes_per_configuration(terms: "list[ForceTerm]", n_atoms: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes of one configuration of ``terms`` evaluated together in a chunk."""
    itemsize = torch.finfo(dtype).bits // 8
    return itemsize * max([t.live_tensors * (n_atoms**2 if t.needs_dense else t.width) for t in terms], default=1)


def chunk_bytes(need: int, device: torch.device, n_threads: int, what: str) -> int:
    """Bytes a chunk may hold on ``device`` with ``n_threads`` chunks in flight (CPUs; one on other
    devices), for a system of ``need`` bytes per configuration (``what`` names it in messages);
    raises :class:`CMTInputError` in one sentence where one configuration per chunk does not fit."""
    cpu = device.type == "cpu"
    budget = CHUNK_BYTES if cpu else DEVICE_CHUNK_BYTES
    in_flight = max(1, n_threads) if cpu else 1
    available = available_memory(device)
    if need > CHUNK_BYTES_SAFETY * budget:
        needed = f"{format_bytes(need)} for one configuration"
        limit = f"{CHUNK_BYTES_SAFETY} x the budget of {format_bytes(budget)} per chunk"
    elif available is not None and need * in_flight > available:
        threads = f" in each of {in_flight} threads" if in_flight > 1 else ""
        needed = f"{format_bytes(need * in_flight)} for one configuration{threads}"
        limit = f"the {format_bytes(available)} of {'memory' if cpu else 'device memory'} available here"
    else:
        return budget if available is None else min(budget, available // in_flight)
    raise CMTInputError(
        f"The torch energy of {what} would need about {needed}, more than {limit}; use the OpenMM backend."
    )


def format_bytes(n: int) -> str:
    """A number of bytes for a message: "1.41 GB", "268 MB", "101 kB" (powers of 1000)."""
    for unit_name, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit_name}"
    return f"{n / 1e3:.3g} kB"


def available_memory(device: torch.device) -> int | None:
    """Bytes available for new allocations on ``device``: MemAvailable of /proc/meminfo on CPUs
    (Linux; None where it does not exist), the free memory of a CUDA device, else None (no check)."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no answer from the driver: skip the check
            return None
    return None
