"""The monotone rational-quadratic spline (Durkan et al. 2019, arXiv 1906.04032), batched over
coordinates, with circular (periodic-derivative) and interval variants in one call."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_MIN_BIN = 1e-3  # smallest bin width/height, as a fraction of the interval
_MIN_DERIVATIVE = 1e-3
IDENTITY_DERIVATIVE = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))
"""Raw derivative parameter that gives knot slope 1 (the conditioners' initial bias)."""


def rq_spline(
    x: Tensor, bins: Tensor, derivatives: Tensor, periodic: Tensor, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline of [0, 1] onto itself, batched over coordinates.

    Args:
        x: (..., D) inputs in [0, 1] (outputs of the forward map when ``inverse``).
        bins: (..., D, 2, K) unconstrained bin widths and heights (softmax; equal values give
            equal bins).
        derivatives: (..., D, K + 1) unconstrained knot derivatives (softplus;
            :data:`IDENTITY_DERIVATIVE` gives slope 1). Equal bins and unit slopes: identity.
        periodic: (D,) bool; where True the derivative at 1 is the one at 0 (circular spline,
            C1 across the seam; the last derivative is unused).
        inverse: apply the inverse map.

    Returns:
        The mapped values (..., D) and log|d out / d in| (..., D) of the map applied.
    """
    k = bins.shape[-1]
    scale = 1.0 - _MIN_BIN * k
    bins = torch.softmax(bins, dim=-1)
    cum = F.pad(torch.cumsum(bins, dim=-1), (1, 0))  # (..., D, 2, K + 1): sum of bins before j
    row = 1 if inverse else 0
    inner_knots = cum[..., row, 1:k] * scale + _MIN_BIN * torch.arange(1, k, dtype=x.dtype, device=x.device)
    idx = (x.unsqueeze(-1) >= inner_knots).sum(-1)  # (..., D) bin index in [0, K - 1]
    pair = idx[..., None, None].expand(*idx.shape, 2, 1).contiguous()  # contiguous: faster gather
    x0, y0 = (cum.gather(-1, pair).squeeze(-1) * scale + _MIN_BIN * idx.unsqueeze(-1).to(x.dtype)).unbind(-1)
    w, h = (bins.gather(-1, pair).squeeze(-1) * scale + _MIN_BIN).unbind(-1)
    following = torch.where(periodic & (idx == k - 1), 0, idx + 1)
    d0, d1 = (F.softplus(derivatives.gather(-1, torch.stack([idx, following], -1))) + _MIN_DERIVATIVE).unbind(-1)
    s = h / w
    slack = d0 + d1 - 2.0 * s

    if inverse:
        dy = x - y0
        a = h * (s - d0) + dy * slack
        b = h * d0 - dy * slack
        c = -s * dy
        theta = (2.0 * c / (-b - torch.sqrt((b * b - 4.0 * a * c).clamp_min(0.0)))).clamp(0.0, 1.0)
        out = x0 + theta * w
    else:
        theta = ((x - x0) / w).clamp(0.0, 1.0)
    t1 = theta * (1.0 - theta)
    denom = s + slack * t1
    if not inverse:
        out = y0 + h * (s * theta * theta + d0 * t1) / denom
    logdet = (
        2.0 * torch.log(s)
        + torch.log(d1 * theta * theta + 2.0 * s * t1 + d0 * (1.0 - theta) ** 2)
        - 2.0 * torch.log(denom)
    )
    return out, (-logdet if inverse else logdet)
