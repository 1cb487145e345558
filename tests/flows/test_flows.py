"""Spline flows: exact inverses, log-dets against autograd, circular smoothness, identity at
initialisation, priors and normalisation; the fast implementation against the previous one (log q,
samples, gradients, saved state dicts) and the throughput benchmark's smoke run."""
import math
import os
from pathlib import Path

import pytest
import torch

from cmt_openmm.errors import CMTInputError
from helpers import load_script, perturb_parameters
import reference_flow as reference
from cmt_openmm.flows import IDENTITY_DERIVATIVE, CouplingFlow, SplineFlow, rq_spline, spline_kernel, splines
from cmt_openmm.flows.coupling import conditioner_matmuls


def _toy_flow(dtype=torch.float64, **kwargs) -> SplineFlow:
    """dim 5: two torsions, a bond, an angle near pi (clipped interval) and a chiral relative torsion."""
    circular = torch.tensor([True, False, True, False, False])
    kinds = ["torsion", "bond", "torsion", "angle", "relative_torsion"]
    reference = torch.tensor([0.3, 0.11, -2.0, 3.0, 0.2], dtype=torch.float64)
    bounds = torch.tensor([[-math.pi, math.pi], [0.03, 0.3], [-math.pi, math.pi], [0.0, math.pi], [0.0, math.pi]],
                          dtype=torch.float64)
    settings = dict(n_layers=4, hidden=16, n_bins=6, dtype=dtype)
    settings.update(kwargs)
    return SplineFlow(circular, kinds, reference, bounds, **settings)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_rq_spline_inverse_and_logdet(scale):
    gen = torch.Generator().manual_seed(1)
    d, k = 4, 7
    x = torch.rand(200, d, generator=gen, dtype=torch.float64)
    bins = scale * torch.randn(200, d, 2, k, generator=gen, dtype=torch.float64)
    derivs = scale * torch.randn(200, d, k + 1, generator=gen, dtype=torch.float64)
    periodic = torch.tensor([True, False, True, False])
    y, logdet = rq_spline(x, bins, derivs, periodic)
    assert bool(((y >= 0) & (y <= 1)).all())
    x_back, logdet_inv = rq_spline(y, bins, derivs, periodic, inverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-8, rtol=0)
    # log-det against autograd (the map is elementwise: the Jacobian is diagonal)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(rq_spline(xg, bins, derivs, periodic)[0].sum(), xg)
    torch.testing.assert_close(torch.log(grad), logdet, atol=1e-8, rtol=0)


def test_rq_spline_identity_and_circular_ends():
    x = torch.linspace(0, 1, 101, dtype=torch.float64)[:, None].expand(101, 2)
    periodic = torch.tensor([True, False])
    bins = torch.zeros(101, 2, 2, 5, dtype=torch.float64)
    derivs = torch.full((101, 2, 6), IDENTITY_DERIVATIVE, dtype=torch.float64)
    y, logdet = rq_spline(x, bins, derivs, periodic)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros_like(logdet), atol=1e-12, rtol=0)
    # circular: fixed ends and the same slope on both sides of the seam, whatever the parameters
    gen = torch.Generator().manual_seed(2)
    bins = torch.randn(1, 1, 2, 5, generator=gen, dtype=torch.float64).expand(2, 2, 2, 5)
    derivs = torch.randn(1, 1, 6, generator=gen, dtype=torch.float64).expand(2, 2, 6)
    ends = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    y, logdet = rq_spline(ends, bins, derivs, periodic)
    torch.testing.assert_close(y, ends, atol=1e-12, rtol=0)
    assert logdet[0, 0].item() == pytest.approx(logdet[1, 0].item(), abs=1e-12)  # periodic: shared slope
    assert abs(logdet[0, 1].item() - logdet[1, 1].item()) > 1e-3  # interval spline: free end slopes


@pytest.mark.parametrize("linear_bins", [None, 3])
def test_coupling_flow_inverse_logdet_and_seam(linear_bins):
    flow = _toy_flow(linear_bins=linear_bins)
    perturb_parameters(flow, 0.2)
    couplings = flow.couplings
    y0 = flow.prior.sample(64, torch.Generator().manual_seed(3))
    y, logdet = couplings(y0)
    y_back, logdet_inv = couplings.inverse(y)
    torch.testing.assert_close(y_back, y0, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-9, rtol=0)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: couplings(v[None])[0][0], y0[i])
        assert torch.linalg.slogdet(jac)[1].item() == pytest.approx(logdet[i].item(), abs=1e-8)
    # circular coordinates: the map is continuous across the seam at +-pi
    eps = 1e-9
    edge = y0[:1].repeat(2, 1)
    edge[0, 0], edge[1, 0] = math.pi - eps, -math.pi + eps
    out, ld = couplings(edge)
    gap = torch.remainder(out[0] - out[1] + math.pi, 2 * math.pi) - math.pi
    assert gap.abs().max().item() < 1e-6
    assert ld[0].item() == pytest.approx(ld[1].item(), abs=1e-6)


def test_identity_at_initialisation():
    flow = _toy_flow(dtype=torch.float32)
    y0 = flow.prior.sample(100, torch.Generator().manual_seed(4)).float()
    y, logdet = flow.couplings(y0)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=0)  # float32 rounding of the seam rotation
    assert logdet.abs().max().item() < 1e-5
    z, log_q = flow.sample(100, torch.Generator().manual_seed(4))
    expected = flow.prior.log_prob(flow.scaling.to_flow(z)) + flow.scaling.log_det
    torch.testing.assert_close(log_q, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_log_prob_matches_sample_and_support(dtype, tol):
    flow = _toy_flow(dtype=dtype)
    perturb_parameters(flow, 0.1)
    z, log_q = flow.sample(500, torch.Generator().manual_seed(5))
    torch.testing.assert_close(flow.log_prob(z), log_q, atol=tol, rtol=0)
    s = flow.scaling
    lower, upper = s.from_flow(s.lower[None])[0], s.from_flow(s.upper[None])[0]
    assert bool(((z >= lower) & (z <= upper)).all())
    assert bool((z[:, 3] < math.pi).all()) and bool((z[:, 4] > 0).all())  # strictly inside valid bounds
    assert float(upper[3]) < math.pi and float(upper[1]) == pytest.approx(0.11 + 6 * 0.005, abs=1e-6)
    outside = z[:3].clone()
    outside[0, 4], outside[1, 3], outside[2, 1] = -0.1, math.pi + 0.01, 0.5
    assert bool(torch.isneginf(flow.log_prob(outside)).all())


def test_fewer_bins_on_bonds_and_angles_give_the_layout_and_exact_gradients(spline_path):
    """linear_bins: circular rows first, one output block per part, and the layer's hand-written
    backward pass equals finite differences of log q in the parameters and in z."""
    flow = _toy_flow(linear_bins=3, n_layers=6)
    perturb_parameters(flow, 0.1)
    circular = flow.scaling.circular
    for layer in flow.couplings.layers:
        kinds = circular[layer.transformed]
        n_circular = int(kinds.sum())
        assert bool(kinds[:n_circular].all()) and not bool(kinds[n_circular:].any())
        outputs = n_circular * (3 * 6 + 1) + (len(kinds) - n_circular) * (3 * 3 + 1)
        assert layer.net[-1].out_features == outputs
    assert any(0 < int(circular[layer.transformed].sum()) < len(layer.transformed) for layer in flow.couplings.layers)
    z, log_q = flow.sample(64, torch.Generator().manual_seed(11))
    torch.testing.assert_close(flow.log_prob(z), log_q, atol=1e-9, rtol=0)
    gen = torch.Generator().manual_seed(12)
    params = list(flow.parameters())
    directions = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    z_direction = torch.randn(z.shape, generator=gen, dtype=z.dtype) * 1e-3  # small: z stays in its intervals
    z = z.clone().requires_grad_(True)
    total = flow.log_prob(z).sum()
    grads = torch.autograd.grad(total, [*params, z])
    analytic = sum((g * v).sum() for g, v in zip(grads[:-1], directions)).item()
    analytic_z = (grads[-1] * z_direction).sum().item()
    eps = 1e-6
    with torch.no_grad():
        def shifted(sign):
            for p, v in zip(params, directions):
                p.add_(sign * eps * v)
            value = flow.log_prob(z).sum().item()
            for p, v in zip(params, directions):
                p.sub_(sign * eps * v)
            return value
        numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
        numeric_z = (flow.log_prob(z + z_direction * eps / 1e-3).sum() - flow.log_prob(z - z_direction * eps / 1e-3)
                     .sum()).item() / (2 * eps / 1e-3)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-6)
    assert analytic_z == pytest.approx(numeric_z, rel=1e-6, abs=1e-6)


def test_density_integrates_to_one_2d():
    circular = torch.tensor([True, False])
    flow = SplineFlow(circular, ["torsion", "angle"], torch.tensor([0.0, 1.0], dtype=torch.float64),
                      torch.tensor([[-math.pi, math.pi], [0.0, math.pi]], dtype=torch.float64),
                      n_layers=4, hidden=16, n_bins=5, dtype=torch.float64, bound=3.0)
    perturb_parameters(flow, 0.3)
    n = 300  # midpoint rule over the support [lower, upper] of z
    lo, hi = (flow.scaling.from_flow(b[None])[0] for b in (flow.scaling.lower, flow.scaling.upper))
    edges = [torch.linspace(float(lo[i]), float(hi[i]), n + 1, dtype=torch.float64) for i in range(2)]
    centres = [(e[1:] + e[:-1]) / 2 for e in edges]
    grid = torch.stack(torch.meshgrid(*centres, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        p = flow.log_prob(grid).exp()
    mass = p.sum().item() * float((hi - lo).prod()) / n**2
    assert mass == pytest.approx(1.0, abs=1e-3)
    assert p.max().item() > 100.0 * p.min().item()  # the perturbed flow is not the prior


def test_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = _toy_flow(seed=7), _toy_flow(seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = _toy_flow(seed=8)
    assert not torch.equal(a.couplings.layers[0].net[0].weight, c.couplings.layers[0].net[0].weight)


def test_masks_cover_every_coordinate():
    lower, upper = -torch.ones(7), torch.ones(7)
    for mask in ("random", "alternating"):
        flow = CouplingFlow(torch.zeros(7, dtype=torch.bool), lower, upper, n_layers=2, hidden=4, mask=mask)
        seen = torch.cat([layer.transformed for layer in flow.layers]).sort()[0]
        assert seen.tolist() == list(range(7))
    one = CouplingFlow(torch.zeros(1, dtype=torch.bool), -torch.ones(1), torch.ones(1), n_layers=2, hidden=4)
    y, _ = one(torch.zeros(3, 1))
    assert y.shape == (3, 1)


def test_torsions_mask_conditions_every_other_coordinate_on_all_torsions():
    circular = torch.tensor([False, True, False, False, True, False, False, True, False])
    torsions = torch.nonzero(circular).flatten().tolist()
    flow = CouplingFlow(circular, -torch.ones(9), torch.ones(9), n_layers=6, hidden=4, mask="torsions")
    for cycle in (flow.layers[0:3], flow.layers[3:6]):
        assert cycle[0].transformed.tolist() == torsions
        halves = [layer.transformed.tolist() for layer in cycle[1:]]
        assert sorted(halves[0] + halves[1]) == [i for i in range(9) if i not in torsions]
        for layer in cycle[1:]:
            assert layer.cond_circular.tolist() == torsions  # every torsion is an input
    # a new random split of the others every cycle, and an exact inverse
    assert flow.layers[1].transformed.tolist() != flow.layers[4].transformed.tolist()
    tors = _toy_flow(mask="torsions", n_layers=6)
    perturb_parameters(tors, 0.2)
    y0 = tors.prior.sample(32, torch.Generator().manual_seed(1))
    y, logdet = tors.couplings(y0)
    y_back, logdet_inv = tors.couplings.inverse(y)
    torch.testing.assert_close(y_back, y0, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-9, rtol=0)
    # without torsions (a Cartesian toy) it is the random mask
    cartesian = torch.zeros(4, dtype=torch.bool)
    a = CouplingFlow(cartesian, -torch.ones(4), torch.ones(4), n_layers=2, hidden=4, mask="torsions")
    b = CouplingFlow(cartesian, -torch.ones(4), torch.ones(4), n_layers=2, hidden=4, mask="random")
    assert [la.transformed.tolist() for la in a.layers] == [lb.transformed.tolist() for lb in b.layers]


def test_quarters_mask_transforms_each_coordinate_once_per_cycle_of_four():
    """Every cycle of four layers splits the coordinates into four random quarters, one per layer,
    so each transform has three quarters of the others as inputs; a new split every cycle."""
    circular = torch.tensor([i % 3 == 1 for i in range(10)])
    flow = CouplingFlow(circular, -torch.ones(10), torch.ones(10), n_layers=8, hidden=4, mask="quarters")
    cycles = [[layer.transformed.tolist() for layer in flow.layers[c : c + 4]] for c in (0, 4)]
    for cycle in cycles:
        assert sorted(sum(cycle, [])) == list(range(10))
        assert sorted(map(len, cycle)) == [2, 2, 3, 3]
    for layer in flow.layers:
        inputs = set(layer.cond_circular.tolist()) | set(layer.cond_linear.tolist())
        assert inputs == set(range(10)) - set(layer.transformed.tolist()) and len(inputs) >= 7
    assert cycles[0] != cycles[1]
    # the random mask's halves are unchanged by the shared splitting helper
    halves = CouplingFlow(circular, -torch.ones(10), torch.ones(10), n_layers=2, hidden=4, mask="random", seed=3)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert halves.layers[0].transformed.tolist() == sorted(perm[:5].tolist())
    # fewer coordinates than quarters: every layer still transforms one
    tiny = CouplingFlow(torch.tensor([False, True]), -torch.ones(2), torch.ones(2), n_layers=4, hidden=4, mask="quarters")
    assert [len(layer.transformed) for layer in tiny.layers] == [1, 1, 1, 1]


def test_bad_settings_refused():
    with pytest.raises(CMTInputError):
        _toy_flow(mask="checkerboard")
    with pytest.raises(CMTInputError):
        _toy_flow(n_bins=1)
    with pytest.raises(CMTInputError):
        SplineFlow(torch.tensor([False]), ["dihedral_sum"], torch.zeros(1), torch.tensor([[-1.0, 1.0]]))
    with pytest.raises(CMTInputError):  # reference on its bound
        SplineFlow(torch.tensor([False]), ["angle"], torch.zeros(1), torch.tensor([[0.0, 1.0]]))


# --------------------------------------------------------------------------- the fast implementation
# tests/flows/reference_flow.py keeps the implementation as of commit c661161 verbatim (``BaselineSplineFlow``,
# built from a flow with the same weights): the reference the fast one must agree with.

@pytest.mark.parametrize("inverse", [False, True])
def test_rq_spline_values_and_gradients_match_the_reference(inverse):
    gen = torch.Generator().manual_seed(11)
    n, d, k = 300, 4, 7
    periodic = torch.tensor([True, False, False, True])
    x = torch.rand(n, d, generator=gen, dtype=torch.float64)
    bins = torch.randn(n, d, 2, k, generator=gen, dtype=torch.float64)
    derivs = torch.randn(n, d, k + 1, generator=gen, dtype=torch.float64)
    if inverse:  # inputs of the inverse: outputs of the forward map
        x = reference.rq_spline(x, bins, derivs, periodic)[0]
    weights = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    results = []
    for spline in (rq_spline, reference.rq_spline):
        inputs = [t.clone().requires_grad_(True) for t in (x, bins, derivs)]
        out, logdet = spline(*inputs, periodic, inverse)
        grads = torch.autograd.grad((out * weights[0]).sum() + (logdet * weights[1]).sum(), inputs)
        results.append((out, logdet, *grads))
    for new, old in zip(*results):
        torch.testing.assert_close(new, old, atol=1e-9, rtol=1e-9)


@pytest.fixture(params=["kernel", "torch"])
def spline_path(request, monkeypatch):
    """Both implementations of the coupling layers' spline: the compiled loop and the torch operations."""
    if request.param == "torch":
        monkeypatch.setenv("CMT_OPENMM_SPLINE_KERNEL", "0")
    else:
        assert spline_kernel.library() is not None, "the spline kernel did not build (it needs a C++ compiler)"
    return request.param


def _spline_case(k: int, d: int, b: int, dtype: torch.dtype, seed: int):
    """x (D, B), a conditioner output raw (D (3K + 1), B), bins and derivatives as the coupling layers
    view it (strided), and upstream gradients of (out, logdet) (the latter expanded over rows)."""
    gen = torch.Generator().manual_seed(seed)
    raw = 1.5 * torch.randn(d * (3 * k + 1), b, generator=gen, dtype=torch.float64)
    x = torch.rand(d, b, generator=gen, dtype=torch.float64)
    grads = torch.randn(d, b, generator=gen, dtype=torch.float64), torch.randn(b, generator=gen, dtype=torch.float64)
    raw, x, grads = raw.to(dtype), x.to(dtype), [g.to(dtype) for g in grads]
    bins = raw[: 2 * k * d].view(d, 2, k, b).permute(2, 1, 0, 3)
    derivatives = raw[2 * k * d :].view(d, k + 1, b).transpose(0, 1)
    return x, bins, derivatives, grads[0], grads[1].expand(d, b)


def _both_splines(x, bins, derivatives, grad_out, grad_logdet, inverse):
    """(out, logdet, d/dx, d/dbins, d/dderivatives) of the kernel and of the torch operations."""
    assert spline_kernel.library() is not None, "the spline kernel did not build (it needs a C++ compiler)"
    assert spline_kernel.applies(x, bins, derivatives)
    limits = splines._MIN_BIN, splines._MIN_DERIVATIVE
    out, logdet = spline_kernel.forward(x, bins, derivatives, inverse, *limits)
    kernel = (out, logdet, *spline_kernel.backward(x, bins, derivatives, grad_out, grad_logdet, inverse, *limits))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CMT_OPENMM_SPLINE_KERNEL", "0")
        out, logdet, saved = splines.spline_forward(x, bins, derivatives, inverse)
        reference = (out, logdet, *splines.spline_backward(saved, grad_out, grad_logdet.contiguous(), inverse))
    return kernel, reference


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k, d, b", [(8, 30, 256), (3, 2, 70), (16, 5, 1)])
def test_spline_kernel_equals_the_torch_operations_float64(inverse, k, d, b):
    """Values, log-dets and every gradient; blocks of 64 columns with a remainder; strided bins."""
    kernel, reference = _both_splines(*_spline_case(k, d, b, torch.float64, seed=k + d + b), inverse)
    for name, new, old in zip(("out", "logdet", "x", "bins", "derivatives"), kernel, reference):
        assert new.shape == old.shape, name
        torch.testing.assert_close(new, old, atol=1e-10 * float(old.abs().max()), rtol=1e-9, msg=name)


@pytest.mark.parametrize("inverse", [False, True])
def test_spline_kernel_float32_error_is_float32_rounding(inverse):
    """float32: the kernel is as far from the float64 values as the torch operations (rounding: 1e-6-1e-4
    of the largest value, the inverse's root and log-det the most; a wrong formula is off by O(1))."""
    x, bins, derivatives, grad_out, grad_logdet = _spline_case(8, 5, 300, torch.float64, seed=1)
    exact = _both_splines(x, bins, derivatives, grad_out, grad_logdet, inverse)[1]
    kernel, reference = _both_splines(*(t.float() for t in (x, bins, derivatives, grad_out, grad_logdet)), inverse)
    for new, old, truth in zip(kernel, reference, exact):
        scale = float(truth.abs().max())
        error, torch_error = float((new.double() - truth).abs().max()), float((old.double() - truth).abs().max())
        assert error <= max(3.0 * torch_error, 2e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
def test_spline_kernel_gradients_stay_finite_for_extreme_knot_derivatives(dtype, inverse):
    """Unconstrained knot derivatives far below zero (softplus ~ 0, its slope exp(raw) underflowing):
    the kernel's gradients are finite and equal the torch operations' to rounding. Training reaches
    such values; there the slope written as 1 / (1 + exp(-raw)) divides by an overflowed exp, which
    -ffast-math turns into NaN."""
    x, bins, derivatives, grad_out, grad_logdet = _spline_case(8, 4, 100, torch.float64, seed=3)
    # exp(-raw) overflows float32 below -88 and float64 below -709
    extreme = torch.tensor([-800.0, -200.0, -120.0, -90.0, -60.0, -30.0, 0.0, 5.0], dtype=torch.float64)
    knots = torch.arange(derivatives.shape[0]).view(-1, 1, 1)
    derivatives[:, :, :8] = extreme[(knots + torch.arange(8)) % 8].expand(-1, derivatives.shape[1], 8)  # 8 columns
    exact = _both_splines(x, bins, derivatives, grad_out, grad_logdet, inverse)[1]  # float64 torch operations
    kernel, reference = _both_splines(*(t.to(dtype) for t in (x, bins, derivatives, grad_out, grad_logdet)), inverse)
    for name, new, old, truth in zip(("out", "logdet", "x", "bins", "derivatives"), kernel, reference, exact):
        assert torch.isfinite(new).all(), f"the kernel's {name} is not finite"
        error, torch_error = float((new.double() - truth).abs().max()), float((old.double() - truth).abs().max())
        # near-zero slopes make float32 ill-conditioned (the inverse's log-det: ~1e-3 of its scale either
        # way, the operations' order differing); a wrong formula is off by O(1)
        factor, floor = (10.0, 1e-3) if dtype == torch.float32 else (3.0, 1e-9)
        assert error <= max(factor * torch_error, floor * float(truth.abs().max())), name


def test_coupling_layers_run_the_kernel_with_and_without_gradients(monkeypatch):
    """The kernel is used wherever it applies: sampling, log q and both backward passes."""
    assert spline_kernel.library() is not None, "the spline kernel did not build (it needs a C++ compiler)"
    calls = []
    run = spline_kernel._run
    monkeypatch.setattr(spline_kernel, "_run", lambda inverse, backward, *a, **kw: (calls.append((inverse, backward)),
                                                                                     run(inverse, backward, *a, **kw)))
    flow = _toy_flow(n_layers=2)
    z, _ = flow.sample(100)
    (flow.log_prob(z).sum() + flow.rsample(50)[1].sum()).backward()
    assert {(False, False), (True, False), (True, True), (False, True)} <= set(calls)


def test_spline_kernel_refuses_mismatched_gradients():
    """The loop reads and writes through raw pointers: mismatched tensors are refused before it runs."""
    x, bins, derivatives, grad_out, grad_logdet = _spline_case(4, 3, 20, torch.float32, seed=3)
    limits = splines._MIN_BIN, splines._MIN_DERIVATIVE
    for bad in (grad_out.double(), grad_out[:, :10], grad_out[:2]):
        with pytest.raises(ValueError, match="grad_out"):
            spline_kernel.backward(x, bins, derivatives, bad, grad_logdet, False, *limits)
    with pytest.raises(ValueError, match="out_bins"):
        spline_kernel.backward(x, bins, derivatives, grad_out, grad_logdet, False, *limits,
                               out_bins=torch.empty(4, 2, 3, 10))


def test_building_and_loading_the_kernel_leaves_denormals_alone(tmp_path):
    """A fresh build (empty cache) that loads: and the process still has denormal numbers (gcc < 13
    links fast-math libraries with a constructor that flushes them to zero process-wide)."""
    import subprocess
    import sys

    script = ("import numpy, torch; from cmt_openmm.flows import spline_kernel as k; assert k.library() is not None; "
              "print(float((numpy.array([1e-310]) * 0.5)[0]), float(torch.tensor([1e-40]) * 0.5))")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    halves = [float(v) for v in result.stdout.split()]
    assert halves[0] == 5e-311 and halves[1] > 0.0  # not flushed to zero
    assert len(list(tmp_path.rglob("spline_kernel_*.so"))) == 1


def test_a_failing_compiler_leaves_the_torch_operations(monkeypatch, tmp_path):
    flow = _toy_flow(n_layers=2)
    z, _ = flow.sample(50, torch.Generator().manual_seed(2))
    expected = flow.log_prob(z)
    monkeypatch.setattr(spline_kernel, "_LIBRARY", None)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built before
    with pytest.warns(UserWarning, match="spline kernel is unavailable"):
        got = flow.log_prob(z)
    assert spline_kernel.library() is None and not list(tmp_path.rglob("*.so"))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def _agree(new_flow, old_flow, z, atol):
    with torch.no_grad():
        new, old = new_flow.log_prob(z), old_flow.log_prob(z)
    assert torch.equal(torch.isneginf(new), torch.isneginf(old))
    finite = torch.isfinite(old)
    torch.testing.assert_close(new[finite], old[finite], atol=atol, rtol=0)


@pytest.mark.parametrize("mask", ["random", "alternating", "torsions", "quarters"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_toy_flow_matches_the_reference(spline_path, mask, depth):
    flow = _toy_flow(mask=mask, depth=depth, n_layers=6)
    perturb_parameters(flow, 0.1)  # (from ~0.2 some inverses are ill-conditioned: ~1e-9 off in either one)
    old = reference.BaselineSplineFlow(flow)
    z, log_q = flow.sample(400, torch.Generator().manual_seed(6))
    z_old, log_q_old = old.sample(400, torch.Generator().manual_seed(6))
    torch.testing.assert_close(z, z_old, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_q, log_q_old, atol=1e-10, rtol=0)
    _agree(flow, old, z, 1e-10)


@pytest.fixture(scope="module")
def aldp_flows():
    return {dtype: reference.build_flows(dtype=dtype, perturb=0.05) for dtype in (torch.float64, torch.float32)}


def _aldp_points(flow, n=400):
    """Flow samples, samples with a coordinate moved to (just inside) its interval's end, points outside."""
    z, _ = flow.sample(n, torch.Generator().manual_seed(7))
    s = flow.scaling
    lower, upper = s.from_flow(s.lower[None] + 1e-9)[0], s.from_flow(s.upper[None] - 1e-9)[0]
    ends = z[:40].clone()
    columns = torch.arange(40) % flow.dim
    ends[torch.arange(20), columns[:20]] = lower[columns[:20]]
    ends[torch.arange(20, 40), columns[20:]] = upper[columns[20:]]
    outside = z[:3].clone()
    linear = torch.nonzero(~s.circular).flatten()
    outside[0, linear[0]] = upper[linear[0]] + 1.0
    outside[1, linear[1]] = float("nan")
    return torch.cat([z, ends, outside])


def test_aldp_flow_matches_the_reference_float64(spline_path, aldp_flows):
    """log q, samples and gradients (parameters and z) of the fast flow are the old ones to 1e-10."""
    flow, old, _ = aldp_flows[torch.float64]
    assert bool(flow.scaling.circular.any()) and bool((flow.scaling.upper < 6.0).any())  # circular and clipped
    z = _aldp_points(flow)
    _agree(flow, old, z, 1e-10)
    assert int(torch.isneginf(flow.log_prob(z)).sum()) == 2
    zs, log_q = flow.sample(300, torch.Generator().manual_seed(8))
    zs_old, log_q_old = old.sample(300, torch.Generator().manual_seed(8))
    torch.testing.assert_close(zs, zs_old, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_q, log_q_old, atol=1e-10, rtol=0)
    weights = torch.randn(300, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = []  # of log q, with respect to z and to the parameters (the closed-form backward passes)
    for f in (flow, old):
        zg = zs.clone().requires_grad_(True)
        grads.append(torch.autograd.grad((f.log_prob(zg) * weights).sum(), [zg, *f.couplings.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9 * float(b.abs().max()), rtol=1e-7)
    grads = []  # reparameterised samples (reverse KL): gradients through the forward map
    for f in (flow, old):
        zr, lq = f.rsample(200, torch.Generator().manual_seed(10))
        grads.append(torch.autograd.grad((zr ** 2).sum() + lq.sum(), list(f.couplings.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9 * float(b.abs().max()), rtol=1e-7)


def test_aldp_flow_matches_the_reference_float32(spline_path, aldp_flows):
    """float32: differences of float32 rounding (log q ~ 100 summed from ~200 spline log-dets)."""
    flow, old, _ = aldp_flows[torch.float32]
    z = _aldp_points(flow)
    with torch.no_grad():
        new_lp, old_lp = flow.log_prob(z), old.log_prob(z)
    finite = torch.isfinite(old_lp)
    assert torch.equal(torch.isneginf(new_lp), torch.isneginf(old_lp)) and int(finite.sum()) == len(z) - 2
    difference = (new_lp - old_lp)[finite].abs()
    assert float(difference.max()) < 2e-4 and float(difference.median()) < 2e-5
    zs, log_q = flow.sample(300, torch.Generator().manual_seed(8))
    zs_old, log_q_old = old.sample(300, torch.Generator().manual_seed(8))
    torch.testing.assert_close(zs, zs_old, atol=1e-4, rtol=0)
    assert float((log_q - log_q_old).abs().max()) < 2e-4 and float((log_q - log_q_old).abs().median()) < 2e-5


def test_state_dict_of_the_reference_loads():
    """Generator files hold ``flow.state_dict()``: the old layout loads, strictly, with the same densities."""
    from safetensors.torch import load, save

    _, old, _ = reference.build_flows(dtype=torch.float64, perturb=0.05, seed=3)
    fresh, _, _ = reference.build_flows(dtype=torch.float64, perturb=0.0)  # identity flow, same architecture
    fresh.load_state_dict(load(save({k: v.contiguous() for k, v in old.state_dict().items()})), strict=True)
    z, _ = old.sample(200, torch.Generator().manual_seed(4))
    _agree(fresh, old, z, 1e-10)


def test_torsions_mask_flow_can_be_saved():
    """Layers of the torsions mask transform the same indices: their buffers must not share storage."""
    from safetensors.torch import save

    flow = _toy_flow(mask="torsions", n_layers=6)
    save({k: v.contiguous() for k, v in flow.state_dict().items()})


def test_flow_throughput_benchmark_quick(tmp_path):
    import json

    bench = load_script("benchmarks/flow_throughput.py")
    report = bench.main(["--quick", "--out", str(tmp_path / "flow.json")])
    assert json.loads((tmp_path / "flow.json").read_text())["results"] == report["results"]
    row = report["results"][0]
    assert row["batch"] == 256 and row["threads"] == 1
    assert all(row[task][name]["us_per_sample_best"] > 0
               for task in ("train", "sample") for name in ("baseline", "new"))
    assert report["agreement"]["log_prob_max_abs_diff"] < 1e-3


_COMPILED_LOG_PROB = r"""
import torch
from reference_flow import build_flows
flow, _, _ = build_flows()
z, _ = flow.sample(64, torch.Generator().manual_seed(0))
def value_and_grads(fn):
    flow.zero_grad(set_to_none=True)
    log_q = fn(z)
    log_q.sum().backward()
    return log_q.detach(), [p.grad.clone() for p in flow.parameters()]
eager, eager_grads = value_and_grads(flow.log_prob)
compiled, compiled_grads = value_and_grads(torch.compile(flow.log_prob))
print("DIFF", float((eager - compiled).abs().max()),
      max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(eager_grads, compiled_grads)))
"""


@pytest.mark.slow
def test_compiled_log_prob_runs_and_equals_eager():
    """torch.compile of log q with its backward pass (in a subprocess: a crash fails the test, not
    the suite). It crashed with a segmentation fault while the spline read its knot derivatives
    through an ``as_strided`` view, which inductor read out of bounds; traced, it gathers instead."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(reference.__file__).resolve().parent  # python -c puts its folder on the path
    proc = subprocess.run([sys.executable, "-c", _COMPILED_LOG_PROB], capture_output=True, text=True, cwd=here,
                          timeout=900)
    assert proc.returncode == 0, f"compiled log q failed (return code {proc.returncode}): {proc.stderr[-2000:]}"
    result = [line for line in proc.stdout.splitlines() if line.startswith("DIFF")][0]
    log_q_diff, grad_diff = map(float, result.split()[1:])
    assert log_q_diff < 1e-3 and grad_diff < 1e-3  # float32 flow; fused kernels round differently


def test_bfloat16_conditioners_keep_densities_and_gradients_close(spline_path, aldp_flows):
    """Inside conditioner_matmuls(bfloat16): log q and its gradients (parameters and z, the
    hand-written backward) stay within bfloat16 rounding of float32's; outside, float32 again."""
    flow, old, _ = aldp_flows[torch.float32]
    zs, _ = flow.sample(300, torch.Generator().manual_seed(8))
    weights = torch.randn(300, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def log_q_and_grads():
        zg = zs.clone().requires_grad_(True)
        log_q = flow.log_prob(zg)
        return log_q.detach(), torch.autograd.grad((log_q * weights).sum(), [zg, *flow.couplings.parameters()])

    exact_lq, exact_grads = log_q_and_grads()
    with conditioner_matmuls(flow, torch.bfloat16):
        lq, grads = log_q_and_grads()
    difference = (lq - exact_lq).abs()
    assert 1e-5 < float(difference.max()) < 0.05  # bfloat16 is in use, and only rounds
    for a, b in zip(grads, exact_grads):
        assert a.dtype == b.dtype
        assert float((a - b).norm()) < 0.05 * float(b.norm()), float((a - b).norm() / b.norm())  # seen: <= 0.02
    assert torch.equal(flow.log_prob(zs), exact_lq)  # the block restored float32
