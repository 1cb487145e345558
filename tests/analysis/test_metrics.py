"""Metrics: ESS/EUBO estimators on known weights, Ramachandran angles and histograms, basins."""
import math

import mdtraj as md
import numpy as np
import pytest
import torch
from openmmtools.testsystems import AlanineDipeptideVacuum

from cmt_openmm.analysis.metrics import (histogram_kl, histogram_tv, phi_transitions, ramachandran_histogram,
                                        ramachandran_tv)
from cmt_openmm.coordinates.backbone import backbone_dihedrals, ramachandran_angles
from cmt_openmm.importance import eubo, forward_ess, reverse_ess
from cmt_openmm.sampling.estimators import (ALDP_BASINS, ALDP_HALVES, aldp_basins, basin_free_energies,
                                           basin_indicators, basin_populations, statistical_inefficiency, weighted_mean)
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


def test_phi_transitions_count_core_to_core_crossings_per_residue():
    neg, pos = -1.2, 1.0  # radians: inside the φ < 0 and φ > 0 cores
    phi = np.full((40, 3), neg)
    phi[10:15, 0] = pos  # residue 1: one visit to φ > 0, there and back
    phi[20:30, 1] = pos
    phi[32, 1] = 0.1  # residue 2: a step just past φ = 0, outside both cores, is no transition
    phi[[5, 7], 2] = 0.3  # residue 3: recrossings inside the buffer...
    phi[8:, 2] = 3.0  # ...and C5 across ±180° (in the φ < 0 core): none counted
    assert phi_transitions(phi) == [2, 2, 0]
    assert phi_transitions(phi[:, 0]) == [2]  # one series (T,)
    assert phi_transitions(np.full((5, 2), 0.1)) == [0, 0]  # never in a core


def test_a_chain_population_needs_transitions_before_it_is_reliable():
    """Two residues over 6,000 frames: one hops between φ cores every 50 frames (119 transitions),
    the other visits φ > 0 once for 3 frames. N / g of the second is large (its indicator is almost
    constant), but two transitions are one visit: unreliable, and rendered without an error bar."""
    from cmt_openmm.analysis.metrics import MIN_TRANSITIONS, chain_populations
    from cmt_openmm.analysis.report import md_population_text

    n = 6_000
    phi = np.full((n, 2), -1.2)
    phi[(np.arange(n) // 50) % 2 == 1, 0] = 1.0
    phi[3000:3003, 1] = 1.0
    pairs = np.stack([phi, np.zeros_like(phi)], axis=-1)
    php = chain_populations(pairs, phi, kT=1.0)["phi_positive_population"]
    hopping, once = php["residue_1"], php["residue_2"]
    assert (hopping["transitions"], once["transitions"]) == (119, 2) and MIN_TRANSITIONS == 20
    assert hopping["reliable"] is True and hopping["value"] == pytest.approx(0.5)
    assert once["n_effective"] > 100 and once["reliable"] is False  # N / g alone would call it reliable
    assert md_population_text(once) == "0.0005 (unreliable: 2 φ transitions)"
    never = chain_populations(pairs[:, 1:], phi[:, 1:2] * 0 - 1.2, kT=1.0)["phi_positive_population"]
    assert md_population_text(never) == "never visited (unreliable: 0 φ transitions)"
    assert " ± " in md_population_text(hopping) and "unreliable" not in md_population_text(hopping)


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


# A 1-D setup with a known truth, numpy only: x ~ q = N(0.3, 1.3²) weighted towards p = N(0, 1),
# and "angles" φ = 2 arctan(x) (ψ = 0), so that each φ box is an x interval with a known mass.
HALF_BASINS = {
    "neg": ((-math.pi, 0.0), (-math.pi, math.pi)),  # x < 0: 0.5
    "low": ((0.0, math.pi / 2), (-math.pi, math.pi)),  # 0 ≤ x < 1: 0.3413
    "high": ((math.pi / 2, -math.pi), (-math.pi, math.pi)),  # x ≥ 1: 0.1587
}


def _weighted_draw(rng, n, mu=0.3, s=1.3):
    x = rng.normal(mu, s, n)
    log_w = -0.5 * x**2 + 0.5 * ((x - mu) / s) ** 2
    return x, np.exp(log_w - log_w.max()), np.stack([2 * np.arctan(x), np.zeros(n)], axis=1)


def test_basin_free_energy_errors_match_repeated_sampling():
    """ΔF errors include the (negative) covariance of disjoint basins: over independent draws the
    spread of ΔF equals the mean reported error (dropping the covariance: 1.33× / 1.17× too small)."""
    rng = np.random.default_rng(10)
    values, errors = [], []
    for _ in range(1000):
        _, w, angles = _weighted_draw(rng, 1000)
        f = basin_free_energies(angles, w, HALF_BASINS, reference="neg")
        values.append([f["low"].value, f["high"].value])
        errors.append([f["low"].error, f["high"].error])
    ratio = np.std(values, axis=0, ddof=1) / np.mean(errors, axis=0)
    np.testing.assert_allclose(ratio, 1.0, atol=0.1)


def test_basin_free_energies_values_reference_and_refusals():
    rng = np.random.default_rng(11)
    _, w, angles = _weighted_draw(rng, 4000)
    pops = basin_populations(angles, w, HALF_BASINS)
    f = basin_free_energies(angles, w, HALF_BASINS)  # default reference: the most populated ("neg")
    assert f["neg"] == (0.0, 0.0)
    assert f["low"].value == pytest.approx(-math.log(pops["low"].value / pops["neg"].value), rel=1e-12)
    assert 0 < f["low"].error < 0.1
    f_kj = basin_free_energies(angles, w, HALF_BASINS, kT=2.494, reference="low")
    assert f_kj["neg"].value == pytest.approx(-2.494 * f["low"].value)
    assert f_kj["neg"].error == pytest.approx(2.494 * f["low"].error)
    boot = basin_free_energies(angles, w, HALF_BASINS, error="bootstrap", n_bootstrap=200, seed=1)
    assert boot["low"].value == f["low"].value and boot["low"].error == pytest.approx(f["low"].error, rel=0.25)
    empty = {**HALF_BASINS, "none": ((3.0, 3.1), (1.0, 1.1))}
    f = basin_free_energies(angles, w, empty)
    assert f["none"] == (math.inf, math.inf)
    with pytest.raises(CMTInputError, match="empty"):
        basin_free_energies(angles, w, empty, reference="none")
    with pytest.raises(CMTInputError, match="not one of"):
        basin_free_energies(angles, w, HALF_BASINS, reference="C5")


def _ar1(rng, rho, n):
    e = rng.normal(size=n)
    x = np.empty(n)
    x[0] = e[0] / math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + e[t]
    return x


def test_correlated_error_of_an_ar1_series_matches_the_analytic_one():
    """AR(1), ρ = 0.9: Var(mean) ≈ σ² g / N with σ² = 1/(1−ρ²) and g = (1+ρ)/(1−ρ) = 19."""
    rho, n = 0.9, 50_000
    x = _ar1(np.random.default_rng(12), rho, n)
    analytic = math.sqrt((1 / (1 - rho**2)) * (1 + rho) / (1 - rho) / n)
    corr = weighted_mean(x, error="correlated")
    assert corr.value == pytest.approx(np.mean(x), rel=1e-12)
    assert corr.error == pytest.approx(analytic, rel=0.1)
    assert statistical_inefficiency(x) == pytest.approx((1 + rho) / (1 - rho), rel=0.15)
    assert weighted_mean(x).error < 0.3 * analytic  # the i.i.d. error is ~4.4× too small here
    # independent samples: g ≈ 1, the correlated error is the i.i.d. one; constants give g = 1
    iid = np.random.default_rng(13).normal(size=20_000)
    assert weighted_mean(iid, error="correlated").error == pytest.approx(weighted_mean(iid).error, rel=0.1)
    assert statistical_inefficiency(np.ones(100)) == 1.0
    vec = weighted_mean(np.stack([x, iid[:1] + 0 * x], axis=1), error="correlated")
    assert vec.error.shape == (2,) and vec.error[0] == pytest.approx(corr.error) and vec.error[1] < 1e-12


def test_reference_populations_use_correlated_errors():
    """MD frames (weights=None) get errors from the statistical inefficiency; weighted samples the
    delta method; every estimate carries its effective sample count and a reliability flag."""
    from cmt_openmm.analysis.metrics import peptide_populations

    rng = np.random.default_rng(14)
    phi = wrap_angle(np.cumsum(0.05 * rng.normal(size=20_000)))  # a slow walk: strongly correlated basins
    psi = wrap_angle(rng.uniform(-np.pi, np.pi, 20_000))
    angles = np.stack([phi, psi], axis=1)[:, None]
    ref = peptide_populations(angles, None, kT=2.494)
    assert "statistical inefficiency" in ref["error_method"]
    ind = basin_indicators(angles[:, 0], ALDP_BASINS)["C7eq"].astype(float)
    iid = weighted_mean(ind)
    corr = ref["basin_populations"]["C7eq"]
    assert corr["value"] == pytest.approx(iid.value)
    assert corr["error"] == pytest.approx(weighted_mean(ind, error="correlated").error)
    assert corr["error"] > 3 * iid.error  # the i.i.d. error is far too small on these frames
    assert corr["n_effective"] == pytest.approx(20_000 / statistical_inefficiency(ind))
    assert corr["reliable"] is (corr["n_effective"] >= 100)
    assert all("reliable" in v for v in ref["basin_free_energies_kT"].values())
    weighted = peptide_populations(angles, np.ones(20_000), kT=2.494)
    assert weighted["basin_populations"]["C7eq"]["error"] == pytest.approx(iid.error)
    inside = basin_indicators(angles[:, 0], ALDP_BASINS)["C7eq"]
    assert weighted["basin_populations"]["C7eq"]["n_effective"] == pytest.approx(min(inside.sum(), (~inside).sum()))
    assert "Kish" in weighted["error_method"]


def test_a_rare_state_carried_by_few_samples_is_unreliable_whatever_the_draw_s_ess():
    """q = N(0, 1) towards p = 0.97 N(0, 1) + 0.03 N(4, 0.6²): the bulk's weights are even
    (N·ESS in the thousands) but the tail state x > 2 ("φ > 0" here) holds p's 3 % on a few
    samples of huge weight. Its 1σ delta-method intervals cover the truth far less than 68 %, and
    its population is marked unreliable with the state's own effective count, not the draw's."""
    from scipy.stats import norm

    from cmt_openmm.analysis.metrics import peptide_populations, state_effective_samples
    from cmt_openmm.sampling.estimators import effective_samples

    rng = np.random.default_rng(21)
    truth = 0.97 * norm.sf(2.0) + 0.03 * norm.sf(2.0, 4.0, 0.6)
    n, covered, flags, n_state, n_draw = 4000, [], [], [], []
    for _ in range(200):
        x = rng.normal(size=n)
        w = (0.97 * norm.pdf(x) + 0.03 * norm.pdf(x, 4.0, 0.6)) / norm.pdf(x)
        angles = np.stack([np.where(x > 2.0, 1.0, -1.0), np.zeros(n)], axis=1)[:, None]
        php = peptide_populations(angles, w, kT=1.0)["phi_positive_population"]
        covered.append(abs(php["value"] - truth) <= php["error"])
        flags.append(php["reliable"])
        n_state.append(php["n_effective"])
        n_draw.append(effective_samples(w))
    assert np.median(n_draw) > 1000 and np.median(n_state) < 40
    assert np.mean(covered) < 0.45  # the error bar does not hold: the flag is needed
    assert np.mean(flags) < 0.05
    assert n_state[-1] == pytest.approx(state_effective_samples(w / w.sum(), x > 2.0))
    # even weights: each side's count is its number of samples
    even = np.full(10, 0.1)
    assert state_effective_samples(even, np.arange(10) < 3) == pytest.approx(3.0)


def test_report_says_which_populations_are_thin_and_how_many_samples_would_lift_them():
    """A reliable draw with a population resting on ~10 effective samples gets one line saying so
    and the `evaluate --n` that would lift it to 100 (effective counts grow with N)."""
    from cmt_openmm.analysis.report import render_markdown

    ess = {"median": 0.5, "min": 0.5, "max": 0.5, "draws": [0.5]}
    thin = {"value": 0.02, "error": 0.01, "n_effective": 12.5, "reliable": False}
    samples = {"n_draws": 5, "n_samples_per_draw": 5000, "reverse_ess": ess, "reverse_ess_clipped": ess,
               "clip_fraction": 1e-4, "failed_energies": 0, "chirality_flips": 0, "n_effective": 12_500.0,
               "min_effective_samples": 100.0, "reliable": True,
               "phi_positive_population": {"residue_1": thin, "residue_2": {**thin, "n_effective": 400.0, "reliable": True},
                                           "residue_3": {"value": 0.0, "error": None, "n_effective": 12_500.0,
                                                         "reliable": False, "seen_in": "none"}}}
    md = render_markdown({"system": "ala4", "temperature": 300.0, "run_dir": "runs/a4", "samples": samples})
    assert ("- 1 population(s) rest on fewer than 100 effective samples inside or outside their basin (fewest: 12) "
            "although the whole draw has 12,500") in md
    assert "about 8× the samples would lift the fewest to 100 (`cmt-openmm evaluate runs/a4 --n 40000`)" in md
    from cmt_openmm.analysis.report import verdict
    assert "1 basin population(s) rest on fewer than 100 effective samples (fewest: 12; see Samples)" in verdict(
        {"samples": {**samples, "reverse_ess_pooled": 0.5}})["summary"]
    samples["phi_positive_population"]["residue_1"] = {**thin, "n_effective": 0.5}
    assert "train longer, or use the generator inside MCMC moves" in render_markdown({"samples": samples})
    samples["phi_positive_population"]["residue_1"] = {**thin, "n_effective": 400.0, "reliable": True}
    assert "population(s) rest on" not in render_markdown({"samples": samples})  # nothing thin: no line


def test_low_ess_estimates_are_reported_as_unreliable():
    """A population resting on ~1.5 effective samples is "unreliable (N_eff = 1.5)" in report.md,
    with "reliable": false and the effective count in report.json, never "0.0000 ± 0.0000"."""
    from cmt_openmm.analysis.metrics import peptide_populations
    from cmt_openmm.analysis.report import render_markdown

    rng = np.random.default_rng(15)
    angles = rng.uniform(-np.pi, np.pi, size=(10_000, 1, 2))
    angles[:, 0, 0] = -np.abs(angles[:, 0, 0]) - 1e-3  # no sample in φ > 0
    w = np.full(10_000, 1e-12)
    w[:2] = [1.0, 0.5]  # two samples carry the weight: N_eff = (1.5)² / 1.25 = 1.8
    pops = peptide_populations(angles, w, kT=1.0)
    php = pops["phi_positive_population"]
    assert php["reliable"] is False and php["n_effective"] == pytest.approx(1.8, rel=1e-6)
    assert php["value"] == 0.0
    unseen = peptide_populations(angles, None, kT=1.0)["phi_positive_population"]
    assert unseen["reliable"] is False and unseen["seen_in"] == "none" and unseen["error"] is None  # not 0 ± 0
    ess = {"median": 1.8e-4, "min": 1.8e-4, "max": 1.8e-4, "draws": [1.8e-4]}
    report = {"system": "aldp-vacuum", "temperature": 300.0,
              "samples": {"n_draws": 1, "n_samples_per_draw": 10_000, "reverse_ess": ess, "reverse_ess_clipped": ess,
                          "clip_fraction": 1e-4, "failed_energies": 0, "chirality_flips": 0, "n_effective": 1.8,
                          "min_effective_samples": 100.0, "reliable": False, **pops}}
    md = render_markdown(report)
    assert "unreliable (N_eff = 1.8)" in md and "0.0000 ± 0.0000" not in md
    assert "φ > 0 basin (αL ∪ C7ax, 0° ≤ φ < 120°) population, reweighted: unreliable (N_eff = 1.8)" in md
    report["samples"].update(n_effective=5000.0, reliable=True, **peptide_populations(angles, None, kT=1.0))
    md = render_markdown(report)
    assert "unreliable (N_eff" not in md and " ± " in md
    assert "population, reweighted: 0 (no samples; N_eff = 10,000)" in md  # not "0.0000 ± 0.0000" either
    # a reference from few effective MD frames keeps its value, flagged, with the error method named
    slow = np.stack([wrap_angle(np.cumsum(0.05 * rng.normal(size=5000))), np.zeros(5000)], axis=1)[:, None]
    ref = peptide_populations(slow, None, kT=1.0)
    report["reference"] = {"n_reference": 5000, "forward_ess": 0.1, "eubo": -200.0, "reference_populations": ref}
    md = render_markdown(report)
    php = ref["phi_positive_population"]
    assert php["reliable"] is False
    assert f"| {php['value']:.4f} ± {php['error']:.4f} (unreliable: N_eff = " in md  # the reference MD column
    assert "pymbar.timeseries.statistical_inefficiency" in md


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


def test_a_run_that_did_not_reach_its_target_says_so_and_what_to_do():
    from cmt_openmm.analysis.metrics import training_summary
    from cmt_openmm.analysis.report import render_markdown

    short = training_summary([{"step": 9, "lam": 0.52, "eta": 0.0, "wall_time": 3.0}], "max_minutes")
    assert short["target_reached"] is False and "λ = 0.52 > 0" in short["verdict"] and "--resume" in short["verdict"]
    md = render_markdown({"system": "ala4", "temperature": 300.0, "training": short})
    assert "**not finished**: training stopped (max_minutes) before the path reached the target" in md
    done = training_summary([{"step": 9, "lam": 0.0, "eta": 0.0, "wall_time": 3.0}], "target reached")
    assert done["target_reached"] is True and "verdict" not in done
    assert "not finished" not in render_markdown({"system": "ala4", "temperature": 300.0, "training": done})
    assert "target_reached" not in training_summary([{"step": 3, "loss": 1.0, "wall_time": 1.0}], "budget")


def test_an_uncapped_peptides_c_terminal_phi_is_counted_and_reweighted(tmp_path, monkeypatch):
    """ELIL (zwitterion, no caps) has three backbone φ but two (φ, ψ) pairs: the report's φ > 0 counts
    cover all three, its C-terminal leucine's (no ψ) included, equal to mdtraj's φ, both from an
    ensemble with positions and from the weights-only draw the report keeps; MD frames' populations
    cover it too."""
    from cmt_openmm import BoltzmannGenerator, get_target, reweight
    from cmt_openmm.analysis.metrics import md_populations, sample_metrics

    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    target = get_target("elil")
    bg = BoltzmannGenerator.build(target, n_layers=1, hidden=4, seed=0)
    draw = dict(seed=0, batch_size=150, progress=False, min_effective_samples=0)  # 3 blocks of angles
    full, lean = reweight(bg, target, 400, **draw), reweight(bg, target, 400, positions=False, **draw)
    _, phi = md.compute_phi(md.Trajectory(full.positions, md.Topology.from_openmm(target.topology)))
    in_basin = (phi >= 0) & (phi < 2 * np.pi / 3)
    assert phi.shape[1] == 3 and full.ramachandran_angles().shape[1] == 2
    assert 0 < in_basin[:, 2].sum() < len(phi)  # the untrained flow puts samples on both sides
    expected = {f"residue_{i + 1}": int(n) for i, n in enumerate(in_basin.sum(axis=0))}
    assert sample_metrics(full)["phi_positive_samples"] == expected
    assert sample_metrics(lean)["phi_positive_samples"] == expected
    assert sample_metrics(lean)["phi_residues"] == ["LEU2", "ILE3", "LEU4"]
    frames = md_populations(target, full.positions)["phi_positive_population"]
    assert list(frames) == list(expected)
    assert [frames[k]["value"] for k in frames] == pytest.approx(in_basin.mean(axis=0).tolist(), abs=1e-12)
