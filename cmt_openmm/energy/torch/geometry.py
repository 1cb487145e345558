"""Geometry of a chunk of configurations for the torch force terms, with analytic backward passes.

A chunk is held batch-last, X (3, n_atoms, b) nm (:class:`PairGeometry`), so that every gather
and scatter over atoms or pairs copies contiguous rows and every elementwise operation is
contiguous. Internal coordinates come as (P, b) tensors: pair distances r (nm) from a
:class:`PairList`, angles theta in [0, pi] (:class:`Angles`) and dihedrals phi in (-pi, pi]
(:class:`Dihedrals`), rad. A term adds its gradient dE/dx (kJ/mol/nm) to the geometry either as
atom gradients (3, n, b), scattered through an :class:`Incidence`, or as pair weights (n, n, b);
:meth:`PairGeometry.gradient` combines them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "Angles",
    "Dihedrals",
    "Incidence",
    "PairGeometry",
    "PairList",
    "bond_lengths",
    "upper_pairs",
]


class PairGeometry:
    """One chunk of configurations in batch-last layout, X (3, n, b), the pair distances
    computed from it (shared by all terms of the chunk) and the gradient being accumulated.

    Batch-last keeps every gather/scatter over atoms or pairs a copy of contiguous rows and
    every elementwise operation contiguous. Terms add their gradient either as direct atom
    gradients G (3, n, b) or as pair weights W (n, n, b) with dE/dx_i = sum_j W_ij (x_i - x_j)
    (for a pair energy e(r_ij): W_ij = W_ji = e'(r_ij)/r_ij); :meth:`gradient` combines them.
    With ``dense`` the (n, n, b) distance matrix is computed once and pair lists gather from it.
    """

    def __init__(self, X: torch.Tensor, dense: bool = False):
        self.X = X
        self.n_atoms, self.batch = X.shape[1], X.shape[2]
        self.use_dense = dense
        self._dense: torch.Tensor | None = None
        self._squared: torch.Tensor | None = None
        self._inverse: torch.Tensor | None = None
        self.W: torch.Tensor | None = None
        self.G: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, x: torch.Tensor, dense: bool = False) -> "PairGeometry":
        """From positions (b, n, 3)."""
        return cls(x.permute(2, 1, 0).contiguous(), dense)

    def zeros(self) -> torch.Tensor:
        return self.X.new_zeros(self.batch)

    def dense(self) -> torch.Tensor:
        """(n, n, b) distances |x_j - x_i|, 1 on the diagonal (never 0: no inf/NaN there)."""
        if self._dense is None:
            X = self.X
            d = torch.sub(X[0][None, :, :], X[0][:, None, :])
            r2 = d * d
            for c in (1, 2):
                r2.addcmul_(torch.sub(X[c][None, :, :], X[c][:, None, :], out=d), d)
            r2.diagonal(0, 0, 1).fill_(1.0)
            self._squared, self._dense = r2, torch.sqrt(r2)
        return self._dense

    def dense_squared(self) -> torch.Tensor:
        """(n, n, b) squared distances (1 on the diagonal)."""
        self.dense()
        return self._squared

    def dense_inverse(self) -> torch.Tensor:
        """(n, n, b) 1/r (1 on the diagonal)."""
        if self._inverse is None:
            self._inverse = torch.reciprocal(self.dense())
        return self._inverse

    def pair_inverse(self, pairs: "PairList") -> torch.Tensor | None:
        """1/r (P, b) of a pair list gathered from the dense matrix, or None without one."""
        if not self.use_dense:
            return None
        return self.dense_inverse().view(-1, self.batch).index_select(0, pairs.flat)

    def pairs(self, pairs: "PairList") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Distances r (P, b) of a pair list and, when not taken from the dense matrix, the
        displacements d = x_j - x_i (3, P, b)."""
        if self.use_dense:
            return self.dense().view(-1, self.batch).index_select(0, pairs.flat), None
        d = self.X.index_select(1, pairs.j) - self.X.index_select(1, pairs.i)
        return torch.sqrt((d * d).sum(0)), d

    def add_pair_gradient(self, pairs: "PairList", d: torch.Tensor | None, w: torch.Tensor) -> None:
        """Add the gradient of pair energies given w = (dE/dr)/r (P, b)."""
        if d is None:
            W = self.weights()
            flat = W.view(-1, self.batch)
            flat.index_add_(0, pairs.flat, w)
            flat.index_add_(0, pairs.flat_t, w)
        else:
            g = d * w
            self.add_atoms(pairs.incidence, torch.cat([g, -g], 1))

    def weights(self) -> torch.Tensor:
        if self.W is None:
            self.W = self.X.new_zeros(self.n_atoms, self.n_atoms, self.batch)
        return self.W

    def add_weights(self, w: torch.Tensor) -> None:
        """Add pair weights W (n, n, b) (see the class docstring)."""
        if self.W is None:
            self.W = w
        else:
            self.W.add_(w)

    def add_atoms(self, incidence: "Incidence", g: torch.Tensor) -> None:
        """Add gradients g (3, R, b), row r onto atom ``incidence.index[r]``."""
        if self.G is None:
            self.G = torch.zeros_like(self.X)
        self.G.index_add_(1, incidence.index, g)

    def add_direct(self, g: torch.Tensor) -> None:
        """Add a gradient (3, n, b)."""
        self.G = g if self.G is None else self.G + g

    def gradient(self) -> torch.Tensor:
        """dE/dx (3, n, b) from everything added so far."""
        grad = torch.zeros_like(self.X) if self.G is None else self.G
        if self.W is not None:
            W, X = self.W, self.X
            row = W.sum(1)
            grad = grad + torch.stack([X[c] * row - (W * X[c][None, :, :]).sum(1) for c in range(3)])
        return grad


class Incidence:
    """The atoms of the rows of a (3, R, b) gradient: row r belongs to atom ``index[r]`` (a
    term's roles concatenated, so that one ``index_add`` adds them all)."""

    def __init__(self, index: Any, n_atoms: int, device: Any):
        self.n_atoms = n_atoms
        self.index = torch.as_tensor(np.asarray(index, dtype=np.int64).reshape(-1), device=device)


@dataclass
class PairList:
    """Pairs (i, j) of atoms (P,), their flat indices i*n + j, j*n + i in an (n, n) matrix and
    the :class:`Incidence` of the rows [j..., i...] (a pair's gradient on j, then on i)."""

    i: torch.Tensor
    j: torch.Tensor
    flat: torch.Tensor
    flat_t: torch.Tensor
    incidence: Incidence

    @classmethod
    def build(cls, i: Any, j: Any, n: int, device: Any) -> "PairList":
        i = np.asarray(i, dtype=np.int64).reshape(-1)
        j = np.asarray(j, dtype=np.int64).reshape(-1)
        as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        return cls(as_t(i), as_t(j), as_t(i * n + j), as_t(j * n + i), Incidence(np.concatenate([j, i]), n, device))

    def __len__(self) -> int:
        return len(self.i)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross product of (3, ...) vectors."""
    return torch.stack((a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]))


class Angles:
    """Angles i-j-k in [0, pi] of a chunk, theta = atan2(|a x c|, a.c) with a = x_i - x_j,
    c = x_k - x_j, and the backward pass d theta/dx (dtheta/da = (p a/|a|^2 - c)/s,
    p = a.c, s = |a x c|, with s at least 1e-6 as in OpenMM's Reference platform: an exactly
    linear angle, where p a/|a|^2 - c = 0, gets a zero gradient as there, not NaN)."""

    arity = 3  # atoms per angle

    def __init__(self, X: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor):
        self.i, self.j, self.k = i, j, k
        xj = X.index_select(1, j)
        self.a = X.index_select(1, i) - xj
        self.c = X.index_select(1, k) - xj
        self.p = (self.a * self.c).sum(0)
        cr = _cross(self.a, self.c)
        self.s = torch.sqrt((cr * cr).sum(0))
        self.theta = torch.atan2(self.s, self.p)

    @staticmethod
    def incidence(i: Any, j: Any, k: Any, n_atoms: int, device: Any) -> Incidence:
        return Incidence(np.concatenate([np.asarray(i), np.asarray(k), np.asarray(j)]), n_atoms, device)

    def backward(self, geometry: PairGeometry, dE: torch.Tensor, incidence: Incidence) -> None:
        """Add dE/dtheta (P, b) times dtheta/dx; ``incidence`` from :meth:`incidence`."""
        f = dE / self.s.clamp(min=1e-6)
        aa, cc = (self.a * self.a).sum(0), (self.c * self.c).sum(0)
        ga = (self.p / aa * f) * self.a - f * self.c
        gc = (self.p / cc * f) * self.c - f * self.a
        geometry.add_atoms(incidence, torch.cat([ga, gc, -(ga + gc)], 1))


class Dihedrals:
    """Dihedrals i-j-k-l in (-pi, pi] (IUPAC sign, OpenMM's convention) of a chunk and the
    backward pass (Blondel & Karplus 1996): with F = x_i - x_j, G = x_j - x_k, H = x_l - x_k,
    A = F x G, B = H x G: phi = atan2((B x A).G/|G|, A.B),
    dphi/dx_i = -|G| A/A^2, dphi/dx_l = |G| B/B^2, and x_j, x_k from translation/rotation invariance."""

    arity = 4  # atoms per dihedral

    def __init__(self, X: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor, l: torch.Tensor):
        self.atoms = (i, j, k, l)
        xj, xk = X.index_select(1, j), X.index_select(1, k)
        self.F = X.index_select(1, i) - xj
        self.G = xj - xk
        self.H = X.index_select(1, l) - xk
        self.A, self.B = _cross(self.F, self.G), _cross(self.H, self.G)
        self.gn = torch.sqrt((self.G * self.G).sum(0))
        # (B x A).G = -|G|^2 (B.F) (B and A both normal to G): y = -|G| B.F
        y = (self.B * self.F).sum(0).mul_(self.gn).neg_()
        self.phi = torch.atan2(y, (self.A * self.B).sum(0))

    @staticmethod
    def incidence(i: Any, j: Any, k: Any, l: Any, n_atoms: int, device: Any) -> Incidence:
        return Incidence(np.concatenate([np.asarray(a) for a in (i, l, j, k)]), n_atoms, device)

    def backward(self, geometry: PairGeometry, dE: torch.Tensor, incidence: Incidence) -> None:
        """Add dE/dphi (P, b) times dphi/dx; ``incidence`` from :meth:`incidence`."""
        A2, B2 = (self.A * self.A).sum(0), (self.B * self.B).sum(0)
        fg, hg = (self.F * self.G).sum(0), (self.H * self.G).sum(0)
        gi = (-dE * self.gn / A2) * self.A
        gl = (dE * self.gn / B2) * self.B
        s_a = (dE * fg / (A2 * self.gn)) * self.A
        s_b = (dE * hg / (B2 * self.gn)) * self.B
        geometry.add_atoms(incidence, torch.cat([gi, gl, -gi + s_a - s_b, -gl - s_a + s_b], 1))


def bond_lengths(geometry: PairGeometry, pairs: PairList) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths r (P, b) and displacements d = x_j - x_i (3, P, b) of pairs, from the positions
    (never from the dense matrix: bonded pairs are few)."""
    d = geometry.X.index_select(1, pairs.j) - geometry.X.index_select(1, pairs.i)
    return torch.sqrt((d * d).sum(0)), d


def upper_pairs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j), i < j, of the pairs set in an (n, n) boolean mask."""
    i, j = np.nonzero(np.triu(mask, 1))
    return i, j
