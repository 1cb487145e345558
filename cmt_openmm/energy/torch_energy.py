"""Batched reduced energies u(x) = U(x)/kT computed in PyTorch, verified against OpenMM.

:class:`TorchEnergy` has the interface of :class:`~cmt_openmm.energy.OpenMMEnergy` (call on
(B, n_atoms, 3) nm -> u (B,), gradient -F/kT by autograd, +inf for failures, ``n_evaluations``,
``n_failed``, ``energy_and_forces``, ``regularized``, ``close``, ``with``) but evaluates the
System's forces as batched torch code (:mod:`.torch_forces`): whole chunks of configurations at
once, no worker processes, on any torch device. At construction it checks itself against
OpenMM's Reference platform (:func:`~.verification.verify_against_openmm`) and refuses to exist
when it disagrees, so a silently wrong energy never reaches training or importance weights.
:func:`cmt_openmm.energy.select.make_energy` picks the backend.

>>> energy = TorchEnergy(get_target("aldp-implicit"))                  # doctest: +SKIP
>>> energy.verification["max_relative_force_error"]                   # doctest: +SKIP
>>> x = torch.tensor(energy.target.positions)[None].requires_grad_()   # doctest: +SKIP
>>> energy(x).sum().backward()   # x.grad == -F(x)/kT                   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import openmm.unit as unit
import torch
from torch.autograd.function import once_differentiable

from ..errors import CMTInputError
from .regularize import regularize_energy
from .torch_forces import compile_system
from .torch_geometry import PairGeometry
from .torch_term import ForceTerm
from .verification import verify_against_openmm

if TYPE_CHECKING:
    from ..target import Target

__all__ = ["TorchEnergy"]

# Elements per configuration x configurations per chunk. torch runs an elementwise operation on
# one thread below 32768 elements (its grain size); chunks stay below it and threads take whole
# chunks, which keeps every core busy without OpenMP's spinning threads (measured to slow small
# operations 10-100x on a machine whose cores other processes share).
_ELEMENT_BUDGET = 32768
_COMPILED_ELEMENT_BUDGET = 4 * 32768
COMPILE_MIN_BATCH = 2048  # compile="auto" compiles on the first call with at least this many configurations


class _ReducedEnergy(torch.autograd.Function):
    """u(x) with gradient du/dx computed together with u, chunk by chunk (no graph kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, energy: "TorchEnergy") -> torch.Tensor:
        u, grad = energy._evaluate(x, gradient=True)
        ctx.save_for_backward(grad)
        ctx.input_dtype, ctx.input_device = x.dtype, x.device
        return u.to(x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        out = grad_u.to(grad.device, grad.dtype)[:, None, None] * grad
        return out.to(ctx.input_device, ctx.input_dtype), None


class TorchEnergy:
    """Reduced energies u = U/kT (B,) of batches (B, n_atoms, 3) nm, computed in PyTorch.

    Args:
        target: the :class:`~cmt_openmm.target.Target` (its ``system``, ``kT``, ``positions``).
        device: torch device of the computation ("cpu", "cuda", ...).
        dtype: compute and output dtype (float64 by default; float32 is verified to looser
            tolerances, see :func:`~.verification.verify_against_openmm`).
        verify: compare with OpenMM's Reference platform at construction and raise
            :class:`~.verification.VerificationError` on disagreement; the record is
            ``verification``.
        compile: ``torch.compile`` the chunk evaluation (energies and gradients fused into a
            few loops, ~5x faster on CPUs, after a one-time compilation of ~10-40 s that
            torch caches on disk). ``"auto"`` compiles on the first call with at least
            ``COMPILE_MIN_BATCH`` configurations, so small calls (tests, checks) stay eager;
            ``True`` on the first call; ``False`` (default) never. Off by default: an exception
            in compilation is caught (a warning, then eager), but a crash of the compiler cannot
            be, and torch.compile of the flow with a backward pass has segfaulted on these CPUs.
        chunk_size: configurations per chunk (default: from the size of the terms' tensors).
        n_threads: chunks evaluated at once by a pool of threads, each operation on one core
            (default: ``torch.get_num_threads()`` on CPU, 1 on GPUs).

    Raises :class:`~cmt_openmm.energy.torch_term.UnsupportedForceError` (a
    :class:`~cmt_openmm.errors.CMTInputError`) naming any force it cannot evaluate.
    Calling on a tensor that requires grad returns a differentiable u (gradient -F/kT, cast to
    the input's dtype); otherwise only energies are computed. A configuration with non-finite
    positions, energy or gradient gets u = +inf and zero gradient and is counted in
    ``n_failed``; ``n_evaluations`` counts every configuration.
    """

    backend = "torch"

    def __init__(
        self,
        target: "Target",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        verify: bool = True,
        *,
        compile: bool | str = False,
        chunk_size: int | None = None,
        n_threads: int | None = None,
    ):
        if dtype not in (torch.float32, torch.float64):
            raise CMTInputError(f"dtype={dtype} is not supported; use torch.float64 or torch.float32.")
        try:
            self.device = torch.device(device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as error:
            raise CMTInputError(
                f"torch device {device!r} is not available here ({str(error).splitlines()[0]})."
            ) from None
        self.target = target
        self.dtype = dtype
        self.n_evaluations = 0
        self.n_failed = 0
        self._kT = float(target.kT)
        self._n_atoms = int(target.n_atoms)
        if compile not in (True, False, "auto"):
            raise CMTInputError(f"compile={compile!r} is not one of True, False, 'auto'.")
        self.compile = compile
        self._chunk_size = int(chunk_size) if chunk_size else None
        self.n_threads = int(n_threads) if n_threads else (torch.get_num_threads() if self.device.type == "cpu" else 1)
        self._build()
        self.verification: dict[str, Any] | None = None
        if verify:
            self.verification = verify_against_openmm(self)

    def _build(self) -> None:
        """Compile the System's forces into terms and plan the chunks."""
        reference = np.asarray(self.target.positions, dtype=np.float64)
        self.terms: list[ForceTerm] = compile_system(self.target.system, reference, self.device, self.dtype)
        self._reference = torch.as_tensor(reference, dtype=self.dtype, device=self.device)
        self._dense = any(term.needs_dense for term in self.terms)
        # two groups: terms on the (n, n) distance matrix and the rest (pair lists, bonded), each
        # with chunks that keep its largest tensors below the budget
        n2 = self._n_atoms**2
        dense_terms = [term for term in self.terms if term.needs_dense]
        light_terms = [term for term in self.terms if not term.needs_dense]
        width = max([term.width for term in light_terms], default=1)
        self._groups = [
            (group, dense, self._chunk_size or max(1, _ELEMENT_BUDGET // w))
            for group, dense, w in ((dense_terms, True, n2), (light_terms, False, width))
            if group
        ]
        self.compiled_chunk_size = self._chunk_size or max(1, _COMPILED_ELEMENT_BUDGET // max(1, n2))
        self._compiled: Callable | None = None

    # -- evaluation ---------------------------------------------------------------------------
    def _positions(self, x: Any) -> torch.Tensor:
        if isinstance(x, unit.Quantity):
            x = x.value_in_unit(unit.nanometer)
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach())
        x = x.to(self.device, self.dtype)
        if x.ndim != 3 or tuple(x.shape[1:]) != (self._n_atoms, 3):
            raise CMTInputError(
                f"Positions have shape {tuple(x.shape)}; pass a batch of shape (B, {self._n_atoms}, 3) in nm."
            )
        return x

    def _chunk(
        self, x: torch.Tensor, gradient: bool, terms: list[ForceTerm] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Energies (b,) kJ/mol and, if asked, dE/dx (b, n, 3) of one chunk (b, n, 3), eagerly."""
        terms = self.terms if terms is None else terms
        with torch.no_grad():
            return _evaluate_terms(x, terms, any(term.needs_dense for term in terms), gradient)

    def _group_chunk(
        self, x: torch.Tensor, size: int, terms: list[ForceTerm], dense: bool, gradient: bool, start: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Energies and gradients of ``terms`` on the chunk x[start : start + size]."""
        with torch.no_grad():
            return _evaluate_terms(x[start : start + size], terms, dense, gradient)

    def _map(self, run: Callable, starts: range, gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``run(start)`` for every chunk (on ``n_threads`` threads) and concatenate."""
        starts = list(starts)
        if self.n_threads > 1 and len(starts) > 1:
            with ThreadPoolExecutor(min(self.n_threads, len(starts))) as pool:
                results = list(pool.map(run, starts))
        else:
            results = [run(s) for s in starts]
        energy = torch.cat([e for e, _ in results])
        return energy, (torch.cat([g for _, g in results]) if gradient else None)

    def _compiled_chunk(self) -> Callable | None:
        """The compiled energy-and-gradient function of a chunk, or None (eager)."""
        if self._compiled is None:
            terms, dense = self.terms, self._dense

            def chunk(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                with torch.no_grad():
                    return _evaluate_terms(x, terms, dense, True)

            try:  # single-threaded kernels: the thread pool spreads the chunks
                options = {"cpp.threads": 1} if self.device.type == "cpu" else None
                compiled = torch.compile(chunk, dynamic=False, options=options)
                probe = self._reference.expand(self.compiled_chunk_size, -1, -1).contiguous()
                compiled(probe)
                self._compiled = compiled
            except Exception as error:  # no C++ compiler, unsupported operation, ...
                reason = (
                    f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    if str(error)
                    else type(error).__name__
                )
                warnings.warn(f"TorchEnergy stays eager: torch.compile failed ({reason}).", stacklevel=4)
                self._compiled, self.compile = None, False
        return self._compiled

    def _use_compiled(self, n: int) -> bool:
        if self.compile is False or n == 0:
            return False
        if self.compile == "auto" and self._compiled is None and n < COMPILE_MIN_BATCH:
            return False
        return self._compiled_chunk() is not None

    def _evaluate(
        self, x: torch.Tensor, gradient: bool, terms: list[ForceTerm] | None = None, count: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reduced energies u (B,) and du/dx (B, n, 3) (or None), with failures handled."""
        x = self._positions(x)
        n = x.shape[0]
        if n == 0:
            return x.new_zeros(0), (torch.zeros_like(x) if gradient else None)
        bad = ~torch.isfinite(x).flatten(1).all(-1)
        if bool(bad.any()):
            x = torch.where(bad[:, None, None], self._reference, x)
        if terms is None and self._use_compiled(n):
            size, compiled = self.compiled_chunk_size, self._compiled

            def run(s: int) -> tuple[torch.Tensor, torch.Tensor]:
                chunk = x[s : s + size]
                if len(chunk) < size:  # pad: one compiled shape
                    chunk = torch.cat([chunk, self._reference.expand(size - len(chunk), -1, -1)])
                e, g = compiled(chunk)
                return e[: min(size, n - s)], g[: min(size, n - s)]

            energy, grad_sum = self._map(run, range(0, n, size), True)
        else:
            energy, grad_sum = x.new_zeros(n), (torch.zeros_like(x) if gradient else None)
            groups = [(terms, any(t.needs_dense for t in terms), n)] if terms is not None else self._groups
            for group, dense, size in groups:
                run = partial(self._group_chunk, x, size, group, dense, gradient)
                e, g = self._map(run, range(0, n, size), gradient)
                energy = energy + e
                if gradient:
                    grad_sum = grad_sum + g
        u = energy / self._kT
        failed = bad | ~torch.isfinite(u)
        grad = None
        if gradient:
            grad = grad_sum / self._kT
            failed = failed | ~torch.isfinite(grad).flatten(1).all(-1)
            grad = torch.where(failed[:, None, None], torch.zeros_like(grad), grad)
        u = torch.where(failed, torch.full_like(u, float("inf")), u)
        if count:
            self.n_evaluations += n
            self.n_failed += int(failed.sum())
        return u, grad

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Reduced energies (B,) in ``dtype`` on x's device; differentiable when x requires grad."""
        if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
            return _ReducedEnergy.apply(x, self)
        u, _ = self._evaluate(x, gradient=False)
        return u.to(x.device if isinstance(x, torch.Tensor) else "cpu")

    def energy_and_forces(self, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reduced energies u (B,) and reduced forces f = -du/dx (B, n_atoms, 3) in 1/nm, float64 numpy."""
        u, grad = self._evaluate(x, gradient=True)
        return u.detach().to("cpu", torch.float64).numpy(), (-grad).to("cpu", torch.float64).numpy()

    def regularized(self, x: torch.Tensor | np.ndarray, threshold: float = 1e3) -> torch.Tensor:
        """:func:`regularize_energy` of ``self(x)``, differentiable like ``self(x)``."""
        return regularize_energy(self(x), threshold)

    def term_energies(self, x: Any) -> dict[str, np.ndarray]:
        """Energy of each force (kJ/mol, float64 numpy (B,)) by its label; not counted as evaluations."""
        x = self._positions(x)
        return {term.label: self._chunk(x, False, [term])[0].to("cpu", torch.float64).numpy() for term in self.terms}

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release (no processes or Contexts); kept for OpenMMEnergy's interface."""

    def __enter__(self) -> "TorchEnergy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickle/deepcopy the target and settings; the copy rebuilds its terms (and compiles its own)."""
        skip = {"terms", "_reference", "_dense", "_groups", "compiled_chunk_size", "_compiled"}
        return {key: value for key, value in self.__dict__.items() if key not in skip}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()

    def __repr__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"TorchEnergy({getattr(self.target, 'name', 'target')!r}, {self.device}, {dtype})"


def _evaluate_terms(
    x: torch.Tensor, terms: list[ForceTerm], dense: bool, gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of the terms' energies (b,) on positions x (b, n, 3) and, if asked, dE/dx (b, n, 3)."""
    geometry = PairGeometry.from_batch(x, dense)
    energy = geometry.zeros()
    for term in terms:
        energy = energy + term(geometry, gradient)
    return energy, (geometry.gradient().permute(2, 1, 0) if gradient else None)
