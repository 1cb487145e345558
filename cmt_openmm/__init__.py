"""cmt_openmm: Boltzmann generators trained with Constrained Mass Transport against OpenMM.

The public API is importable from the package root; submodules load on first use so that
``import cmt_openmm`` stays cheap (torch and openmmtools are only imported when needed).

>>> import cmt_openmm
>>> target = cmt_openmm.get_target("aldp-vacuum")          # doctest: +SKIP
>>> result = cmt_openmm.train(target, {"method": "cmt"})   # doctest: +SKIP
"""
from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "CMTInputError": "errors",
    "Target": "target",
    "ToyTarget": "toys",
    "get_target": "systems",
    "list_targets": "systems",
    "OpenMMEnergy": "energy",
    "regularize_energy": "energy",
    "InternalCoordinates": "coordinates",
    "CartesianCoordinates": "coordinates",
    "coordinates_for": "coordinates",
    "BoltzmannGenerator": "generator",
    "train": "training",
    "TrainConfig": "training",
    "solve_dual": "training",
    "reweight": "reweighting",
    "FlowIndependenceMove": "moves",
    "FlowMoveReporter": "moves",
    "register_target": "moves",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'cmt_openmm' has no attribute {name!r}")
