"""Rational-quadratic spline coupling flows on a molecule's flow coordinates, with their priors.

The flow models the density of the coordinates ``z`` of a :class:`CoordinateTransform`
(internal coordinates, or Cartesian coordinates of a toy). Three pieces, composed by
:class:`SplineFlow`:

1. :class:`CoordinateScaling` (:mod:`.scaling`; float64, fixed): circular coordinates (torsions) stay on
   [-pi, pi); every other coordinate is scaled around the reference structure,
   ``y = (z - reference_z) / scale`` with a per-kind scale (bond 0.005 nm, angle 0.1 rad,
   relative_torsion 0.2 rad; Cartesian: the box centre and half-width / B, so the box maps to
   [-B, B]; B = 6 by default; 300 K MD of alanine dipeptide then has y-spreads of about
   0.5-1 and |y| < 4). Each scaled coordinate lives on the interval [-B, B] clipped to the
   coordinate's ``valid_bounds`` (less a margin of 1e-4 in scaled units), so every sample lies strictly
   inside ``valid_bounds``: relative torsions never leave the half-interval that encodes the
   reference chirality, angles stay in (0, pi), Cartesian toys stay in their box.
2. :class:`Prior` (:mod:`.priors`): uniform on [-pi, pi) for circular coordinates, standard normal truncated
   to each coordinate's interval for the scaled ones.
3. :class:`CouplingFlow` (:mod:`.coupling`): coupling layers (:class:`SplineCoupling`), each transforming part of
   the coordinates with a rational-quadratic spline (:mod:`.splines`; Durkan et al. 2019, "Neural Spline
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

Speed (``benchmarks/flow_throughput.py`` measures it against the previous implementation,
kept verbatim in ``tests/flows/reference_flow.py``, with figures in ``benchmarks/RESULTS.md``;
``tests/flows/test_flows.py`` checks that log q, samples and gradients agree with it): the layers run *coordinates first* (y.T, (dim, B)), so the
conditioners are ``W @ h`` on columns and the spline reads its parameters through strided views
with the K bins on the leading dimension; the spline normalises its bins without a softmax and
has a closed-form backward pass (:mod:`.splines`); and, with gradients, each coupling layer
(MLP, spline, rows written back) is a single autograd node (``coupling._CouplingLayer``) with a
hand-written backward pass. Parameters, buffers and state dicts are those of the previous
implementation, so generator files load unchanged. ``torch.compile`` is not used: on CPU it is
not robust enough to be a default path.

>>> import torch
>>> flow = SplineFlow(torch.tensor([True, False]), ["torsion", "bond"],
...                   torch.tensor([0.0, 0.1]), torch.tensor([[-3.2, 3.2], [0.0, 1.0]]),
...                   n_layers=2, hidden=16)
>>> z, log_q = flow.sample(4, torch.Generator().manual_seed(0))
>>> bool(torch.allclose(flow.log_prob(z), log_q))
True
"""
from .coupling import MASKS, CouplingFlow, SplineCoupling
from .priors import Prior
from .scaling import DEFAULT_SCALES, CoordinateScaling
from .spline_flow import SplineFlow
from .splines import IDENTITY_DERIVATIVE, rq_spline

__all__ = ["DEFAULT_SCALES", "IDENTITY_DERIVATIVE", "MASKS", "CoordinateScaling", "CouplingFlow", "Prior",
           "SplineCoupling", "SplineFlow", "rq_spline"]
