"""Lin-log energy regularisation for training (FAB/boltzgen lineage): large energies grow slowly.

Weights, ESS and MCMC acceptance always use the raw energy; only training losses use this.
"""
from __future__ import annotations

import torch


def regularize_energy(u: torch.Tensor, threshold: float = 1e3) -> torch.Tensor:
    """Lin-log regularised reduced energy for training: ``u`` below ``threshold``,
    ``threshold + log1p(u - threshold)`` above; +inf maps to ``threshold + ~710`` (finite, zero
    gradient). Differentiable; shape and dtype of ``u`` are kept. Weights, ESS and MCMC
    acceptance must use the raw energy instead.
    """
    excess = (u - threshold).clamp(min=0.0, max=torch.finfo(u.dtype).max)
    return torch.where(u > threshold, threshold + torch.log1p(excess), u)
