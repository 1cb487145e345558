"""Rational-quadratic spline coupling flows on a molecule's flow coordinates, with their priors.

The flow models the density of the coordinates ``z`` of a :class:`CoordinateTransform`
(internal coordinates, or Cartesian coordinates of a toy). Three pieces, composed by
:class:`SplineFlow`:

1. :class:`CoordinateScaling` (float64, fixed): circular coordinates (torsions) stay on
   [-pi, pi); every other coordinate is scaled around the reference structure,
   ``y = (z - reference_z) / scale`` with a per-kind scale (bond 0.005 nm, angle 0.1 rad,
   relative_torsion 0.2 rad; Cartesian: the box centre and half-width / B, so the box maps to
   [-B, B]; B = 6 by default; 300 K MD of alanine dipeptide then has y-spreads of about
   0.5-1 and |y| < 4). Each scaled coordinate lives on the interval [-B, B] clipped to the
   coordinate's ``valid_bounds`` (less a margin of 1e-4 in scaled units), so every sample lies strictly
   inside ``valid_bounds``: relative torsions never leave the half-interval that encodes the
   reference chirality, angles stay in (0, pi), Cartesian toys stay in their box.
2. :class:`Prior`: uniform on [-pi, pi) for circular coordinates, standard normal truncated
   to each coordinate's interval for the scaled ones.
3. :class:`CouplingFlow`: coupling layers (:class:`SplineCoupling`), each transforming part of
   the coordinates with a rational-quadratic spline (Durkan et al. 2019, "Neural Spline
   Flows", arXiv 1906.04032) whose bins come from an MLP of the other coordinates (circular
   ones enter as (cos, sin)). Circular coordinates get a *circular* spline on [-pi, pi): the
   derivative at -pi and at pi is one shared, learned value, so the map is a C1
   diffeomorphism of the circle; each layer also rotates its circular inputs by a fixed random
   offset (and back), so the seam at +-pi is not the same point in every layer. Scaled
   coordinates get an *interval* spline with bounded support: it maps the coordinate's
   interval onto itself, all K + 1 knot derivatives learned; values outside the interval have
   density zero (``log_prob`` returns -inf). The last layer of every conditioner has zero
   weights and a bias that gives equal bins and unit slopes, so a new flow is exactly the
   identity map and q_0 is the prior.

Densities: ``log q_z(z) = log p_0(y_0) + log|det dy_0/dy| - sum(log scale)`` (the affine
scaling's log-det included), returned in float64; the coupling layers run in the flow's dtype
(float32 by default).

Why hand-written rather than zuko: zuko's ``MonotonicRQSTransform`` has one scalar bound per
transform and fixes both boundary derivatives to 1 (identity tails), and its circular spline is
that spline plus a shift. Here one coupling layer transforms a mix of circular and interval
coordinates, each with its own (asymmetric, chirality-clipped) interval; a single batched
spline function with a per-coordinate periodic mask does all of them in one call, which is both
simpler and faster on CPU than one zuko transform per coordinate group.

>>> import torch
>>> flow = SplineFlow(torch.tensor([True, False]), ["torsion", "bond"],
...                   torch.tensor([0.0, 0.1]), torch.tensor([[-3.2, 3.2], [0.0, 1.0]]),
...                   n_layers=2, hidden=16)
>>> z, log_q = flow.sample(4, torch.Generator().manual_seed(0))
>>> bool(torch.allclose(flow.log_prob(z), log_q))
True
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CMTInputError

DEFAULT_SCALES: dict[str, float] = {"bond": 0.005, "angle": 0.1, "relative_torsion": 0.2}
"""Scale of each non-circular coordinate kind around the reference (nm for bonds, rad else)."""

_MIN_BIN = 1e-3  # smallest bin width/height, as a fraction of the interval
_MIN_DERIVATIVE = 1e-3
IDENTITY_DERIVATIVE = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))
"""Raw derivative parameter that gives knot slope 1 (the conditioners' initial bias)."""
_TWO_PI = 2.0 * math.pi


def wrap_angle(a: Tensor) -> Tensor:
    """Map angles (rad) to [-pi, pi)."""
    return torch.remainder(a + math.pi, _TWO_PI) - math.pi


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


class SplineCoupling(nn.Module):
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


MASKS = ("random", "alternating", "torsions")


def _half(perm: Tensor, first: bool) -> Tensor:
    """The first (larger) or second half of the indices ``perm``, sorted."""
    cut = (len(perm) + 1) // 2
    return (perm[:cut] if first else perm[cut:]).sort()[0]


class CouplingFlow(nn.Module):
    """A stack of :class:`SplineCoupling` layers; ``forward`` maps prior -> data coordinates.

    Masks: ``"random"`` draws, for every pair of layers, a random half of the coordinates
    transformed by the first layer (the rest by the second); ``"alternating"`` uses even / odd
    indices; ``"torsions"`` repeats a cycle of three layers: the circular coordinates
    conditioned on all others, then a random half of the others conditioned on the torsions and
    the other half, then that other half. Every bond and angle is thus transformed once per
    cycle with every torsion among its inputs, so it can follow the conformation (alanine
    dipeptide's backbone angles shift by about one standard deviation between the φ < 0 and
    φ > 0 basins; with random halves some angles never see φ); in the ALDP settings study it
    cost the same CPU as ``"random"`` at 9 vs 6 layers and did not keep that basin more often
    (benchmarks/cmt_settings_study.py, ``tors9_*``). Without circular coordinates
    (Cartesian toys), or with nothing else, it falls back to ``"random"``. Circular seam offsets
    are drawn at random per layer. All from ``seed``.
    """

    def __init__(
        self,
        circular: Tensor,
        lower: Tensor,
        upper: Tensor,
        n_layers: int = 8,
        hidden: int = 128,
        depth: int = 2,
        n_bins: int = 8,
        mask: str = "random",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mask not in MASKS:
            raise CMTInputError(f"mask must be one of {', '.join(MASKS)}, not {mask!r}.")
        if n_layers < 1 or hidden < 1 or depth < 0 or not 2 <= n_bins <= 256:
            raise CMTInputError("The flow needs n_layers >= 1, hidden >= 1, depth >= 0 and 2 <= n_bins <= 256.")
        dim = len(circular)
        gen = torch.Generator().manual_seed(seed)
        if mask == "torsions" and (bool(circular.all()) or not bool(circular.any())):
            mask = "random"
        torsions, others = torch.nonzero(circular).flatten(), torch.nonzero(~circular).flatten()
        layers = []
        for i in range(n_layers):
            if mask == "torsions" and i % 3 == 0:
                transformed = torsions
            elif mask == "torsions":  # parts 1 and 2 of the cycle: the two halves of the others
                if i % 3 == 1:
                    perm = others[torch.randperm(len(others), generator=gen)]
                transformed = _half(perm, first=i % 3 == 1)
            elif dim == 1:
                transformed = torch.tensor([0])
            elif mask == "alternating":
                transformed = torch.arange(i % 2, dim, 2)
            else:
                if i % 2 == 0:
                    perm = torch.randperm(dim, generator=gen)
                transformed = _half(perm, first=i % 2 == 0)
            is_transformed = torch.zeros(dim, dtype=torch.bool)
            is_transformed[transformed] = True
            conditioning = torch.arange(dim)[~is_transformed]
            shift = torch.rand(len(transformed), generator=gen, dtype=lower.dtype)
            layers.append(
                SplineCoupling(transformed, conditioning, circular, lower, upper, hidden, depth, n_bins, shift)
            )
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

    def to_flow(self, z: Tensor) -> Tensor:
        """z (B, dim) -> y (B, dim) float64; circular coordinates wrapped to [-pi, pi)."""
        z = z.double()
        return torch.where(self.circular, wrap_angle(z), (z - self.center) / self.scale)

    def from_flow(self, y: Tensor) -> Tensor:
        """y (B, dim) -> z (B, dim) float64."""
        y = y.double()
        return torch.where(self.circular, y, self.center + self.scale * y)

    def inside(self, y: Tensor) -> Tensor:
        """(B,) bool: every coordinate of y inside its interval."""
        return ((y >= self.lower) & (y <= self.upper)).all(-1)


class SplineFlow(nn.Module):
    """Normalised density on flow coordinates z: scaling, prior and coupling layers.

    Args:
        circular, kinds, reference_z, valid_bounds: as on a ``CoordinateTransform``.
        n_layers, hidden, depth, n_bins, mask, seed: :class:`CouplingFlow` settings (the
            weights are initialised from ``seed``; global RNG state is left untouched).
        bound, scales, margin: :class:`CoordinateScaling` settings.
        dtype: dtype of the coupling layers.
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
    ) -> None:
        super().__init__()
        self.scaling = CoordinateScaling(circular, kinds, reference_z, valid_bounds, bound, scales, margin)
        s = self.scaling
        self.prior = Prior(s.circular, s.lower, s.upper)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.couplings = CouplingFlow(
                s.circular, s.lower.to(dtype), s.upper.to(dtype), n_layers, hidden, depth, n_bins, mask, seed
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
        y = self.scaling.to_flow(z)
        ok = self.scaling.inside(y) & torch.isfinite(y).all(-1)
        y = torch.where(ok[:, None], y, torch.zeros_like(y))
        y = torch.minimum(torch.maximum(y, self.scaling.lower), self.scaling.upper).to(self.dtype)
        y0, logdet = self.couplings.inverse(y)
        log_q = self.prior.log_prob(y0) + logdet.double() + self.scaling.log_det
        return torch.where(ok, log_q, torch.full_like(log_q, -math.inf))
