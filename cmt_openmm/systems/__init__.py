"""Targets to train on: named benchmark systems (:mod:`.builtin`) and toys with exact answers (:mod:`.toys`).

>>> from cmt_openmm.systems import get_target, list_targets
>>> target = get_target("aldp-vacuum")    # doctest: +SKIP
"""
from .builtin import aldp_pdb_path, get_target, list_targets
from .toys import ToyTarget, double_well_3d, gaussian_mixture

__all__ = ["ToyTarget", "aldp_pdb_path", "double_well_3d", "gaussian_mixture", "get_target", "list_targets"]
