"""A normalised density on a transform's coordinates: scaling, prior and coupling layers composed."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .coupling import CouplingFlow
from .priors import Prior
from .scaling import CoordinateScaling


class SplineFlow(nn.Module):
    """Normalised density on flow coordinates z: scaling, prior and coupling layers.

    Args:
        circular, kinds, reference_z, valid_bounds: as on a ``CoordinateTransform``.
        n_layers, hidden, depth, n_bins, mask, seed, linear_bins: :class:`CouplingFlow` settings (the
            weights are initialised from ``seed``; global RNG state is left untouched).
        bound, scales, margin: :class:`CoordinateScaling` settings.
        dtype: dtype of the coupling layers.

    Example (the flow of a :class:`~cmt_openmm.BoltzmannGenerator`, on alanine dipeptide's
    internal coordinates):
        >>> import cmt_openmm, torch
        >>> from cmt_openmm.flows import SplineFlow
        >>> ic = cmt_openmm.coordinates_for(cmt_openmm.get_target("aldp-vacuum"))
        >>> flow = SplineFlow(ic.circular_mask, ic.kinds, ic.reference_z, ic.valid_bounds, n_layers=2, hidden=8)
        >>> z, log_q = flow.sample(256, torch.Generator().manual_seed(0))
        >>> tuple(z.shape), log_q.dtype, flow.dtype       # densities in float64, layers in float32
        ((256, 60), torch.float64, torch.float32)
        >>> bool(torch.allclose(flow.log_prob(z), log_q))
        True
        >>> bool(((z > ic.valid_bounds[:, 0]) & (z < ic.valid_bounds[:, 1])).all())   # strictly inside
        True
        >>> outside = z[:1].clone()
        >>> outside[0, 0] = -1.0                            # a negative bond length
        >>> flow.log_prob(outside).item()
        -inf
        >>> z, log_q = flow.rsample(64, torch.Generator().manual_seed(1))   # differentiable
        >>> (-log_q.mean()).backward()
        >>> all(p.grad is not None for p in flow.parameters())
        True
    """

    def __init__(
        self,
        circular: Tensor,
        kinds: Sequence[str],
        reference_z: Tensor,
        valid_bounds: Tensor,
        n_layers: int = 8,
        hidden: int = 128,
        depth: int = 2,
        n_bins: int = 8,
        mask: str = "random",
        seed: int = 0,
        bound: float = 6.0,
        scales: Mapping[str, float] | None = None,
        margin: float = 1e-4,
        dtype: torch.dtype = torch.float32,
        linear_bins: int | None = None,
    ) -> None:
        super().__init__()
        self.scaling = CoordinateScaling(circular, kinds, reference_z, valid_bounds, bound, scales, margin)
        s = self.scaling
        self.prior = Prior(s.circular, s.lower, s.upper)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.couplings = CouplingFlow(
                s.circular, s.lower.to(dtype), s.upper.to(dtype), n_layers, hidden, depth, n_bins, mask, seed,
                linear_bins,
            ).to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the coupling layers."""
        return self.couplings.layers[0].lower.dtype

    @property
    def dim(self) -> int:
        return len(self.scaling.circular)

    def rsample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples z (n, dim) float64 and log q_z(z) (n,) float64, differentiable."""
        y0 = self.prior.sample(n, generator)
        y, logdet = self.couplings(y0.to(self.dtype))
        log_q = self.prior.log_prob(y0) - logdet.double() + self.scaling.log_det
        # float32 rounding may step ~1e-7 past an interval end: clamp (density unaffected)
        y = torch.minimum(torch.maximum(y.double(), self.scaling.lower), self.scaling.upper)
        return self.scaling.from_flow(y), log_q

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Like :meth:`rsample`, without gradients."""
        return self.rsample(n, generator)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q_z(z) (B,) float64 of z (B, dim); -inf outside the support or for non-finite z."""
        y, ok = self.scaling.to_flow_checked(z)
        y0, logdet = self.couplings.inverse(y.to(self.dtype))
        log_q = self.prior.log_prob(y0) + logdet.double() + self.scaling.log_det
        return torch.where(ok, log_q, torch.full_like(log_q, -math.inf))
