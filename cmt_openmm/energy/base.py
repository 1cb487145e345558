"""The base class of both energy backends: calling, regularising, counting, closing.

:class:`Energy` is what :class:`~.openmm.energy.OpenMMEnergy` and
:class:`~.torch.energy.TorchEnergy` have in common. ``energy(x)`` maps positions (B, n_atoms, 3)
nm to reduced energies u = U/kT (B,); on a tensor that requires grad the result is
differentiable, with the gradient du/dx = -F/kT that the backend computes together with u (no
autograd graph through the backend). A subclass supplies :meth:`Energy._energies`,
:meth:`Energy._energies_and_gradient` and :meth:`Energy.energy_and_forces`, counts what it
evaluates with :meth:`Energy._count`, and names in ``_resources`` the attributes that hold what
evaluation acquires (worker processes, Contexts, compiled functions): :meth:`Energy.close`
releases them and copies start without them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .regularize import regularize_energy

if TYPE_CHECKING:
    from ..target import Target

__all__ = ["Energy"]


class _ReducedEnergy(torch.autograd.Function):
    """u(x) with the gradient du/dx that the backend returns together with u."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, energy: "Energy") -> torch.Tensor:
        u, grad = energy._energies_and_gradient(x)
        ctx.save_for_backward(grad)
        ctx.input_dtype, ctx.input_device = x.dtype, x.device
        return u.to(x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        out = grad_u.to(grad.device, grad.dtype)[:, None, None] * grad
        return out.to(ctx.input_device, ctx.input_dtype), None


class Energy:
    """Reduced energies u = U/kT (B,) of batches of positions (B, n_atoms, 3) nm of ``target``.

    Calling on a tensor that requires grad (with grad enabled) returns a differentiable u whose
    gradient is cast back to the input's dtype and device; otherwise only energies are computed.
    A configuration that cannot be evaluated gets u = +inf and zero gradient and is counted in
    ``n_failed``; ``n_evaluations`` counts every configuration evaluated, and ``n_restarts`` the
    worker pools restarted after a worker died (OpenMM workers only; plain ints, kept by
    :meth:`close` and copies). :meth:`close` (also on leaving a ``with`` block) releases what
    evaluation acquired; a later call acquires it again.
    """

    backend = ""  # "openmm" or "torch"
    #: attributes holding what evaluation acquires; :meth:`close` closes (if they can be) and drops them
    _resources: tuple[str, ...] = ()

    def __init__(self, target: "Target"):
        self.target = target
        self.n_evaluations = 0
        self.n_failed = 0
        self.n_restarts = 0
        self._kT = float(target.kT)
        self._n_atoms = int(target.n_atoms)
        for name in self._resources:
            setattr(self, name, None)

    # -- evaluation (subclasses) ----------------------------------------------------------------
    def _energies(self, x: Any) -> torch.Tensor:
        """Reduced energies (B,) of ``x`` (tensor, array or Quantity), on any device."""
        raise NotImplementedError

    def _energies_and_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced energies (B,) and du/dx (B, n_atoms, 3) 1/nm of the tensor ``x``."""
        raise NotImplementedError

    def energy_and_forces(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """Reduced energies u (B,) and reduced forces f = -du/dx (B, n_atoms, 3) in 1/nm."""
        raise NotImplementedError

    def _count(self, n: int, n_failed: int) -> None:
        self.n_evaluations += n
        self.n_failed += n_failed

    # -- interface -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Reduced energies (B,) on x's device (CPU for arrays); differentiable when x requires grad."""
        if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
            return _ReducedEnergy.apply(x, self)
        return self._energies(x).to(x.device if isinstance(x, torch.Tensor) else "cpu")

    def regularized(self, x: torch.Tensor | np.ndarray, threshold: float = 1e3) -> torch.Tensor:
        """:func:`~.regularize.regularize_energy` of ``self(x)``, differentiable like ``self(x)``."""
        return regularize_energy(self(x), threshold)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release what evaluation acquired (idempotent): every attribute named in ``_resources``
        is closed if it has a ``close`` method, then dropped. A later call acquires it again."""
        for name in self._resources:
            resource = getattr(self, name, None)
            if resource is not None and callable(getattr(resource, "close", None)):
                resource.close()
            setattr(self, name, None)

    def __enter__(self) -> "Energy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickle/deepcopy without the ``_resources``: the copy acquires its own on first use."""
        return self.__dict__ | dict.fromkeys(self._resources)
