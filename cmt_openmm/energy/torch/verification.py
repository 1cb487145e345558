"""Verification of a :class:`~.energy.TorchEnergy` against OpenMM's Reference platform.

:func:`verify_against_openmm` evaluates the torch terms and a Reference Context, force by force
(each force in its own force group; above 32 forces, 32 at a time) and in total, on
:func:`verification_structures` (the reference structure, small, large and far Gaussian
perturbations, the structure compressed and stretched, and stretched across every cutoff and
switching distance) and :func:`torsion_grid_structures` (the CMAP torsions driven through every
patch of their maps): issue 24 found faults that structures near the reference never reach (a
cutoff ignored, a CMAP patch off by 5 kJ/mol). It evaluates them in the energy's planned chunks
(so that it needs no more memory than training will) and raises
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
    "torsion_grid_structures",
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


def verification_structures(
    positions: np.ndarray,
    n_perturbed: int = 24,
    n_high: int = 8,
    seed: int = 0,
    distances: tuple[float, ...] = (),
    n_wide: int = 8,
) -> np.ndarray:
    """Structures spread as training will see them, (m, n_atoms, 3) nm: the reference,
    ``n_perturbed`` Gaussian perturbations (0.002-0.02 nm), ``n_high`` high-energy ones
    (0.04-0.08 nm: strained bonds, close contacts), ``n_wide`` far ones (0.1-0.3 nm: torsions
    and contacts anywhere, as an untrained flow draws them), the structure compressed and
    stretched about its centre (x0.85, 0.92, 1.08, 1.15), and for each of ``distances`` (the
    System's cutoffs and switching distances, nm) one stretched until its largest pair distance
    is 1.5 times that distance, so that pairs lie on both sides of it (each scaled one with
    0.005 nm of noise)."""
    rng = np.random.default_rng(seed)
    sigma = np.concatenate(
        [np.linspace(0.002, 0.02, n_perturbed), np.linspace(0.04, 0.08, n_high), np.linspace(0.1, 0.3, n_wide)]
    )
    noise = rng.standard_normal((len(sigma), *positions.shape)) * sigma[:, None, None]
    centre = positions.mean(0)
    extent = max(float(np.linalg.norm(positions[:, None] - positions[None], axis=-1).max()), 1e-3)
    scales = [0.85, 0.92, 1.08, 1.15] + [1.5 * d / extent for d in sorted(set(distances)) if 1.5 * d > extent]
    scaled = [centre + s * (positions - centre) + 0.005 * rng.standard_normal(positions.shape) for s in scales]
    return np.concatenate([positions[None], positions[None] + noise, np.asarray(scaled).reshape(-1, *positions.shape)])


def torsion_grid_structures(positions: np.ndarray, system: openmm.System, bonds: list[tuple[int, int]]) -> np.ndarray:
    """Structures (m, n_atoms, 3) nm in which the CMAP torsion pairs of ``system`` together visit
    the centre of every patch of their maps: structure k sets pair r to patch k * R + r (R
    pairs), so ceil(size^2 / R) structures cover the grid (576 for one pair of a 24 x 24 map, 6
    for a 100-residue protein). A dihedral i-j-k-l is set by rotating the atoms on k's side of
    the bond j-k (``bonds``: atom index pairs) about it; one in a ring is left as it is."""
    from ...units import dihedral_angles

    pairs = [
        (force, *force.getTorsionParameters(t)) for force in system.getForces()
        if isinstance(force, openmm.CMAPTorsionForce) for t in range(force.getNumTorsions())
    ]
    if not pairs:
        return np.zeros((0, *positions.shape))
    neighbours: dict[int, list[int]] = {}
    for i, j in bonds:
        neighbours.setdefault(i, []).append(j)
        neighbours.setdefault(j, []).append(i)

    def set_dihedral(x: np.ndarray, atoms: tuple[int, ...], angle: float) -> None:
        i, j, k, _ = atoms
        moving, stack = {k}, [k]
        while stack:  # k's side of the bond j-k
            for a in neighbours.get(stack.pop(), []):
                if a not in moving and a != j:
                    moving.add(a)
                    stack.append(a)
        if i in moving:  # a ring: no side to turn
            return
        index = np.fromiter(moving, int)
        axis = (x[k] - x[j]) / np.linalg.norm(x[k] - x[j])

        def turn(delta: float) -> None:  # Rodrigues' rotation about the axis through x[j]
            p = x[index] - x[j]
            c, s_ = np.cos(delta), np.sin(delta)
            x[index] = x[j] + p * c + np.cross(axis, p) * s_ + axis * (p @ axis)[:, None] * (1 - c)

        delta = angle - float(dihedral_angles(x, [atoms])[0, 0])
        turn(delta)
        off = float(dihedral_angles(x, [atoms])[0, 0]) - angle
        if abs(np.remainder(off + np.pi, 2 * np.pi) - np.pi) > 1e-6:  # it turned the other way
            turn(-2 * delta)

    sizes = [int(force.getMapParameters(m)[0]) for force, m, *_ in pairs]
    out = []
    for k in range(-(-max(sizes) ** 2 // len(pairs))):
        x = np.array(positions, float)
        for r, ((force, m, a1, a2, a3, a4, b1, b2, b3, b4), size) in enumerate(zip(pairs, sizes)):
            patch, width = (k * len(pairs) + r) % size**2, 2 * np.pi / size
            set_dihedral(x, (a1, a2, a3, a4), -np.pi + (patch % size + 0.5) * width)
            set_dihedral(x, (b1, b2, b3, b4), -np.pi + (patch // size + 0.5) * width)
        out.append(x)
    return np.asarray(out)


def _openmm_by_term(
    system: openmm.System, indices: list[int], x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenMM Reference energies (B,) and forces (B, n, 3) in total and per force index in
    ``indices`` (kJ/mol, kJ/mol/nm): each force in its own force group, in Contexts of at most 32
    forces (OpenMM's groups), the total summed over them."""
    n, n_forces = len(x), system.getNumForces()
    total_e, total_f = np.zeros(n), np.zeros(x.shape)
    term_e = np.zeros((len(indices), n))
    term_f = np.zeros((len(indices), *x.shape))
    for start in range(0, max(n_forces, 1), 32):
        block = range(start, min(start + 32, n_forces))
        copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
        for k in reversed(range(n_forces)):
            if k not in block:
                copy.removeForce(k)
        for group, force in enumerate(copy.getForces()):
            force.setForceGroup(group)
        context = openmm.Context(copy, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        terms = [(t, k - start) for t, k in enumerate(indices) if k in block]
        for b in range(n):
            context.setPositions(x[b])
            state = context.getState(getEnergy=True, getForces=True)
            total_e[b] += state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            total_f[b] += state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
            for t, group in terms:
                state = context.getState(getEnergy=True, getForces=True, groups={group})
                term_e[t, b] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                term_f[t, b] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        del context
    return total_e, total_f, term_e, term_f


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
    positions = np.asarray(target.positions, float)
    distances = tuple(d for t in energy.terms for d in (getattr(t, "cutoff", None), getattr(t, "switch", None)) if d)
    bonds = [(a.index, b.index) for a, b in target.topology.bonds()]
    x = np.concatenate([
        verification_structures(positions, n_perturbed, n_high, seed, distances),
        torsion_grid_structures(positions, target.system, bonds),
    ])
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
    if max(max_e / e_tol, max_f / f_tol) > worst[1]:
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
