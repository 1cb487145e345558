"""Batched reduced energies u(x) = U(x)/kT and their forces.

- :mod:`.openmm_bridge`: :class:`OpenMMEnergy`, OpenMM itself on any platform (worker pool on CPUs);
- :mod:`.torch_energy` + :mod:`.torch_forces`: :class:`TorchEnergy`, the System's forces as batched
  torch code on any device, verified against OpenMM at construction;
- :mod:`.select`: :func:`make_energy`, the fastest verified backend for a target;
- :mod:`._worker`: the worker processes' side (imports neither torch nor the rest of the package);
- :mod:`.regularize`: the lin-log regularisation used by training losses.

Names load on first use, so that a spawned worker importing :mod:`._worker` does not import torch.
"""
from importlib import import_module

_NAMES = {
    "OpenMMEnergy": "openmm_bridge",
    "TorchEnergy": "torch_energy",
    "VerificationError": "verification",
    "make_energy": "select",
    "WorkerError": "_worker",
    "regularize_energy": "regularize",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
