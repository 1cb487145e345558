"""The Run object: one way to read and write run directories, for the API and the command line alike."""
import json

import numpy as np
import pytest

import cmt_openmm
from cmt_openmm import CMTInputError, Run
from cmt_openmm.cli.main import main

TINY = {"method": "cmt", "seed": 0, "max_steps": 2, "budget": 10_000,
        "flow": {"n_layers": 2, "hidden": 8, "n_bins": 4},
        "cmt": {"n_samples": 200, "fit_steps": 2, "batch_size": 100}}


def _own_aldp():
    """Alanine dipeptide as a user's own System (not a built-in): the run keeps its XML and PDB."""
    import openmm

    builtin = cmt_openmm.get_target("aldp-vacuum")
    system = openmm.XmlSerializer.clone(builtin.system)
    system.getForce(0).setForceGroup(3)  # another System: not the built-in any more
    return cmt_openmm.Target(system, builtin.topology, builtin.positions, 300.0, name="my-aldp")


def test_api_run_in_a_relative_folder_is_read_by_the_cli(tmp_path, monkeypatch, capsys):
    """cmt_openmm.train(target, config, "runs/api") then `cmt-openmm sample runs/api` from the same folder."""
    monkeypatch.chdir(tmp_path)
    cmt_openmm.train(_own_aldp(), {**TINY, "max_steps": 2, "energy": {"backend": "openmm"}}, "runs/api",
                     progress=False)
    assert main(["sample", "runs/api", "--n", "300", "--out", "s.npz", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 300 and (tmp_path / "s.npz").is_file()
    run = Run.open("runs/api")
    assert run.directory == tmp_path / "runs" / "api"
    assert run.config.max_steps == 2 and len(run.history) == 2
    monkeypatch.chdir(tmp_path / "runs")  # the opened run no longer depends on the current folder
    assert len(run.sample(100, progress=False)) == 100


def test_run_created_with_a_target_object_reopens_with_the_same_energies(tmp_path, capsys):
    """A Target built in Python (here a System that is not a built-in) is saved with the run."""
    from cmt_openmm.energy import OpenMMEnergy

    target = _own_aldp()
    run = Run.create(tmp_path / "mine", {**TINY, "max_steps": 1, "energy": {"backend": "openmm"}}, target=target)
    run.train(progress=False, report=False)
    again = Run.open(tmp_path / "mine")
    assert again.spec.system["name"] == "my-aldp" and again.spec.temperature == 300.0
    x = target.positions[None] + 0.01 * np.random.default_rng(0).normal(size=(4, *target.positions.shape))
    with OpenMMEnergy(target) as mine, OpenMMEnergy(again.target) as reopened:
        np.testing.assert_allclose(reopened(x).numpy(), mine(x).numpy(), rtol=1e-12)
    assert main(["sample", str(tmp_path / "mine"), "--n", "50", "--out", str(tmp_path / "m.npz"), "--quiet"]) == 0


def test_create_refuses_a_taken_directory_and_resume_checks_settings(tmp_path):
    run = Run.create(tmp_path / "r", {"system": "toy-double-well", **TINY})
    run.train(progress=False, report=False)
    with pytest.raises(CMTInputError, match="already holds a run"):
        Run.create(tmp_path / "r", {"system": "toy-double-well", **TINY})
    with pytest.raises(CMTInputError, match="other cmt settings"):
        Run.create(tmp_path / "r", {"system": "toy-double-well", **TINY, "cmt": {**TINY["cmt"], "eps_tr": 0.3}},
                   resume=True)
    more = Run.create(tmp_path / "r", {"system": "toy-double-well", **TINY}, overrides={"max_steps": 3}, resume=True)
    assert more.train(progress=False, report=False)["stop_reason"] == "max_steps"
    assert len(Run.open(tmp_path / "r").history) == 3
    with pytest.raises(CMTInputError, match="no checkpoint to resume"):
        Run.create(tmp_path / "new", {"system": "toy-double-well", **TINY}, resume=True)


def test_resuming_a_finished_run_trains_and_writes_nothing(tmp_path):
    """A run stopped by its max_steps and resumed with the same settings has finished: one sentence
    says why and what to raise, and train() returns the stored report without touching a file;
    with max_steps raised it trains on."""
    config = {"system": "toy-double-well", **TINY, "report": {"n_samples": 200, "n_draws": 1}}
    Run.create(tmp_path / "r", config).train(progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r").iterdir() if p.is_file() and p.name != "run.yaml"}
    again = Run.create(tmp_path / "r", config, resume=True)
    assert again.finished == (f"the run in {tmp_path / 'r'} has already finished (it reached its max_steps of 2 "
                              "steps); raise max_steps (--max-steps) to continue.")
    assert again.train(progress=False) == json.loads((tmp_path / "r" / "report.json").read_text())
    assert {name: (tmp_path / "r" / name).stat().st_mtime_ns for name in before} == before
    more = Run.create(tmp_path / "r", config, overrides={"max_steps": 3}, resume=True)
    assert more.finished is None
    assert more.train(progress=False, report=False)["stop_reason"] == "max_steps" and len(more.history) == 3


def test_train_docstring_names_every_resumable_setting():
    from cmt_openmm.training import train
    from cmt_openmm.training.config import RESUMABLE

    assert all(f"``{name}``" in train.__doc__ for name in RESUMABLE)


def test_run_file_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text("system: toy-double-well\ntemperature: 250\nbudget: 2e4\n")
    monkeypatch.chdir(tmp_path)
    run = Run.create("out", "cfg/run.yaml")
    assert run.directory == tmp_path / "out" and run.spec.temperature == 250.0 and run.config.budget == 20_000
    stored = Run.open(tmp_path / "out")
    assert stored.spec.to_dict() == run.spec.to_dict()


def test_a_run_file_may_start_from_a_preset(tmp_path):
    """`preset:` fills in a built-in configuration; the file's own keys win, section by section."""
    from cmt_openmm.runs import get_preset, parse_run_config

    preset = get_preset("aldp-quick")
    spec = parse_run_config({"preset": "aldp-quick", "system": "toy-double-well", "max_minutes": 5,
                             "cmt": {"eps_tr": 0.3}})
    assert spec.system == "toy-double-well"
    assert spec.train.max_minutes == 5 and spec.train.cmt.eps_tr == 0.3
    assert spec.train.cmt.n_samples == preset["cmt"]["n_samples"]  # the rest of the section is the preset's
    assert spec.train.max_steps == preset["max_steps"] and spec.train.flow.hidden == preset["flow"]["hidden"]
    with pytest.raises(CMTInputError, match="unknown preset"):
        parse_run_config({"preset": "aldp-slow", "system": "toy-double-well"})
