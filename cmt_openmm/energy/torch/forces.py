"""OpenMM forces compiled to batched PyTorch: energies (kJ/mol) of chunks (b, n_atoms, 3) nm.

Hand-written because no maintained PyPI package compiles OpenMM force fields with implicit
solvent to batched torch (torchmd has no GB and loops over replicas in Python; bgflow, DMFF,
jaxmm and smee are not on PyPI). Each supported ``openmm.Force`` becomes one term, a small
class whose docstring gives its formula, built once from the Force (index lists and
parameters become tensors) and evaluated on a whole chunk of configurations at once with no
Python loop over atoms, pairs or configurations. This module maps Force types to terms:

=========================  ================================================================
OpenMM force               term
=========================  ================================================================
HarmonicBondForce          :class:`~.bonded.HarmonicBondTerm`
HarmonicAngleForce         :class:`~.bonded.HarmonicAngleTerm`
PeriodicTorsionForce       :class:`~.bonded.PeriodicTorsionTerm`
RBTorsionForce             :class:`~.bonded.RBTorsionTerm`
CMAPTorsionForce           :class:`~.bonded.CMAPTorsionTerm` (OpenMM's bicubic patches)
NonbondedForce             :class:`~.nonbonded.NonbondedTerm` (NoCutoff, CutoffNonPeriodic)
GBSAOBCForce               :class:`~.obc.GBSAOBCTerm` (OBC2 as OpenMM's ReferenceObc, ACE)
CustomGBForce              :class:`~.obc.OBCFamilyGBTerm` when its expressions are OpenMM's
                           OBC1/OBC2 ones (``implicit/obc1.xml``, ``implicit/obc2.xml``, prmtop
                           ``implicitSolvent=OBC1/OBC2``, openmmtools AlanineDipeptideImplicit;
                           matched structurally, :func:`~.custom_gb.recognise_obc`), else
                           :class:`~.custom_gb.CustomGBTerm` (any expressions: HCT,
                           GBn/GBn2 with their neck tables, salt screening)
Custom{Bond,Angle,Torsion, :class:`~.custom.CustomBondedTerm`, ``CustomExternalTerm``,
External,Nonbonded}Force   ``CustomNonbondedTerm`` (Lepton expressions compiled, :mod:`.lepton`)
CMMotionRemover            no energy, ignored
=========================  ================================================================

Any other force or option raises :class:`~.term.UnsupportedForceError` naming it in one
sentence: CustomCompoundBondForce, CustomCentroidBondForce, CustomHbondForce,
CustomManyParticleForce, CustomCVForce, TorchForce, PythonForce, the AMOEBA/Drude forces,
periodic methods, Continuous1D/2D/3DFunction tables, CustomNonbondedForce computed values, CMAP
maps of different sizes. An expression OpenMM cannot evaluate either (a NaN constant, on which
its optimizer never finishes) raises :class:`~.term.OpenMMWouldHangError` instead, on its own.
Every force counts whatever its force group: OpenMM's default ``getState(getEnergy=True)`` sums
all 32 groups.

Speed: a chunk is held batch-last, X (3, n_atoms, b) (:mod:`.geometry`), several
times faster than (b, n, 3) on CPUs. With a GB force, the (n, n, b) distance matrix is computed
once per chunk and shared (OBC/GBn2 pair sums, and the Nonbonded pairs gathered from it); the
passes over it are few and in place (the OBC kernel needs no masks), since on CPUs their number,
not arithmetic, sets the speed. Gradients are analytic for the standard forces (bonds,
angles, torsions, CMAP, nonbonded, OBC); compiled expressions are differentiated by autograd
with respect to their internal variable only (r, theta, phi; the pair-distance matrix for
CustomGBForce), never through index operations.

Conventions: positions nm, energies kJ/mol, ``ONE_4PI_EPS0 = 138.9354576...`` (OpenMM's value,
:mod:`.term`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import openmm
import torch

from .bonded import CMAPTorsionTerm, HarmonicAngleTerm, HarmonicBondTerm, PeriodicTorsionTerm, RBTorsionTerm
from .custom import CustomBondedTerm, CustomExternalTerm, CustomNonbondedTerm
from .custom_gb import compile_custom_gb
from .nonbonded import NonbondedTerm
from .obc import GBSAOBCTerm
from .term import ForceTerm, OpenMMWouldHangError, UnsupportedForceError, exception_summary, force_label

__all__ = ["compile_force", "compile_system"]

_IGNORED_FORCES = ("CMMotionRemover", "AndersenThermostat")  # no potential energy

_TERMS: dict[type, Callable] = {
    openmm.HarmonicBondForce: HarmonicBondTerm,
    openmm.HarmonicAngleForce: HarmonicAngleTerm,
    openmm.PeriodicTorsionForce: PeriodicTorsionTerm,
    openmm.RBTorsionForce: RBTorsionTerm,
    openmm.CMAPTorsionForce: CMAPTorsionTerm,
    openmm.NonbondedForce: NonbondedTerm,
    openmm.GBSAOBCForce: GBSAOBCTerm,
    openmm.CustomBondForce: CustomBondedTerm,
    openmm.CustomAngleForce: CustomBondedTerm,
    openmm.CustomTorsionForce: CustomBondedTerm,
    openmm.CustomExternalForce: CustomExternalTerm,
    openmm.CustomNonbondedForce: CustomNonbondedTerm,
}


def compile_force(
    force: openmm.Force,
    index: int,
    positions: np.ndarray | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float64,
    n_atoms: int | None = None,
) -> ForceTerm | None:
    """The term of one force (None for forces without energy, e.g. CMMotionRemover) of a
    System with ``n_atoms`` particles (needed for bonded forces; default: ``len(positions)``).

    A CustomGBForce recognised as OBC1/OBC2 gets the fast :class:`~.obc.OBCFamilyGBTerm`
    when it agrees with the generic :class:`~.custom_gb.CustomGBTerm` on structures near
    ``positions`` (nm); any other CustomGBForce the generic term
    (:func:`~.custom_gb.compile_custom_gb`). Raises
    :class:`~.term.UnsupportedForceError` (one sentence naming the force) otherwise.
    """
    if type(force).__name__ in _IGNORED_FORCES:
        return None
    if n_atoms is None and positions is not None:
        n_atoms = len(positions)
    if isinstance(force, openmm.CustomGBForce):
        return compile_custom_gb(force, index, positions, device, dtype)
    if not _implemented(force):
        raise UnsupportedForceError(
            f"{force_label(force, index)} is not implemented by the torch backend; use the OpenMM backend."
        )
    return _TERMS[type(force)](force, index, device, dtype, n_atoms=n_atoms)


def compile_system(
    system: openmm.System, positions: np.ndarray | None = None, device: Any = "cpu", dtype: torch.dtype = torch.float64
) -> list[ForceTerm]:
    """Terms for every force of ``system`` (see :func:`compile_force`); one
    :class:`~.term.UnsupportedForceError` sentence names every force that cannot be evaluated
    (the forces of types without a term together) and says once to use the OpenMM backend."""
    terms, refused, missing = [], [], []
    for index, force in enumerate(system.getForces()):
        if not _implemented(force):  # listed together, the advice said once
            missing.append(force_label(force, index))
            continue
        try:
            term = compile_force(force, index, positions, device, dtype, n_atoms=system.getNumParticles())
        except OpenMMWouldHangError:  # not a refusal: OpenMM cannot evaluate it either
            raise
        except UnsupportedForceError as error:
            refused.append(str(error).rstrip("."))
            continue
        except Exception as error:  # an input the compiler did not foresee: refused, never a crash
            refused.append(f"{force_label(force, index)} cannot be compiled to torch ({exception_summary(error)})")
            continue
        if term is not None:
            terms.append(term)
    if missing:
        names = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        refused.insert(0, f"{names} {'are' if len(missing) > 1 else 'is'} not implemented by the torch backend")
    if refused:
        raise UnsupportedForceError("; ".join(refused) + "; use the OpenMM backend.")
    return terms


def _implemented(force: openmm.Force) -> bool:
    """Whether the torch backend has a term for the force's type (or ignores it)."""
    return type(force).__name__ in _IGNORED_FORCES or isinstance(force, openmm.CustomGBForce) or type(force) in _TERMS
