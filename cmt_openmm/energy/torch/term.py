"""What a compiled force is: :class:`ForceTerm`, its error, and readers of Force parameters.

:class:`UnsupportedForceError` is what the torch backend raises for what it refuses; the
readers take an ``openmm.Force``'s parameters in OpenMM's MD units (nm, kJ/mol, rad, e). A
term is built once from its Force (:meth:`ForceTerm._compile` turns index lists and parameters
into tensors) and maps a chunk (:class:`~.geometry.PairGeometry`, b configurations) to energies
(b,) kJ/mol, adding dE/dx when asked. :func:`exception_summary` words an unexpected exception
for the one-sentence refusals that turn it into a fallback. ``ONE_4PI_EPS0`` is OpenMM's Coulomb constant, shared by
the nonbonded and GB terms.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import openmm
import torch

from ...errors import CMTInputError
from .geometry import Incidence, PairGeometry

__all__ = [
    "ONE_4PI_EPS0",
    "ForceTerm",
    "UnsupportedForceError",
    "exception_summary",
    "force_label",
    "global_defaults",
    "md_value",
    "per_particle_parameters",
]

# 1/(4 pi eps0) in kJ mol^-1 nm e^-2 computed as OpenMM does (SimTKOpenMMRealType.h, CODATA 2018):
# 138.93545764..., not the rounded 138.935456 (which would leave 1e-8 relative errors).
ONE_4PI_EPS0 = 1.0 / (4.0 * math.pi * (1e-6 * 8.8541878128e-12 / (1.602176634e-19**2 * 6.02214076e23)))


class UnsupportedForceError(CMTInputError):
    """A force (or one of its options) that the torch backend does not implement."""


class OpenMMWouldHangError(UnsupportedForceError):
    """A force that OpenMM cannot evaluate either: creating a Context with it never finishes
    (an expression Lepton's optimizer loops on), so no backend falls back to OpenMM."""


def exception_summary(error: BaseException) -> str:
    """An unexpected exception in a few words for a one-sentence message: its type and the
    first line of its text (at most 200 characters, no final period)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200].rstrip('.')}" if text else type(error).__name__


def force_label(force: openmm.Force, index: int) -> str:
    """How messages name a force: "HarmonicBondForce #0", or with its own name if it has one."""
    kind, name = type(force).__name__, force.getName()
    return f"{kind} #{index}" if name in ("", kind) else f"{kind} {name!r} #{index}"


def md_value(quantity: Any) -> float:
    """A float in OpenMM's MD units (nm, kJ/mol, rad, e) from a float or a Quantity."""
    if isinstance(quantity, openmm.unit.Quantity):
        return float(quantity.value_in_unit_system(openmm.unit.md_unit_system))
    return float(quantity)


def global_defaults(force: Any) -> dict[str, float]:
    """The default values of a force's global parameters, by name."""
    return {
        force.getGlobalParameterName(k): force.getGlobalParameterDefaultValue(k)
        for k in range(force.getNumGlobalParameters())
    }


def per_particle_parameters(count: int, getter: Callable, n_params: int) -> np.ndarray:
    """(count, n_params) parameters ``getter(k)`` of rows k = 0..count-1, in MD units."""
    rows = [getter(k) for k in range(count)]
    return np.array([[md_value(v) for v in row] for row in rows], float).reshape(count, n_params)


class ForceTerm:
    """One OpenMM force as a batched torch function.

    ``term(geometry, gradient)`` returns the energies (b,) in kJ/mol of the chunk in
    ``geometry`` (:class:`PairGeometry`) and, when ``gradient`` is true, adds dE/dx to it.
    ``label`` names the force ("HarmonicBondForce #0"), ``force_index`` is its index in the
    System; ``needs_dense`` asks for the (n, n) distance matrix, ``uses_dense`` says that the
    term reads its pair distances from it when the chunk has one (in the same chunks); ``width`` is the number of
    elements per configuration of its largest tensors (pairs, angles, ...; sets chunk sizes);
    ``translation_invariant`` is false for terms of absolute positions (x, y, z in an expression);
    ``live_tensors`` is how many tensors of its largest size (``width`` elements per configuration,
    n_atoms^2 with ``needs_dense``) are alive at once at the peak of an evaluation with gradients,
    the chunk's shared ones (distance matrix, 1/r, pair weights) included: the chunk planner's
    bytes per configuration (:class:`~.energy.TorchEnergy`). Measured as the peak resident memory
    of one large chunk over the size of one such tensor: 33 for NonbondedTerm's pair lists on
    alanine dipeptide in vacuum (pair distances, displacements (3, P, b), powers, gradients).
    ``Term(force, index, device, dtype, n_atoms)`` checks what every term needs (``n_atoms``,
    no periodic boundary conditions), then reads the force in the subclass's :meth:`_compile`.
    """

    label = "force"
    force_index = -1
    needs_dense = False
    uses_dense = False
    width = 1
    translation_invariant = True
    live_tensors = 36

    def __init__(
        self,
        force: openmm.Force,
        index: int,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float64,
        n_atoms: int | None = None,
    ):
        self.label, self.force_index = force_label(force, index), index
        self.device, self.dtype = torch.device(device), dtype
        if n_atoms is None and hasattr(force, "getNumParticles"):
            n_atoms = force.getNumParticles()
        if n_atoms is None:
            raise ValueError(f"{self.label}: pass n_atoms, the System's number of particles.")
        self.n_atoms = int(n_atoms)
        if force.usesPeriodicBoundaryConditions():
            raise UnsupportedForceError(
                f"{self.label} uses periodic boundary conditions, which the torch backend does not implement."
            )
        self._compile(force)

    def _compile(self, force: openmm.Force) -> None:
        """Read ``force`` into tensors on ``self.device`` (index lists, parameters in ``self.dtype``)."""
        raise NotImplementedError

    def _tensor(self, values: Any, column: bool = False) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=self.dtype, device=self.device)
        return t[:, None] if column else t

    def _index(self, values: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64).reshape(-1), device=self.device)

    def _atoms(self, rows: list, coordinate: type, first: int = 0) -> tuple[list[torch.Tensor], Incidence]:
        """Atom indices of the columns ``first``, ``first + 1``, ... of ``rows``, one per atom of
        ``coordinate`` (:class:`~.geometry.Angles` or ``Dihedrals``), and their incidence."""
        columns = [[row[first + c] for row in rows] for c in range(coordinate.arity)]
        return [self._index(column) for column in columns], coordinate.incidence(*columns, self.n_atoms, self.device)

    def _method_cutoff(self, force: Any) -> float | None:
        """The cutoff (nm) of a force's nonbonded method: None for NoCutoff (0), r_c for
        CutoffNonPeriodic (1); periodic methods are refused."""
        method = force.getNonbondedMethod()
        if method == 0:  # NoCutoff
            return None
        if method == 1:  # CutoffNonPeriodic
            return md_value(force.getCutoffDistance())
        raise UnsupportedForceError(
            f"{self.label} uses periodic boundary conditions, which the torch backend does not implement."
        )

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"
