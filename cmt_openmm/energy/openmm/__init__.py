"""The OpenMM backend: :class:`~.energy.OpenMMEnergy` and its worker processes.

- :mod:`.energy`: :class:`~.energy.OpenMMEnergy`, OpenMM on any platform, differentiable in torch;
- :mod:`.worker`: the Contexts and the spawned worker pool (imports neither torch nor the rest
  of the package).

Imports nothing itself: a spawned worker imports this package on its way to :mod:`.worker`.
"""
