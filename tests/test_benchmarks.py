"""The methods benchmark runs end to end at smoke size and keeps its accounting honest."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aldp_methods_tiny_run_writes_one_row_per_method_within_budget(tmp_path):
    bench = _load("aldp_methods")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    budget = results["settings"]["budget"]
    assert [r["method"] for r in results["runs"]] == ["cmt", "reverse_kl", "temperature_annealing"]
    for run in results["runs"]:
        assert 0 < run["evaluations"] <= budget  # same budget, counted the same way for every method
        assert 0.0 < run["ess"] <= 1.0
        assert (tmp_path / f"{run['method']}-seed0" / "report.json").exists()
    assert "| CMT |" in (tmp_path / "table.md").read_text()


def test_cmt_benchmark_settings_are_the_preset_with_the_run_overrides():
    bench = _load("aldp_methods")
    from cmt_openmm.presets import get_preset

    settings = bench.method_settings(2_000_000, tiny=False, buffer=3000, fit_steps=5, lr=2e-3)
    expected = {**get_preset("aldp-quick")["cmt"], "n_samples": 3000, "fit_steps": 5, "lr": 2e-3}
    assert settings["cmt"] == expected
    ta = settings["temperature_annealing"]
    assert ta["n_samples"] == 3000 and ta["fit_steps"] == 5
    # the ladder takes about half of what the reverse-KL stage leaves
    assert ta["steps_per_temperature"] * (ta["n_temperatures"] - 1) * 3000 <= 0.375 * 2_000_000 + 3000
