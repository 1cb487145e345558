"""Targets to train on: named benchmark systems (:mod:`.builtin`), toys with exact answers (:mod:`.toys`)
and peptides built offline from a sequence (:mod:`.peptides`).

>>> from cmt_openmm.systems import get_target, list_targets
>>> target = get_target("aldp-vacuum")    # doctest: +SKIP
"""
from .builtin import aldp_pdb_path, get_target, list_targets
from .peptides import peptide
from .toys import ToyTarget, double_well_3d, gaussian_mixture

__all__ = ["ToyTarget", "aldp_pdb_path", "double_well_3d", "gaussian_mixture", "get_target", "list_targets",
           "peptide"]
