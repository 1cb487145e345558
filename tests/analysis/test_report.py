"""The report's opening verdict: target reached or not, the reverse ESS in a word, the φ > 0 basins
lost against a reference, and the one next step."""
from cmt_openmm.analysis.metrics import CONTINUE_TRAINING, training_summary
from cmt_openmm.analysis.report import MCMC_ONLY, render_markdown, verdict


def _report(lam: float, ess: float, n: int = 10_000, flow=None, reference=None) -> dict:
    samples = {"n_draws": 2, "n_samples_per_draw": n // 2, "reverse_ess_pooled": ess, "n_effective": ess * n,
               "reverse_ess": {"median": ess, "min": ess, "max": ess}}
    report = {"system": "ala4", "temperature": 300.0, "training": training_summary(
        [{"step": 9, "lam": lam, "eta": 0.0, "wall_time": 3.0}], "target reached" if lam == 0 else "max_minutes"),
        "samples": samples}
    if flow is not None:
        samples["phi_positive_population"] = flow
        report["reference"] = {"reference_populations": {"phi_positive_population": reference}}
    return report


def _php(*values):
    return {f"residue_{i + 1}": {"value": v} for i, v in enumerate(values)}


def test_a_run_short_of_its_target_is_told_to_continue():
    v = verdict(_report(lam=0.52, ess=0.2))
    assert v["target_reached"] is False and v["quality"] == "good" and v["next_step"] == CONTINUE_TRAINING
    assert v["summary"].startswith("training did not reach its target (λ = 0.52, η = 0); reverse ESS 20.00 % of "
                                   "all 10,000 samples (N_eff = 2,000): good; next step: continue it with")


def test_the_ess_word_and_its_thresholds():
    words = {ess: verdict(_report(lam=0.0, ess=ess))["quality"] for ess in (0.5, 0.1, 0.05, 0.01, 0.005, 0.0005)}
    assert words == {0.5: "good", 0.1: "good", 0.05: "usable", 0.01: "usable", 0.005: "unusable", 0.0005: "unusable"}
    # 0.5 % of 10,000 samples is N_eff = 50 < 100: unusable; of 100,000 samples it is "poor"
    assert verdict(_report(lam=0.0, ess=0.005, n=100_000))["quality"] == "poor"
    assert verdict(_report(lam=0.0, ess=0.005, n=100_000))["next_step"] == MCMC_ONLY
    assert verdict(_report(lam=0.0, ess=0.2))["next_step"].startswith("use its reweighted samples")


def test_a_basin_the_reference_visits_and_the_flow_never_does_is_lost():
    v = verdict(_report(lam=0.0, ess=0.3, flow=_php(0.02, 0.0, 0.0), reference=_php(0.03, 0.01, 0.0)))
    assert v["basins"] == {"in_reference": ["residue_1", "residue_2"], "lost": ["residue_2"]}
    assert v["next_step"] == MCMC_ONLY  # reweighting cannot restore a basin no sample visits
    assert "its samples visit 1 of the 2 φ > 0 basins (by residue) the reference visits, missing residue 2" in v["summary"]
    one_pair = verdict(_report(lam=0.0, ess=0.3, flow={"value": 0.02}, reference={"value": 0.03}))
    assert one_pair["basins"]["lost"] == [] and one_pair["next_step"].startswith("use its reweighted samples")


def test_the_markdown_opens_with_the_verdict():
    report = _report(lam=0.52, ess=0.2)
    report["verdict"] = verdict(report)
    lines = render_markdown({**report, "samples": {}}).splitlines()
    assert lines[2] == f"**Verdict**: {report['verdict']['summary']}"
