"""Verification of a :class:`~.energy.TorchEnergy` against OpenMM's Reference platform.

:func:`verify_against_openmm` evaluates the torch terms and a Reference Context, force by force
(each force in its own force group) and in total, on :func:`verification_structures` (the
reference structure, small and large Gaussian perturbations, nm), in the energy's planned chunks
(so that it needs no more memory than training will), and raises
:class:`VerificationError` naming the worst force when a relative error exceeds its tolerance:
|dE| / max(|E|, kT) for energies (kJ/mol) and max_atom |dF| / max(max_atom |F|, kT/nm) for forces
(kJ/mol/nm). Tolerances: float64 1e-6 and 1e-5, float32 5e-4 and 1e-3. A term that raises
while evaluated is a :class:`VerificationError` naming it, so that ``make_energy("auto")`` falls
back to OpenMM.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import openmm
import openmm.unit as unit
import torch

from ...errors import CMTInputError
from .term import exception_summary

__all__ = [
    "ENERGY_TOLERANCE",
    "FLOAT32_ENERGY_TOLERANCE",
    "FLOAT32_FORCE_TOLERANCE",
    "FORCE_TOLERANCE",
    "VerificationError",
    "verification_structures",
    "verify_against_openmm",
]

ENERGY_TOLERANCE = 1e-6  # relative, float64
FORCE_TOLERANCE = 1e-5  # relative, float64
# float32: rounding of coordinate differences and of sums of large cancelling terms; the
# tolerances leave a margin of about 5x over the largest errors seen on alanine dipeptide
# (energies with amber14 + GBn2, forces of CMAP)
FLOAT32_ENERGY_TOLERANCE = 5e-4
FLOAT32_FORCE_TOLERANCE = 1e-3


class VerificationError(CMTInputError):
    """The torch energy disagrees with OpenMM's Reference platform."""


def verification_structures(positions: np.ndarray, n_perturbed: int = 24, n_high: int = 8, seed: int = 0) -> np.ndarray:
    """The reference structure, ``n_perturbed`` Gaussian perturbations (0.002-0.02 nm) and
    ``n_high`` high-energy ones (0.04-0.08 nm: strained bonds, close contacts), (1+n+m, n_atoms, 3)."""
    rng = np.random.default_rng(seed)
    sigma = np.concatenate([np.linspace(0.002, 0.02, n_perturbed), np.linspace(0.04, 0.08, n_high)])
    noise = rng.standard_normal((len(sigma), *positions.shape)) * sigma[:, None, None]
    return np.concatenate([positions[None], positions[None] + noise])


def _openmm_by_term(
    system: openmm.System, indices: list[int], x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """OpenMM Reference energies (B,) and forces (B, n, 3) in total and per force index
    (kJ/mol, kJ/mol/nm); per-force arrays are None when the System has more than 32 forces."""
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    per_force = copy.getNumForces() <= 32
    if per_force:
        for k, force in enumerate(copy.getForces()):
            force.setForceGroup(k)
    context = openmm.Context(copy, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    n = len(x)
    total_e, total_f = np.zeros(n), np.zeros(x.shape)
    term_e = np.zeros((len(indices), n))
    term_f = np.zeros((len(indices), *x.shape))
    for b in range(n):
        context.setPositions(x[b])
        state = context.getState(getEnergy=True, getForces=True)
        total_e[b] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        total_f[b] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        if per_force:
            for t, k in enumerate(indices):
                state = context.getState(getEnergy=True, getForces=True, groups={k})
                term_e[t, b] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                term_f[t, b] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    del context
    return total_e, total_f, (term_e if per_force else None), (term_f if per_force else None)


def _relative_errors(
    e: np.ndarray, f: np.ndarray, e_ref: np.ndarray, f_ref: np.ndarray, kT: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per configuration: |dE| / max(|E|, kT) and max_atom |dF| / max(max_atom |F|, kT/nm); inf
    where torch's value is not finite (OpenMM's are: structures where it fails are left out)."""
    e_err = np.abs(e - e_ref) / np.maximum(np.abs(e_ref), kT)
    f_norm = np.linalg.norm(f_ref, axis=-1).max(-1)
    f_err = np.linalg.norm(f - f_ref, axis=-1).max(-1) / np.maximum(f_norm, kT)
    return np.nan_to_num(e_err, nan=np.inf), np.nan_to_num(f_err, nan=np.inf)  # NaN: never within tolerance


def verify_against_openmm(
    energy: Any,
    n_perturbed: int = 24,
    n_high: int = 8,
    seed: int = 0,
    energy_tolerance: float | None = None,
    force_tolerance: float | None = None,
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    """Compare ``energy`` (a :class:`~.energy.TorchEnergy`; not imported here, which
    imports this module) with OpenMM's Reference platform, force by force, on
    :func:`verification_structures` of its target; return the record (also kept as
    ``energy.verification``) and raise :class:`VerificationError` (one sentence naming the
    worst force and its error) above the tolerances (float64: 1e-6 relative energy, 1e-5
    relative force; float32: 5e-4 and 1e-3). Relative errors: |dE|/max(|E|, kT) and
    max_atom |dF| / max(max_atom |F|, kT/nm), per force and in total.
    """
    target = energy.target
    x = verification_structures(np.asarray(target.positions, float), n_perturbed, n_high, seed)
    indices = [term.force_index for term in energy.terms]
    e_ref, f_ref, te_ref, tf_ref = _openmm_by_term(target.system, indices, x)
    finite = np.isfinite(e_ref) & np.isfinite(f_ref).all(axis=(1, 2))
    x, e_ref, f_ref = x[finite], e_ref[finite], f_ref[finite]
    kT = float(target.kT)
    float32 = energy.dtype == torch.float32
    e_tol = energy_tolerance or (FLOAT32_ENERGY_TOLERANCE if float32 else ENERGY_TOLERANCE)
    f_tol = force_tolerance or (FLOAT32_FORCE_TOLERANCE if float32 else FORCE_TOLERANCE)
    xt = torch.as_tensor(x)
    per_force: dict[str, dict[str, float]] = {}
    worst = ("the total", 0.0, "energy")
    name = getattr(target, "name", "the target")
    for t, term in enumerate(energy.terms):
        try:  # term by term, so that an exception names its force; in chunks planned for the term
            e, g = energy._chunk(energy._positions(xt), True, [term])
        except Exception as error:
            raise VerificationError(
                f"the torch energy of {name} cannot be evaluated: {term.label} raised {exception_summary(error)}."
            ) from error
        if te_ref is None:
            continue
        e_err, f_err = _relative_errors(
            e.detach().to("cpu", torch.float64).numpy(),
            -g.to("cpu", torch.float64).numpy(),
            te_ref[t][finite],
            tf_ref[t][finite],
            kT,
        )
        per_force[term.label] = {
            "max_relative_energy_error": float(e_err.max()),
            "max_relative_force_error": float(f_err.max()),
        }
        for kind, err, tol in (("energy", e_err.max(), e_tol), ("force", f_err.max(), f_tol)):
            if err / tol > worst[1]:
                worst = (term.label, float(err / tol), kind)
    u, grad = energy._evaluate(xt, gradient=True, count=False)
    e_err, f_err = _relative_errors(
        u.to("cpu", torch.float64).numpy() * kT, -grad.to("cpu", torch.float64).numpy() * kT, e_ref, f_ref, kT
    )
    max_e, max_f = float(e_err.max()), float(f_err.max())
    if te_ref is None or max(max_e / e_tol, max_f / f_tol) > worst[1]:
        kind = "energy" if max_e / e_tol >= max_f / f_tol else "force"
        worst = ("the total", max(max_e / e_tol, max_f / f_tol), kind)
    record = {
        "n_configurations": int(len(x)),
        "max_relative_energy_error": max_e,
        "max_relative_force_error": max_f,
        "energy_tolerance": e_tol,
        "force_tolerance": f_tol,
        "dtype": str(energy.dtype).replace("torch.", ""),
        "device": str(energy.device),
        "per_force": per_force,
        "worst_force": worst[0],
        "passed": bool(
            max_e <= e_tol
            and max_f <= f_tol
            and all(
                v["max_relative_energy_error"] <= e_tol and v["max_relative_force_error"] <= f_tol
                for v in per_force.values()
            )
        ),
    }
    energy.verification = record
    if not record["passed"] and raise_on_failure:
        label, _, kind = worst
        err = (
            per_force[label][f"max_relative_{kind}_error"]
            if label in per_force
            else (max_e if kind == "energy" else max_f)
        )
        tol = e_tol if kind == "energy" else f_tol
        what = (
            f"a relative {kind} error of {err:.2e} (tolerance {tol:.0e})"
            if np.isfinite(err)
            else f"a non-finite {kind}{' (a NaN or inf energy or gradient)' if label == 'the total' else ''} where "
            "OpenMM's is finite"
        )
        raise VerificationError(
            f"the torch energy of {name} disagrees with OpenMM's Reference platform: {label} has {what} on "
            f"{len(x)} verification structures."
        )
    return record
