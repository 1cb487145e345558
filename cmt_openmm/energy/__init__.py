"""Batched reduced energies u(x) = U(x)/kT and their forces, from OpenMM or from PyTorch.

- :mod:`.base`: :class:`~.base.Energy`, what both backends share (call, ``regularized``,
  evaluation counters, ``close``/``with``);
- :mod:`.openmm`: :class:`OpenMMEnergy` (:mod:`.openmm.energy`), OpenMM itself on any platform,
  with a spawned worker pool on CPUs (:mod:`.openmm.worker`, which imports neither torch nor
  the rest of the package);
- :mod:`.torch`: :class:`TorchEnergy` (:mod:`.torch.energy`), the System's forces compiled to
  batched torch on any device (:mod:`.torch.forces` and one module per force family), verified
  against OpenMM at construction (:mod:`.torch.verification`);
- :mod:`.select`: :func:`make_energy`, the fastest verified backend for a target;
- :mod:`.regularize`: the lin-log regularisation used by training losses.

Names load on first use, and this package and its subpackages import nothing themselves, so
that a spawned worker importing :mod:`.openmm.worker` does not import torch.
"""
from importlib import import_module

_NAMES = {
    "OpenMMEnergy": "openmm.energy",
    "TorchEnergy": "torch.energy",
    "VerificationError": "torch.verification",
    "make_energy": "select",
    "WorkerError": "openmm.worker",
    "regularize_energy": "regularize",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
