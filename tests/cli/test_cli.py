"""The `cmt-openmm` command line end to end: train (preset, YAML, resume), sample, evaluate, errors.

One toy run (the `toy-quick` preset) is trained once per module and shared; the real-ALDP test
trains a tiny flow for two CMT annealing steps on OpenMM energies, then samples and reweights.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cmt_openmm.cli import main
from cmt_openmm.importance import forward_ess, reverse_ess
from helpers import ROOT


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    assert main(["train", "--preset", "toy-quick", "--out", str(out), "--quiet"]) == 0
    return out


def test_train_preset_writes_run_directory(toy_run):
    for name in ("run.yaml", "config.yaml", "checkpoint.pt", "metrics.jsonl", "generator.safetensors",
                 "report.json", "report.md", "training_curves.png", "marginal_x.png"):
        assert (toy_run / name).is_file(), name
    records = [json.loads(line) for line in (toy_run / "metrics.jsonl").read_text().splitlines()]
    assert records and all("lam" in r and "energy_evaluations" in r for r in records)
    report = json.loads((toy_run / "report.json").read_text())
    assert report["system"] == "toy-double-well" and report["method"] == "cmt"
    assert report["training"]["steps"] == len(records)
    assert report["training"]["energy_evaluations"] == records[-1]["energy_evaluations"] > 0
    ess = report["samples"]["reverse_ess"]
    assert len(ess["draws"]) == 3
    assert (ess["median"], ess["min"], ess["max"]) == (np.median(ess["draws"]), min(ess["draws"]), max(ess["draws"]))
    # each draw's ESS is the ESS of that draw's samples: redraw the first one from the saved generator
    from cmt_openmm import Run
    from cmt_openmm.sampling.reweighting import reweight

    saved = Run.open(toy_run)
    first = reweight(saved.generator, saved.target, saved.spec.report["n_samples"],
                     seed=saved.spec.report["seed"], progress=False, min_effective_samples=0)
    assert first.ess == pytest.approx(ess["draws"][0], rel=1e-9)
    assert report["samples"]["n_effective"] > 100 and report["samples"]["reliable"] is True
    modes = report["samples"]["modes"]
    assert np.isclose(sum(modes["reweighted"]), 1.0) and len(modes["exact"]) == 2
    assert "reverse ESS" in (toy_run / "report.md").read_text()


def test_resume_finished_run_changes_nothing(toy_run, capsys):
    """Resuming a run that reached its target says so in one sentence and rewrites nothing."""
    before = {p.name: p.stat().st_mtime_ns for p in toy_run.iterdir() if p.is_file() and p.name != "run.yaml"}
    rc, out, err = run(capsys, "train", "--out", toy_run, "--resume", "--quiet")
    assert rc == 0
    assert {name: (toy_run / name).stat().st_mtime_ns for name in before} == before
    assert err == (f"[cmt-openmm] the run in {toy_run.resolve()} has already finished (target reached), so there is "
                   "nothing left to train; sample or evaluate it.\n")
    assert json.loads(out) == json.loads((toy_run / "report.json").read_text())


def test_resume_partial_run(tmp_path, capsys):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "system": "toy-double-well", "method": "cmt", "seed": 3, "max_steps": 1,
        "flow": {"n_layers": 1, "hidden": 8},
        "cmt": {"n_samples": 200, "fit_steps": 2, "batch_size": 100},
        "report": {"n_samples": 200, "n_draws": 2},
    }))
    out = tmp_path / "run"
    assert run(capsys, "train", config, "--out", out, "--quiet")[0] == 0
    rc, stdout, _ = run(capsys, "train", config, "--out", out, "--resume", "--max-steps", 3, "--quiet")
    assert rc == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert json.loads(stdout)["training"]["energy_evaluations"] == 600


def test_sample_writes_npz_pdb_dcd_and_weights(toy_run, tmp_path, capsys):
    import mdtraj

    npz, pdb, dcd, csv = (tmp_path / f"s.{ext}" for ext in ("npz", "pdb", "dcd", "csv"))
    rc, out, err = run(capsys, "sample", toy_run, "--n", 300, "--out", npz, "--pdb", pdb, "--dcd", dcd,
                       "--weights", csv, "--resample", 40, "--quiet")
    assert rc == 0
    summary = json.loads(out)
    assert summary["n"] == 300
    with np.load(npz) as data:  # resampled frames repeat samples: how many are distinct is said
        distinct = len(np.unique(data["resampled_indices"]))
        n_eff = 300 * reverse_ess(data["log_weights"])
    assert summary["resampled_distinct"] == distinct
    assert summary["resampled_note"] == (
        f"the 40 resampled frames hold {distinct} distinct samples (resampling repeats samples in proportion to "
        f"their weights) and carry no more information than the N_eff = {n_eff:,.0f} effective samples of the 300 "
        "drawn.")
    assert err == f"[cmt-openmm] {summary['resampled_note']}\n"
    with np.load(npz) as data:
        assert summary["ess"] == pytest.approx(reverse_ess(data["log_weights"]), rel=1e-12)  # of the stored samples
        assert data["positions"].shape == (300, 1, 3)
        for key in ("log_q", "reduced_energy", "log_weights"):
            assert data[key].shape == (300,)
        assert np.isfinite(data["log_weights"]).all()
        np.testing.assert_allclose(data["log_weights"], -data["reduced_energy"] - data["log_q"])
        assert data["resampled_indices"].shape == (40,)
    traj = mdtraj.load(str(dcd), top=str(pdb))
    assert traj.n_frames == 40 and traj.n_atoms == 1
    rows = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert rows.shape == (300, 3) and np.isclose(rows[:, 2].sum(), 1.0)
    assert json.loads(npz.with_suffix(".json").read_text())["n"] == 300


def test_evaluate_with_reference(toy_run, tmp_path, capsys):
    target_positions = np.random.default_rng(0).normal([-0.5, 0.0, 0.0], 0.05, size=(100, 1, 3))
    ref = tmp_path / "ref.npz"
    np.savez(ref, positions=target_positions)
    rc, out, err = run(capsys, "evaluate", toy_run, "--reference", ref, "--n", 300, "--draws", 2, "--quiet")
    assert rc == 0
    result = json.loads(out)
    assert result["reference"]["n_reference"] == 100
    assert next(iter(result)) == "verdict" and result["verdict"]["target_reached"] is True  # the JSON opens with it
    assert f"[cmt-openmm] verdict: {result['verdict']['summary']}" in err
    assert (toy_run / "evaluation.md").read_text().splitlines()[2].startswith("**Verdict**: training reached its target")
    # the forward ESS of the reference frames, recomputed from the generator and the energies
    from cmt_openmm import Run
    from cmt_openmm.energy import OpenMMEnergy

    saved = Run.open(toy_run)
    target = saved.target
    with torch.no_grad():
        log_q = saved.generator.log_prob(torch.as_tensor(target_positions)).numpy()
    with OpenMMEnergy(target) as energy:
        u = np.asarray(energy(target_positions), dtype=float)
    assert result["reference"]["forward_ess"] == pytest.approx(forward_ess(-u - log_q), rel=1e-9)
    assert len(result["samples"]["reverse_ess"]["draws"]) == 2
    assert json.loads((toy_run / "evaluation.json").read_text())["reference"]["n_reference"] == 100


def test_evaluate_stdout_stays_json_with_a_dcd_reference(toy_run, tmp_path):
    """mdtraj's DCD plugin prints on the process's stdout from C, which `evaluate … > eval.json`
    must not catch: run as a process, its stdout parses as JSON."""
    import mdtraj

    from cmt_openmm import Run

    topology = mdtraj.Topology.from_openmm(Run.open(toy_run).target.topology)
    frames = np.random.default_rng(1).normal([-0.5, 0.0, 0.0], 0.05, size=(50, 1, 3)).astype(np.float32)
    dcd = tmp_path / "md.dcd"
    mdtraj.Trajectory(frames, topology).save_dcd(str(dcd))
    proc = subprocess.run([sys.executable, "-m", "cmt_openmm", "evaluate", str(toy_run), "--reference", str(dcd),
                           "--n", "300", "--draws", "2", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "dcdplugin" not in proc.stdout
    assert json.loads(proc.stdout)["reference"]["n_reference"] == 50


def test_budget_below_one_step_exits_2_without_a_report(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(capsys, "train", "--preset", "toy-quick", "--out", out, "--budget", 500, "--quiet")
    assert rc == 2 and stdout == ""
    errors = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(errors) == 1 and "budget of 500" in errors[0] and "(1,000 evaluations)" in errors[0]
    assert errors[0] == err.strip().splitlines()[-1]
    assert "Traceback" not in err and not (out / "report.json").exists()


def test_demo_summary_marks_an_unreliable_population(tmp_path, capsys, monkeypatch):
    """With a handful of effective samples the demo prints "unreliable (N_eff = …)", not "0.0000 ± 0.0000"."""
    import importlib

    cli = importlib.import_module("cmt_openmm.cli.main")
    ess = {"median": 3e-4, "min": 2e-4, "max": 4e-4, "draws": [2e-4, 3e-4, 4e-4]}
    result = {"system": "aldp-vacuum", "temperature": 300.0, "method": "cmt", "plots": [],
              "training": {"steps": 1, "energy_evaluations": 4000, "wall_time_s": 1.0, "stop_reason": "max_steps"},
              "samples": {"reverse_ess": ess, "n_draws": 3, "n_effective": 1.5, "reliable": False,
                          "phi_positive_population": {"value": 2e-7, "error": 1e-7, "n_effective": 1.5,
                                                      "reliable": False}}}
    monkeypatch.setattr(cli.Run, "train", lambda self, **k: result)
    monkeypatch.setattr(cli.Run, "write_samples", lambda self, *a, **k: {})
    rc, out, _ = run(capsys, "demo", "--out", tmp_path / "demo", "--quiet")
    assert rc == 0
    assert "phi > 0 basin population (reweighted): unreliable (N_eff = 1.5 effective samples)" in out
    assert "±" not in out
    result["samples"]["phi_positive_population"].update(value=0.02, error=0.003, n_effective=800.0, reliable=True)
    rc, out, _ = run(capsys, "demo", "--out", tmp_path / "demo", "--quiet")
    assert "phi > 0 basin population (reweighted): 0.0200 ± 0.0030" in out


@pytest.mark.parametrize("content, expected", [
    ({"system": "toy-double-well", "method": "sgd"}, "method"),
    ({"system": "no-such-system"}, "unknown system"),
    ({"system": "toy-double-well", "cmt": {"eps_tr": -1}}, "eps_tr"),
    ({"system": {"pdb": "missing.pdb", "forcefield": ["amber99sbildn.xml"]}}, "missing.pdb"),
    ("system: [unclosed", "not valid YAML"),
])
def test_bad_config_is_one_sentence_exit_2(tmp_path, capsys, content, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    rc, _, err = run(capsys, "train", config, "--out", tmp_path / "run", "--quiet")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err


def test_missing_files_and_run_dirs_exit_2(tmp_path, capsys):
    for argv in (("train", tmp_path / "nope.yaml", "--out", tmp_path / "r"),
                 ("sample", tmp_path, "--n", 10, "--out", tmp_path / "s.npz"),
                 ("evaluate", tmp_path / "nowhere"),
                 ("sample", tmp_path, "--n", 10, "--out", tmp_path / "s.txt")):
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_entry_point_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cmt_openmm", "train", str(tmp_path / "x.yaml"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_aldp_openmm_cmt_samples_reweighting_end_to_end(tmp_path, capsys):
    """The real path: OpenMM energies of alanine dipeptide -> CMT steps -> samples -> weights."""
    config = tmp_path / "aldp.yaml"
    config.write_text(yaml.safe_dump({
        "system": "aldp-vacuum", "temperature": 300, "method": "cmt", "seed": 0, "max_steps": 2,
        "flow": {"n_layers": 2, "hidden": 16, "n_bins": 4},
        "cmt": {"n_samples": 256, "fit_steps": 4, "batch_size": 64, "eps_tr": 0.5, "eps_ent": 1.0},
        "report": {"n_samples": 200, "n_draws": 2},
    }))
    out = tmp_path / "run"
    rc, stdout, _ = run(capsys, "train", config, "--out", out, "--quiet")
    assert rc == 0
    report = json.loads(stdout)
    assert report["training"]["steps"] == 2 and report["training"]["energy_evaluations"] == 512
    assert report["samples"]["chirality_flips"] == 0
    assert "basin_populations" in report["samples"] and (out / "ramachandran_fes.png").is_file()
    assert (out / "phi_free_energy.png").is_file() and report["samples"]["phi_positive_samples"]["residue_1"] >= 0
    # two annealing steps of a tiny flow: a handful of samples carry the weight, and the report says so
    samples = report["samples"]
    assert samples["reliable"] is False and samples["n_effective"] < 100
    assert samples["phi_positive_population"]["reliable"] is False
    md = (out / "report.md").read_text()
    assert "unreliable (N_eff = " in md and "0.0000 ± 0.0000" not in md
    npz = tmp_path / "aldp.npz"
    rc, stdout, _ = run(capsys, "sample", out, "--n", 300, "--out", npz, "--quiet")
    assert rc == 0
    with np.load(npz) as data:
        assert data["positions"].shape == (300, 22, 3)
        assert not data["invalid"].any()  # no chirality flips
        assert np.isfinite(data["log_weights"]).all()
    with np.load(npz) as data:
        assert json.loads(stdout)["ess"] == pytest.approx(reverse_ess(data["log_weights"]), rel=1e-12)

    # ... -> the generator as exact MCMC moves between Langevin segments on the same OpenMM System
    chain = tmp_path / "chain.npz"
    mcmc = ("mcmc", out, "--out", chain, "--steps-per-iteration", 10, "--flow-attempts", 5, "--quiet")
    rc, stdout, err = run(capsys, *mcmc, "--iterations", 3)
    assert rc == 0
    summary = json.loads(stdout)
    assert [m["n_proposed"] for m in summary["flow_moves"]] == [15] and summary["exchange_acceptance"] is None
    assert summary["timestep_fs"] == 1.0  # no constraints in this System: 1 fs (2 with HBonds)
    php = summary["populations"]["phi_positive_population"]
    assert summary["n_frames"] == 3 and "value" in php and php["transitions"] < 20 and php["reliable"] is False
    assert "3 frames at 300 K; flow moves accepted" in err and "φ > 0 population by residue" in err
    assert ("this chain is MD alone" in err) == (summary["flow_moves"][0]["n_accepted"] == 0)
    from cmt_openmm import Run

    target = Run.open(out).target
    with np.load(chain) as data:
        first, u = data["positions"], data["reduced_energy"]
    assert u == pytest.approx([target.reduced_potential(x) for x in first], rel=1e-5)  # the run's own System
    rc, stdout, _ = run(capsys, *mcmc, "--iterations", 5)  # continues the stored chain
    with np.load(chain) as data:
        assert rc == 0 and data["positions"].shape == (5, 22, 3)
        np.testing.assert_array_equal(data["positions"][:3], first)
    assert json.loads(stdout)["flow_moves"][0]["n_proposed"] == 25
    rc, _, err = run(capsys, *mcmc, "--iterations", 6, "--flow-attempts", 6)
    assert rc == 2 and "other settings (flow_attempts)" in err and len(err.strip().splitlines()) == 1


def test_reference_md_command_writes_frames(tmp_path, capsys):
    out = tmp_path / "ref.npz"
    rc, stdout, _ = run(capsys, "reference-md", "toy-double-well", "--out", out, "--iterations", 3,
                        "--steps-per-iteration", 5, "--replicas", 2, "--quiet")
    assert rc == 0
    summary = json.loads(stdout)
    with np.load(out) as data:
        assert data["positions"].shape == (summary["n_frames"], 1, 3) and summary["n_frames"] >= 2
    assert json.loads(out.with_suffix(".json").read_text())["n_frames"] == summary["n_frames"]


def test_mcmc_with_flow_moves_samples_both_wells_where_md_alone_stays_in_one(toy_run, tmp_path, capsys):
    """`cmt-openmm mcmc` on the toy double well: 200 Langevin segments of 50 fs, each followed by
    20 flow proposals. MD alone never crosses the barrier at 300 K; with the generator's exact moves
    the chain's left-well fraction matches the exact weight (1D quadrature of the toy)."""
    from cmt_openmm import Run

    toy = Run.open(toy_run).target
    exact = toy.mode_weights()[0]
    fractions = {}
    for command in ("mcmc", "reference-md"):
        out = tmp_path / f"{command}.npz"
        rc, stdout, _ = run(capsys, command, toy_run, "--out", out, "--iterations", 200, "--steps-per-iteration", 50,
                            "--replicas", 1, "--seed", 3, "--platform", "Reference", "--quiet")
        assert rc == 0
        with np.load(out) as data:
            fractions[command] = np.mean(np.asarray(toy.mode_of(data["positions"])) == 0)
    summary = json.loads((tmp_path / "mcmc.json").read_text())
    assert summary["flow_moves"][0]["acceptance"] > 0.3 and summary["flow_generator"]
    tolerance = 4 * np.sqrt(2 * exact * (1 - exact) / 200)  # x2 for correlation between frames
    assert abs(fractions["mcmc"] - exact) < tolerance
    assert abs(fractions["reference-md"] - exact) > tolerance  # the same test fails without the flow moves


def test_mcmc_refuses_a_folder_without_a_trained_generator_in_one_sentence(tmp_path, capsys):
    from cmt_openmm import Run

    Run.from_preset(tmp_path / "untrained", "toy-quick")
    expected = {tmp_path / "untrained": "holds no trained generator yet; train it first", tmp_path: "run.yaml"}
    for folder, sentence in expected.items():
        rc, _, err = run(capsys, "mcmc", folder, "--out", tmp_path / "chain.npz", "--quiet")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and sentence in err, err


def test_resume_with_other_settings_is_refused_and_keeps_run_file(toy_run, tmp_path, capsys):
    before = (toy_run / "run.yaml").read_text()
    rc, _, err = run(capsys, "train", "--preset", "toy-quick", "--out", toy_run, "--resume", "--seed", 7, "--quiet")
    assert rc == 2 and "seed" in err and len(err.strip().splitlines()) == 1
    assert (toy_run / "run.yaml").read_text() == before


def test_every_preset_is_a_valid_run_file():
    from cmt_openmm.runs.presets import get_preset, list_presets
    from cmt_openmm.runs.run_files import parse_run_config

    for name in list_presets():
        spec = parse_run_config(get_preset(name))
        assert spec.train.budget == "auto" or spec.train.budget >= spec.train.cmt.n_samples, name


def test_a_full_disk_during_train_names_the_path_and_the_resume_command(tmp_path, capsys, monkeypatch):
    """A checkpoint that cannot be written (ENOSPC, faked) ends `train` with one sentence: the path,
    why, and the exact command that continues the run (issue 25)."""
    import errno
    import os

    from cmt_openmm import files

    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "system": "toy-double-well", "method": "cmt", "seed": 3, "max_steps": 1,
        "flow": {"n_layers": 1, "hidden": 8}, "cmt": {"n_samples": 200, "fit_steps": 2, "batch_size": 100},
        "report": {"n_samples": 200, "n_draws": 2},
    }))
    out = tmp_path / "run"
    assert run(capsys, "train", config, "--out", out, "--quiet")[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    replace = os.replace

    def full_disk(source, target):
        if str(target).endswith("checkpoint.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        return replace(source, target)

    monkeypatch.setattr(files.os, "replace", full_disk)
    rc, stdout, err = run(capsys, "train", config, "--out", out, "--resume", "--max-steps", 3, "--quiet")
    assert rc == 2 and stdout == ""
    assert err == (f"cmt-openmm train: error: cannot write {out / 'checkpoint.pt'}: no space left on device (errno 28); "
                   "the previous file is intact; free space and write it again; then continue the run with: "
                   f"cmt-openmm train {config} --out {out} --resume --max-steps=3\n")
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_sigterm_during_sample_leaves_no_output_file(toy_run, tmp_path):
    """SIGTERM while `sample` writes: exit 143, one sentence, nothing under the output names and no
    temporary files (they are removed as the interrupt unwinds), the previous file intact."""
    import os
    import signal
    import time

    out = tmp_path / "s.npz"
    out.write_bytes(b"previous")
    proc = subprocess.Popen([sys.executable, "-m", "cmt_openmm", "sample", str(toy_run), "--n", str(10**8), "--out",
                             str(out), "--dcd", str(tmp_path / "s.dcd"), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.startswith(".s.tmp-") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == (
        f"[cmt-openmm] SIGTERM stopped sampling before its files were complete; nothing was written under {out}, "
        f"{tmp_path / 's.dcd'} (previous files there are intact), so run the command again.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"] and out.read_bytes() == b"previous"


def test_warnings_reach_the_user_as_one_line_notes(capsys, monkeypatch):
    """A library warning during a command is one line of its own, not Python's file, line and source."""
    import importlib
    import warnings

    cli = importlib.import_module("cmt_openmm.cli.main")

    def warns(args):
        warnings.warn("only 3 effective samples; draw more", UserWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_presets", warns)  # the parser is built inside main, from the module's names
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["presets"]) == 0
    err = capsys.readouterr().err
    assert "cmt-openmm: warning: only 3 effective samples; draw more." in err
    assert "UserWarning" not in err and "warnings.warn" not in err


def test_a_run_stopped_by_max_minutes_continues_with_the_command_its_verdict_gives(tmp_path, capsys):
    """`--max-minutes` raises the run's training time on resume, as the verdict says, also for a preset run."""
    from cmt_openmm.training import load_history

    out = tmp_path / "run"
    code = main(["train", "--preset", "toy-quick", "--out", str(out), "--max-minutes", "0.0003", "--quiet"])
    assert code == 0
    first = load_history(out)
    assert len(first) < 6 and yaml.safe_load((out / "config.yaml").read_text())["max_minutes"] == 0.0003
    err = capsys.readouterr().err
    assert f"`cmt-openmm train --out {out.resolve()} --resume --max-minutes M`" in err
    assert main(["train", "--out", str(out), "--resume", "--max-minutes", "1", "--quiet"]) == 0
    assert len(load_history(out)) > len(first)  # trained on (to its target or the preset's max_steps)
    assert json.loads((out / "report.json").read_text())["training"]["stop_reason"] != "max_minutes"
