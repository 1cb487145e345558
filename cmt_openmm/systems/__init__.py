"""Targets to train on: named benchmark systems (:mod:`.builtin`), toys with exact answers (:mod:`.toys`)
and peptides built offline from a sequence (:mod:`.peptides`).

>>> import cmt_openmm
>>> [name for name in cmt_openmm.list_targets() if name.startswith("toy")]
['toy-double-well', 'toy-gaussian-mixture']
>>> target = cmt_openmm.get_target("aldp-vacuum")
>>> target.name, target.n_atoms, target.temperature
('aldp-vacuum', 22, 300.0)
"""
from .builtin import aldp_pdb_path, get_target, list_targets
from .peptides import peptide
from .toys import ToyTarget, double_well_3d, gaussian_mixture

__all__ = ["ToyTarget", "aldp_pdb_path", "double_well_3d", "gaussian_mixture", "get_target", "list_targets",
           "peptide"]
