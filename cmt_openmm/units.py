"""Units and geometry conventions at the OpenMM boundary: the one home of each helper.

- ``MOLAR_GAS_CONSTANT`` (kJ/(mol K), OpenMM's value) and :func:`kT` (kJ/mol);
- :func:`kelvin` and :func:`nanometers` strip ``openmm.unit`` quantities once, at the public API;
- :func:`as_float64` turns tensors, arrays and sequences into float64 NumPy arrays;
- :func:`wrap_angle` (NumPy or torch, same convention), :func:`dihedral` (torch, points) and
  :func:`dihedral_angles` (NumPy, atom quadruples): IUPAC dihedrals, the sign convention of
  mdtraj and OpenMM's PeriodicTorsionForce.

This module imports neither torch nor the rest of the package at import time, so every layer
may use it.

>>> round(kT(300.0), 4)
2.4943
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import openmm.unit as unit

from .errors import CMTInputError

MOLAR_GAS_CONSTANT = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
"""R in kJ/(mol K), as OpenMM defines it."""

_TWO_PI = 2.0 * math.pi


def kT(temperature: float) -> float:
    """Thermal energy R T in kJ/mol of a temperature in K."""
    return MOLAR_GAS_CONSTANT * float(temperature)


def kelvin(temperature: Any) -> float:
    """Temperature as a float in K, from a float or an `openmm.unit` temperature; refuses T <= 0."""
    if unit.is_quantity(temperature):
        if not temperature.unit.is_compatible(unit.kelvin):
            raise CMTInputError(f"temperature {temperature} is not a temperature: pass kelvin or a float in K.")
        temperature = temperature.value_in_unit(unit.kelvin)
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise CMTInputError(f"temperature {temperature!r} is not a number: pass a float in K.") from None
    if not (math.isfinite(value) and value > 0.0):
        raise CMTInputError(f"temperature must be a finite positive number of kelvin, got {value}.")
    return value


def nanometers(positions: Any) -> np.ndarray:
    """Positions as a float64 array in nm, from an array or tensor (nm) or an `openmm.unit` length."""
    if unit.is_quantity(positions):
        if not positions.unit.is_compatible(unit.nanometer):
            raise CMTInputError(f"positions have unit {positions.unit}, not a length: pass nm or a length quantity.")
        positions = positions.value_in_unit(unit.nanometer)
    try:
        return as_float64(positions).copy()
    except (TypeError, ValueError):
        raise CMTInputError("positions could not be read as an (n_atoms, 3) array of numbers in nm.") from None


def as_float64(a: Any) -> np.ndarray:
    """A float64 NumPy array of a torch tensor (detached, on the CPU), an array or a sequence."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _is_tensor(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


def wrap_angle(angle: Any) -> Any:
    """Angles (rad) mapped onto [-π, π); a torch tensor stays a tensor, anything else becomes float64 NumPy."""
    a = angle if _is_tensor(angle) else as_float64(angle)
    wrapped = (a + math.pi) % _TWO_PI - math.pi  # % is the floored modulo for both NumPy and torch
    if _is_tensor(wrapped):
        import torch

        return torch.where(wrapped >= math.pi, wrapped - _TWO_PI, wrapped)  # rounding can land on +π
    return np.where(wrapped >= math.pi, wrapped - _TWO_PI, wrapped)


def dihedral(p0, p1, p2, p3):
    """IUPAC dihedral p0-p1-p2-p3 (rad, in [-π, π]) of torch points (..., 3); differentiable."""
    import torch

    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / b1.norm(dim=-1, keepdim=True)
    v = b0 - (b0 * b1).sum(-1, keepdim=True) * b1
    w = b2 - (b2 * b1).sum(-1, keepdim=True) * b1
    return torch.atan2((torch.linalg.cross(b1, v) * w).sum(-1), (v * w).sum(-1))


def dihedral_angles(x: Any, quadruples: Any) -> np.ndarray:
    """Dihedral angles (B, K) in [-π, π) of atom quadruples (K, 4) in configurations x (B, n, 3) (NumPy)."""
    x = as_float64(x)
    if x.ndim == 2:
        x = x[None]
    q = np.asarray(quadruples, dtype=np.int64).reshape(-1, 4)
    p0, p1, p2, p3 = (x[:, q[:, k]] for k in range(4))
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = np.cross(b0, b1), np.cross(b1, b2)
    b1_hat = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    angle = np.arctan2(np.sum(np.cross(n1, n2) * b1_hat, axis=-1), np.sum(n1 * n2, axis=-1))
    return wrap_angle(angle)
