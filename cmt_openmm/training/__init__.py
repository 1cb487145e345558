"""Training Boltzmann generators: the CMT dual and trainer, and baselines sharing one loop.

>>> from cmt_openmm.training import TrainConfig, solve_dual, train
"""
from .config import TrainConfig
from .dual import DualSolution, solve_dual
from .loop import TrainResult, Trainer, load_history, train

__all__ = ["DualSolution", "TrainConfig", "TrainResult", "Trainer", "load_history", "solve_dual", "train"]
