"""TorchEnergy: batched reduced energies u(x) = U(x)/kT computed in PyTorch, verified against OpenMM.

:class:`TorchEnergy` has the interface of :class:`~cmt_openmm.energy.OpenMMEnergy` (both are
:class:`~cmt_openmm.energy.base.Energy`: call on (B, n_atoms, 3) nm -> u (B,), gradient -F/kT,
+inf for failures, ``n_evaluations``, ``n_failed``, ``energy_and_forces``, ``regularized``,
``close``, ``with``) but evaluates the System's forces as batched torch code (:mod:`.forces`):
whole chunks of configurations at once (sized and run by :mod:`.chunks`), no worker processes,
on any torch device. At construction it checks itself against OpenMM's Reference platform
(:func:`~.verification.verify_against_openmm`) and refuses to exist when it disagrees, so a
silently wrong energy never reaches training or importance weights. Each configuration is
centred on its mean position (in float64) before the cast to the compute dtype (unless a term
reads absolute positions), so float32 accuracy does not depend on where the molecule sits.
:func:`cmt_openmm.energy.select.make_energy` picks the backend. Example: :class:`TorchEnergy`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import openmm.unit as unit
import torch

from ...errors import CMTInputError
from ..base import Energy
from . import memory
from .chunks import (  # re-exported: tests import _compiled_chunk_size, _pool, _evaluate_terms from here
    _DEVICE_ELEMENT_BUDGET,
    _ELEMENT_BUDGET,
    _compiled_chunk_size,
    _evaluate_batch_last,
    _evaluate_terms,
    _pool,
    _rounded,
)
from .forces import compile_system
from .term import ForceTerm, exception_summary
from .verification import (
    ENERGY_TOLERANCE,
    FLOAT32_ENERGY_TOLERANCE,
    FLOAT32_FORCE_TOLERANCE,
    FORCE_TOLERANCE,
    _relative_errors,
    verification_structures,
    verify_against_openmm,
)

if TYPE_CHECKING:
    from ...target import Target

__all__ = ["TorchEnergy"]

COMPILE_MIN_BATCH = 2048  # compile="auto" compiles on the first call with at least this many configurations


class TorchEnergy(Energy):
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
            few loops, after a one-time compilation of tens of seconds that torch caches on disk;
            energies-only calls compile their own function on first use). ``"auto"`` compiles
            on the first call with at least ``COMPILE_MIN_BATCH`` configurations, so small calls
            (tests, checks) stay eager; ``True`` on the first call; ``False`` (default) never.
            Off by default: an exception in compilation is caught (a warning, then eager), but
            a crash in compiled code cannot be (inductor has read a strided view out of bounds:
            see :func:`~cmt_openmm.flows.splines.spline_forward`). Each compiled function is
            checked against the verified eager path when first built (``compiled_check``); one
            that disagrees warns and the energy stays eager.
            :func:`~cmt_openmm.energy.select.make_energy` (``compile="auto"``) therefore turns it
            on only after :mod:`.compile_probe` has compiled and checked the same chunks in a
            subprocess.
        chunk_size: configurations per chunk (default: from the size of the terms' tensors and
            the byte budget per chunk, :data:`.memory.CHUNK_BYTES` on CPUs, down to 1 configuration).
        n_threads: chunks evaluated at once by a pool of threads, each operation on one core
            (default: ``torch.get_num_threads()`` on CPU; GPUs run the chunks in order).

    Raises :class:`~cmt_openmm.energy.torch.term.UnsupportedForceError` (a
    :class:`~cmt_openmm.errors.CMTInputError`) naming any force it cannot evaluate, and a
    :class:`~cmt_openmm.errors.CMTInputError` when one configuration's tensors would exceed
    ``CHUNK_BYTES_SAFETY`` x the byte budget or the memory available (:mod:`.memory`; checked
    before verifying).
    Calling on a tensor that requires grad returns a differentiable u (gradient -F/kT, cast to
    the input's dtype); otherwise only energies are computed. A configuration with non-finite
    positions, energy or gradient gets u = +inf and zero gradient and is counted in
    ``n_failed``; ``n_evaluations`` counts every configuration. :meth:`close` drops the
    compiled functions (a later call compiles again); the threads are shared by every
    TorchEnergy of the process and stay.

    Example (OBC1 as a CustomGBForce, which torch evaluates faster than OpenMM on CPUs):
        >>> import cmt_openmm, torch
        >>> target = cmt_openmm.get_target("aldp-implicit")
        >>> energy = cmt_openmm.TorchEnergy(target)          # verified against OpenMM's Reference platform
        >>> energy.verification["passed"], energy.verification["max_relative_force_error"] < 1e-9
        (True, True)
        >>> noise = 0.002 * torch.randn(4, 22, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> x = (torch.tensor(target.positions) + noise).requires_grad_()   # (4, 22, 3) nm
        >>> u = energy(x)                                    # u = U / kT (4,), differentiable
        >>> abs(u[1].item() - target.reduced_potential(x[1].detach().numpy())) < 1e-9
        True
        >>> u.sum().backward()                               # x.grad = du/dx = -F(x)/kT
        >>> bool(torch.allclose(x.grad, -torch.as_tensor(energy.energy_and_forces(x.detach())[1])))
        True
    """

    backend = "torch"
    _resources = ("_compiled", "_compiled_energy")  # the torch.compile'd chunk functions

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
        super().__init__(target)
        self.dtype = dtype
        if compile not in (True, False, "auto"):
            raise CMTInputError(f"compile={compile!r} is not one of True, False, 'auto'.")
        self.compile = compile
        self._chunk_size = int(chunk_size) if chunk_size else None
        self.n_threads = int(n_threads) if n_threads else (torch.get_num_threads() if self.device.type == "cpu" else 1)
        self._build()
        self.fallback: Any = None  # an OpenMMEnergy once switch_to_openmm() was called
        self.compiled_check: dict[str, Any] = {}  # compiled vs eager, by "gradient" / "energy"
        self.verification: dict[str, Any] | None = None
        if verify:
            self.verification = verify_against_openmm(self)

    def _build(self) -> None:
        """Compile the System's forces into terms and plan the chunks."""
        reference = np.asarray(self.target.positions, dtype=np.float64)
        self.terms: list[ForceTerm] = compile_system(self.target.system, reference, self.device, self.dtype)
        self._reference = torch.as_tensor(reference, dtype=self.dtype, device=self.device)
        self._reference_batch_last = self._reference.t()[:, :, None]  # (3, n, 1), the compiled chunks' layout
        self._dense = any(term.needs_dense for term in self.terms)
        self._centre = all(term.translation_invariant for term in self.terms)
        # refuse first when one configuration would not fit in memory; then two groups: terms on
        # the (n, n) distance matrix (with the pair-list terms that can read it, e.g.
        # NonbondedForce) and the rest (bonded), each with its own chunks (:meth:`_planned_size`)
        self._chunk_bytes = memory.chunk_bytes(
            self._bytes_per_configuration(self.terms), self.device, self.n_threads,
            f"{getattr(self.target, 'name', 'the target')} ({self._n_atoms} atoms)",
        )
        n2 = self._n_atoms**2
        budget = _ELEMENT_BUDGET if self.device.type == "cpu" else _DEVICE_ELEMENT_BUDGET
        dense_terms = [t for t in self.terms if t.needs_dense or (self._dense and t.uses_dense)]
        light_terms = [t for t in self.terms if t not in dense_terms]
        self._groups = [
            (group, dense, self._chunk_size or self._planned_size(group, dense)) for group, dense in
            ((dense_terms, True), (light_terms, False)) if group
        ]
        self.compiled_chunk_sizes = {  # keyed by ``gradient``; one compiled chunk holds every term
            gradient: self._chunk_size
            or min(_compiled_chunk_size(n2, self.n_threads, gradient), self._fitting(self.terms))
            for gradient in (True, False)
        }
        self._rows = max(8, budget // (3 * self._n_atoms))  # configurations per whole-batch slice
        self._compiled: Callable | None = None
        self._compiled_energy: Callable | None = None

    def _bytes_per_configuration(self, terms: list[ForceTerm]) -> int:
        """Estimated peak bytes of one configuration of ``terms`` in a chunk (:mod:`.memory`)."""
        return memory.bytes_per_configuration(terms, self._n_atoms, self.dtype)

    def _fitting(self, terms: list[ForceTerm]) -> int:
        """Configurations of ``terms`` per chunk within ``_chunk_bytes`` (at least 1)."""
        return max(1, self._chunk_bytes // self._bytes_per_configuration(terms))

    def _planned_size(self, terms: list[ForceTerm], dense: bool) -> int:
        """Configurations per eager chunk of ``terms``: the largest tensors near the element budget
        (distance-matrix chunks: (n, n); others: (3, width)), in multiples of 8 configurations (whole
        vector registers: odd chunks slow broadcasts down), and within the byte budget."""
        budget = _ELEMENT_BUDGET if self.device.type == "cpu" else _DEVICE_ELEMENT_BUDGET
        elements = self._n_atoms**2 if dense else 3 * max([t.width for t in terms], default=1)
        size = min(_rounded(budget // elements), self._fitting(terms))
        return size // 8 * 8 if size >= 8 else size

    # -- evaluation ---------------------------------------------------------------------------
    def _positions(self, x: Any) -> torch.Tensor:
        """Positions (B, n, 3) nm in the compute dtype and device; each configuration about its
        mean position, taken in float64, when every term is translation invariant (so that float32
        keeps its digits for the pair geometry wherever the molecule sits)."""
        if isinstance(x, unit.Quantity):
            x = x.value_in_unit(unit.nanometer)
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach())
        if x.ndim != 3 or tuple(x.shape[1:]) != (self._n_atoms, 3):
            raise CMTInputError(
                f"Positions have shape {tuple(x.shape)}; pass a batch of shape (B, {self._n_atoms}, 3) in nm."
            )
        if not self._centre:
            return x.to(self.device, self.dtype)
        out = torch.empty(x.shape, dtype=self.dtype, device=self.device)
        for start in range(0, x.shape[0], self._rows):  # slices below the grain size: one core (see _evaluate)
            part = x[start : start + self._rows].to(torch.float64)
            out[start : start + self._rows] = part - part.mean(1, keepdim=True)
        return out

    def _chunk(
        self, x: torch.Tensor, gradient: bool, terms: list[ForceTerm] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Energies (B,) kJ/mol and, if asked, dE/dx (B, n, 3) of positions (B, n, 3), eagerly,
        in this thread, in chunks planned for ``terms`` (or ``chunk_size``)."""
        terms = self.terms if terms is None else terms
        dense = any(term.needs_dense for term in terms)
        size = self._chunk_size or self._planned_size(terms, dense)
        with torch.no_grad():
            parts = [_evaluate_terms(x[s : s + size], terms, dense, gradient) for s in range(0, max(1, len(x)), size)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([e for e, _ in parts]), (torch.cat([g for _, g in parts]) if gradient else None)

    def _map(self, run: Callable, jobs: list[tuple]) -> None:
        """Run ``run(*job)`` for every job (a chunk): on CPUs in a lasting pool of ``n_threads``
        threads whose torch operations are single-threaded (the calling thread's OpenMP teams,
        which stall on every operation while other processes share the cores, are never
        used), elsewhere in order. One barrier per call: a straggling thread (the cores
        are shared) is waited for once."""
        if self.device.type != "cpu":
            for job in jobs:
                run(*job)
            return
        list(_pool(self.n_threads).map(lambda job: run(*job), jobs))

    def _compiled_chunk(self, gradient: bool = True) -> Callable | None:
        """The compiled function of a chunk, energies and gradients (``_compiled``) or energies
        only (``_compiled_energy``, compiled on the first call without gradients), or None.

        It maps positions X (3, n, b) nm, batch last, to reduced energies u (b,), du/dX (3, n, b)
        (or None) and ``ok`` (b,) bool: positions, energy and gradient finite (a configuration
        with non-finite positions is evaluated at the reference structure instead). The check,
        the division by kT and the layout all run inside the compiled kernels: done outside on
        the whole batch, in the calling thread, they cost more (the layout most: inductor reads
        (b, n, 3) positions one configuration at a time, unvectorised)."""
        compiled = self._compiled if gradient else self._compiled_energy
        if compiled is None and self.compile is not False:
            terms, dense, inv_kT, reference = self.terms, self._dense, 1.0 / self._kT, self._reference_batch_last

            def chunk(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
                with torch.no_grad():
                    ok = torch.isfinite(X).flatten(0, 1).all(0)
                    energy, grad = _evaluate_batch_last(torch.where(ok, X, reference), terms, dense, gradient)
                    ok &= torch.isfinite(energy)
                    if gradient:
                        ok &= torch.isfinite(grad).flatten(0, 1).all(0)
                        grad = grad * inv_kT
                    return energy * inv_kT, grad, ok

            # CPU: single-threaded kernels, the thread pool spreads the chunks; the C++ wrapper
            # (``cpp_wrapper``) releases the GIL while the kernels run, where inductor's default
            # Python wrapper holds it and the pool threads run no faster than one
            try:
                options = {"cpp.threads": 1, "cpp_wrapper": True} if self.device.type == "cpu" else None
                compiled = torch.compile(chunk, dynamic=False, options=options)
                # where the chunks will run: the compiled function is specialised to the calling
                # thread's torch thread count (a probe here recompiled it in every pool thread)
                self._map(compiled, [(reference.expand(-1, -1, self.compiled_chunk_sizes[gradient]).contiguous(),)])
            except Exception as error:  # no C++ compiler, unsupported operation, ...
                warnings.warn(
                    f"TorchEnergy stays eager: torch.compile failed ({exception_summary(error)}).", stacklevel=4
                )
                compiled, self.compile = None, False
            mismatch = None if compiled is None else self._check_compiled(compiled, gradient)
            if mismatch is not None:  # verified when first used: a wrong compiled path is never used
                warnings.warn(f"TorchEnergy stays eager: its compiled path {mismatch}.", stacklevel=4)
                compiled, self.compile = None, False
            if gradient:
                self._compiled = compiled
            else:
                self._compiled_energy = compiled
        return compiled

    def _check_compiled(self, compiled: Callable, gradient: bool) -> str | None:
        """Compare a freshly compiled chunk function with the eager path (itself verified against
        OpenMM at construction) on the first of :func:`~.verification.verification_structures`
        that fill one compiled chunk; the disagreement in words, or None. Recorded in
        ``compiled_check``."""
        size = self.compiled_chunk_sizes[gradient]
        x = self._positions(verification_structures(np.asarray(self.target.positions, float))[:size])
        X = x.permute(2, 1, 0)
        if X.shape[2] < size:
            X = torch.cat([X, self._reference_batch_last.expand(-1, -1, size - X.shape[2])], dim=2)
        u, g, _ = compiled(X.contiguous())
        e_ref, g_ref = self._chunk(x, gradient)
        to64 = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
        m, kT = len(x), self._kT
        f = -to64(g[..., :m].permute(2, 1, 0)) * kT if gradient else np.zeros(x.shape)
        f_ref = -to64(g_ref) if gradient else np.zeros(x.shape)
        e_err, f_err = _relative_errors(to64(u[:m]) * kT, f, to64(e_ref), f_ref, kT)
        float32 = self.dtype == torch.float32
        e_tol = FLOAT32_ENERGY_TOLERANCE if float32 else ENERGY_TOLERANCE
        f_tol = FLOAT32_FORCE_TOLERANCE if float32 else FORCE_TOLERANCE
        self.compiled_check["gradient" if gradient else "energy"] = {
            "n_configurations": m, "max_relative_energy_error": float(e_err.max()),
            "max_relative_force_error": float(f_err.max()),
        }
        if e_err.max() <= e_tol and f_err.max() <= f_tol:
            return None
        return (
            f"disagrees with the verified eager one on {m} verification structures (relative energy error "
            f"{e_err.max():.1e}, force {f_err.max():.1e}; tolerances {e_tol:.0e}, {f_tol:.0e})"
        )

    def _use_compiled(self, n: int, gradient: bool) -> bool:
        if self.compile is False or n == 0:
            return False
        first = self._compiled is None and self._compiled_energy is None
        if self.compile == "auto" and first and n < COMPILE_MIN_BATCH:
            return False
        return self._compiled_chunk(gradient) is not None

    def _evaluate(
        self, x: torch.Tensor, gradient: bool, terms: list[ForceTerm] | None = None, count: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reduced energies u (B,) and du/dx (B, n, 3) (or None), with failures handled."""
        if self.fallback is not None:
            return self._evaluate_fallback(x, gradient, count)
        x = self._positions(x)
        n = x.shape[0]
        if n == 0:
            return x.new_zeros(0), (torch.zeros_like(x) if gradient else None)
        if terms is None and self._use_compiled(n, gradient):
            u, grad, failed = self._evaluate_compiled(x, gradient)
        else:
            u, grad, failed = self._evaluate_eager(x, gradient, terms)
        # whole-batch operations are avoided: above torch's grain size they run on OpenMP
        # threads, much slower than one core while other processes share the cores
        if bool(failed.any()):
            u.masked_fill_(failed, float("inf"))
            if gradient:
                for start in range(0, n, self._rows):
                    grad[start : start + self._rows].masked_fill_(failed[start : start + self._rows, None, None], 0.0)
        if count:
            self._count(n, int(failed.sum()))
        return u, grad

    def switch_to_openmm(self, reason: str, platform: str = "Reference") -> None:
        """From now on evaluate with OpenMM (an :class:`~cmt_openmm.energy.OpenMMEnergy` on
        ``platform``, one worker) instead of torch: ``backend`` becomes "openmm" and
        ``selection`` says ``reason``. Used by :func:`~.recheck.recheck` when torch disagrees
        with OpenMM on a run's own samples; results keep this energy's dtype and device."""
        from ..openmm.energy import OpenMMEnergy

        self.close()
        self.fallback = OpenMMEnergy(self.target, platform=platform, n_workers=1)
        self.backend, self.compile = "openmm", False
        self.selection = f"openmm: {reason}"

    def _evaluate_fallback(
        self, x: Any, gradient: bool, count: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._positions(x).to("cpu", torch.float64)
        if gradient:
            u, grad = self.fallback._energies_and_gradient(x)
        else:
            u, grad = self.fallback._energies(x), None
        if count:
            self._count(int(u.shape[0]), int((~torch.isfinite(u)).sum()))
        u = u.to(self.device, self.dtype)
        return u, (grad.to(self.device, self.dtype) if gradient else None)

    def _evaluate_compiled(
        self, x: torch.Tensor, gradient: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(u, du/dx, failed) of :meth:`_evaluate` by the compiled chunk, every step in the pool's threads."""
        n, size, compiled = x.shape[0], self.compiled_chunk_sizes[gradient], self._compiled_chunk(gradient)
        reference = self._reference_batch_last
        u, failed = x.new_empty(n), torch.empty(n, dtype=torch.bool, device=x.device)
        grad = torch.empty_like(x) if gradient else None

        def run(start: int, stop: int) -> None:
            X = x[start:stop].permute(2, 1, 0)
            if stop - start < size:  # pad with the reference structure: one compiled shape
                X = torch.cat([X, reference.expand(-1, -1, size - (stop - start))], dim=2)
            u_chunk, g_chunk, ok = compiled(X.contiguous())
            u[start:stop] = u_chunk[: stop - start]
            torch.logical_not(ok[: stop - start], out=failed[start:stop])
            if gradient:
                grad[start:stop] = g_chunk[..., : stop - start].permute(2, 1, 0)

        self._map(run, [(s, min(s + size, n)) for s in range(0, n, size)])
        return u, grad, failed

    def _evaluate_eager(
        self, x: torch.Tensor, gradient: bool, terms: list[ForceTerm] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(u, du/dx, failed) of :meth:`_evaluate`, term groups by chunks in the pool's threads."""
        n, rows = x.shape[0], self._rows
        failed = torch.cat([~torch.isfinite(x[s : s + rows]).flatten(1).all(-1) for s in range(0, n, rows)])
        if bool(failed.any()):
            x = torch.where(failed[:, None, None], self._reference, x)
        if terms is not None:
            dense = any(t.needs_dense for t in terms)
            groups = [(terms, dense, self._chunk_size or self._planned_size(terms, dense))]
        else:
            groups = self._groups
        # each group writes its own outputs (no two threads add into the same rows), summed below
        outputs = [(x.new_empty(n), torch.empty_like(x) if gradient else None) for _ in groups]
        energy, grad = outputs[0] if groups else (x.new_zeros(n), torch.zeros_like(x) if gradient else None)

        def run(k: int, start: int, stop: int) -> None:
            group, dense, _ = groups[k]
            with torch.no_grad():
                e, g = _evaluate_terms(x[start:stop], group, dense, gradient)
            outputs[k][0][start:stop] = e
            if gradient:
                outputs[k][1][start:stop] = g

        jobs = [(k, s, min(s + size, n)) for k, (_, _, size) in enumerate(groups) for s in range(0, n, size)]
        self._map(run, jobs)
        for start in range(0, n, rows):  # in this thread, slices below the grain size: one core
            stop = min(start + rows, n)
            for e, g in outputs[1:]:
                energy[start:stop] += e[start:stop]
                if gradient:
                    grad[start:stop] += g[start:stop]
            if gradient:
                g = grad[start:stop].div_(self._kT)
                failed[start:stop] |= ~torch.isfinite(g).flatten(1).all(-1)
        u = energy.div_(self._kT)
        failed |= ~torch.isfinite(u)
        return u, grad, failed

    def _energies(self, x: Any) -> torch.Tensor:
        return self._evaluate(x, gradient=False)[0]

    def _energies_and_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._evaluate(x, gradient=True)

    def energy_and_forces(self, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reduced energies u (B,) and reduced forces f = -du/dx (B, n_atoms, 3) in 1/nm, float64 numpy."""
        u, grad = self._evaluate(x, gradient=True)
        # numpy negates on one core (torch would use OpenMP threads on a whole batch)
        return u.detach().to("cpu", torch.float64).numpy(), np.negative(grad.to("cpu", torch.float64).numpy())

    def term_energies(self, x: Any) -> dict[str, np.ndarray]:
        """Energy of each force (kJ/mol, float64 numpy (B,)) by its label; not counted as evaluations."""
        x = self._positions(x)
        return {term.label: self._chunk(x, False, [term])[0].to("cpu", torch.float64).numpy() for term in self.terms}

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the compiled functions and close OpenMM's Context if switched to it (which stays)."""
        super().close()
        if self.fallback is not None:
            self.fallback.close()

    def __getstate__(self) -> dict:
        """Pickle/deepcopy the target and settings; the copy rebuilds its terms (and compiles its own)."""
        skip = {
            "terms", "_reference", "_reference_batch_last", "_dense", "_centre", "_groups", "compiled_chunk_sizes",
            "_chunk_bytes",
        }
        return {key: value for key, value in super().__getstate__().items() if key not in skip}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()

    def __repr__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"TorchEnergy({getattr(self.target, 'name', 'target')!r}, {self.device}, {dtype})"
