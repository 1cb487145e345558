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

    Example:
        >>> import cmt_openmm, torch
        >>> u = torch.tensor([10.0, 1e3, 2e3, float("inf")], dtype=torch.float64)
        >>> [round(v, 3) for v in cmt_openmm.regularize_energy(u).tolist()]   # 1000 + log(1 + 1000) for 2000
        [10.0, 1000.0, 1006.909, 1709.783]
    """
    excess = (u - threshold).clamp(min=0.0, max=torch.finfo(u.dtype).max)
    return torch.where(u > threshold, threshold + torch.log1p(excess), u)
