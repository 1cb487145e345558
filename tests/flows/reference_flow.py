"""The spline flow as of commit c661161, frozen: the oracle the current flow must agree with.

``rq_spline``, ``SplineCoupling`` (here ``BaselineSplineCoupling``), ``CouplingFlow.forward`` /
``inverse`` (``BaselineCouplingFlow``) and ``SplineFlow.rsample`` / ``sample`` / ``log_prob``
(``BaselineSplineFlow``) are kept verbatim from that commit: the implementation that the
current, faster one in ``cmt_openmm/flows/`` replaced. A ``BaselineSplineFlow`` is
built from a current :class:`~cmt_openmm.flows.SplineFlow` with the same weights and buffers
(its state_dict), sharing its (unchanged) ``CoordinateScaling`` and ``Prior``.
``tests/flows/test_flows.py`` checks that both give the same log q, samples and gradients;
``benchmarks/flow_throughput.py`` times the current flow against this one. Do not edit the
frozen code: it is the reference, not an implementation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmt_openmm.flows import SplineFlow

_MIN_BIN = 1e-3  # smallest bin width/height, as a fraction of the interval
_MIN_DERIVATIVE = 1e-3
IDENTITY_DERIVATIVE = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))


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


class BaselineSplineCoupling(nn.Module):
    """One coupling layer: splines on ``transformed`` coordinates, bins from an MLP of the rest.

    Args:
        transformed, conditioning: (Dt,), (Dc,) long indices into the flow coordinates.
        circular: (dim,) bool, True for coordinates on [-pi, pi).
        lower, upper: (dim,) interval of every coordinate (circular: -pi, pi).
        hidden, depth: MLP width and number of hidden layers.
        n_bins: spline bins K.
        shift: (Dt,) rotation of circular inputs as a fraction of the circle (0 elsewhere).
    """

    def __init__(
        self,
        transformed: Tensor,
        conditioning: Tensor,
        circular: Tensor,
        lower: Tensor,
        upper: Tensor,
        hidden: int,
        depth: int,
        n_bins: int,
        shift: Tensor,
    ) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.register_buffer("transformed", transformed.long())
        self.register_buffer("cond_circular", conditioning[circular[conditioning]].long())
        self.register_buffer("cond_linear", conditioning[~circular[conditioning]].long())
        self.register_buffer("periodic", circular[transformed].clone())
        self.register_buffer("lower", lower[transformed].clone())
        self.register_buffer("width", (upper - lower)[transformed].clone())
        self.register_buffer("shift", torch.where(self.periodic, shift, torch.zeros_like(shift)))
        n_features = max(2 * len(self.cond_circular) + len(self.cond_linear), 1)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(n_features if i == 0 else hidden, hidden), nn.SiLU()]
        last = nn.Linear(hidden if depth > 0 else n_features, len(transformed) * (3 * n_bins + 1))
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        with torch.no_grad():  # identity spline: equal bins, unit slopes
            last.bias[len(transformed) * 2 * n_bins :] = IDENTITY_DERIVATIVE
        self.net = nn.Sequential(*layers, last)

    def _features(self, y: Tensor) -> Tensor:
        if len(self.cond_circular) + len(self.cond_linear) == 0:
            return y.new_ones(y.shape[0], 1)
        angles = y[:, self.cond_circular]
        return torch.cat([torch.cos(angles), torch.sin(angles), y[:, self.cond_linear]], dim=-1)

    def forward(self, y: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        """Map y (B, dim) -> (B, dim); returns it and log|det| (B,) of the map applied."""
        params = self.net(self._features(y))  # (B, Dt * 2K) bins, then (B, Dt * (K + 1)) slopes
        n, k = len(self.transformed), self.n_bins
        bins = params[:, : n * 2 * k].view(-1, n, 2, k)
        derivatives = params[:, n * 2 * k :].view(-1, n, k + 1)
        u = (y[:, self.transformed] - self.lower) / self.width + self.shift
        u = torch.where(self.periodic, u - torch.floor(u), u)
        v, logdet = rq_spline(u, bins, derivatives, self.periodic, inverse)
        v = v - self.shift
        v = torch.where(self.periodic, v - torch.floor(v), v)
        return y.index_copy(1, self.transformed, self.lower + v * self.width), logdet.sum(-1)


class BaselineCouplingFlow(nn.Module):
    """The old ``CouplingFlow``: its layers rebuilt from a new flow's, forward/inverse verbatim."""

    def __init__(self, layers: list[BaselineSplineCoupling]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, y0: Tensor) -> tuple[Tensor, Tensor]:
        """Prior sample y0 (B, dim) -> y (B, dim), log|det dy/dy0| (B,)."""
        logdet = y0.new_zeros(y0.shape[0])
        for layer in self.layers:
            y0, ld = layer(y0)
            logdet = logdet + ld
        return y0, logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Data y (B, dim) -> y0 (B, dim), log|det dy0/dy| (B,)."""
        logdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, ld = layer(y, inverse=True)
            logdet = logdet + ld
        return y, logdet


class BaselineSplineFlow(nn.Module):
    """The old ``SplineFlow`` methods on ``flow``'s scaling and prior and a copy of its weights."""

    def __init__(self, flow: SplineFlow) -> None:
        super().__init__()
        self.scaling, self.prior = flow.scaling, flow.prior
        circular = flow.scaling.circular
        dtype = flow.dtype
        lower, upper = flow.scaling.lower.to(dtype), flow.scaling.upper.to(dtype)
        layers = []
        with torch.random.fork_rng(devices=[]):  # nn.Linear's initialisation; overwritten below
            for layer in flow.couplings.layers:
                linears = [m for m in layer.net if isinstance(m, nn.Linear)]
                depth = len(linears) - 1
                hidden = linears[0].out_features if depth > 0 else 1
                conditioning = torch.cat([layer.cond_circular, layer.cond_linear]).sort()[0]
                old = BaselineSplineCoupling(layer.transformed, conditioning, circular, lower, upper, hidden,
                                             depth, layer.n_bins, layer.shift).to(dtype)
                old.load_state_dict(layer.state_dict(), strict=True)
                layers.append(old)
        self.couplings = BaselineCouplingFlow(layers)

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
        y = self.scaling.to_flow(z)
        ok = self.scaling.inside(y) & torch.isfinite(y).all(-1)
        y = torch.where(ok[:, None], y, torch.zeros_like(y))
        y = torch.minimum(torch.maximum(y, self.scaling.lower), self.scaling.upper).to(self.dtype)
        y0, logdet = self.couplings.inverse(y)
        log_q = self.prior.log_prob(y0) + logdet.double() + self.scaling.log_det
        return torch.where(ok, log_q, torch.full_like(log_q, -math.inf))


def build_flows(dtype: torch.dtype = torch.float32, perturb: float = 0.05, seed: int = 0):
    """aldp-vacuum's flow at the preset size (6 layers, hidden 64, depth 2, 8 bins), weights perturbed
    by N(0, perturb²) so that the splines are not the identity, and its frozen copy:
    (current SplineFlow, BaselineSplineFlow with the same weights, aldp-vacuum's coordinates)."""
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems import get_target

    generator = BoltzmannGenerator.build(get_target("aldp-vacuum"), n_layers=6, hidden=64, n_bins=8, dtype=dtype)
    flow = generator.flow
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow, BaselineSplineFlow(flow), generator.coordinates
