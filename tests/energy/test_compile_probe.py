"""make_energy's compile probe: compiled torch energies only where a subprocess found them safe.

The probe's verdict is cached per key (System, dtype, device, chunk shapes, torch, CPU), written
atomically; a damaged cache file means a new probe. Crashing, failing, hanging and disagreeing
probes are faked by replacing the probe's command; they give "unsafe", make_energy keeps torch
eager and warns once. ``compile: false`` and ``CMT_OPENMM_COMPILE=0`` never probe. The real
probe (tens of seconds of torch.compile) runs in one slow test on aldp-obc.
"""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from cmt_openmm.energy import select
from cmt_openmm.energy.openmm.energy import OpenMMEnergy
from cmt_openmm.energy.select import make_energy
from cmt_openmm.energy.torch import compile_probe
from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.systems import get_target
from cmt_openmm.training.config import TrainConfig

REAL_CACHE_DIR = compile_probe.cache_dir

GOOD_REPORT = {
    "compiled": True, "compile_error": None, "n_configurations": 41, "compile_seconds": 1.0,
    "tolerances": {"energy": 1e-6, "force": 1e-5},
    "max_relative_errors": {"eager": {"energy": 1e-13, "force": 1e-14, "energy_only": 1e-13},
                            "openmm": {"energy": 2e-13, "force": 1e-14, "energy_only": 2e-13}},
    "failures_agree": True,
    "seconds_per_configuration": {"compiled": 1e-5, "eager": 4e-5, "openmm_reference": 1e-4},
}


def report_with(**changes) -> dict:
    report = json.loads(json.dumps(GOOD_REPORT))
    for path, value in changes.items():
        *keys, last = path.split("__")
        node = report
        for key in keys:
            node = node[key]
        node[last] = value
    return report


def fake_probe(monkeypatch, code: str) -> list:
    """Replace the probe's command by ``python -c code SPEC REPORT``; returns the list of its calls."""
    calls = []

    def command(spec, report):
        calls.append(spec)
        return [sys.executable, "-c", code, str(spec), str(report)]

    monkeypatch.setattr(compile_probe, "probe_command", command)
    return calls


def writes(report: dict) -> str:
    """Code of a probe that writes ``report``."""
    return f"import sys; open(sys.argv[2], 'w').write({json.dumps(report)!r})"


@pytest.fixture
def probing(monkeypatch, tmp_path):
    """The probe turned on (the suite turns it off), a fresh cache folder, no warning given yet."""
    monkeypatch.delenv(compile_probe.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(compile_probe, "cache_dir", lambda: tmp_path / "compile-probes")
    monkeypatch.setattr(compile_probe, "_WARNED", set())
    return tmp_path / "compile-probes"


@pytest.fixture(scope="module")
def vacuum() -> TorchEnergy:
    return TorchEnergy(get_target("aldp-vacuum"), verify=False)


def compile_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "stay eager in torch" in str(w.message)]


# -- the verdict cache ----------------------------------------------------------------------------
def test_the_key_changes_with_what_compiled_code_depends_on(vacuum, monkeypatch):
    parts = compile_probe.key_parts(vacuum)
    key = compile_probe.verdict_key(parts)
    assert compile_probe.verdict_key(compile_probe.key_parts(vacuum)) == key  # stable
    obc = TorchEnergy(get_target("aldp-obc"), verify=False)
    single = TorchEnergy(get_target("aldp-vacuum"), dtype=torch.float32, verify=False)
    other_threads = TorchEnergy(get_target("aldp-vacuum"), verify=False, n_threads=vacuum.n_threads * 4)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    newer_torch = compile_probe.key_parts(vacuum)
    monkeypatch.undo()
    changed = [compile_probe.key_parts(obc), compile_probe.key_parts(single), compile_probe.key_parts(other_threads),
               newer_torch, {**parts, "cpu": parts["cpu"] + " avx512_fp16"}, {**parts, "device": "cuda"},
               {**parts, "source": "0" * 64}]
    assert changed[0]["system"] != parts["system"] and changed[1]["dtype"] == "float32"
    assert changed[2]["chunk_sizes"] != parts["chunk_sizes"] and newer_torch["torch"] == "9.9.9"
    keys = [compile_probe.verdict_key(p) for p in changed]
    assert key not in keys and len(set(keys)) == len(keys)


def test_verdicts_are_cached_atomically_and_a_damaged_file_means_a_new_probe(vacuum, probing, monkeypatch):
    from cmt_openmm.flows import spline_kernel

    monkeypatch.setenv("XDG_CACHE_HOME", str(probing.parent / "xdg"))  # the real folder: beside the kernels
    assert REAL_CACHE_DIR() == probing.parent / "xdg" / "cmt-openmm" / "compile-probes"
    assert REAL_CACHE_DIR().parent == spline_kernel._cache_dir().parent

    runs = []
    monkeypatch.setattr(compile_probe, "run_probe", lambda energy, timeout: runs.append(1) or {
        "safe": True, "reason": "agreed", "probe_seconds": 0.0, "report": None})
    first = compile_probe.compile_verdict(vacuum)
    path = probing / f"{first['key']}.json"
    assert first["probed"] and first["safe"] and first["path"] == str(path) and len(runs) == 1
    assert json.loads(path.read_text())["key"] == first["key"]
    assert [p.name for p in probing.iterdir()] == [path.name]  # no temporary file left
    second = compile_probe.compile_verdict(vacuum)
    assert not second["probed"] and second["safe"] and len(runs) == 1

    for damaged in ("{not json", "[]", json.dumps({**json.loads(path.read_text()), "key": "another"}),
                    json.dumps({**json.loads(path.read_text()), "safe": "yes"}), ""):
        path.write_text(damaged)
        verdict = compile_probe.compile_verdict(vacuum)  # no traceback: probed again, rewritten
        assert verdict["probed"] and verdict["safe"]
        assert json.loads(path.read_text())["safe"] is True
    assert len(runs) == 6

    # a write that fails before its final rename leaves the old file whole and no temporary file
    from cmt_openmm import files

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    path.write_text("{damaged")
    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.warns(UserWarning, match="cannot be cached in .*[Nn]o space left on device"):
        verdict = compile_probe.compile_verdict(vacuum)
    assert verdict["safe"] and path.read_text() == "{damaged" and [p.name for p in probing.iterdir()] == [path.name]


# -- probes that crash, fail, hang or disagree -------------------------------------------------------
def test_judge_reads_a_report():
    assert compile_probe.judge(GOOD_REPORT)[0] is True
    cases = {
        "max_relative_errors__openmm__force": (3e-3, "disagree with OpenMM's Reference platform: relative force "
                                                     "error 3.00e-03 (tolerance 1e-05)"),
        "max_relative_errors__eager__energy": (2e-6, "disagree with eager torch: relative energy error 2.00e-06"),
        "max_relative_errors__eager__energy_only": (float("nan"), "relative energy (without gradients) error nan"),
        "failures_agree": (False, "flag other configurations as failed"),
        "compiled": (False, "torch.compile failed in the compile probe"),
        "tolerances": ({}, "report is incomplete"),
    }
    for change, (value, reason) in cases.items():
        safe, why = compile_probe.judge(report_with(**{change: value}))
        assert safe is False and reason in why, (change, why)
    assert compile_probe.judge(None) == (False, "the compile probe's report is incomplete")


@pytest.mark.parametrize("code, reason", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "the compile probe crashed (SIGSEGV)"),
    ("import sys; sys.exit('RuntimeError: inductor gave up')",
     "the compile probe failed with exit code 1 (RuntimeError: inductor gave up)"),
    ("pass", "the compile probe exited without a readable report"),
    (writes(report_with(max_relative_errors__openmm__energy=1e-3)),
     "compiled torch energies disagree with OpenMM's Reference platform: relative energy error 1.00e-03 "
     "(tolerance 1e-06)"),
])
def test_a_probe_that_crashes_fails_or_disagrees_is_unsafe(vacuum, probing, monkeypatch, code, reason):
    fake_probe(monkeypatch, code)
    with pytest.warns(UserWarning) as caught:
        verdict = compile_probe.compile_verdict(vacuum)
    assert verdict["safe"] is False and verdict["reason"] == reason
    assert compile_warnings(caught) == [f"Energies of aldp-vacuum stay eager in torch: {reason} (delete "
                                        f"{verdict['path']} to probe again, or set energy compile: false to skip "
                                        "the probe)."]
    assert json.loads((probing / f"{verdict['key']}.json").read_text())["safe"] is False


def test_a_probe_that_hangs_is_stopped_and_unsafe(vacuum, probing, monkeypatch, tmp_path):
    pid_file = tmp_path / "pid"
    fake_probe(monkeypatch, f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    with pytest.warns(UserWarning, match="did not finish within 5 s"):
        verdict = compile_probe.compile_verdict(vacuum, timeout=5)
    assert verdict["safe"] is False and verdict["probe_seconds"] < 30
    import os

    with pytest.raises(ProcessLookupError):  # the probe was ended, not left running
        os.kill(int(pid_file.read_text()), 0)


def test_make_energy_falls_back_to_eager_torch_after_a_crashing_probe_with_one_warning(probing, monkeypatch):
    calls = fake_probe(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    target = get_target("aldp-vacuum")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        energy = make_energy(target, verify=False)
    assert len(calls) == 1 and len(compile_warnings(caught)) == 1
    assert "crashed (SIGSEGV)" in compile_warnings(caught)[0]
    assert energy.selection.endswith("; compiled torch probed unsafe here"), energy.selection
    assert "compiled" not in energy.selection.split(":")[0]
    if isinstance(energy, TorchEnergy):
        assert energy.compile is False and energy._compiled is None
    with warnings.catch_warnings(record=True) as caught:  # the cached verdict: no probe, no second warning
        warnings.simplefilter("always")
        again = make_energy(target, backend="torch", verify=False)
    assert len(calls) == 1 and compile_warnings(caught) == []
    assert again.selection == "torch: asked for; compiled torch probed unsafe here" and again.compile is False


def test_a_safe_verdict_puts_compiled_torch_into_the_timing(probing, monkeypatch):
    """The probe and the timing are faked (torch.compile too: the chunk function runs as it is)."""
    from cmt_openmm.energy.torch import energy as energy_module

    calls = fake_probe(monkeypatch, writes(GOOD_REPORT))
    monkeypatch.setattr(energy_module.torch, "compile", lambda function, **options: function)
    target = get_target("aldp-vacuum")

    def timings(compiled: float, eager: float, openmm: float):
        def seconds(energy, x):
            energy(x[:8])  # what the real timing's warm-up does: compiles the chunk
            if isinstance(energy, OpenMMEnergy):
                return openmm * len(x)
            return (compiled if energy.compile is True else eager) * len(x)
        monkeypatch.setattr(select, "_seconds", seconds)

    timings(compiled=12e-6, eager=40e-6, openmm=75e-6)
    energy = make_energy(target, verify=False)
    assert energy.selection == ("torch (compiled, probed safe): faster here (12 us per configuration with gradients; "
                                "eager torch 40, openmm 75)")
    assert energy.compile is True and energy._compiled is not None and energy.n_evaluations == 0
    assert len(calls) == 1

    timings(compiled=50e-6, eager=40e-6, openmm=75e-6)  # probed safe but slower: eager, compiled functions dropped
    energy = make_energy(target, verify=False)
    assert energy.selection == "torch: faster here (40 us per configuration with gradients; compiled torch 50, openmm 75)"
    assert energy.compile is False and energy._compiled is None and len(calls) == 1

    timings(compiled=12e-6, eager=40e-6, openmm=5e-6)
    assert isinstance(make_energy(target, verify=False), OpenMMEnergy)
    timings(compiled=12e-6, eager=40e-6, openmm=75e-6)
    energy = make_energy(target, backend="torch", verify=False)
    assert energy.selection == ("torch (compiled, probed safe): asked for, faster here (12 us per configuration with "
                                "gradients; eager torch 40)") and energy.compile is True


def test_compile_false_and_the_environment_variable_never_probe(probing, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("probed")

    monkeypatch.setattr(compile_probe, "run_probe", no_probe)
    monkeypatch.setattr(compile_probe, "compile_verdict", no_probe)
    target = get_target("aldp-vacuum")
    assert TrainConfig().energy.compile == "auto"
    config = TrainConfig.from_dict({"energy": {"compile": False}})
    energy = make_energy(target, compile=config.energy.compile, verify=False)
    assert "probed" not in energy.selection and getattr(energy, "compile", False) is False
    assert make_energy(target, backend="torch", compile=False, verify=False).compile is False
    assert isinstance(make_energy(target, backend="openmm"), OpenMMEnergy)
    monkeypatch.setenv(compile_probe.ENVIRONMENT_VARIABLE, "0")
    for compile in ("auto", True):
        energy = make_energy(target, backend="torch", compile=compile, verify=False)
        assert energy.compile is False and energy._compiled is None
    assert not list(probing.parent.glob("compile-probes/*"))


# -- the real probe ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_real_probe_finds_compiled_aldp_obc_safe_and_make_energy_uses_it(probing, monkeypatch):
    """Compiles aldp-obc (GBSAOBCForce) in a subprocess, compares it with eager torch and OpenMM,
    caches the verdict; make_energy then compiles in-process and times it (compiled is ~3x faster
    than eager torch and ~5x faster than OpenMM here)."""
    target = get_target("aldp-obc")
    energy = make_energy(target)
    verdict = json.loads(next(probing.glob("*.json")).read_text())
    report = verdict["report"]
    assert verdict["safe"] is True, verdict["reason"]
    assert report["compiled"] and report["failures_agree"] and report["n_configurations"] > 2 * max(
        report["chunk_sizes"].values())
    for against in ("eager", "openmm"):
        assert report["max_relative_errors"][against]["force"] <= report["tolerances"]["force"]
    assert set(report["seconds_per_configuration"]) == {"compiled", "eager", "openmm_reference"}
    assert energy.selection.startswith("torch (compiled, probed safe): faster here"), energy.selection
    assert energy.compile is True and energy._compiled is not None
    x = target.positions[None] + 0.01 * np.random.default_rng(1).normal(size=(300, target.n_atoms, 3))
    with OpenMMEnergy(target) as reference:
        np.testing.assert_allclose(energy(x).numpy(), reference(x).numpy(), rtol=1e-9)
    assert energy._compiled_energy is not None  # energies only: the compiled function the probe checked too

    monkeypatch.setattr(compile_probe, "run_probe", lambda *a, **k: pytest.fail("probed again"))
    assert make_energy(target, backend="torch").selection.startswith("torch (compiled, probed safe)")
