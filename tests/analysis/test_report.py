"""The report: its opening verdict (target reached or not, the reverse ESS in a word, the φ > 0
basins lost against a reference, the one next step) and every residue's φ > 0 population beside
the reference's."""
import json

import numpy as np

from cmt_openmm.analysis.metrics import continue_training, peptide_populations, training_summary
from cmt_openmm.analysis.report import MCMC_ONLY, USE_SAMPLES, mcmc_only, render_markdown, verdict


def _report(lam: float, ess: float, n: int = 10_000, flow_samples=None, reference=None) -> dict:
    """A report's training and samples parts; ``flow_samples``: flow samples in φ > 0 by residue."""
    samples = {"n_draws": 2, "n_samples_per_draw": n // 2, "reverse_ess_pooled": ess, "n_effective": ess * n,
               "reverse_ess": {"median": ess, "min": ess, "max": ess}}
    report = {"system": "ala4", "temperature": 300.0, "training": training_summary(
        [{"step": 9, "lam": lam, "eta": 0.0, "wall_time": 3.0}], "target reached" if lam == 0 else "max_minutes"),
        "samples": samples}
    if flow_samples is not None:
        samples["phi_positive_samples"] = flow_samples
        report["reference"] = {"reference_populations": {"phi_positive_population": reference}}
    return report


def _php(*values):
    return {f"residue_{i + 1}": {"value": v} for i, v in enumerate(values)}


def test_a_run_short_of_its_target_is_told_to_continue():
    v = verdict(_report(lam=0.52, ess=0.005))
    assert v["target_reached"] is False and v["quality"] == "unusable" and v["next_step"] == continue_training("max_minutes")
    assert v["summary"].startswith("training did not reach its target (λ = 0.52, η = 0); reverse ESS 0.50 % of "
                                   "all 10,000 samples (N_eff = 50): unusable; next step: continue it with "
                                   "`cmt-openmm train --out RUN_DIR --resume --max-minutes M`")


def test_the_next_step_names_the_limit_that_stopped_the_run_and_its_folder():
    report = {**_report(lam=0.52, ess=0.005), "run_dir": "/home/me/runs/my peptide"}
    v = verdict(report)
    assert v["next_step"] == ("continue it with `cmt-openmm train --out '/home/me/runs/my peptide' --resume "
                              "--max-minutes M`, M larger than the minutes trained so far (max_minutes counts all "
                              "of the run's training)")
    assert "RUN_DIR" not in v["summary"]
    report["training"] = training_summary([{"step": 9, "lam": 0.52, "eta": 0.0, "wall_time": 3.0}], "max_steps",
                                          "/home/me/runs/mine")
    assert verdict(report)["next_step"] == ("continue it with `cmt-openmm train --out '/home/me/runs/my peptide' "
                                            "--resume --max-steps N`, N larger than the steps taken")
    assert "`cmt-openmm train --out /home/me/runs/mine --resume --max-steps N`" in report["training"]["verdict"]
    assert "`cmt-openmm train --out RUN_DIR --resume --budget N`" in continue_training("budget")
    poor = verdict({**_report(lam=0.0, ess=0.005, n=100_000), "run_dir": "/home/me/runs/my peptide"})
    assert poor["next_step"] == mcmc_only("/home/me/runs/my peptide") != MCMC_ONLY
    assert "`cmt-openmm mcmc '/home/me/runs/my peptide' --out chain.npz`" in poor["next_step"]


def test_a_good_generator_short_of_its_target_is_used_and_may_be_continued():
    v = verdict(_report(lam=0.52, ess=0.2))
    assert v["target_reached"] is False and v["quality"] == "good"
    assert v["next_step"] == f"{USE_SAMPLES}; or, for a higher ESS, {continue_training('max_minutes')}"
    lost = verdict(_report(lam=0.52, ess=0.2, flow_samples={"residue_1": 0}, reference={"value": 0.03}))
    assert lost["next_step"] == MCMC_ONLY  # a lost basin outweighs a good ESS, at the target or not


def test_the_ess_word_and_its_thresholds():
    words = {ess: verdict(_report(lam=0.0, ess=ess))["quality"] for ess in (0.5, 0.1, 0.05, 0.01, 0.005, 0.0005)}
    assert words == {0.5: "good", 0.1: "good", 0.05: "usable", 0.01: "usable", 0.005: "unusable", 0.0005: "unusable"}
    # 0.5 % of 10,000 samples is N_eff = 50 < 100: unusable; of 100,000 samples it is "poor"
    assert verdict(_report(lam=0.0, ess=0.005, n=100_000))["quality"] == "poor"
    assert verdict(_report(lam=0.0, ess=0.005, n=100_000))["next_step"] == MCMC_ONLY
    assert verdict(_report(lam=0.0, ess=0.2))["next_step"].startswith("use its reweighted samples")


def test_a_basin_the_reference_visits_and_no_flow_sample_does_is_lost():
    flow_samples = {"residue_1": 40, "residue_2": 0, "residue_3": 0}
    v = verdict(_report(lam=0.0, ess=0.3, flow_samples=flow_samples, reference=_php(0.03, 0.01, 0.0)))
    assert v["basins"] == {"in_reference": ["residue_1", "residue_2"], "lost": ["residue_2"]}
    assert v["next_step"] == MCMC_ONLY  # reweighting cannot restore a basin no sample visits
    assert ("of the 2 φ > 0 basins (by residue) the reference visits, its samples visit 1, missing residue 2"
            in v["summary"])
    one_pair = verdict(_report(lam=0.0, ess=0.3, flow_samples={"residue_1": 12}, reference={"value": 0.03}))
    assert one_pair["basins"]["lost"] == [] and one_pair["next_step"].startswith("use its reweighted samples")
    assert "the reference visits no φ > 0 basin" in verdict(_report(0.0, 0.3, 10_000, {"residue_1": 0},
                                                                    {"value": 0.0}))["summary"]


def test_the_markdown_opens_with_the_verdict():
    report = _report(lam=0.52, ess=0.2)
    report["verdict"] = verdict(report)
    lines = render_markdown({**report, "samples": {}}).splitlines()
    assert lines[2] == f"**Verdict**: {report['verdict']['summary']}"


def test_every_residues_phi_positive_population_is_shown_beside_the_reference():
    """One row per residue, named: flow samples in the basin, the reweighted population and the
    reference MD's, each with its error bar (the reference's from its correlated frames)."""
    rng = np.random.default_rng(3)
    flow_angles = rng.uniform(-np.pi, np.pi, (4000, 3, 2))
    ref_angles = rng.uniform(-np.pi, np.pi, (2000, 3, 2))
    ref_angles[:, 2, 0] = -np.abs(ref_angles[:, 2, 0]) - 1e-3  # residue 3 never at φ > 0 in the reference
    flow, ref = peptide_populations(flow_angles, np.ones(4000), kT=1.0), peptide_populations(ref_angles, None, kT=1.0)
    counts = {f"residue_{i + 1}": int(((flow_angles[:, i, 0] >= 0) & (flow_angles[:, i, 0] < 2 * np.pi / 3)).sum())
              for i in range(3)}
    ess = {"median": 1.0, "min": 1.0, "max": 1.0, "draws": [1.0]}
    samples = {"n_draws": 1, "n_samples_per_draw": 4000, "reverse_ess": ess, "reverse_ess_clipped": ess,
               "clip_fraction": 1e-4, "failed_energies": 0, "chirality_flips": 0, "n_effective": 4000.0,
               "min_effective_samples": 100.0, "reliable": True, "phi_positive_samples": counts,
               "phi_residues": ["ALA2", "ALA3", "ALA4"], **flow}
    md = render_markdown({"system": "ala4", "temperature": 300.0, "samples": samples,
                          "reference": {"n_reference": 2000, "forward_ess": 0.5, "eubo": 1.0,
                                        "reference_populations": ref}})
    rows = md[md.index("| φ > 0 basin (0° ≤ φ < 120°) | flow samples in it | flow, reweighted | reference MD |"):]
    rows = rows.splitlines()[2:5]
    for i, row in enumerate(rows[:2]):
        f, r = flow["phi_positive_population"][f"residue_{i + 1}"], ref["phi_positive_population"][f"residue_{i + 1}"]
        assert r["reliable"] and r["error"] > 0
        assert row == (f"| residue {i + 1} (ALA{i + 2}) | {counts[f'residue_{i + 1}']:,} | {f['value']:.4f} ± {f['error']:.4f} | "
                       f"{r['value']:.4f} ± {r['error']:.4f} |")
    assert rows[2].startswith("| residue 3 (ALA4) |") and rows[2].endswith("| 0 (no samples; N_eff = 2,000) |")


def test_replaced_energy_worker_pools_are_reported_when_there_were_any():
    """The records' cumulative energy_restarts (issue 25) reach report.json and report.md; none, no line."""
    from cmt_openmm.analysis.report import energy_restarts

    history = [{"step": 1, "wall_time": 1.0}, {"step": 2, "energy_restarts": 1, "wall_time": 2.0},
               {"step": 3, "energy_restarts": 2, "wall_time": 3.0}]
    report = {"system": "aldp-vacuum", "temperature": 300.0,
              "training": {**training_summary(history, "max_steps"), **energy_restarts(history)}}
    assert report["training"]["energy_restarts"] == 2
    assert "- energy worker pools replaced: 2 (a worker died;" in render_markdown(report)
    assert energy_restarts(history[:1]) == {} and energy_restarts([]) == {}
    quiet = {**report, "training": training_summary(history[:1], "max_steps")}
    assert "worker pools replaced" not in render_markdown(quiet)


class _NoisyStart:
    """A stand-in generator: Gaussian noise around the start positions, with its exact log density."""

    def __init__(self, target, scale=0.003):
        import torch

        self.center, self.scale = torch.as_tensor(target.positions, dtype=torch.float64), scale

    def sample(self, n, generator=None):
        import torch

        z = torch.randn((n,) + self.center.shape, generator=generator, dtype=torch.float64)
        return self.center + self.scale * z, (-0.5 * z**2 - np.log(self.scale) - 0.9189385332046727).sum((1, 2))


def test_a_report_over_the_memory_bound_keeps_angles_only_and_gives_the_same_numbers(tmp_path, monkeypatch):
    """Draws above KEEP_POSITIONS_BYTES keep no positions (issue 25); the report is the same."""
    import warnings

    from cmt_openmm.analysis import report as report_module
    from cmt_openmm.energy.select import make_energy
    from cmt_openmm.systems import get_target

    target = get_target("aldp-vacuum")
    drawn, pooled = [], []
    real, real_pooled = report_module.reweight, report_module.draw_pooled
    monkeypatch.setattr(report_module, "reweight", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    monkeypatch.setattr(report_module, "draw_pooled", lambda *a, **k: pooled.append(real_pooled(*a, **k)) or pooled[-1])
    results = []
    with make_energy(target, "openmm") as openmm, warnings.catch_warnings():
        warnings.simplefilter("ignore")

        class Torch:  # flagged as the torch backend, so that the report re-checks its energies
            backend, selection, verification = "torch", "test", None
            __call__ = staticmethod(openmm)

        for bound in (report_module.KEEP_POSITIONS_BYTES, 0):
            monkeypatch.setattr(report_module, "KEEP_POSITIONS_BYTES", bound)
            results.append(report_module.write_run_report(
                tmp_path / str(bound), target, _NoisyStart(target), [], None, method="cmt", seed=0, n_samples=300,
                n_draws=2, sample_seed=5, progress=False, energy=Torch()))
    # kept: two draws; streamed: the two draws pooled as log-weights and angles only (25 bytes a
    # sample), then the first 300 redrawn for the re-check
    assert [d.positions is None for d in drawn] == [False, False, False] and len(pooled) == 1
    lean = pooled[0]
    assert lean.positions is None and lean.log_q is None and lean.reduced_energy is None and len(lean) == 600
    for k in (0, 1):
        np.testing.assert_array_equal(lean.ramachandran_angles()[300 * k : 300 * (k + 1)], drawn[k].ramachandran_angles())
        np.testing.assert_array_equal(lean.log_weights[300 * k : 300 * (k + 1)], drawn[k].log_weights)
    np.testing.assert_array_equal(drawn[2].positions, drawn[0].positions)
    kept, streamed = (json.loads(json.dumps({k: v for k, v in r.items() if k not in ("run_dir", "energy")}, default=str)
                                 .replace(str(r["run_dir"]), "RUN_DIR")) for r in results)  # the verdict names it
    assert streamed == kept and kept["samples"]["phi_positive_samples"]["residue_1"] >= 0
    assert results[0]["energy"]["recheck"]["passed"] and results[1]["energy"]["recheck"]["passed"]
    assert "basin_populations" in kept["samples"] and kept["plots"] == ["ramachandran_fes.png", "phi_free_energy.png"]


def test_the_torch_recheck_redraws_samples_only_when_needed():
    from cmt_openmm.analysis.report import energy_record
    from cmt_openmm.sampling.reweighting import ReweightedEnsemble
    from cmt_openmm.systems.toys import double_well_3d

    toy = double_well_3d(300.0)
    x = np.random.default_rng(0).normal(0.0, 0.3, size=(100, 1, 3))
    u = np.array([toy.reduced_potential(p) for p in x])
    calls = []

    def draw():
        calls.append(1)
        return ReweightedEnsemble(toy, x, np.zeros(100), u)

    class Torch:
        backend, selection, verification = "torch", "test", None

    assert energy_record(object(), toy, draw)["backend"] == "openmm" and not calls
    assert energy_record(Torch(), toy, draw())["recheck"]["n_checked"] == 64 and calls == [1]
    calls.clear()
    record = energy_record(Torch(), toy, draw)
    assert calls == [1] and record["recheck"]["n_checked"] == 64 and record["recheck"]["passed"]


def test_the_markdown_explains_the_energy_recheck_and_a_reference_outside_the_generator():
    md = render_markdown({"system": "x", "temperature": 300.0,
                          "energy": {"backend": "torch", "selection": "torch (compiled, probed safe): faster here",
                                     "recheck": {"n_checked": 64, "max_abs_difference_kT": 62.0,
                                                 "max_relative_difference": 5e-15, "passed": True}},
                          "reference": {"n_reference": 20, "forward_ess": 0.0, "eubo": None,
                                        "reference_outside_flow_support": 20, "ramachandran_tv": 1.0,
                                        "ramachandran_kl": 20.0}})
    assert ("- report energies: torch (compiled, probed safe): faster here; 64 samples re-checked against OpenMM: "
            "largest difference 6.20e+01 kT, 5.0e-15 of the energy (agrees: within 1e-6 relative)") in md
    assert ("- EUBO: inf (20 of the 20 reference frames lie where the generator has no density: it never proposes "
            "them)") in md
    assert "- Ramachandran TV: 1.0000 (total variation of the φ/ψ histograms: 0 identical, 1 no overlap)" in md
