"""Bonded terms with analytic gradients: bonds, angles and torsions.

Harmonic bonds and angles, periodic, Ryckaert-Bellemans and CMAP torsions (OpenMM's bicubic
patches). Positions nm, energies kJ/mol, angles rad; per-term parameters are (P, 1) columns
against the chunk's internal coordinates (P, b) (:mod:`.geometry`).
"""

from __future__ import annotations

import math

import numpy as np
import openmm
import torch

from .geometry import Angles, Dihedrals, PairGeometry, PairList, bond_lengths
from .term import ForceTerm, UnsupportedForceError, md_value

__all__ = [
    "CMAPTorsionTerm",
    "HarmonicAngleTerm",
    "HarmonicBondTerm",
    "PeriodicTorsionTerm",
    "RBTorsionTerm",
    "cmap_coefficients",
]


class HarmonicBondTerm(ForceTerm):
    """HarmonicBondForce: E = sum_bonds k/2 (r - r0)^2, r = |x_j - x_i|."""

    def _compile(self, force: openmm.HarmonicBondForce) -> None:
        rows = [force.getBondParameters(k) for k in range(force.getNumBonds())]
        self.pairs = PairList.build([r[0] for r in rows], [r[1] for r in rows], self.n_atoms, self.device)
        self.width = max(1, len(rows))
        self.r0 = self._tensor([md_value(r[2]) for r in rows], column=True)
        self.k = self._tensor([md_value(r[3]) for r in rows], column=True)

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        if len(self.pairs) == 0:
            return geometry.zeros()
        r, d = bond_lengths(geometry, self.pairs)
        dr = r - self.r0
        kdr = self.k * dr
        if gradient:
            geometry.add_pair_gradient(self.pairs, d, kdr / r)
        return 0.5 * (kdr * dr).sum(0)


class HarmonicAngleTerm(ForceTerm):
    """HarmonicAngleForce: E = sum_angles k/2 (theta - theta0)^2, theta the angle i-j-k in [0, pi]."""

    def _compile(self, force: openmm.HarmonicAngleForce) -> None:
        rows = [force.getAngleParameters(k) for k in range(force.getNumAngles())]
        self.atoms, self.incidence = self._atoms(rows, Angles)
        self.width = max(1, len(rows))
        self.theta0 = self._tensor([md_value(r[3]) for r in rows], column=True)
        self.k = self._tensor([md_value(r[4]) for r in rows], column=True)

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        if len(self.k) == 0:
            return geometry.zeros()
        angles = Angles(geometry.X, *self.atoms)
        d = angles.theta - self.theta0
        kd = self.k * d
        if gradient:
            angles.backward(geometry, kd, self.incidence)
        return 0.5 * (kd * d).sum(0)


class PeriodicTorsionTerm(ForceTerm):
    """PeriodicTorsionForce: E = sum_torsions k (1 + cos(n phi - phi0)), phi the dihedral i-j-k-l."""

    def _compile(self, force: openmm.PeriodicTorsionForce) -> None:
        rows = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
        # one dihedral per distinct quadruple of atoms (force fields list several periodicities)
        quads = {}
        for row in rows:
            quads.setdefault(tuple(row[:4]), len(quads))
        self.atoms, self.incidence = self._atoms(list(quads), Dihedrals)
        self.quad = self._index([quads[tuple(r[:4])] for r in rows]) if len(quads) < len(rows) else None
        self.width = max(1, len(rows))
        self.n = self._tensor([float(r[4]) for r in rows], column=True)
        self.phase = self._tensor([md_value(r[5]) for r in rows], column=True)
        self.k = self._tensor([md_value(r[6]) for r in rows], column=True)

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        if len(self.k) == 0:
            return geometry.zeros()
        dihedrals = Dihedrals(geometry.X, *self.atoms)
        phi = dihedrals.phi if self.quad is None else dihedrals.phi.index_select(0, self.quad)
        arg = self.n * phi - self.phase
        if gradient:
            dE = -self.k * self.n * torch.sin(arg)
            if self.quad is not None:
                dE = dihedrals.phi.new_zeros(dihedrals.phi.shape).index_add_(0, self.quad, dE)
            dihedrals.backward(geometry, dE, self.incidence)
        return (self.k * (1.0 + torch.cos(arg))).sum(0)


class RBTorsionTerm(ForceTerm):
    """RBTorsionForce (Ryckaert-Bellemans): E = sum_torsions sum_{m=0..5} C_m cos(psi)^m, psi = phi - pi."""

    def _compile(self, force: openmm.RBTorsionForce) -> None:
        rows = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
        self.atoms, self.incidence = self._atoms(rows, Dihedrals)
        self.width = max(1, len(rows))
        c = np.array([[md_value(v) for v in r[4:10]] for r in rows], float).reshape(-1, 6)
        self.c = [self._tensor(c[:, m], column=True) for m in range(6)]

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        if len(self.c[0]) == 0:
            return geometry.zeros()
        dihedrals = Dihedrals(geometry.X, *self.atoms)
        cos_psi = -torch.cos(dihedrals.phi)
        energy = self.c[5]  # Horner: E(c) and dE/dc
        slope = 5.0 * self.c[5]
        for m in range(4, -1, -1):
            energy = energy * cos_psi + self.c[m]
            if m > 0:
                slope = slope * cos_psi + m * self.c[m]
        if gradient:  # d cos(psi)/d phi = sin(phi)
            dihedrals.backward(geometry, slope * torch.sin(dihedrals.phi), self.incidence)
        return energy.expand_as(cos_psi).sum(0)


def cmap_coefficients(size: int, energy: np.ndarray) -> np.ndarray:
    """(size*size, 16) bicubic coefficients of an OpenMM CMAP energy map, patch s + size*t,
    coefficient 4*i + j of da^i db^j: periodic cubic-spline derivatives along each angle and
    the cross derivative, then OpenMM's weight matrix (``CMAPTorsionForceImpl::calcMapDerivatives``)."""
    from scipy.interpolate import CubicSpline

    e = np.asarray(energy, float).reshape(size, size)  # e[j, i] = energy[i + size*j]: i the first angle
    grid = np.arange(size + 1) * 2 * np.pi / size

    def periodic_derivative(values: np.ndarray) -> np.ndarray:  # along the last axis
        closed = np.concatenate([values, values[..., :1]], axis=-1)
        return CubicSpline(grid, closed, axis=-1, bc_type="periodic")(grid[:-1], 1)

    d1 = periodic_derivative(e)  # d/d(first angle)
    d2 = periodic_derivative(e.T).T  # d/d(second angle)
    d12 = periodic_derivative(d2)
    wt = np.array(_CMAP_WEIGHTS, float).reshape(16, 16)  # coeff[k] = sum_m wt[m, k] rhs[m]
    delta = 2 * np.pi / size
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    ni, nj = (ii + 1) % size, (jj + 1) % size
    corners = [(ii, jj), (ni, jj), (ni, nj), (ii, nj)]
    rhs = np.stack(
        [e[b, a] for a, b in corners]
        + [d1[b, a] * delta for a, b in corners]
        + [d2[b, a] * delta for a, b in corners]
        + [d12[b, a] * delta * delta for a, b in corners],
        axis=-1,
    )
    coeff = rhs @ wt  # (i, j, 16)
    return coeff.transpose(1, 0, 2).reshape(size * size, 16)  # patch index i + size*j


# fmt: off
_CMAP_WEIGHTS = [
    1, 0, -3, 2, 0, 0, 0, 0, -3, 0, 9, -6, 2, 0, -6, 4,
    0, 0, 0, 0, 0, 0, 0, 0, 3, 0, -9, 6, -2, 0, 6, -4,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, -6, 0, 0, -6, 4,
    0, 0, 3, -2, 0, 0, 0, 0, 0, 0, -9, 6, 0, 0, 6, -4,
    0, 0, 0, 0, 1, 0, -3, 2, -2, 0, 6, -4, 1, 0, -3, 2,
    0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 3, -2, 1, 0, -3, 2,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -3, 2, 0, 0, 3, -2,
    0, 0, 0, 0, 0, 0, 3, -2, 0, 0, -6, 4, 0, 0, 3, -2,
    0, 1, -2, 1, 0, 0, 0, 0, 0, -3, 6, -3, 0, 2, -4, 2,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 3, -6, 3, 0, -2, 4, -2,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -3, 3, 0, 0, 2, -2,
    0, 0, -1, 1, 0, 0, 0, 0, 0, 0, 3, -3, 0, 0, -2, 2,
    0, 0, 0, 0, 0, 1, -2, 1, 0, -2, 4, -2, 0, 1, -2, 1,
    0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 2, -1, 0, 1, -2, 1,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, -1, 0, 0, -1, 1,
    0, 0, 0, 0, 0, 0, -1, 1, 0, 0, 2, -2, 0, 0, -1, 1,
]
# fmt: on


class CMAPTorsionTerm(ForceTerm):
    """CMAPTorsionForce: E = sum_torsions sum_{i,j=0..3} c^{(s,t)}_{4i+j} da^i db^j.

    phi, psi are the two dihedrals wrapped to [0, 2 pi); with delta = 2 pi / size the patch is
    s = min(floor(phi/delta), size-1) (t likewise) and da = phi/delta - s, db = psi/delta - t;
    the 16 coefficients of each patch come from :func:`cmap_coefficients`, as in OpenMM.
    """

    def _compile(self, force: openmm.CMAPTorsionForce) -> None:
        maps = [force.getMapParameters(m) for m in range(force.getNumMaps())]
        sizes = {int(size) for size, _ in maps}
        if len(sizes) > 1:
            raise UnsupportedForceError(
                f"{self.label} has CMAP maps of different sizes, which the torch backend does not implement."
            )
        self.size = sizes.pop() if sizes else 1
        coeff = [cmap_coefficients(int(size), np.array([md_value(v) for v in energy])) for size, energy in maps]
        table = np.stack(coeff).reshape(-1, 16) if coeff else np.zeros((1, 16))
        self.coeff = self._tensor(table)  # (n_maps * size^2, 16)
        rows = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
        self.map_offset = self._index([r[0] * self.size * self.size for r in rows])[:, None]
        self.a, self.incidence_a = self._atoms(rows, Dihedrals, 1)
        self.b, self.incidence_b = self._atoms(rows, Dihedrals, 5)
        self.width = max(1, 16 * len(rows))  # the gathered patch coefficients

    def __call__(self, geometry: PairGeometry, gradient: bool = False) -> torch.Tensor:
        if len(self.map_offset) == 0:
            return geometry.zeros()
        delta, two_pi = 2 * math.pi / self.size, 2 * math.pi
        first, second = Dihedrals(geometry.X, *self.a), Dihedrals(geometry.X, *self.b)
        pa = torch.remainder(first.phi + two_pi, two_pi) / delta
        pb = torch.remainder(second.phi + two_pi, two_pi) / delta
        s = torch.clamp(torch.floor(pa), max=self.size - 1)
        t = torch.clamp(torch.floor(pb), max=self.size - 1)
        da, db = pa - s, pb - t
        patch = self.map_offset + (s + self.size * t).long()  # (T, b)
        c = self.coeff.index_select(0, patch.reshape(-1)).view(*patch.shape, 4, 4)  # [.., i, j]
        # E = sum_i da^i sum_j c_ij db^j, Horner in both
        row = ((c[..., 3] * db[..., None] + c[..., 2]) * db[..., None] + c[..., 1]) * db[..., None] + c[
            ..., 0
        ]  # (T, b, 4) over i
        energy = ((row[..., 3] * da + row[..., 2]) * da + row[..., 1]) * da + row[..., 0]
        if gradient:
            dE_da = (3.0 * row[..., 3] * da + 2.0 * row[..., 2]) * da + row[..., 1]
            drow = (3.0 * c[..., 3] * db[..., None] + 2.0 * c[..., 2]) * db[..., None] + c[..., 1]  # d row_i / d db
            dE_db = ((drow[..., 3] * da + drow[..., 2]) * da + drow[..., 1]) * da + drow[..., 0]
            first.backward(geometry, dE_da / delta, self.incidence_a)
            second.backward(geometry, dE_db / delta, self.incidence_b)
        return energy.sum(0)
