"""Coupling layers of rational-quadratic splines and their stack (the learned part of a flow)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import CMTInputError
from .splines import IDENTITY_DERIVATIVE, rq_spline


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
