"""Global internal coordinates (bonds, angles, torsions) built from a Topology's bond graph.

``InternalCoordinates`` is a bond/angle/torsion transform built automatically from a
Topology's bond graph (Z-matrix conventions in :mod:`cmt_openmm.coordinates.zmatrix`), batched
in torch with exact log-determinants. Hand-written because the transform must be built from any topology, handle constraints and
chirality, and be vectorised over placement generations; bgflow-style transforms need a
hand-made Z-matrix and do not fix chirality.

Frame and density conventions:

* The standard frame puts seed ``a0`` at the origin, ``a1`` on +x and ``a2`` in the xy plane
  with y > 0.  ``inverse`` returns configurations in that frame; ``frame(x)`` gives the
  rotation and translation that map it back onto ``x``.
* Density convention (docs/method.md, "Density conventions"). The Boltzmann distribution is
  exp(-u(x)) dx on R^{3N}. Splitting x into the translation t (the position of ``a0``), the
  rotation R of the standard frame and the internal coordinates gives

      dx = dt dR J(z) dz,   J(z) = r_1^2 . r_2^2 sin(theta_2) . prod_{i >= 3} r_i^2 sin(theta_i),

  with dR the Haar measure on SO(3) (total mass 8 pi^2), r_1 = |a0 a1|, r_2 = |a0 a2|,
  theta_2 = angle a1-a0-a2 and (r_i, theta_i) the bond and angle that place atom i. So
  ``log|det dx/dz| = sum over every placed bond of 2 log r + sum over every placed angle of
  log sin theta``, the seed atoms included, and ``log q(x) = log q_z(z) - log J(z)`` is a
  density of x with respect to dx / (dt dR): rigid-motion invariant, and the density whose
  Metropolis-Hastings moves and importance weights target exactly the Boltzmann distribution
  (a flow move keeps t and R and changes z, whose Boltzmann marginal is exp(-u) J(z)). A
  relative torsion is a shift of the placement dihedral by the sibling's torsion, which leaves
  J unchanged. (Before format 2 of the generator files the seed factor r_1^2 r_2 sin(theta_2)
  was missing: MCMC and reweighting then targeted exp(-u) dz, wrong for every molecule.)
* Constrained bond lengths are constants, excluded from ``z``; J keeps their r^2 at the
  constraint length (a constant factor). The flow's density on the constraint manifold is then
  exp(-u) J restricted to the manifold. Constrained MD samples that times the Fixman factor
  |det G|^(1/2) (G the mass-weighted Gram matrix of the constraint gradients), which is left
  out: for X-H bond constraints G is nearly diagonal (off-diagonal terms ~ cos(HXH) / m_X) and
  the factor varies by ~1e-4 relative over thermal fluctuations of the angles.
* Proper torsions are wrapped to [-pi, pi) and are circular, except ring torsions (about a bond
  on a ring, see :mod:`.zmatrix`), which ring closure keeps near their reference value: like
  relative torsions they are narrow interval coordinates on [ref - pi, ref + pi).  A relative torsion (azimuth of
  the atom around the parent-axis bond minus that of its reference sibling) is wrapped to
  [ref - pi, ref + pi) around its reference value, so it is an ordinary narrow interval
  coordinate; on four-neighbour (chiral) centres its valid bounds are the half interval
  (0, pi) or (-pi, 0) that contains the reference, which keeps the reference chirality.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import CMTInputError
from ..units import dihedral, wrap_angle
from .base import CoordinateTransform, reference_positions_nm
from .zmatrix import RELATIVE, RING, TORSION, build_zmatrix

_PI = math.pi
_MIN_REFERENCE_ANGLE = 0.05  # rad; reference angles closer to 0 or pi (linear groups) are refused


def _angle(u: Tensor, v: Tensor) -> Tensor:
    """Angle (rad, in [0, pi]) between vectors u and v (..., 3)."""
    return torch.atan2(torch.linalg.cross(u, v).norm(dim=-1), (u * v).sum(-1))


def _place(a: Tensor, b: Tensor, c: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """NeRF: the point d with |c d| = r, angle b-c-d = theta, dihedral a-b-c-d = phi."""
    bc = c - b
    bc = bc / bc.norm(dim=-1, keepdim=True)
    n = torch.linalg.cross(b - a, bc)
    n = n / n.norm(dim=-1, keepdim=True)
    m = torch.linalg.cross(n, bc)
    sin_t = torch.sin(theta)
    return c + r * (-torch.cos(theta) * bc + sin_t * torch.cos(phi) * m + sin_t * torch.sin(phi) * n)


def _length_nm(length) -> float:
    if hasattr(length, "value_in_unit"):
        import openmm.unit as unit

        length = length.value_in_unit(unit.nanometer)
    return float(length)


class InternalCoordinates(CoordinateTransform):
    """Global internal coordinates (bonds, angles, torsions) from a Topology's bond graph.

    ``z`` = [free bond lengths (nm), angles (rad), dihedrals (rad)], each block in placement
    order; ``kinds`` says which dihedral is a circular "torsion" and which a narrow
    "relative_torsion".  ``dim = 3N - 6 - len(constraints)``.  ``constraints``: (i, j, length)
    for bonds of the spanning tree only.  ``seeds``: optional (a0, a1, a2) override.
    All index/reference buffers are derived from the topology and reference positions and
    are not part of the state dict.

    Example:
        >>> import cmt_openmm, torch
        >>> target = cmt_openmm.get_target("aldp-vacuum")
        >>> ic = cmt_openmm.InternalCoordinates(target.topology, target.positions)
        >>> ic.dim, ic.kinds.count("torsion")          # 3 N - 6, of which circular torsions
        (60, 7)
        >>> noise = 0.002 * torch.randn(4, 22, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> x = torch.tensor(target.positions) + noise  # (4, 22, 3) nm
        >>> z, log_det = ic(x)                         # z (4, 60), log|det dz/dx| (4,)
        >>> x_std, log_det_inv = ic.inverse(z)         # x in the standard frame, log|det dx/dz|
        >>> rotation, translation = ic.frame(x)
        >>> bool(torch.allclose(x_std @ rotation.transpose(1, 2) + translation[:, None], x))
        True
        >>> bool(torch.allclose(log_det, -log_det_inv))
        True
        >>> ic.chirality_flipped(-x).tolist()          # the mirror images
        [True, True, True, True]
    """

    def __init__(self, topology, reference_positions, constraints=(), dtype: torch.dtype = torch.float64,
                 seeds: tuple[int, int, int] | None = None):
        super().__init__()
        n = topology.getNumAtoms()
        pos = reference_positions_nm(reference_positions, n)
        atoms = list(topology.atoms())
        is_h = [(a.element.atomic_number == 1) if a.element is not None else a.name.upper().startswith("H")
                for a in atoms]
        bonds = [(a.index, b.index) for a, b in topology.bonds()]
        zm = build_zmatrix(n, bonds, is_h, seeds)
        self.zmatrix = zm
        self.n_atoms = n
        self.seeds = zm.seeds
        rows = zm.rows
        pos_of = {row.atom: p for p, row in enumerate(rows)}
        drows = rows[3:]
        nd = len(drows)
        drow_of = {row.atom: p for p, row in enumerate(drows)}

        # Constraints: constant bond lengths on tree bonds.
        bond_row = {frozenset((row.atom, row.j)): p for p, row in enumerate(rows[1:])}
        constant = {}
        for c in constraints:
            i, j, length = int(c[0]), int(c[1]), _length_nm(c[2])
            p = bond_row.get(frozenset((i, j)))
            if p is None:
                raise CMTInputError(f"Constraint between atoms {i} and {j} is not on a bond of the "
                                    "Z-matrix spanning tree (e.g. a rigid-water H-H or ring-closure "
                                    "constraint); remove it (create the System without it).")
            if not length > 0:
                raise CMTInputError(f"Constraint between atoms {i} and {j} has length {length} nm; "
                                    "constraint lengths must be positive.")
            constant[p] = length
        free = [p for p in range(n - 1) if p not in constant]
        fixed = sorted(constant)
        self.n_constrained = len(fixed)
        self.constraints = tuple(sorted((min(rows[p + 1].atom, rows[p + 1].j), max(rows[p + 1].atom, rows[p + 1].j),
                                         constant[p]) for p in fixed))
        self.dim = 3 * n - 6 - len(fixed)

        lng = dict(dtype=torch.long)
        reg = lambda name, value: self.register_buffer(name, value, persistent=False)  # noqa: E731
        reg("_bond_i", torch.tensor([r.atom for r in rows[1:]], **lng))
        reg("_bond_j", torch.tensor([r.j for r in rows[1:]], **lng))
        reg("_angle_ijk", torch.tensor([[r.atom, r.j, r.k] for r in rows[2:]], **lng).reshape(-1, 3))
        reg("_dihedral_ijkm", torch.tensor(
            [[r.atom, r.j, r.k, r.sibling if r.kind == RELATIVE else r.l] for r in drows], **lng).reshape(-1, 4))
        reg("_is_narrow", torch.tensor([r.kind in (RELATIVE, RING) for r in drows], dtype=torch.bool))
        reg("_free", torch.tensor(free, **lng))
        reg("_fixed", torch.tensor(fixed, **lng))
        reg("_fixed_length", torch.tensor([constant[p] for p in fixed], dtype=dtype))
        # bond rows as positions in cat([free, fixed]):
        reg("_bond_perm", torch.tensor(np.argsort(free + fixed), **lng))
        # placement: positions of j, k, l in the placement order; dihedral offset (sibling's torsion).
        reg("_place_jkl", torch.tensor([[pos_of[r.j], pos_of[r.k], pos_of[r.l]] for r in drows], **lng).reshape(-1, 3))
        reg("_offset", torch.tensor([drow_of[r.sibling] if r.kind == RELATIVE and r.sibling != r.l else nd
                                     for r in drows], **lng))
        reg("_atom_pos", torch.tensor([pos_of[a] for a in range(n)], **lng))
        gens = [r.generation for r in drows]
        self._generations = [(gens.index(g), len(gens) - gens[::-1].index(g)) for g in sorted(set(gens))]

        # Chirality of the reference structure.
        chiral = torch.tensor(zm.chiral, **lng).reshape(-1, 4)
        reg("_chiral", chiral)
        ref_t = torch.as_tensor(pos, dtype=torch.float64)[None]
        reg("_chiral_sign", torch.sign(self._volumes(ref_t)[0]).to(dtype))
        self.chiral_centres = [c[0] for c in zm.chiral]

        # Reference coordinates and bounds (relative torsions are centred on their reference).
        r_ref, theta_ref, d_ref = (t[0] for t in self._measure(ref_t))
        if theta_ref.numel() and (torch.sin(theta_ref).min() < math.sin(_MIN_REFERENCE_ANGLE)):
            bad = int(rows[2 + int(torch.sin(theta_ref).argmin())].atom)
            raise CMTInputError(f"The reference bond angle at atom {bad} is (nearly) linear; internal "
                                "coordinates cannot represent linear groups, use CartesianCoordinates.")
        reg("_relative_centre", d_ref.to(dtype))
        kinds = ["bond"] * len(free) + ["angle"] * (n - 2) + [r.kind for r in drows]
        self.kinds = kinds
        reg("circular_mask", torch.tensor([k == TORSION for k in kinds], dtype=torch.bool))
        z_ref, _ = self.forward(ref_t)
        reg("reference_z", z_ref[0].to(dtype))
        centres = set(self.chiral_centres)
        bounds = [(0.3 * float(r_ref[p]), 3.0 * float(r_ref[p])) for p in free]
        bounds += [(0.0, _PI)] * (n - 2)
        for r, d in zip(drows, d_ref.tolist()):
            if r.kind == TORSION:
                bounds.append((-_PI, _PI))
            elif r.kind == RELATIVE and r.j in centres:
                bounds.append((0.0, _PI) if d >= 0 else (-_PI, 0.0))
            else:
                bounds.append((d - _PI, d + _PI))
        reg("valid_bounds", torch.tensor(bounds, dtype=dtype).reshape(-1, 2))
        label = lambda a: f"{atoms[a].name}({atoms[a].residue.name}{atoms[a].residue.id})"  # noqa: E731
        self.names = ([f"bond {label(rows[p + 1].atom)}-{label(rows[p + 1].j)}" for p in free]
                      + [f"angle {label(r.atom)}-{label(r.j)}-{label(r.k)}" for r in rows[2:]]
                      + [f"{r.kind} {label(r.atom)}-{label(r.j)}-{label(r.k)}-"
                         f"{label(r.sibling if r.kind == RELATIVE else r.l)}" for r in drows])
        self.to(dtype)

    def extra_repr(self) -> str:
        return (f"n_atoms={self.n_atoms}, dim={self.dim}, circular={int(self.circular_mask.sum())}, "
                f"constrained={self.n_constrained}, chiral_centres={len(self.chiral_centres)}")

    def _measure(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw bond lengths (B, n-1), angles (B, n-2) and dihedrals (B, n-3) in placement order."""
        r = (x[:, self._bond_i] - x[:, self._bond_j]).norm(dim=-1)
        a = self._angle_ijk
        theta = _angle(x[:, a[:, 0]] - x[:, a[:, 1]], x[:, a[:, 2]] - x[:, a[:, 1]])
        d = self._dihedral_ijkm
        phi = dihedral(x[:, d[:, 0]], x[:, d[:, 1]], x[:, d[:, 2]], x[:, d[:, 3]])
        return r, theta, phi

    def _log_jacobian(self, r: Tensor, theta: Tensor) -> Tensor:
        """log J(z) = sum 2 log r + sum log sin theta over all bonds (B, n-1) and angles (B, n-2),
        seeds included (see the module docstring)."""
        return 2 * torch.log(r).sum(-1) + torch.log(torch.sin(theta)).sum(-1)

    def _all_bonds(self, free: Tensor) -> Tensor:
        fixed = self._fixed_length.to(free).expand(free.shape[0], -1)
        return torch.cat([free, fixed], dim=-1)[:, self._bond_perm]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, n_atoms, 3) nm -> z (B, dim), log|det dz/dx| (B,) (standard-frame coordinates)."""
        self._check_x(x)
        r, theta, d = self._measure(x)
        centre = self._relative_centre.to(d)
        d = torch.where(self._is_narrow, centre + wrap_angle(d - centre), wrap_angle(d))
        free = r[:, self._free]
        z = torch.cat([free, theta, d], dim=-1)
        return z, -self._log_jacobian(self._all_bonds(free), theta)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, dim) -> x (B, n_atoms, 3) nm in the standard frame, log|det dx/dz| (B,)."""
        self._check_z(z)
        n, nf = self.n_atoms, len(self._free)
        r = self._all_bonds(z[:, :nf])
        theta = z[:, nf:nf + n - 2]
        d = z[:, nf + n - 2:]
        phase = d + torch.cat([d, torch.zeros_like(d[:, :1])], dim=-1)[:, self._offset]
        zero = torch.zeros_like(r[:, 0])
        x0 = torch.stack([zero, zero, zero], dim=-1)
        x1 = torch.stack([r[:, 0], zero, zero], dim=-1)
        x2 = torch.stack([r[:, 1] * torch.cos(theta[:, 0]), r[:, 1] * torch.sin(theta[:, 0]), zero], dim=-1)
        placed = torch.stack([x0, x1, x2], dim=1)
        for start, end in self._generations:
            jkl = self._place_jkl[start:end]
            new = _place(placed[:, jkl[:, 2]], placed[:, jkl[:, 1]], placed[:, jkl[:, 0]],
                         r[:, 2 + start:2 + end, None], theta[:, 1 + start:1 + end, None],
                         phase[:, start:end, None])
            placed = torch.cat([placed, new], dim=1)
        return placed[:, self._atom_pos], self._log_jacobian(r, theta)

    def frame(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """R (B, 3, 3) proper rotation, t (B, 3) nm with x == x_std @ R.T + t."""
        self._check_x(x)
        a0, a1, a2 = self.seeds
        t = x[:, a0]
        e1 = x[:, a1] - t
        e1 = e1 / e1.norm(dim=-1, keepdim=True)
        v = x[:, a2] - t
        e2 = v - (v * e1).sum(-1, keepdim=True) * e1
        e2 = e2 / e2.norm(dim=-1, keepdim=True)
        return torch.stack([e1, e2, torch.linalg.cross(e1, e2)], dim=-1), t

    def _volumes(self, x: Tensor) -> Tensor:
        """Signed volumes (B, n_centres) of the three recorded neighbours around each centre."""
        c = self._chiral
        centre = x[:, c[:, 0]]
        u, v, w = (x[:, c[:, m]] - centre for m in (1, 2, 3))
        return (u * torch.linalg.cross(v, w)).sum(-1)

    def flipped_centres(self, x) -> Tensor:
        """(B, n_centres) bool, columns as ``chiral_centres``; flat or non-finite counts as flipped."""
        x = torch.as_tensor(x)
        self._check_x(x)
        return ~(self._volumes(x) * self._chiral_sign.to(x) > 0)

    def chirality_flipped(self, x) -> Tensor:
        """(B,) bool: True where any reference chiral centre (four-neighbour atom) is flipped."""
        return self.flipped_centres(x).any(dim=-1)
