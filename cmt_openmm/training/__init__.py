"""Training Boltzmann generators: the CMT dual and trainer, and baselines sharing one loop.

:mod:`.loop` runs any method registered with :func:`~.loop.register_method`; the methods
(:mod:`.cmt`, :mod:`.baselines`) register themselves when imported here, so ``loop`` never
imports them (no import circle).

>>> from cmt_openmm.training import TrainConfig, solve_dual, train
"""
from . import baselines, cmt  # noqa: F401  (register the methods)
from .config import TrainConfig
from .dual import DualSolution, solve_dual
from .loop import METHODS, TrainResult, Trainer, load_history, register_method, train

__all__ = ["METHODS", "DualSolution", "TrainConfig", "TrainResult", "Trainer", "load_history", "register_method",
           "solve_dual", "train"]
