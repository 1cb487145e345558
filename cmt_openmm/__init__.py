"""cmt_openmm: Boltzmann generators trained with Constrained Mass Transport against OpenMM.

The public API is importable from the package root; submodules load on first use so that
``import cmt_openmm`` stays cheap (torch and openmmtools are only imported when needed).

Example (the training line is skipped in the doctests: a full CMT run on alanine dipeptide
takes tens of minutes; :class:`Run` and :func:`train` show runs on a toy that take seconds):

>>> import cmt_openmm
>>> target = cmt_openmm.get_target("aldp-vacuum")
>>> target.name, target.n_atoms, round(target.kT, 4)    # kT in kJ/mol at 300 K
('aldp-vacuum', 22, 2.4943)
>>> result = cmt_openmm.train(target, {"method": "cmt"})   # doctest: +SKIP
"""
import logging
from importlib import import_module

__version__ = "0.1.0"

_IMPORT_BANNERS = {
    "pymbar.mbar_solvers": "JAX NOT FOUND",
    "pymbar.timeseries": "Warning on use of the timeseries module",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
"""Notices libraries log when imported (pymbar, which openmmtools imports) or first used (torch's
C++ extension finder, on machines without a GPU), by logger: with no logging set up they reach
stderr before any output of ours. Dropped at their loggers; every other record passes."""


def _drop_import_banners() -> None:
    for name, text in _IMPORT_BANNERS.items():
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())


_drop_import_banners()

_PUBLIC = {
    "CMTInputError": "errors",
    "Target": "target",
    "ToyTarget": "systems.toys",
    "get_target": "systems",
    "list_targets": "systems",
    "target_from_entry": "systems.inputs",
    "peptide": "systems.peptides",
    "OpenMMEnergy": "energy.openmm.energy",
    "TorchEnergy": "energy.torch.energy",
    "make_energy": "energy.select",
    "regularize_energy": "energy.regularize",
    "InternalCoordinates": "coordinates",
    "CartesianCoordinates": "coordinates",
    "coordinates_for": "coordinates",
    "BoltzmannGenerator": "generator",
    "load_generator": "generator",
    "register_target": "generator",
    "train": "training",
    "TrainConfig": "training",
    "solve_dual": "training",
    "reweight": "sampling.reweighting",
    "ReweightedEnsemble": "sampling.reweighting",
    "FlowIndependenceMove": "sampling.moves",
    "FlowMoveReporter": "sampling.reporters",
    "Run": "runs.run",
    "report": "runs.run",
    "to_openmm_force": "export.force",
    "run_bridge_remd": "export.flow_bridged_remd",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'cmt_openmm' has no attribute {name!r}")
