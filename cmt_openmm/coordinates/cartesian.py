"""The identity transform for toy targets without a molecule: z = x flattened."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import CMTInputError
from .base import CoordinateTransform, reference_positions_nm


class CartesianCoordinates(CoordinateTransform):
    """Identity transform for toy targets without a molecule: z = x flattened (B, 3 n_atoms).

    ``box``: (3 n_atoms, 2) lower/upper bounds in nm (becomes ``valid_bounds``);
    ``reference_positions`` (optional, nm) becomes ``reference_z``, else the box centre.

    Example:
        >>> import cmt_openmm, torch
        >>> toy = cmt_openmm.get_target("toy-double-well")
        >>> cc = cmt_openmm.CartesianCoordinates(toy.n_atoms, toy.box, toy.positions)
        >>> z, log_det = cc(torch.tensor([[[0.5, 0.1, -0.2]]], dtype=torch.float64))
        >>> z.tolist(), log_det.tolist()
        ([[0.5, 0.1, -0.2]], [0.0])
        >>> cc.valid_bounds.tolist() == toy.box.tolist(), cc.reference_z.tolist()
        (True, [-0.5, 0.0, 0.0])
    """

    def __init__(self, n_atoms: int, box, reference_positions=None, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.n_atoms = int(n_atoms)
        self.dim = 3 * self.n_atoms
        box = torch.as_tensor(np.asarray(box, dtype=np.float64))
        if box.shape != (self.dim, 2) or not bool(torch.isfinite(box).all()) or not bool((box[:, 0] < box[:, 1]).all()):
            raise CMTInputError(f"The box must be a finite ({self.dim}, 2) array of lower < upper "
                                f"bounds in nm, got shape {tuple(box.shape)}; set the target's box.")
        ref = box.mean(dim=1) if reference_positions is None else torch.as_tensor(
            reference_positions_nm(reference_positions, self.n_atoms)).reshape(-1)
        self.kinds = ["cartesian"] * self.dim
        self.register_buffer("circular_mask", torch.zeros(self.dim, dtype=torch.bool), persistent=False)
        self.register_buffer("valid_bounds", box.to(dtype), persistent=False)
        self.register_buffer("reference_z", ref.to(dtype), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, n_atoms, 3) -> z (B, 3 n_atoms), log|det| = 0."""
        self._check_x(x)
        return x.reshape(x.shape[0], self.dim), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, 3 n_atoms) -> x (B, n_atoms, 3), log|det| = 0."""
        self._check_z(z)
        return z.reshape(z.shape[0], self.n_atoms, 3), z.new_zeros(z.shape[0])

    def frame(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Identity rotation and zero translation (no rigid-body degrees of freedom removed)."""
        b = x.shape[0]
        return torch.eye(3, dtype=x.dtype, device=x.device).expand(b, 3, 3), x.new_zeros(b, 3)

    def chirality_flipped(self, x) -> Tensor:
        """All False: there are no chiral centres."""
        x = torch.as_tensor(x)
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
