"""Coupling layers of rational-quadratic splines and their stack (the learned part of a flow)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import CMTInputError
from .splines import IDENTITY_DERIVATIVE, spline_backward, spline_forward


def _wrap_(u: Tensor, periodic: Tensor, mode: str) -> None:
    """Circular rows of u (Dt, B) taken modulo 1, in place (``periodic``: (Dt, 1) 1.0 / 0.0)."""
    if mode == "all":
        u.sub_(torch.floor(u))
    elif mode == "some":
        u.sub_(torch.floor(u).mul_(periodic))


def _views(raw: Tensor, d: int, k: int) -> tuple[Tensor, Tensor]:
    """Bins (K, 2, Dt, B) and knot derivatives (K + 1, Dt, B): strided views of the conditioner's
    output raw (Dt (3K + 1), B), laid out as the last Linear's rows: (Dt, 2, K) bins, then (Dt, K + 1)."""
    b = raw.shape[1]
    bins = raw[: 2 * k * d].view(d, 2, k, b).permute(2, 1, 0, 3)
    derivatives = raw[2 * k * d :].view(d, k + 1, b).transpose(0, 1)
    return bins, derivatives


def _coupling_forward(x: Tensor, raw: Tensor, constants: tuple, inverse: bool, keep: bool):
    """Transformed coordinates x (Dt, B) -> (new x, log|det| summed per sample (B,), saved).

    raw: (Dt (3K + 1), B), the conditioner's output (see :func:`_views`). The derivative at 1
    of a circular coordinate is its derivative at 0: that value is copied, in place, into
    ``raw``'s (otherwise unused) last derivative row of the coordinate.
    """
    lower, width, inv_width, shift, periodic, mode, k, circular_rows = constants
    d = x.shape[0]
    bins, derivatives = _views(raw, d, k)
    if mode == "all":
        derivatives[k].copy_(derivatives[0])
    elif mode == "some":
        derivatives[k].index_copy_(0, circular_rows, derivatives[0].index_select(0, circular_rows))
    u = torch.sub(x, lower).mul_(inv_width)
    if mode != "none":
        u.add_(shift)
        _wrap_(u, periodic, mode)
    v, logdet, saved = spline_forward(u, bins, derivatives, inverse, keep)
    if mode != "none":
        v.sub_(shift)
        _wrap_(v, periodic, mode)
    return torch.addcmul(lower, v, width), logdet.sum(0), saved


def _coupling_backward(saved, constants: tuple, g_raw: Tensor, grad_out: Tensor, grad_logdet: Tensor, inverse: bool):
    """The gradient of x (Dt, B) of :func:`_coupling_forward` (new x, summed log|det|); that of raw
    is written into ``g_raw`` (Dt (3K + 1), B)."""
    _, width, inv_width, _, _, mode, k, circular_rows = constants
    theta = saved[0]
    d, b = theta.shape
    g_bins, g_derivatives = _views(g_raw, d, k)
    g_u, _, _ = spline_backward(saved, grad_out * width, grad_logdet.expand(d, b), inverse, g_bins, g_derivatives)
    if mode == "all":  # the derivative at 1 of circular coordinates is their derivative at 0
        g_derivatives[0].add_(g_derivatives[k])
        g_derivatives[k].zero_()
    elif mode == "some":
        g_derivatives[0].index_add_(0, circular_rows, g_derivatives[k].index_select(0, circular_rows))
        g_derivatives[k].index_fill_(0, circular_rows, 0.0)
    return g_u.mul_(inv_width)


def _apply_parts(layer: SplineCoupling, x: Tensor, raw: Tensor, inverse: bool, keep: bool):
    """:func:`_coupling_forward` on each part of the layer's transformed rows (:func:`bin_layout`):
    new x (Dt, B), log|det| (B,) and the saved tensors of each part (a list, empty unless ``keep``)."""
    parts = layer._parts()
    if len(parts) == 1:
        new, logdet, saved = _coupling_forward(x, raw, parts[0][2], inverse, keep)
        return new, logdet, [saved] if keep else []
    news, logdet, saved_parts = [], None, []
    for rows, cols, constants in parts:
        new, part_logdet, saved = _coupling_forward(x[rows], raw[cols], constants, inverse, keep)
        news.append(new)
        logdet = part_logdet if logdet is None else logdet.add_(part_logdet)
        saved_parts.append(saved)
    return torch.cat(news), logdet, saved_parts if keep else []


class _CouplingLayer(torch.autograd.Function):
    """A whole coupling layer as one autograd node: conditioner MLP, spline, rows written back.

    Inputs: y.T (dim, B), the layer, the direction and the MLP's parameters (weight, bias of
    each Linear, in order). The backward pass is written out (the MLP's in the usual way, the
    spline's in closed form, :func:`~cmt_openmm.flows.splines.spline_backward`): one node per
    layer instead of ~15 saves autograd's per-node overhead and several copies.
    """

    @staticmethod
    def forward(ctx, y_t: Tensor, layer: SplineCoupling, inverse: bool, *params: Tensor):
        raw, inputs, pre_activations = layer._mlp(y_t, keep=True)
        x = y_t.index_select(0, layer.transformed)
        new, logdet, saved_parts = _apply_parts(layer, x, raw, inverse, keep=True)
        ctx.layer, ctx.inverse, ctx.raw_shape, ctx.y_shape = layer, inverse, raw.shape, y_t.shape
        ctx.part_counts = [len(saved) for saved in saved_parts]
        ctx.counts = (sum(ctx.part_counts), len(inputs), len(pre_activations))
        ctx.save_for_backward(*(t for saved in saved_parts for t in saved), *inputs, *pre_activations, *params)
        return y_t.index_copy(0, layer.transformed, new), logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):
        layer = ctx.layer
        tensors = ctx.saved_tensors
        n_saved, n_inputs, n_pre = ctx.counts
        saved = tensors[:n_saved]
        inputs = tensors[n_saved : n_saved + n_inputs]
        pre_activations = tensors[n_saved + n_inputs : n_saved + n_inputs + n_pre]
        params = tensors[n_saved + n_inputs + n_pre :]
        theta = saved[0]
        d, b = len(layer.transformed), theta.shape[1]
        g_new = theta.new_zeros((d, b)) if grad_y is None else grad_y.index_select(0, layer.transformed)
        g_logdet = theta.new_zeros(b) if grad_logdet is None else grad_logdet
        g = theta.new_empty(ctx.raw_shape)
        parts, g_x_parts, start = layer._parts(), [], 0
        for (rows, cols, constants), count in zip(parts, ctx.part_counts):
            part_saved, start = saved[start : start + count], start + count
            g_x_parts.append(_coupling_backward(part_saved, constants, g[cols], g_new[rows], g_logdet, ctx.inverse))
        g_x = g_x_parts[0] if len(g_x_parts) == 1 else torch.cat(g_x_parts)
        need_input, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        g_params: list[Tensor | None] = [None] * len(params)
        g = g.to(inputs[0].dtype)  # the conditioner's matmul dtype (bfloat16 or the flow's)
        for i in reversed(range(len(inputs))):  # Linear i: out = W h_i + b (columns), then SiLU
            if need_params[2 * i]:
                g_params[2 * i] = torch.mm(g, inputs[i].t()).to(params[2 * i].dtype)
            if need_params[2 * i + 1]:
                g_params[2 * i + 1] = g.sum(1, dtype=params[2 * i + 1].dtype)
            if i == 0 and not need_input:
                break
            g = torch.mm(params[2 * i].t().to(g.dtype), g)
            if i > 0:
                g = torch.ops.aten.silu_backward(g, pre_activations[i - 1])
        if not need_input:
            return (None, None, None, *g_params)
        g_y = grad_y.clone() if grad_y is not None else theta.new_zeros(ctx.y_shape)
        g_y.index_copy_(0, layer.transformed, g_x)  # the transformed rows reach the output only through x
        if len(layer._conditioning):
            m = layer._n_circular
            features = inputs[0]  # cos, sin of the circular conditioning coordinates, then the others
            g_c = g[m:] if m == 0 else torch.cat([
                torch.mul(g[m : 2 * m], features[:m]).addcmul_(g[:m], features[m : 2 * m], value=-1.0), g[2 * m :]])
            g_y.index_add_(0, layer._conditioning, g_c.to(g_y.dtype))
        return (g_y, None, None, *g_params)


@contextlib.contextmanager
def conditioner_matmuls(module: nn.Module, dtype: torch.dtype | None):
    """Run the conditioners of every coupling layer in ``module`` in ``dtype`` inside the block.

    bfloat16 conditioners (inputs, weights and matmuls; the splines and densities stay in the
    flow's dtype) make a training step about twice as fast on CPUs with native bfloat16
    (AVX512-BF16, AMX) and on recent GPUs. The flow is still an exact bijection with exact
    densities, but a slightly different function: the conditioner's input is rounded to
    bfloat16, so a sample's log q and ``log_prob`` of its positions (which recomputes the input
    from them) can differ by ~1e-3 nats instead of ~1e-5. Training tolerates that; a generator
    handed out runs in its own dtype (the block restores it). None leaves the layers as they are.
    """
    layers = [m for m in module.modules() if isinstance(m, SplineCoupling)]
    before = [layer.matmul_dtype for layer in layers]
    for layer in layers:
        layer.matmul_dtype = dtype if dtype is not None else layer.matmul_dtype
    try:
        yield module
    finally:
        for layer, value in zip(layers, before):
            layer.matmul_dtype = value


def bin_layout(periodic: Tensor, n_bins: int, linear_bins: int) -> list[tuple[slice, slice, int]]:
    """The parts of a coupling layer's transformed rows and of its conditioner's output, with
    their number of bins: [(rows, output rows, K)].

    periodic: (Dt,) bool, True for the circular rows. Circular rows have ``n_bins`` bins, the
    others ``linear_bins``. Where both kinds are transformed with different numbers of bins, the
    circular rows come first (the layer orders them so) and each part has its own block of output
    rows, laid out as :func:`_views` says; otherwise there is one part.
    """
    d = len(periodic)
    n_circular = int(periodic.sum())
    if 0 < n_circular < d and n_bins != linear_bins:
        cut = n_circular * (3 * n_bins + 1)
        return [(slice(0, n_circular), slice(0, cut), n_bins),
                (slice(n_circular, d), slice(cut, cut + (d - n_circular) * (3 * linear_bins + 1)), linear_bins)]
    k = n_bins if n_circular else linear_bins
    return [(slice(0, d), slice(0, d * (3 * k + 1)), k)]


def _rederive(module: SplineCoupling, incompatible_keys) -> None:
    """load_state_dict post-hook: the derived constants follow the loaded buffers."""
    module._derive()


class SplineCoupling(nn.Module):
    """One coupling layer: splines on ``transformed`` coordinates, bins from an MLP of the rest.

    Args:
        transformed, conditioning: (Dt,), (Dc,) long indices into the flow coordinates.
        circular: (dim,) bool, True for coordinates on [-pi, pi).
        lower, upper: (dim,) interval of every coordinate (circular: -pi, pi).
        hidden, depth: MLP width and number of hidden layers.
        n_bins: spline bins K of circular coordinates.
        shift: (Dt,) rotation of circular inputs as a fraction of the circle (0 elsewhere).
        linear_bins: spline bins of the other coordinates (None: ``n_bins``). Bonds and angles
            are nearly Gaussian; fewer bins there shrink their share of the last Linear, most
            of a layer's arithmetic.

    Parameters (``net``: Linear, SiLU, ..., Linear; the last Linear has ``Dt (3K + 1)`` outputs,
    the (Dt, 2, K) bin widths and heights, then the (Dt, K + 1) knot derivatives; with two numbers
    of bins, one such block for the circular rows, which come first, then one for the others,
    :func:`bin_layout`) and buffers are
    those generator files store; everything else (``_``-prefixed, not in the state dict) is
    derived from them, again after ``load_state_dict``. The layer runs *coordinates first*
    (:meth:`forward_t` maps y.T (dim, B) to (dim, B)): the MLP is computed as ``W @ h`` on columns,
    and the spline reads its parameters through strided views of the MLP's output with the bins
    on the leading dimension (:func:`_views`), so it reduces over leading dimensions. With
    gradients, the whole layer is one autograd node (:class:`_CouplingLayer`). A circular
    coordinate's derivative at 1 is its derivative at 0 (the stored row of the last derivative
    is unused, as before). ``matmul_dtype`` (None: the layer's own dtype) is the dtype the
    conditioner computes in; see :func:`conditioner_matmuls`.
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
        linear_bins: int | None = None,
    ) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.linear_bins = n_bins if linear_bins is None else linear_bins
        self.matmul_dtype: torch.dtype | None = None
        if self.linear_bins != n_bins:  # circular rows first (bin_layout)
            order = torch.argsort((~circular[transformed]).to(torch.int8), stable=True)
            transformed, shift = transformed[order], shift[order]
        self.register_buffer("transformed", transformed.long().clone())  # own storage: safetensors refuses shared
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
        layout = bin_layout(self.periodic, self.n_bins, self.linear_bins)
        last = nn.Linear(hidden if depth > 0 else n_features, layout[-1][1].stop)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        with torch.no_grad():  # identity spline: equal bins, unit slopes
            for rows, cols, k in layout:
                last.bias[cols.start + (rows.stop - rows.start) * 2 * k : cols.stop] = IDENTITY_DERIVATIVE
        self.net = nn.Sequential(*layers, last)
        self._derive()
        self.register_load_state_dict_post_hook(_rederive)

    def _derive(self) -> None:
        """Non-persistent constants of the coordinates-first layout, from the stored buffers."""
        device = self.transformed.device
        periodic = self.periodic.cpu()
        self.register_buffer("_circular_rows", torch.nonzero(periodic).flatten().to(device), persistent=False)
        self.register_buffer("_conditioning", torch.cat([self.cond_circular, self.cond_linear]), persistent=False)
        self._n_circular = len(self.cond_circular)
        self.register_buffer("_lower", self.lower[:, None].clone(), persistent=False)
        self.register_buffer("_width", self.width[:, None].clone(), persistent=False)
        self.register_buffer("_inv_width", 1.0 / self.width[:, None], persistent=False)
        self.register_buffer("_shift", self.shift[:, None].clone(), persistent=False)
        self.register_buffer("_periodic", self.periodic[:, None].to(self.lower.dtype), persistent=False)
        self._layout = [(rows, cols, k, self._wrap_mode(periodic[rows]))
                        for rows, cols, k in bin_layout(periodic, self.n_bins, self.linear_bins)]

    @staticmethod
    def _wrap_mode(periodic: Tensor) -> str:
        return "all" if bool(periodic.all()) else ("some" if bool(periodic.any()) else "none")

    def _parts(self) -> list[tuple[slice, slice, tuple]]:
        """[(rows, output rows, constants of :func:`_coupling_forward`)] per part (:func:`bin_layout`)."""
        return [(rows, cols, (self._lower[rows], self._width[rows], self._inv_width[rows], self._shift[rows],
                              self._periodic[rows], mode, k, self._circular_rows))
                for rows, cols, k, mode in self._layout]

    def _mlp(self, y_t: Tensor, keep: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The spline parameters raw (Dt (3K + 1), B) (see :func:`_views`) of y.T (dim, B); with
        ``keep``, also the inputs of the Linear layers and the pre-activations of the SiLUs."""
        if len(self._conditioning) == 0:
            h = y_t.new_ones(1, y_t.shape[1])
        else:
            c = y_t.index_select(0, self._conditioning)
            m = self._n_circular
            h = torch.cat([torch.cos(c[:m]), torch.sin(c[:m]), c[m:]]) if m else c
        inputs: list[Tensor] = []
        pre_activations: list[Tensor] = []
        dtype = self.matmul_dtype or y_t.dtype
        h = h.to(dtype)
        for layer in self.net:  # Linear layers as W @ h: the batch stays the last dimension
            if isinstance(layer, nn.Linear):
                if keep:
                    inputs.append(h)
                h = torch.addmm(layer.bias[:, None].to(dtype), layer.weight.to(dtype), h)
            elif isinstance(layer, nn.SiLU):
                if keep:
                    pre_activations.append(h)
                h = F.silu(h)
            else:
                raise TypeError(f"Unexpected conditioner layer {layer!r}.")
        return h.to(y_t.dtype), inputs, pre_activations

    def forward_t(self, y_t: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        """Map y.T (dim, B) -> (dim, B), coordinates first; returns it and log|det| (B,)."""
        params = [p for layer in self.net if isinstance(layer, nn.Linear) for p in (layer.weight, layer.bias)]
        if torch.is_grad_enabled() and (y_t.requires_grad or any(p.requires_grad for p in params)):
            return _CouplingLayer.apply(y_t, self, inverse, *params)
        raw = self._mlp(y_t)[0]
        x = y_t.index_select(0, self.transformed)
        new, logdet, _ = _apply_parts(self, x, raw, inverse, keep=False)
        return y_t.index_copy(0, self.transformed, new), logdet

    def forward(self, y: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        """Map y (B, dim) -> (B, dim); returns it and log|det| (B,) of the map applied."""
        y_t, logdet = self.forward_t(y.t().contiguous(), inverse)
        return y_t.t().contiguous(), logdet


MASKS = ("random", "alternating", "torsions", "quarters")


def _part(perm: Tensor, k: int, parts: int) -> Tensor:
    """The k-th of ``parts`` near-equal consecutive chunks of the indices ``perm`` (the first ones
    the larger), sorted."""
    return torch.tensor_split(perm, parts)[k].sort()[0]


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
    (benchmarks/cmt_settings_study.py, ``tors9_*``); without circular coordinates (Cartesian
    toys), or with nothing else, it falls back to ``"random"``. ``"quarters"`` draws, for every
    cycle of four layers, a random quarter of the coordinates for each layer: each coordinate is
    transformed once per cycle with three quarters of the others as inputs (half with
    ``"random"``). A conditioner's cost grows mostly with the coordinates it transforms (its
    last Linear), so 4k quarter layers transform each coordinate as often as 2k random ones at a
    little more cost (twice the hidden layers), while every transform sees more of the molecule
    (a peptide's helical turns are states of torsions several residues apart). Circular seam
    offsets are drawn at random per layer. All from ``seed``. ``linear_bins``: bins of the splines on
    non-circular coordinates (None: ``n_bins``, which then sets only the circular ones').
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
        linear_bins: int | None = None,
    ) -> None:
        super().__init__()
        if mask not in MASKS:
            raise CMTInputError(f"mask must be one of {', '.join(MASKS)}, not {mask!r}.")
        if n_layers < 1 or hidden < 1 or depth < 0 or not 2 <= n_bins <= 256:
            raise CMTInputError("The flow needs n_layers >= 1, hidden >= 1, depth >= 0 and 2 <= n_bins <= 256.")
        if linear_bins is not None and not 2 <= linear_bins <= 256:
            raise CMTInputError(f"linear_bins must be between 2 and 256 (or left out: n_bins), not {linear_bins}.")
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
                transformed = _part(perm, i % 3 - 1, 2)
            elif dim == 1:
                transformed = torch.tensor([0])
            elif mask == "alternating":
                transformed = torch.arange(i % 2, dim, 2)
            elif mask == "quarters":
                parts = min(4, dim)
                if i % parts == 0:
                    perm = torch.randperm(dim, generator=gen)
                transformed = _part(perm, i % parts, parts)
            else:
                if i % 2 == 0:
                    perm = torch.randperm(dim, generator=gen)
                transformed = _part(perm, i % 2, 2)
            is_transformed = torch.zeros(dim, dtype=torch.bool)
            is_transformed[transformed] = True
            conditioning = torch.arange(dim)[~is_transformed]
            shift = torch.rand(len(transformed), generator=gen, dtype=lower.dtype)
            layers.append(
                SplineCoupling(transformed, conditioning, circular, lower, upper, hidden, depth, n_bins, shift,
                               linear_bins)
            )
        self.layers = nn.ModuleList(layers)

    def forward(self, y0: Tensor) -> tuple[Tensor, Tensor]:
        """Prior sample y0 (B, dim) -> y (B, dim), log|det dy/dy0| (B,)."""
        y_t, logdet = y0.t().contiguous(), y0.new_zeros(y0.shape[0])
        for layer in self.layers:
            y_t, ld = layer.forward_t(y_t)
            logdet = logdet + ld
        return y_t.t().contiguous(), logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Data y (B, dim) -> y0 (B, dim), log|det dy0/dy| (B,)."""
        y_t, logdet = y.t().contiguous(), y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y_t, ld = layer.forward_t(y_t, inverse=True)
            logdet = logdet + ld
        return y_t.t().contiguous(), logdet
