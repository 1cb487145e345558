"""The base distribution of a flow: uniform on circles, truncated standard normal on intervals."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_TWO_PI = 2.0 * math.pi


class Prior(nn.Module):
    """Uniform on [-pi, pi) (circular) x standard normal truncated to [lower, upper] (others).

    Sampling and densities in float64; ``lower <= 0 <= upper`` is assumed for the truncated
    coordinates (the reference structure is at 0).
    """

    def __init__(self, circular: Tensor, lower: Tensor, upper: Tensor) -> None:
        super().__init__()
        lower, upper = lower.double(), upper.double()
        self.register_buffer("circular", circular.clone())
        self.register_buffer("cdf_lower", torch.special.ndtr(lower))
        self.register_buffer("cdf_upper", torch.special.ndtr(upper))
        self.register_buffer("lower", lower.clone())
        self.register_buffer("upper", upper.clone())
        log_mass = torch.log(self.cdf_upper - self.cdf_lower) + 0.5 * math.log(_TWO_PI)
        self.register_buffer("log_norm", torch.where(circular, math.log(_TWO_PI), log_mass).sum())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, dim) float64 samples."""
        u = torch.rand(n, len(self.circular), generator=generator, dtype=torch.float64,
                       device=self.lower.device)
        normal = torch.special.ndtri(self.cdf_lower + u * (self.cdf_upper - self.cdf_lower))
        normal = torch.minimum(torch.maximum(normal, self.lower), self.upper)
        return torch.where(self.circular, math.pi * (2.0 * u - 1.0), normal)

    def log_prob(self, y0: Tensor) -> Tensor:
        """(B,) float64 log density of y0 (B, dim) (assumed inside the support)."""
        y0 = y0.double()
        return -0.5 * torch.where(self.circular, 0.0, y0 * y0).sum(-1) - self.log_norm
