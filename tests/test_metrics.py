"""Metrics: ESS/EUBO estimators on known weights, Ramachandran angles and histograms, basins."""
import math

import mdtraj as md
import numpy as np
import pytest
import torch
from openmmtools.testsystems import AlanineDipeptideVacuum

from cmt_openmm.analysis.metrics import histogram_kl, histogram_tv, ramachandran_histogram, ramachandran_tv
from cmt_openmm.coordinates.backbone import backbone_dihedrals, ramachandran_angles
from cmt_openmm.importance import eubo, forward_ess, reverse_ess
from cmt_openmm.sampling.estimators import ALDP_BASINS, ALDP_HALVES, Estimate, aldp_basins, basin_free_energies, basin_indicators, basin_populations, weighted_mean
from cmt_openmm.units import wrap_angle
from cmt_openmm.errors import CMTInputError


@pytest.fixture(scope="module")
def aldp():
    ts = AlanineDipeptideVacuum(constraints=None)
    x = np.asarray(ts.positions.value_in_unit(ts.positions.unit), dtype=np.float64)
    return ts.topology, x


def test_reverse_ess_uniform_dominant_and_failed():
    assert reverse_ess(np.full(100, -3.7)) == pytest.approx(1.0)
    lw = np.full(100, -50.0)
    lw[7] = 0.0
    assert reverse_ess(lw) == pytest.approx(1.0 / 100, rel=1e-12)
    # two equal weights, the rest failed (-inf): ESS = 2 / N
    lw = np.full(10, -np.inf)
    lw[:2] = 1.0
    assert reverse_ess(torch.tensor(lw)) == pytest.approx(0.2)
    assert reverse_ess(np.full(5, -np.inf)) == 0.0
    with pytest.raises(CMTInputError):
        reverse_ess(np.array([0.0, np.nan]))


def test_reverse_ess_matches_formula_and_clipping():
    rng = np.random.default_rng(0)
    lw = rng.normal(size=1000) * 2
    w = np.exp(lw)
    assert reverse_ess(lw) == pytest.approx(w.sum() ** 2 / (1000 * (w**2).sum()), rel=1e-10)
    # clip_fraction 0.01 of 1000: the 10 largest set to the 11th largest
    clipped = np.sort(lw)
    clipped[-10:] = clipped[-11]
    wc = np.exp(clipped)
    assert reverse_ess(lw, clip_fraction=0.01) == pytest.approx(wc.sum() ** 2 / (1000 * (wc**2).sum()), rel=1e-10)
    assert reverse_ess(lw, clip_fraction=0.01) > reverse_ess(lw)
    # fewer samples than 1/fraction: nothing clipped
    assert reverse_ess(lw[:50], clip_fraction=1e-4) == reverse_ess(lw[:50])
    assert reverse_ess(lw, clip_fraction=1.0) == pytest.approx(1.0)
    with pytest.raises(CMTInputError):
        reverse_ess(lw, clip_fraction=1.5)


def test_forward_ess_and_eubo_on_exact_gaussians():
    # p = N(0, 1), q = N(0, s^2): reverse ESS = (E_q w)^2 / E_q w^2 = sqrt(2 s^2 - 1) / s^2 (s^2 > 1/2)
    rng = np.random.default_rng(1)
    s = 1.3
    x = rng.normal(size=200_000)
    log_p = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    log_q = -0.5 * (x / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    exact = math.sqrt(2 * s**2 - 1) / s**2
    assert forward_ess(log_p - log_q) == pytest.approx(exact, rel=0.01)
    # EUBO with normalised p = KL(p || q) = log s + 1/(2 s^2) - 1/2
    assert eubo(log_p, log_q) == pytest.approx(math.log(s) + 0.5 / s**2 - 0.5, abs=0.005)
    assert forward_ess(np.zeros(10)) == pytest.approx(1.0)
    assert forward_ess(np.array([0.0, np.inf])) == 0.0
    assert eubo(np.zeros(3), np.array([0.0, -np.inf, 0.0])) == math.inf


def test_backbone_dihedrals_and_reference_angles(aldp):
    top, x = aldp
    assert backbone_dihedrals(top) == [((4, 6, 8, 14), (6, 8, 14, 16))]
    assert backbone_dihedrals(md.Topology.from_openmm(top)) == backbone_dihedrals(top)
    angles = ramachandran_angles(top, x[None])
    assert angles.shape == (1, 1, 2)
    # openmmtools' alanine dipeptide is the extended C5 structure, phi = psi = 180 deg (-> -pi)
    np.testing.assert_allclose(np.abs(angles), np.pi, atol=1e-4)
    assert basin_indicators(angles, ALDP_BASINS)["C5"].all()


def test_ramachandran_angles_agree_with_mdtraj(aldp):
    top, x = aldp
    rng = np.random.default_rng(2)
    xs = x[None] + 0.03 * rng.normal(size=(50, *x.shape))
    angles = ramachandran_angles(top, torch.tensor(xs))
    traj = md.Trajectory(xs, md.Topology.from_openmm(top))
    ref = np.stack([md.compute_phi(traj)[1][:, 0], md.compute_psi(traj)[1][:, 0]], axis=1)
    diff = wrap_angle(angles[:, 0] - ref)
    np.testing.assert_allclose(diff, 0.0, atol=1e-4)
    assert (angles >= -np.pi).all() and (angles < np.pi).all()


def test_no_backbone_is_refused():
    import openmm.app as app

    top = app.Topology()
    res = top.addResidue("X", top.addChain())
    top.addAtom("P", None, res)
    assert backbone_dihedrals(top) == []
    with pytest.raises(CMTInputError):
        ramachandran_angles(top, np.zeros((1, 1, 3)))


def test_histograms_tv_kl():
    rng = np.random.default_rng(3)
    a = rng.uniform(-np.pi, np.pi, size=(5000, 2))
    h = ramachandran_histogram(a, bins=20)
    assert h.shape == (20, 20) and h.sum() == pytest.approx(1.0)
    assert histogram_tv(h, h) == 0.0 and histogram_kl(h, h) == pytest.approx(0.0, abs=1e-12)
    # a point mass in one bin vs another: TV 1
    p = np.zeros((4, 4)); p[0, 0] = 1
    q = np.zeros((4, 4)); q[3, 3] = 1
    assert histogram_tv(p, q) == 1.0
    assert histogram_kl(p, q) == pytest.approx(math.log(1 / 1e-10), rel=1e-6)
    # KL of two known distributions
    p = np.array([0.5, 0.5]); q = np.array([0.9, 0.1])
    assert histogram_kl(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)
    # weights move the mass; stacked pairs give one histogram per pair; +pi wraps to -pi
    pts = np.array([[0.1, 0.1], [-3.0, 3.0], [np.pi, np.pi]])
    h = ramachandran_histogram(pts, weights=[3.0, 1.0, 0.0], bins=10)
    assert h[5, 5] == pytest.approx(0.75) and h[0, 9] == pytest.approx(0.25)
    h3 = ramachandran_histogram(np.stack([pts, pts], axis=1), weights=[1.0, 1.0, 2.0], bins=10)
    assert h3.shape == (2, 10, 10) and h3[1, 0, 0] == pytest.approx(0.5)
    assert histogram_tv(h3, h3, axis=(-2, -1)).shape == (2,)
    assert ramachandran_tv(a[:, None], a[:, None], bins=20) == 0.0
    with pytest.raises(CMTInputError):
        histogram_tv(np.zeros(3), np.zeros(4))


def test_basins_partition_and_populations():
    rng = np.random.default_rng(4)
    a = rng.uniform(-np.pi, np.pi, size=(20000, 2))
    ind = basin_indicators(a, ALDP_BASINS)
    total = sum(v.astype(int) for v in ind.values())
    assert (total == 1).all()  # the named basins partition the torus
    centres = {"C5": (-155, 160), "C7eq": (-83, 73), "alphaR": (-70, -40), "alphaL": (60, 40), "C7ax": (70, -70)}
    for name, (phi, psi) in centres.items():
        assert basin_indicators(np.radians([[phi, psi]]), ALDP_BASINS)[name][0]
    halves = basin_indicators(np.radians([[-10, 0], [10, 0], [179.9, 0]]), ALDP_HALVES)
    assert halves["phi<0"].tolist() == [True, False, False] and halves["phi>0"].tolist() == [False, True, True]
    assert set(aldp_basins(include_halves=True)) == set(ALDP_BASINS) | set(ALDP_HALVES)

    # populations: uniform angles -> box areas; weights move the mass
    pops = basin_populations(a)
    area_ax = (120 / 360) * (190 / 360)
    assert pops["C7ax"].value == pytest.approx(area_ax, abs=4 * pops["C7ax"].error)
    assert pops["C7ax"].error == pytest.approx(math.sqrt(area_ax * (1 - area_ax) / 20000), rel=0.05)
    w = np.where(ind["alphaL"], 1.0, 0.0)
    w[0] = 1.0 if not ind["alphaL"][0] else w[0]
    pops_w = basin_populations(a, weights=w, error="bootstrap", n_bootstrap=100, seed=0)
    n_l = ind["alphaL"].sum()
    assert pops_w["alphaL"].value == pytest.approx(n_l / w.sum())
    assert 0 < pops_w["alphaL"].error < 0.01


def test_basin_free_energies():
    pops = {"a": Estimate(0.8, 0.01), "b": Estimate(0.2, 0.01), "c": Estimate(0.0, 0.0)}
    f = basin_free_energies(pops)
    assert f["a"] == (0.0, 0.0)
    assert f["b"].value == pytest.approx(math.log(4.0))
    assert f["b"].error == pytest.approx(math.hypot(0.01 / 0.2, 0.01 / 0.8))
    assert f["c"].value == math.inf
    f_kj = basin_free_energies(pops, kT=2.494, reference="b")
    assert f_kj["a"].value == pytest.approx(-2.494 * math.log(4.0))
    with pytest.raises(CMTInputError):
        basin_free_energies(pops, reference="c")


def test_weighted_mean_errors_agree():
    rng = np.random.default_rng(5)
    x = rng.normal(size=4000)
    lw = -0.5 * x**2  # weights that pull the mean towards 0
    w = np.exp(lw)
    d = weighted_mean(x + 1.0, w, error="delta")
    b = weighted_mean(x + 1.0, w, error="bootstrap", n_bootstrap=300, seed=1)
    assert d.value == b.value == pytest.approx(1.0, abs=4 * d.error)
    assert b.error == pytest.approx(d.error, rel=0.2)
    vec = weighted_mean(np.stack([x, 2 * x], axis=1), w)
    assert vec.value.shape == (2,) and vec.error[1] == pytest.approx(2 * vec.error[0])
