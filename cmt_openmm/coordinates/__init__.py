"""Coordinate transforms between Cartesian configurations and the coordinates a flow sees.

- :mod:`.zmatrix`: the placement order of atoms from a bond graph (rings, chirality);
- :mod:`.internal`: :class:`InternalCoordinates`, bonds/angles/torsions with exact log|det J|;
- :mod:`.cartesian`: :class:`CartesianCoordinates`, the identity for toys;
- :mod:`.backbone`: a peptide's backbone (φ, ψ) from its Topology.

>>> import cmt_openmm
>>> transform = cmt_openmm.coordinates_for(cmt_openmm.get_target("aldp-vacuum"))
>>> type(transform).__name__, transform.dim           # 3 * 22 - 6 internal coordinates
('InternalCoordinates', 60)
>>> toy = cmt_openmm.coordinates_for(cmt_openmm.get_target("toy-double-well"))
>>> type(toy).__name__, toy.dim                       # one particle, x = z
('CartesianCoordinates', 3)
"""
from __future__ import annotations

import torch

from .base import CoordinateTransform
from .cartesian import CartesianCoordinates
from .internal import InternalCoordinates

__all__ = ["CartesianCoordinates", "CoordinateTransform", "InternalCoordinates", "coordinates_for"]


def coordinates_for(target, dtype: torch.dtype = torch.float64) -> CoordinateTransform:
    """The transform for a Target: internal coordinates for molecules, else Cartesian over its box."""
    if target.has_molecule:
        return InternalCoordinates(target.topology, target.positions, target.constraints, dtype=dtype)
    return CartesianCoordinates(target.n_atoms, target.box, target.positions, dtype=dtype)
