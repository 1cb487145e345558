"""The methods benchmark runs end to end at smoke size and keeps its accounting honest."""
import json

import numpy as np
import pytest
from helpers import load_script

from cmt_openmm.systems import get_target


def test_aldp_methods_tiny_runs_within_budget_and_combine_into_one_table(tmp_path):
    bench = load_script("benchmarks/aldp_methods.py")
    a, b, both = tmp_path / "a", tmp_path / "b", tmp_path / "both"
    assert bench.main(["--tiny", "--methods", "cmt", "temperature_annealing", "--out", str(a)]) == 0
    assert bench.main(["--tiny", "--methods", "reverse_kl", "cmt", "--no-strata", "--out", str(b)]) == 0
    assert bench.main(["--combine", str(a), str(b), "--out", str(both)]) == 0
    results = json.loads((both / "results.json").read_text())
    budget = results["settings"]["budget"]
    assert [r["method"] for r in results["runs"]] == ["cmt", "temperature_annealing", "reverse_kl", "cmt"]
    # CMT with and without strata are separate rows
    assert list(results["summary"]) == ["cmt_strata", "temperature_annealing", "reverse_kl", "cmt"]
    assert results["settings"]["method_settings"]["cmt_strata"]["strata"] == "phi-sign"
    assert results["settings"]["method_settings"]["cmt"]["strata"] == "none"
    for group, summary in results["summary"].items():
        runs = [r for r in results["runs"] if r["group"] == group]
        assert summary["n_runs"] == len(runs) == 1
        assert summary["runs_keeping_every_basin"] == sum(not r["lost_basins"] for r in runs)
    for run in results["runs"]:
        assert 0 < run["evaluations"] <= budget  # same budget, counted the same way for every method
        assert 0.0 < run["ess"] <= 1.0
    assert (a / "cmt-seed0" / "report.json").exists() and (b / "reverse_kl-seed0" / "report.json").exists()
    table = (both / "table.md").read_text()
    assert all(f"| {label} |" in table for label in ("CMT", "CMT + φ strata", "reverse KL", "TA-BG"))
    with pytest.raises(SystemExit, match="no results.json in .*nowhere"):
        bench.main(["--combine", str(a), str(tmp_path / "nowhere"), "--out", str(both)])


def test_cmt_benchmark_settings_are_the_preset_with_the_run_overrides():
    bench = load_script("benchmarks/aldp_methods.py")
    from cmt_openmm.runs.presets import get_preset

    settings = bench.method_settings(2_000_000, tiny=False, buffer=3000, fit_steps=5, lr=2e-3)
    expected = {**get_preset("aldp-quick")["cmt"], "n_samples": 3000, "fit_steps": 5, "lr": 2e-3}
    assert settings["cmt"] == expected
    ta = settings["temperature_annealing"]
    assert ta["n_samples"] == 3000 and ta["fit_steps"] == 5
    # the ladder takes about half of what the reverse-KL stage leaves
    assert ta["steps_per_temperature"] * (ta["n_temperatures"] - 1) * 3000 <= 0.375 * 2_000_000 + 3000


def test_gpu_check_runs_every_check_in_tiny_mode_on_cpu(tmp_path):
    bench = load_script("benchmarks/gpu_check.py")
    result = bench.main(["--tiny", "--out", str(tmp_path / "check.json")])
    assert json.loads((tmp_path / "check.json").read_text())["device"] == result["device"]
    assert "skipped" in result["a_openmm_cuda_vs_reference"] or result["a_openmm_cuda_vs_reference"]["n"] == 8
    assert all(v["passed"] for k, v in result["b_torch_vs_openmm"].items() if k.endswith("float64"))
    assert result["c_throughput"]["aldp-implicit"]["torch_configs_per_s@64"] > 0
    run = result["d_cmt_aldp_implicit"]
    assert run["stop_reason"] == "max_minutes" and run["steps"] >= 1 and run["energy_backend"] == "torch"
    peptide = result["e_ala4_hour_preset"]
    assert peptide["stop_reason"] == "max_minutes" and peptide["steps"] >= 1
    assert peptide["step_scale"] >= 1 and any(line.startswith("[cmt-openmm] step scale") for line in peptide["said"])
    assert set(peptide["phi_positive_by_residue"]) <= {"residue_1", "residue_2", "residue_3"}


def test_dual_benchmark_times_the_nested_case_at_every_size(tmp_path):
    """Its buffers keep both constraints active (the nested solves a peptide's early steps take),
    whatever their size, and each row's ratio is against the first size of the same run."""
    bench = load_script("benchmarks/dual_solve.py")
    assert bench.main(["--sizes", "500", "2000", "--dim", "30", "--repeats", "1", "--out", str(tmp_path / "d.json")]) == 0
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [r["n_samples"] for r in rows] == [500, 2000]
    assert all(r["lam"] > 0 and r["eta"] > 0 and r["seconds"] > 0 for r in rows)
    assert rows[0]["per_sample_vs_first"] == 1.0
    assert rows[1]["per_sample_vs_first"] == pytest.approx(rows[1]["us_per_sample"] / rows[0]["us_per_sample"])


def test_training_step_times_each_step_scale_against_the_first(tmp_path):
    """--step-scales draws and fits the scaled step (the samples per annealing step and per Adam
    step multiplied) and gives each scale's seconds per sample against the first scale's."""
    bench = load_script("benchmarks/training_step.py")
    out = tmp_path / "step.json"
    assert bench.main(["--preset", "toy-quick", "--systems", "aldp-vacuum", "--threads", "1", "--backends", "torch",
                       "--step-scales", "1", "2", "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["step_scale"], r["n_samples"], r["batch_size"]) for r in rows] == [(1, 1000, 250), (2, 2000, 500)]
    assert all(r["preset"] == "toy-quick" and r["step_s"] > 0 and r["speedup_vs_torch"] == 1.0 for r in rows)
    assert rows[0]["per_sample_vs_scale_1"] == 1.0
    assert rows[1]["per_sample_vs_scale_1"] == pytest.approx(
        (rows[1]["step_s"] / 2000) / (rows[0]["step_s"] / 1000))


def test_dual_and_training_step_benchmarks_refuse_non_positive_sizes_in_one_sentence(capsys):
    for script, argv in (("benchmarks/dual_solve.py", ["--sizes", "0"]),
                         ("benchmarks/training_step.py", ["--step-scales", "0"])):
        with pytest.raises(SystemExit):
            load_script(script).main(argv)
        assert "must be positive integers" in capsys.readouterr().err


def test_paper_table_runs_resumes_and_prints_the_published_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path / "cache"))
    bench = load_script("benchmarks/paper_table.py")
    argv = ["--tiny", "--systems", "ala4", "--methods", "cmt", "--out", str(tmp_path / "t")]
    assert bench.main(argv) == 0
    row = tmp_path / "t" / "ala4" / "cmt-seed0" / "row.json"
    before = row.stat().st_mtime_ns
    assert bench.main(argv) == 0 and row.stat().st_mtime_ns == before  # a finished run is read back, not redone
    table = (tmp_path / "t" / "table.md").read_text()
    assert "| ala4 | CMT + φ strata |" in table and "| 68.6 | 0.0143 |" in table
    assert "(1 unreliable: too few effective samples)" in table  # tiny runs: a handful of effective samples
    result = json.loads((tmp_path / "t" / "results.json").read_text())
    assert any(b.startswith("phi>0 residue_") for b in result["rows"]["ala4"][0]["basins"])
    # the two missing runs train in parallel processes; the finished CMT run is read back
    argv_parallel = argv[:4] + ["cmt", "reverse_kl", "temperature_annealing", "--jobs", "2"] + argv[5:]
    assert bench.main(argv_parallel) == 0 and row.stat().st_mtime_ns == before
    rows = json.loads((tmp_path / "t" / "results.json").read_text())["rows"]["ala4"]
    assert [r["method"] for r in rows] == ["cmt", "reverse_kl", "temperature_annealing"]
    # forward KL trains on the MD frames given per system, and is refused without them
    with pytest.raises(SystemExit, match="--reference ala4=FILE"):
        bench.main(argv[:4] + ["forward_kl"] + argv[5:])
    target = get_target("ala4")
    frames = target.positions[None] + np.random.default_rng(0).normal(0.0, 0.002, (20, target.n_atoms, 3))
    np.savez(tmp_path / "ref.npz", positions=frames)
    assert bench.main(argv[:4] + ["forward_kl", "--reference", f"ala4={tmp_path / 'ref.npz'}"] + argv[5:]) == 0
    rows = json.loads((tmp_path / "t" / "results.json").read_text())["rows"]["ala4"]
    assert rows[0]["method"] == "forward_kl" and rows[0]["evaluations"] > 0
    assert "Ram TV floor of the ala4 reference (its two halves, 20 frames):" in (tmp_path / "t" / "table.md").read_text()


def test_paper_table_cpu_hour_trains_the_sized_presets_flow(tmp_path, monkeypatch):
    import argparse

    bench = load_script("benchmarks/paper_table.py")
    preset = bench.get_preset("ala4-hour")
    preset["flow"] = {**preset["flow"], "n_layers": 5, "hidden": 96, "n_bins": 6, "linear_bins": 3}
    monkeypatch.setattr(bench, "get_preset", lambda name: preset if name == "ala4-hour" else None)
    args = argparse.Namespace(preset="cpu-hour", tiny=False, references={}, out=tmp_path)
    settings = bench.bench_settings(args, "ala4")
    assert (settings.n_layers, settings.hidden, settings.n_bins, settings.linear_bins) == (5, 96, 6, 3)
    assert (settings.train_dtype, settings.ema_decay) == (preset["flow"]["train_dtype"], preset["ema_decay"])


def test_a_baseline_that_diverges_is_a_row_of_the_table_not_its_end(tmp_path, monkeypatch):
    """A run whose training diverges (TA-BG on ala4 at cpu-hour did: its fit collapsed onto single
    samples) has no generator: its row says so, with ESS 0, every basin lost and the cost up to its
    last finite step, and the table counts it as diverged."""
    from cmt_openmm.training import TRAINERS

    trainer, step, calls = TRAINERS["temperature_annealing"], TRAINERS["temperature_annealing"].step, []

    def nan_from_the_second_step(self):
        calls.append(self.steps_done)
        record = step(self)
        return {**record, "loss": float("nan")} if self.steps_done >= 1 else record

    monkeypatch.setattr(trainer, "step", nan_from_the_second_step)
    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path / "cache"))
    bench = load_script("benchmarks/paper_table.py")
    out = tmp_path / "t"
    assert bench.main(["--tiny", "--systems", "ala4", "--methods", "temperature_annealing", "--out", str(out)]) == 0
    row = json.loads((out / "ala4" / "temperature_annealing-seed0" / "row.json").read_text())
    assert row["diverged"].startswith("training diverged: step 2 gave a non-finite loss")
    assert calls[0] == 0 and set(calls[1:]) == {1}  # step 2 retried after each rollback, then given up
    assert row["steps"] == 1 and row["evaluations"] > 0 and row["ess"] == 0.0
    assert row["stop_reason"] == "diverged after step 1" and row["lost_basins"] == ["all (training diverged)"]
    assert "| 0/1 (1 diverged) |" in (out / "table.md").read_text()


def test_enhanced_sampling_never_prints_a_zero_error_bar():
    """A chain that never reached φ > 0, or never crossed, says so instead of 0.0000 ± 0.0000."""
    bench = load_script("benchmarks/enhanced_sampling.py")
    assert bench.population_cell(0.0, 0.0) == "never visited (unconverged)"
    assert bench.population_cell(0.02, 0.001, transitions=0) == "0.0200 ± 0.0010 (no transitions: unreliable)"
    assert bench.population_cell(float("nan"), float("nan")) == "n/a (no frames)"
    assert bench.population_cell(0.0264, 0.0012, transitions=758) == "0.0264 ± 0.0012"


def test_enhanced_sampling_judges_convergence_by_every_later_estimate():
    bench = load_script("benchmarks/enhanced_sampling.py")
    ref = [bench.Estimate(0.026, 0.0)]

    def rows(*cells):
        return [{"evaluations": n, "phi_positive": v, "phi_positive_error": e} for n, v, e in cells]

    assert bench.evaluations_to_converge(rows((100, 0.0, 0.0), (250, 0.03, 0.01), (500, 0.027, 0.004),
                                              (1000, 0.0262, 0.002)), ref) == 250
    # agreeing early by a wide error bar, then leaving, does not count: convergence restarts
    assert bench.evaluations_to_converge(rows((100, 0.026, 0.02), (250, 0.05, 0.005), (500, 0.027, 0.002)),
                                         ref) == 500
    assert bench.evaluations_to_converge(rows((100, 0.0, 0.0), (1000, 0.0, 0.0)), ref) is None  # never visited
    assert bench.evaluations_to_converge(rows((1000, 0.02, 0.001)), ref) is None
    # 0.0266 ± 0.0009 against 0.0256 ± 0.0005: 0.0010 apart, within the σ of the difference (0.00103)
    assert bench.evaluations_to_converge(rows((1000, 0.0266, 0.0009)), [bench.Estimate(0.0256, 0.0005)]) == 1000
    assert bench.evaluations_to_converge(rows((1000, 0.0268, 0.0009)), [bench.Estimate(0.0256, 0.0005)]) is None
    args = type("Args", (), {"reference": None})()
    runs = [{"sampler": "replica exchange (4 replicas)", "seed": 0, "evaluations": 1_000_000,
             "evaluations_to_converge": None},
            {"sampler": "flow-bridged replica exchange", "seed": 0, "evaluations": 100_000,
             "evaluations_to_converge": 25_000}]
    table = bench.convergence_summary(runs, [bench.Estimate(0.026, 0.001)], args)
    assert "| flow-bridged replica exchange | 0 | 25,000 | > 40.0x |" in table
    assert "| replica exchange (4 replicas) | 0 | > 1,000,000 (not converged) | – |" in table


def test_enhanced_sampling_counts_each_residue_of_a_peptide():
    """Block populations and convergence residue by residue: a peptide converges only
    when every residue does, and the reweighted generator's estimate says when its basin is thin."""
    bench = load_script("benchmarks/enhanced_sampling.py")
    neg, pos = -1.2, 1.0  # radians: inside the φ < 0 and φ > 0 cores
    phi = np.full((40, 2), neg)
    phi[10:15, 0] = pos  # residue 1: one visit (2 transitions); residue 2: never
    phi[20:30, 1] = pos
    phi[32, 1] = 0.1  # between the cores: no transition counted
    values, errors = bench.population(phi)
    assert values == pytest.approx([5 / 40, 11 / 40]) and len(errors) == 2 and all(e > 0 for e in errors)
    refs = [bench.Estimate(0.02, 0.001), bench.Estimate(0.03, 0.001)]
    one_off = [{"evaluations": 100, "phi_positive": [0.02, 0.1], "phi_positive_error": [0.001, 0.001]}]
    assert bench.evaluations_to_converge(one_off, refs) is None  # residue 2 is off by 70σ
    both = [{"evaluations": 100, "phi_positive": [0.02, 0.0305], "phi_positive_error": [0.001, 0.001]}]
    assert bench.evaluations_to_converge(both, refs) == 100
    assert [tuple(e) for e in bench.reference_estimates([0.02, 0.001, 0.03, 0.002], 2)] == [(0.02, 0.001), (0.03, 0.002)]
    with pytest.raises(SystemExit, match="for each of the 3 residue"):
        bench.reference_estimates([0.02, 0.001], 3)
    assert bench.population_cells([0.02, 0.0], [0.001, 0.0], [4, 0]) == "0.0200 ± 0.0010 / never visited (unconverged)"
    # one heavy sample inside the φ > 0 basins: their populations rest on ~1 effective sample
    angles = np.full((1000, 2), neg)
    angles[:50, 0] = pos
    angles[::5, 1] = pos
    heavy = np.ones(1000)
    heavy[0] = 1e4
    thin = bench.generator_populations(angles, heavy)
    assert all(p.n_effective < 2 for p in thin) and "(unreliable: 1 effective samples)" in bench.generator_cell(thin[0])
    first, second = bench.generator_populations(angles, np.ones(1000))  # even weights: each basin's own count
    assert (first.n_effective, second.n_effective) == pytest.approx((50, 200))
    assert first.value == pytest.approx(0.05) and "(unreliable: 50 effective samples)" in bench.generator_cell(first)
    assert bench.generator_cell(second) == f"{second.value:.4f} ± {second.error:.4f}"


@pytest.mark.filterwarnings("ignore:reweighting")  # a tiny generator's reweighting is poor, and says so
def test_enhanced_sampling_runs_md_with_flow_moves_on_a_tetrapeptide(tmp_path):
    """The real path on ala4 at a tiny size: a generator trained against OpenMM energies, its
    reweighted estimate, Langevin MD with flow moves, one φ series per residue."""
    bench = load_script("benchmarks/enhanced_sampling.py")
    assert bench.main(["--tiny", "--system", "ala4", "--samplers", "md+flow", "--evaluations", "300",
                       "--stride", "5", "--flow-interval", "10", "--reweight-samples", "64", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["runs"]
    assert row["sampler"] == "Langevin MD + flow moves" and row["flow_proposals"] > 0
    assert 300 <= row["evaluations"] <= 310 and row["frames"] >= 40
    assert len(row["transitions_by_residue"]) == 3 and len(row["phi_positive"]) == 3
    assert all(len(c["phi_positive"]) == 3 for c in row["convergence"])
    assert len(results["generator_reweighted"]["effective_samples"]) == 3
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("ala4 (300 K)") and table.count(" / ") >= 2
    # the run directory it trained brings its own system: no --system needed
    again = tmp_path / "again"
    assert bench.main(["--generator", str(tmp_path / "generator_run"), "--samplers", "md", "--evaluations", "100",
                       "--temperature", "350", "--reweight-samples", "64", "--out", str(again)]) == 0
    rerun = json.loads((again / "results.json").read_text())
    assert rerun["settings"]["system"] == "ala4" and rerun["settings"]["temperature"] == 300.0
    assert len(rerun["runs"][0]["phi_positive"]) == 3
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(SystemExit, match="holds neither run.yaml"):  # a folder that is not a run: one sentence
        bench.main(["--generator", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "bad")])


def test_distributed_projection_follows_amdahl_from_the_two_rank_speedup():
    bench = load_script("benchmarks/distributed_training.py")
    free = {"gather_bytes": 0, "allreduce_bytes": 0, "collectives": 0}
    perfect = bench.projection(2.0, 1.0, free)
    assert perfect["serial_fraction"] == 0.0
    assert perfect["8 GPUs (NVLink)"] == pytest.approx(8.0) and perfect["4 nodes (InfiniBand)"] == pytest.approx(4.0)
    none = bench.projection(1.0, 1.0, free)  # two ranks gained nothing: more gain nothing either
    assert none["8 GPUs (NVLink)"] == pytest.approx(1.0)
    talking = bench.projection(2.0, 1e-3, {"gather_bytes": 96_000, "allreduce_bytes": 10_000_000, "collectives": 11})
    assert talking["4 nodes (InfiniBand)"] < talking["8 GPUs (NVLink)"] < 8.0  # the bytes cost, slower links more


def test_flow_settings_cost_times_the_preset_and_its_variants_through_train(tmp_path, monkeypatch):
    import benchmarks.common as common

    bench = load_script("benchmarks/flow_settings_cost.py")
    flows = []
    real_train = common.train

    def recording_train(target, config, *args, **kwargs):
        flows.append((config.flow.hidden, config.flow.n_bins, config.flow.linear_bins, config.flow.n_layers))
        assert config.cmt.step_scale == 1  # the preset's auto is timed at the scale CPUs keep, without its measurement
        return real_train(target, config, *args, **kwargs)

    real_preset = common.get_preset

    def with_auto_step(name):  # as the peptide presets have it
        preset = real_preset(name)
        return {**preset, "cmt": {**preset["cmt"], "step_scale": "auto"}}

    monkeypatch.setattr(common, "get_preset", with_auto_step)
    monkeypatch.setattr(common, "train", recording_train)
    rows = bench.main(["--systems", "toy-double-well:toy-quick", "--variants", "linear_bins=3", "hidden=8,n_bins=4",
                       "--steps", "2", "--repeats", "1", "--out", str(tmp_path / "cost.json")])
    # warm-up, the preset, then each variant with the preset's other settings kept
    assert flows == [(16, 8, None, 2), (16, 8, None, 2), (16, 8, 3, 2), (8, 4, None, 2)]
    assert [(r["variant"], r["flow"]) for r in rows] == [
        ("the preset", "hidden 16, n_layers 2, bins 8 / 8"), ("linear_bins=3", "hidden 16, n_layers 2, bins 8 / 3"),
        ("hidden=8,n_bins=4", "hidden 8, n_layers 2, bins 4 / 4")]
    assert all(r["seconds_per_step"] > 0 for r in rows) and rows[0]["speedup_vs_preset"] == 1.0
    assert json.loads((tmp_path / "cost.json").read_text()) == rows
    with pytest.raises(SystemExit):
        bench.main(["--variants", "hidden:128"])


def test_weight_breakdown_splits_the_weight_variance_over_states():
    bench = load_script("benchmarks/weight_breakdown.py")
    weights = np.array([0.1, 0.1, 0.2, 0.6])
    rows = bench.breakdown({"a": np.array([True, True, False, False]), "b": np.array([False, False, True, True])},
                           weights)
    a, b = rows
    assert (a["raw"], b["raw"]) == (0.5, 0.5)
    assert a["reweighted"] == pytest.approx(0.2) and b["reweighted"] == pytest.approx(0.8)
    assert b["ratio"] == pytest.approx(1.6)  # the generator gives b half its samples, the target 80 %
    assert a["square_share"] == pytest.approx(0.02 / 0.42) and b["square_share"] == pytest.approx(0.40 / 0.42)
    assert a["ess_within"] == pytest.approx(1.0) and b["ess_within"] == pytest.approx(0.64 / 0.40 / 2)
    assert b["error"] == pytest.approx(np.sqrt(weights**2 @ (np.array([0, 0, 1, 1]) - 0.8) ** 2))
    mask = {"c": np.array([True, True, False, False])}
    empty, = bench.breakdown(mask, np.array([0.0, 0.0, 0.5, 0.5]))
    assert empty["reweighted"] == 0.0 and empty["ess_within"] == 0.0  # weights all 0 there: no effective sample
    tiny, = bench.breakdown(mask, np.array([1e-200, 1e-200, 0.5, 0.5]))  # their squares underflow
    assert tiny["ess_within"] == pytest.approx(1.0)


def test_weight_breakdown_finds_the_turn_hydrogen_bonds_and_phi_signs_of_ala4():
    bench = load_script("benchmarks/weight_breakdown.py")
    from cmt_openmm.coordinates.backbone import phi_angles

    target = get_target("ala4")
    from cmt_openmm.coordinates.backbone import TURN_HBOND_CUTOFF, turn_hydrogen_bonds

    pairs = turn_hydrogen_bonds(target.topology)
    names = [name for _, _, name in pairs]
    assert names == ["ACE1 O → ALA4 H", "ACE1 O → NME5 H", "ALA2 O → NME5 H"]  # i → i+3 and i → i+4 only
    o, h, _ = pairs[1]
    x = np.repeat(target.positions[None], 3, axis=0)
    x[1, h] = x[1, o] + np.array([0.0, 0.0, 0.2])  # the α-turn contact, in the second configuration only
    x[2, h] = x[2, o] + np.array([0.0, 0.0, 0.3])  # beyond the cutoff
    turns = bench.peptide_states(target.topology, x)["turn hydrogen bonds"]
    reference = np.linalg.norm(target.positions[o] - target.positions[h]) < TURN_HBOND_CUTOFF
    assert turns["ACE1 O → NME5 H"].tolist() == [reference, True, False]
    assert turns["no turn"].tolist() == list(~np.any([turns[n] for n in names], axis=0))
    signs = bench.peptide_states(target.topology, x)["phi-sign"]
    pattern = "".join("+" if s else "-" for s in phi_angles(target.topology, x[:1])[0] >= 0)
    assert list(signs) == [pattern] and signs[pattern].all()


def test_weight_breakdown_runs_on_a_trained_run(tmp_path, capsys):
    from cmt_openmm import Run

    bench = load_script("benchmarks/weight_breakdown.py")
    run = Run.create(tmp_path / "run", {"system": "aldp-vacuum", "method": "cmt", "max_steps": 2, "budget": 10**6,
                                        "flow": {"n_layers": 2, "hidden": 8},
                                        "cmt": {"n_samples": 200, "batch_size": 100, "fit_steps": 2}})
    run.train(progress=False, report=False)
    record = bench.main([str(tmp_path / "run"), "--n", "300", "--out", str(tmp_path / "breakdown.json")])
    assert record == json.loads((tmp_path / "breakdown.json").read_text())
    rows = record["states"]["phi-sign"]
    assert {r["state"] for r in rows} <= {"+", "-"} and sum(r["raw"] for r in rows) == pytest.approx(1.0)
    assert sum(r["reweighted"] for r in rows) == pytest.approx(1.0)
    assert sum(r["square_share"] for r in rows) == pytest.approx(1.0)
    assert record["states"]["turn hydrogen bonds"] == []  # no residue pair three apart in Ace-Ala-Nme
    assert record["n_effective"] == pytest.approx(300 * record["reverse_ess"])
    assert not record["reliable"] and "are unreliable" in capsys.readouterr().out  # two steps of training
