"""OpenMMEnergy: batched reduced energies u(x) = U(x)/kT from OpenMM, differentiable in torch.

Connects the flow (torch batches of configurations) to OpenMM (the truth for the potential).
Hand-written rather than taken from bgflow's ``OpenMMBridge`` to avoid its known pitfalls: each
worker process evaluates one contiguous slice of the batch per message (not one configuration;
the batch itself travels through shared memory), a failed evaluation is u = +inf with zero
force (never 0), nothing is cached, workers are started with ``spawn`` and build their Context
inside the worker (openmm/openmm#2602), and a dead worker is noticed at once instead of hanging:
the batch is evaluated again on a fresh pool, a bounded number of times (a node's out-of-memory
killer picks a worker now and then; a System that crashes its workers must still end the run).
The process side lives in :mod:`cmt_openmm.energy.openmm.worker`. Example: :class:`OpenMMEnergy`.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import openmm
import openmm.unit as unit
import torch

from ...errors import CMTInputError
from ..base import Energy
from .worker import (
    GPU_PLATFORMS,
    ContextEvaluator,
    WorkerDied,
    WorkerError,
    WorkerPool,
    load_torch_plugins,
    platform_name,
    threads_per_worker,
)

load_torch_plugins()  # openmm may have been imported before torch (see the function)

if TYPE_CHECKING:
    from ...target import Target

__all__ = ["OpenMMEnergy", "WorkerError"]

#: Fresh worker pools one OpenMMEnergy may start after a worker died, over its whole life: enough
#: for the odd out-of-memory kill in a long run, few enough that a System that crashes its
#: workers on every batch ends the run after a handful of pool starts.
MAX_WORKER_RESTARTS = 3


def _serialize(system: openmm.System) -> tuple[str | None, str]:
    """XML of ``system`` for the workers, or None and the reason it cannot be serialised."""
    try:
        return openmm.XmlSerializer.serialize(system), ""
    except Exception as error:  # e.g. a PythonForce whose function cannot be pickled
        return None, str(error).strip()


class OpenMMEnergy(Energy):
    """Reduced energies u = U/kT (B,) float64 of batches (B, n_atoms, 3) nm, evaluated by OpenMM.

    Args:
        target: the :class:`~cmt_openmm.target.Target` (its ``system``, ``kT`` and ``n_atoms``).
        platform: OpenMM platform name or ``openmm.Platform``. ``Reference``/``CPU`` use a pool of ``n_workers``
            spawned processes with one Context each; ``CUDA``/``OpenCL`` one Context in-process.
        n_workers: worker processes for Reference/CPU. With 1 (default) the single Context lives
            in this process: no inter-process overhead, so faster than one worker.
        platform_properties: OpenMM platform properties (strings). On ``CPU`` with workers,
            ``Threads`` defaults to cores // n_workers.
        in_process: force (True) or forbid (False) evaluation in this process; None chooses as
            above. A System that cannot be serialised (a PythonForce whose function cannot be
            pickled) is always evaluated in-process, with a warning when ``n_workers > 1``;
            so is one whose workers fail to start (e.g. a PythonForce function that cannot be
            imported in a fresh process), unless ``in_process=False``.

    Calling on a tensor that requires grad returns a differentiable u with gradient -F/kT (cast
    back to the input dtype); otherwise only energies are computed. A configuration that fails
    (non-finite positions, OpenMM exception, non-finite energy or force) gets u = +inf and zero
    force and is counted in ``n_failed``; ``n_evaluations`` counts every configuration
    evaluated. Workers start on the first call and stop on :meth:`close`, on leaving a ``with``
    block, on garbage collection and at interpreter exit; a later call starts them again.
    When a worker dies during a call, the call is evaluated again on a fresh pool (same
    energies), with a warning, counted in ``n_restarts``; after :data:`MAX_WORKER_RESTARTS`
    restarts the next death raises :class:`~cmt_openmm.errors.CMTInputError` naming the cause.

    Example (the pool line is skipped in the doctests only because spawning workers takes seconds):
        >>> import cmt_openmm, torch
        >>> target = cmt_openmm.get_target("aldp-vacuum")
        >>> noise = 0.002 * torch.randn(4, 22, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> x = (torch.tensor(target.positions) + noise).requires_grad_()   # (4, 22, 3) nm
        >>> with cmt_openmm.OpenMMEnergy(target) as energy:      # one Context, in this process
        ...     u = energy(x)                                    # u = U / kT (4,), differentiable
        ...     u_np, f = energy.energy_and_forces(x.detach())   # u and f = -du/dx (1/nm) as NumPy
        ...     u_nan = energy(torch.full((1, 22, 3), float("nan"), dtype=torch.float64))
        >>> u.shape, round(u[0].item(), 6) == round(target.reduced_potential(x[0].detach().numpy()), 6)
        (torch.Size([4]), True)
        >>> u.sum().backward()                                   # x.grad = du/dx = -F(x)/kT
        >>> bool(torch.allclose(x.grad, -torch.as_tensor(f)))
        True
        >>> u_nan.item(), energy.n_failed, energy.n_evaluations  # a failure is +inf, never 0
        (inf, 1, 9)
        >>> pool = cmt_openmm.OpenMMEnergy(target, platform="CPU", n_workers=2)   # doctest: +SKIP
    """

    backend = "openmm"
    # the WorkerPool (closing it stops the workers) and the in-process ContextEvaluator, both None until used
    _resources = ("_pool", "_evaluator")

    def __init__(
        self,
        target: "Target",
        platform: str | openmm.Platform = "Reference",
        n_workers: int = 1,
        platform_properties: dict[str, Any] | None = None,
        *,
        in_process: bool | None = None,
    ):
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise CMTInputError(f"n_workers={n_workers!r} is not a positive integer; pass 1 or more.")
        platform = platform_name(platform)
        available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        if platform not in available:
            raise CMTInputError(
                f"OpenMM platform {platform!r} is not available here; use one of {', '.join(available)}."
            )
        super().__init__(target)
        self.platform = platform
        self.n_workers = n_workers
        self._properties = {str(k): str(v) for k, v in (platform_properties or {}).items()}
        self._system_xml, reason = _serialize(target.system)
        self._in_process_requested = in_process
        self.in_process = self._choose_in_process(in_process, reason)
        if not self.in_process and platform == "CPU":
            self._properties.setdefault("Threads", str(threads_per_worker(n_workers)))

    def _choose_in_process(self, requested: bool | None, reason: str) -> bool:
        if self.platform in GPU_PLATFORMS or self._system_xml is None:
            why = (
                f"the {self.platform} platform uses one Context in this process"
                if self.platform in GPU_PLATFORMS
                else f"the System cannot be sent to worker processes ({reason}); define a "
                "PythonForce's function at the top level of a module to allow workers"
            )
            if requested is False:
                raise CMTInputError(f"in_process=False is impossible: {why}.")
            if self.n_workers > 1:
                warnings.warn(f"OpenMMEnergy evaluates in-process, ignoring n_workers={self.n_workers}: {why}.")
            return True
        return self.n_workers == 1 if requested is None else bool(requested)

    # -- evaluation ---------------------------------------------------------------------------
    def _positions(self, x: Any) -> np.ndarray:
        """(B, n_atoms, 3) float64 nm C-contiguous array from a tensor, array or Quantity."""
        if isinstance(x, unit.Quantity):
            x = x.value_in_unit(unit.nanometer)
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float64).numpy()
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 3 or x.shape[1:] != (self._n_atoms, 3):
            raise CMTInputError(
                f"Positions have shape {x.shape}; pass a batch of shape (B, {self._n_atoms}, 3) in nm."
            )
        return x

    def _evaluate(self, positions: np.ndarray, forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Reduced energies (B,) and reduced forces F/kT (B, n_atoms, 3) in 1/nm (or None)."""
        if len(positions) == 0:
            return np.zeros(0), (np.zeros_like(positions) if forces else None)
        if self.in_process:
            if self._evaluator is None:
                self._evaluator = ContextEvaluator(self.target.system, self.platform, self._properties)
            energies, f = np.empty(len(positions)), (np.empty(positions.shape) if forces else None)
            self._evaluator.evaluate(positions, energies, f)
        else:
            if self._pool is None or not self._pool.processes:
                self._start_pool()
            if self._pool is None:
                return self._evaluate(positions, forces)
            try:
                energies, f = self._pool.evaluate(positions, forces)
            except WorkerDied as error:  # the pool shut itself down; the next try starts a fresh one
                self._restart_after(error)
                return self._evaluate(positions, forces)
        self._count(len(positions), int(np.isposinf(energies).sum()))
        return energies / self._kT, (f / self._kT if forces else None)

    def _start_pool(self) -> None:
        """Start the workers; if they cannot start and in-process was not forbidden, warn and
        evaluate in-process from now on (e.g. a PythonForce whose function cannot be
        unpickled in a fresh process)."""
        try:
            self._pool = WorkerPool(self._system_xml, self._n_atoms, self.platform, self._properties, self.n_workers)
        except WorkerError as error:
            if self._in_process_requested is False:
                raise
            warnings.warn(f"OpenMMEnergy evaluates in-process because its workers could not start: {error}")
            self._pool, self.in_process = None, True

    def _restart_after(self, error: WorkerDied) -> None:
        """Count a pool restart after ``error``, with a warning, or raise once the restarts are spent."""
        if self.n_restarts >= MAX_WORKER_RESTARTS:
            raise CMTInputError(
                f"OpenMM energy workers kept dying ({MAX_WORKER_RESTARTS} pool restarts spent), the last "
                f"time {error.what}; if memory is short use fewer workers or smaller batches, otherwise "
                "set n_workers to 1 to see how the System fails."
            ) from error
        self.n_restarts += 1
        warnings.warn(
            f"OpenMM energy {error.what}; evaluating the batch again on a fresh pool "
            f"(restart {self.n_restarts} of {MAX_WORKER_RESTARTS})."
        )

    def _energies(self, x: Any) -> torch.Tensor:
        return torch.from_numpy(self._evaluate(self._positions(x), forces=False)[0])

    def _energies_and_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, f = self._evaluate(self._positions(x), forces=True)
        return torch.from_numpy(u), torch.from_numpy(-f).to(x.device)

    def energy_and_forces(self, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reduced energies u (B,) and reduced forces f = -du/dx (B, n_atoms, 3) in 1/nm."""
        return self._evaluate(self._positions(x), forces=True)

    # -- lifetime -----------------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty when in-process or not started)."""
        return [p.pid for p in self._pool.processes] if self._pool is not None else []

    def __repr__(self) -> str:
        where = "in-process" if self.in_process else f"{self.n_workers} workers"
        return f"OpenMMEnergy({getattr(self.target, 'name', 'target')!r}, {self.platform}, {where})"
