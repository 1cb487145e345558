"""Training Boltzmann generators: the CMT dual and trainer, and baselines sharing one loop.

:mod:`.loop` runs any method registered with :func:`~.loop.register_method`; the methods
(:mod:`.cmt`, :mod:`.baselines`) register themselves when imported here, so ``loop`` never
imports them (no import circle).

>>> import cmt_openmm
>>> from cmt_openmm.training import TRAINERS, TrainConfig, train
>>> {"cmt", "reverse_kl", "forward_kl", "temperature_annealing"} <= set(TRAINERS)   # the registered methods
True
>>> cmt_openmm.train is train, cmt_openmm.TrainConfig is TrainConfig   # also at the package root
(True, True)
"""
from . import baselines, cmt  # noqa: F401  (register the methods)
from .config import TRAINERS, TrainConfig, register_method
from .dual import DualSolution, solve_dual
from .checkpoints import load_history
from .loop import TrainResult, Trainer, train

__all__ = ["TRAINERS", "DualSolution", "TrainConfig", "TrainResult", "Trainer", "load_history", "register_method",
           "solve_dual", "train"]
