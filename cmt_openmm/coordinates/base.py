"""The interface every coordinate transform implements: Cartesian x (B, n_atoms, 3) nm <-> flow z (B, dim)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import CMTInputError
from ..units import nanometers


def reference_positions_nm(positions, n_atoms: int) -> np.ndarray:
    """Reference positions (n_atoms, 3) float64 nm (Quantity, tensor or array), checked finite."""
    arr = nanometers(positions)
    if arr.shape != (n_atoms, 3) or not np.all(np.isfinite(arr)):
        raise CMTInputError(f"Reference positions must be a finite ({n_atoms}, 3) array in nm, "
                            f"got shape {arr.shape}; pass one configuration of this topology.")
    return arr


class CoordinateTransform(torch.nn.Module):
    """Common interface: Cartesian x (B, n_atoms, 3) nm <-> flow coordinates z (B, dim).

    Attributes: ``dim``, ``n_atoms``, ``kinds`` (per coordinate), ``constraints`` (sorted
    (i, j, length nm) with i < j: the bond lengths held fixed), buffers ``circular_mask``
    (dim,) bool, ``reference_z`` (dim,), ``valid_bounds`` (dim, 2).
    """

    dim: int
    n_atoms: int
    kinds: list[str]
    constraints: tuple[tuple[int, int, float], ...] = ()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, n_atoms, 3) nm -> z (B, dim), log|det dz/dx| (B,)."""
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, dim) -> x (B, n_atoms, 3) nm in the standard frame, log|det dx/dz| (B,)."""
        raise NotImplementedError

    def frame(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """R (B, 3, 3), t (B, 3) such that x == x_std @ R.T + t."""
        raise NotImplementedError

    def chirality_flipped(self, x) -> Tensor:
        """(B,) bool: True where any reference chiral centre has the opposite handedness."""
        raise NotImplementedError

    def flipped_fraction(self, x) -> float:
        """Fraction of configurations x (B, n_atoms, 3) with a flipped chiral centre."""
        return float(self.chirality_flipped(x).double().mean())

    def _check_x(self, x: Tensor) -> None:
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.n_atoms, 3):
            raise CMTInputError(f"Expected configurations of shape (B, {self.n_atoms}, 3), got "
                                f"{tuple(x.shape)}; add a batch dimension or check the system.")

    def _check_z(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise CMTInputError(f"Expected coordinates of shape (B, {self.dim}), got "
                                f"{tuple(z.shape)}; add a batch dimension or check the transform.")
