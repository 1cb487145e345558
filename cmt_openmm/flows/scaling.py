"""The fixed affine map between a transform's coordinates z and a flow's scaled coordinates y."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import CMTInputError
from ..units import wrap_angle

DEFAULT_SCALES: dict[str, float] = {"bond": 0.005, "angle": 0.1, "relative_torsion": 0.2, "ring_torsion": 0.2}
"""Scale of each non-circular coordinate kind around the reference (nm for bonds, rad else)."""


class CoordinateScaling(nn.Module):
    """Fixed affine map z -> y of the non-circular coordinates and their intervals (float64).

    Args:
        circular: (dim,) bool; kinds: per-coordinate kind; reference_z: (dim,);
        valid_bounds: (dim, 2) hard bounds the samples must respect.
        bound: B, half-width of the scaled interval before clipping to ``valid_bounds``.
        scales: per-kind scale overriding :data:`DEFAULT_SCALES`.
        margin: distance (scaled units) kept from ``valid_bounds``.
    """

    def __init__(
        self,
        circular: Tensor,
        kinds: Sequence[str],
        reference_z: Tensor,
        valid_bounds: Tensor,
        bound: float = 6.0,
        scales: Mapping[str, float] | None = None,
        margin: float = 1e-4,
    ) -> None:
        super().__init__()
        scales = {**DEFAULT_SCALES, **(scales or {})}
        ref = reference_z.detach().double().cpu()
        vb = valid_bounds.detach().double().cpu()
        circular = circular.detach().bool().cpu()
        center, scale = torch.zeros_like(ref), torch.ones_like(ref)
        for i, kind in enumerate(kinds):
            if circular[i]:
                continue
            if kind == "cartesian":
                if not torch.isfinite(vb[i]).all():
                    raise CMTInputError("Cartesian coordinates need a finite box; give the Target a box.")
                center[i], scale[i] = vb[i].mean(), (vb[i, 1] - vb[i, 0]) / (2.0 * bound)
            elif kind in scales:
                center[i], scale[i] = ref[i], scales[kind]
            else:
                raise CMTInputError(f"No scale for coordinate kind {kind!r}; pass scales={{{kind!r}: ...}}.")
        lower = torch.clamp((vb[:, 0] - center) / scale + margin, min=-bound)
        upper = torch.clamp((vb[:, 1] - center) / scale - margin, max=bound)
        lower = torch.where(circular, -math.pi, lower)
        upper = torch.where(circular, math.pi, upper)
        if not bool((lower < 0).all() and (upper > 0).all()):
            raise CMTInputError("The reference structure lies on or outside its coordinates' valid bounds; "
                                "use a reference structure strictly inside them.")
        self.register_buffer("circular", circular)
        self.register_buffer("center", center)
        self.register_buffer("scale", scale)
        self.register_buffer("lower", lower)
        self.register_buffer("upper", upper)
        self.register_buffer("log_det", -torch.log(scale).sum())  # log|det dy/dz|
        self.register_buffer("_circular_index", torch.nonzero(circular).flatten(), persistent=False)

    def to_flow(self, z: Tensor) -> Tensor:
        """z (B, dim) -> y (B, dim) float64; circular coordinates wrapped to [-pi, pi)."""
        z = z.double()
        return torch.where(self.circular, wrap_angle(z), (z - self.center) / self.scale)

    def to_flow_checked(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(y, ok): y = :meth:`to_flow` (z) for the samples inside the support (``ok`` (B,) bool,
        as :meth:`inside` and finite), 0 (the reference structure) for the others; float64."""
        z = z.double()
        y = torch.sub(z, self.center).div_(self.scale)
        if len(self._circular_index):
            y.index_copy_(1, self._circular_index, wrap_angle(z.index_select(1, self._circular_index)))
        # inside every interval: clamping changes nothing (NaN and +-inf give NaN or inf, not 0)
        ok = torch.sub(torch.clamp(y, self.lower, self.upper), y).abs_().sum(-1) == 0.0
        return torch.where(ok[:, None], y, 0.0), ok

    def from_flow(self, y: Tensor) -> Tensor:
        """y (B, dim) -> z (B, dim) float64."""
        y = y.double()
        return torch.where(self.circular, y, self.center + self.scale * y)

    def inside(self, y: Tensor) -> Tensor:
        """(B,) bool: every coordinate of y inside its interval."""
        return ((y >= self.lower) & (y <= self.upper)).all(-1)
