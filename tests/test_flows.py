"""Spline flows: exact inverses, log-dets against autograd, circular smoothness, identity at
initialisation, priors and normalisation."""
import math

import pytest
import torch

from cmt_openmm.errors import CMTInputError
from helpers import perturb_parameters
from cmt_openmm.flows import IDENTITY_DERIVATIVE, CouplingFlow, SplineFlow, rq_spline


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


def test_coupling_flow_inverse_logdet_and_seam():
    flow = _toy_flow()
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


def test_bad_settings_refused():
    with pytest.raises(CMTInputError):
        _toy_flow(mask="checkerboard")
    with pytest.raises(CMTInputError):
        _toy_flow(n_bins=1)
    with pytest.raises(CMTInputError):
        SplineFlow(torch.tensor([False]), ["dihedral_sum"], torch.zeros(1), torch.tensor([[-1.0, 1.0]]))
    with pytest.raises(CMTInputError):  # reference on its bound
        SplineFlow(torch.tensor([False]), ["angle"], torch.zeros(1), torch.tensor([[0.0, 1.0]]))
