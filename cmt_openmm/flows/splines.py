"""The monotone rational-quadratic spline (Durkan et al. 2019, arXiv 1906.04032), batched over
coordinates, with circular (periodic-derivative) and interval variants in one call.

Two entry points compute the same map:

- :func:`rq_spline` takes the parameters in the natural layout ``(..., D, 2, K)`` (one row of
  bins per coordinate) and is the reference interface;
- :func:`spline_forward` / :func:`spline_backward` take them *bins first*, ``(K, 2, *S)`` and
  ``(K + 1, *S)`` (possibly strided views), which is how
  :class:`~cmt_openmm.flows.coupling.SplineCoupling` uses them.

Gradients come from :func:`spline_backward`, the closed-form derivatives of the spline, through
one ``torch.autograd.Function``, not from autograd of the textbook formulation: on a CPU a
coupling layer's spline is a few hundred thousand numbers per step, and autograd of that
formulation (a softmax over a last dimension of size K, a cumsum, gathers whose backward pass
zero-fills and scatters K-sized tensors, ~50 element-wise operations with a backward node each)
spent most of a training step on per-operation overhead and memory traffic. Here:

- every reduction over the K bins runs over a leading dimension (contiguous rows of values);
- the bins are normalised without a softmax: with ``e = exp(a - max a)`` (the normalised bins do
  not depend on the shift), one ``(K + 1) x K`` matrix product gives every knot times
  ``S / scale`` (``S = sum e``; the ``min_bin`` offsets included, as ``sum e = S``) and ``S``;
  only the bin holding each input is divided by ``S``;
- the bin index counts the inner knots at or below x (``x S / scale >= knot_j S / scale``): the
  textbook index up to ties at a knot, where the spline is continuous (and C1) anyway;
- element-wise work uses fused and in-place operations, 0-dim tensor constants (a Python float
  operand costs a tensor allocation per call on CPU) and no boolean masks.

On CPUs, :func:`spline_forward` and :func:`spline_backward` hand coupling-layer tensors ((D, B)
inputs) to :mod:`.spline_kernel`, the same formulas as one compiled C++ loop (built on first
use where a C++ compiler exists; ``CMT_OPENMM_SPLINE_KERNEL=0`` keeps the torch operations below).

Values are those of the textbook formulation to rounding; ``tests/flows/test_flows.py`` checks values
and gradients against it (the implementation before this one, kept in
``tests/flows/reference_flow.py``). Only first derivatives are provided (``once_differentiable``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import spline_kernel

_MIN_BIN = 1e-3  # smallest bin width/height, as a fraction of the interval
_MIN_DERIVATIVE = 1e-3
IDENTITY_DERIVATIVE = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))
"""Raw derivative parameter that gives knot slope 1 (the conditioners' initial bias)."""

_CONSTANTS: dict[tuple[int, torch.dtype, torch.device], dict[str, Tensor]] = {}


def _constants(k: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Cached constants: the cumulative-sum matrix and 0-dim numbers (cheaper operands than floats)."""
    key = (k, dtype, device)
    table = _CONSTANTS.get(key)
    if table is None:
        scale = 1.0 - _MIN_BIN * k
        j = torch.arange(k + 1, dtype=torch.float64)[:, None]
        knots = (torch.arange(k)[None, :] < j).double() + j * (_MIN_BIN / scale)
        knots[k] = 1.0
        table = {
            # (K + 1, K): times e, row j < K gives sum_{i<j} e_i + j (min_bin / scale) S, i.e. knot j
            # times S / scale; row K gives S
            "knots": knots.to(dtype),
            "min_bin": torch.tensor(_MIN_BIN, dtype=dtype),
            "min_derivative": torch.tensor(_MIN_DERIVATIVE, dtype=dtype),
            "scale": torch.tensor(scale, dtype=dtype),
            "inv_scale": torch.tensor(1.0 / scale, dtype=dtype),
            "one": torch.tensor(1.0, dtype=dtype),
            "two": torch.tensor(2.0, dtype=dtype),
        }
        table = {name: value.to(device) for name, value in table.items()}
        _CONSTANTS[key] = table
    return table


def spline_forward(x: Tensor, bins: Tensor, derivatives: Tensor, inverse: bool, keep: bool = True):
    """The spline on inputs x of any shape S: (out, logdet, saved), ``saved`` for :func:`spline_backward`.

    x: (*S) in [0, 1]; bins: (K, 2, *S) unconstrained widths (``[:, 0]``) and heights;
    derivatives: (K + 1, *S) unconstrained knot derivatives (a circular spline's last one equals
    its first). bins and derivatives may be strided views (only x's shape must match).
    ``saved`` is None unless ``keep``.
    """
    if not torch.compiler.is_compiling() and spline_kernel.applies(x, bins, derivatives):
        out, logdet = spline_kernel.forward(x, bins, derivatives, inverse, _MIN_BIN, _MIN_DERIVATIVE)
        return out, logdet, ((x, bins, derivatives) if keep else None)
    k, shape = bins.shape[0], x.shape
    n = x.numel()
    c = _constants(k, x.dtype, x.device)
    if torch.compiler.is_compiling():  # (out= into a tensor of another layout does not trace)
        e = torch.sub(bins, bins.amax(0, keepdim=True)).contiguous()
    else:  # bins first and contiguous, whatever the layout of ``bins``
        e = torch.empty((k, 2, *shape), dtype=x.dtype, device=x.device)
        torch.sub(bins, bins.amax(0, keepdim=True), out=e)
    e.exp_()  # softmax(bins) = e / S
    knot_sums = torch.mm(c["knots"], e.view(k, 2 * n)).view(k + 1, 2, *shape)  # knot j times S / scale; S
    total = knot_sums[k]
    row = 1 if inverse else 0
    # bin index = number of inner knots (1..K-1) at or below x; ``below`` is 1.0 where bin j < idx
    below = torch.empty((k - 1, *shape), dtype=x.dtype, device=x.device)
    torch.ge(torch.mul(x, total[row]).mul_(c["inv_scale"]), knot_sums[1:k, row], out=below)
    idx_float = below.sum(0)
    idx = idx_float.long()
    pick = idx.expand(1, 2, *shape)
    inv_total_scaled = torch.reciprocal(total).mul_(c["scale"])  # (2, *S) scale / S
    knot = knot_sums.gather(0, pick).squeeze(0).mul_(inv_total_scaled)  # (x0, y0)
    p_scaled = e.gather(0, pick).squeeze(0).mul_(inv_total_scaled)  # scale p_idx
    size = torch.add(p_scaled, c["min_bin"])  # (w, h)
    # knot derivatives idx and idx + 1: one gather from rows 0..K-1 and 1..K of the same storage
    if torch.compiler.is_compiling():  # (inductor read this as_strided view out of bounds: a segfault)
        raw = torch.cat([derivatives[:k].gather(0, idx.unsqueeze(0)), derivatives[1:].gather(0, idx.unsqueeze(0))])
    else:
        pair = torch.as_strided(derivatives, (2, k, *shape), (derivatives.stride(0), *derivatives.stride()),
                                derivatives.storage_offset())
        raw = pair.gather(1, idx.expand(2, 1, *shape)).squeeze(1)  # (2, *S)
    slope = F.softplus(raw).add_(c["min_derivative"])
    x0, y0 = knot[0], knot[1]
    w, h = size[0], size[1]
    d0, d1 = slope[0], slope[1]
    inv_w = torch.reciprocal(w)
    s = h * inv_w
    slack = torch.add(d0, d1).sub_(s, alpha=2.0)
    if inverse:
        dy = x - y0
        dy_slack = dy * slack
        a = torch.addcmul(dy_slack, h, s - d0)
        neg_b = torch.addcmul(dy_slack, h, d0, value=-1.0)
        neg_c = s * dy
        root = torch.addcmul(neg_b * neg_b, a, neg_c, value=4.0).clamp_min_(0.0).sqrt_()
        theta = neg_c.div_(root.sub_(neg_b)).mul_(c["two"]).clamp_(0.0, 1.0)
    else:
        theta = torch.sub(x, x0).mul_(inv_w).clamp_(0.0, 1.0)
    one_minus = c["one"] - theta
    t1 = theta * one_minus
    theta2 = theta * theta
    inv_denom = torch.addcmul(s, slack, t1).reciprocal_()
    ratio = s * inv_denom
    q = d1 * theta2
    q.addcmul_(s, t1, value=2.0).addcmul_(d0, one_minus * one_minus)
    logdet = (q * ratio).mul_(ratio).log_()
    if inverse:
        out = torch.addcmul(x0, theta, w)
        logdet.neg_()
    else:
        r = (s * theta2).addcmul_(d0, t1).mul_(inv_denom)  # (out - y0) / h
        out = torch.addcmul(y0, h, r)
    if not keep:
        return out, logdet, None
    if inverse:
        r = dy.mul_(torch.reciprocal(h))  # (y - y0) / h at the solution theta
    saved = (theta, e, below, idx, inv_total_scaled, knot, idx_float, p_scaled, raw, slope, one_minus, t1, theta2,
             s, inv_w, slack, h, w, inv_denom, ratio, q, r)
    return out, logdet, saved


def spline_backward(saved, grad_out: Tensor, grad_logdet: Tensor, inverse: bool,
                    out_bins: Tensor | None = None, out_derivatives: Tensor | None = None):
    """Gradients (x, bins, derivatives) of :func:`spline_forward` from those of (out, logdet).

    ``out_bins`` (K, 2, *S), ``out_derivatives`` (K + 1, *S): where to write the gradients of
    bins and derivatives (may be strided views); new tensors if None.

    Per element, with theta the position in the bin, s = h / w, t1 = theta (1 - theta),
    D = s + (d0 + d1 - 2 s) t1, Q = d1 theta^2 + 2 s t1 + d0 (1 - theta)^2 and
    R = (s theta^2 + d0 t1) / D: the forward map is out = y0 + h R, its logdet
    L = 2 log s + log Q - 2 log D, and

    - d out / d theta = h s Q / D^2;  dL/dtheta = Q'/Q - 2 D'/D with
      Q' = 2 (d1 theta + s (1 - 2 theta) - d0 (1 - theta)), D' = (d0 + d1 - 2 s)(1 - 2 theta);
    - dR/ds = (theta^2 - R (1 - 2 t1)) / D, dR/dd0 = t1 (1 - R) / D, dR/dd1 = -t1 R / D;
    - dL/ds = 2/s + 2 t1/Q - 2 (1 - 2 t1)/D, dL/dd0 = (1 - theta)^2/Q - 2 t1/D,
      dL/dd1 = theta^2/Q - 2 t1/D;
    - forward map: theta = (x - x0) / w; inverse map: out = x0 + theta w, logdet -L, with theta
      solving y = y0 + h R(theta) (differentiated implicitly: d theta / dy = 1 / (d out / d theta)).

    The normalised bins p = softmax(a) enter as x0 = scale sum_{i<idx} p_i + min_bin idx and
    w = scale p_idx + min_bin (the same for heights), so
    dL/da_j = p_j (scale (g_x0 [j < idx] + g_w [j = idx]) - sum_i p_i dL/dp_i); the knot
    derivatives enter as softplus(raw) + min_derivative.
    """
    if len(saved) == 3:  # (x, bins, derivatives): saved by the compiled kernel, which recomputes the rest
        return spline_kernel.backward(*saved, grad_out, grad_logdet, inverse, _MIN_BIN, _MIN_DERIVATIVE,
                                      out_bins, out_derivatives)
    (theta, e, below, idx, inv_total_scaled, knot, idx_float, p_scaled, raw, slope, one_minus, t1, theta2,
     s, inv_w, slack, h, w, inv_denom, ratio, q, r) = saved
    k, shape = e.shape[0], theta.shape
    c = _constants(k, e.dtype, e.device)
    d0, d1 = slope[0], slope[1]
    inv_q = torch.reciprocal(q)
    one_m2theta = one_minus - theta
    half_dl_dtheta = (d1 * theta).addcmul_(s, one_m2theta).addcmul_(d0, one_minus, value=-1.0)
    half_dl_dtheta.mul_(inv_q).addcmul_(slack * one_m2theta, inv_denom, value=-1.0)
    dout_dtheta = (h * q).mul_(ratio).mul_(inv_denom)
    g_knot = torch.empty((2, *shape), dtype=e.dtype, device=e.device)  # (g_x0, g_y0)
    g_size = torch.empty((2, *shape), dtype=e.dtype, device=e.device)  # (g_w, g_h)
    if inverse:
        g_theta = (grad_out * w).addcmul_(grad_logdet, half_dl_dtheta, value=-2.0)
        g_in = g_theta.div_(dout_dtheta)
        a_out, a_l = -g_in, -grad_logdet  # coefficients of d out / d param and dL / d param
        g_knot[0] = grad_out
        torch.mul(grad_out, theta, out=g_size[0])
    else:
        g_theta = (grad_out * dout_dtheta).addcmul_(grad_logdet, half_dl_dtheta, value=2.0)
        g_in = g_theta.mul_(inv_w)
        a_out, a_l = grad_out, grad_logdet
        torch.neg(g_in, out=g_knot[0])
        torch.mul(g_knot[0], theta, out=g_size[0])
    g_knot[1] = a_out
    a_out_h_d = (a_out * h).mul_(inv_denom)
    one_m2t1 = torch.sub(c["one"], t1, alpha=2.0)
    g_s = torch.addcmul(theta2, r, one_m2t1, value=-1.0).mul_(a_out_h_d)
    half_dl_ds = torch.reciprocal(s).addcmul_(t1, inv_q).addcmul_(one_m2t1, inv_denom, value=-1.0)
    g_s.addcmul_(a_l, half_dl_ds, value=2.0)
    torch.mul(a_out, r, out=g_size[1]).addcmul_(g_s, inv_w)
    g_size[0].addcmul_(g_s, s * inv_w, value=-1.0)
    t1_d = t1 * inv_denom
    t1_r = t1 * r
    g_slope = torch.empty((2, *shape), dtype=e.dtype, device=e.device)  # (g_d0, g_d1)
    torch.sub(t1, t1_r, out=g_slope[0]).mul_(a_out_h_d)
    g_slope[0].addcmul_(a_l, (one_minus * one_minus).mul_(inv_q).sub_(t1_d, alpha=2.0))
    torch.mul(a_l, (theta2 * inv_q).sub_(t1_d, alpha=2.0), out=g_slope[1]).addcmul_(a_out_h_d, t1_r, value=-1.0)

    # bins: dL/da_j = e_j scale / S (g_knot [j < idx] + g_size [j = idx]) - p_j sum_i p_i dL/dp_i
    cum_scaled = torch.addcmul(knot, idx_float, c["min_bin"], value=-1.0)  # scale sum_{i<idx} p_i
    total_term = cum_scaled.mul_(g_knot).addcmul_(g_size, p_scaled).mul_(inv_total_scaled).mul_(c["inv_scale"])
    g_knot.mul_(inv_total_scaled)
    g_bins = torch.empty_like(e) if out_bins is None else out_bins
    torch.addcmul(total_term.neg_(), below.unsqueeze(1), g_knot, out=g_bins[: k - 1])
    g_bins[k - 1] = total_term
    g_bins.mul_(e)
    g_bins.scatter_add_(0, idx.expand(1, 2, *shape), g_size.mul_(p_scaled).unsqueeze(0))

    # knot derivatives: d softplus(raw) / d raw = sigmoid(raw)
    g_slope.mul_(torch.sigmoid(raw))
    if out_derivatives is None:
        g_derivatives = torch.zeros((k + 1, *shape), dtype=e.dtype, device=e.device)
    else:
        g_derivatives = out_derivatives.zero_()
    g_derivatives[:k].scatter_(0, idx.unsqueeze(0), g_slope[:1])
    g_derivatives[1:].scatter_add_(0, idx.unsqueeze(0), g_slope[1:])
    return g_in, g_bins, g_derivatives


class _RQSpline(torch.autograd.Function):
    """:func:`spline_forward` with :func:`spline_backward` as its backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, bins: Tensor, derivatives: Tensor, inverse: bool):
        out, logdet, saved = spline_forward(x, bins, derivatives, inverse)
        ctx.inverse = inverse
        ctx.save_for_backward(*saved)
        return out, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_logdet: Tensor):
        saved = ctx.saved_tensors
        grad_out = torch.zeros_like(saved[0]) if grad_out is None else grad_out.contiguous()
        grad_logdet = torch.zeros_like(saved[0]) if grad_logdet is None else grad_logdet.contiguous()
        return (*spline_backward(saved, grad_out, grad_logdet, ctx.inverse), None)


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
    k, shape = bins.shape[-1], x.shape
    bins = bins.expand(*shape, 2, k).movedim((-1, -2), (0, 1)).reshape(k, 2, -1)  # bins first
    derivatives = derivatives.expand(*shape, k + 1)
    last = torch.where(periodic, derivatives[..., 0], derivatives[..., k])
    derivatives = torch.cat([derivatives[..., :k], last.unsqueeze(-1)], -1).movedim(-1, 0).reshape(k + 1, -1)
    x = x.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or bins.requires_grad or derivatives.requires_grad):
        out, logdet = _RQSpline.apply(x, bins, derivatives, inverse)
    else:
        out, logdet, _ = spline_forward(x, bins, derivatives, inverse, keep=False)
    return out.reshape(shape), logdet.reshape(shape)
