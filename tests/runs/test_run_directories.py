"""One run format for the CLI and the API: a run directory describes itself, whoever made it."""
from __future__ import annotations

import json

import mdtraj
import numpy as np
import pytest
from openmmtools import utils

import cmt_openmm
from cmt_openmm.cli import main
from cmt_openmm.errors import CMTInputError
from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.sampling.moves import FlowIndependenceMove
from cmt_openmm.training import train
from helpers import chain_molecule  # a user's own molecule (not built in)

TINY = {"method": "cmt", "budget": 4000, "max_steps": 2, "flow": {"n_layers": 1, "hidden": 8, "n_bins": 4},
        "cmt": {"n_samples": 500, "fit_steps": 2, "batch_size": 250}}


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """A run of a user's own molecule trained through the Python API (no run.yaml)."""
    run_dir = tmp_path_factory.mktemp("api") / "run"
    train(chain_molecule(3), TINY, run_dir=run_dir, progress=False)
    return run_dir


def test_api_run_directory_holds_its_target(api_run):
    assert {p.name for p in (api_run / "target").iterdir()} == {"system.xml", "structure.pdb", "target.json"}
    assert not (api_run / "run.yaml").exists()


def test_generator_of_a_users_molecule_loads_without_target(api_run):
    generator = BoltzmannGenerator.load(api_run / "generator.safetensors")
    assert generator.target_name == "chain-3" and generator.n_atoms == 3
    assert cmt_openmm.load_generator(api_run).content_hash() == generator.content_hash()


def test_report_api_and_cli_work_on_an_api_run(api_run, tmp_path, capsys):
    result = cmt_openmm.report(api_run, n_samples=300, n_draws=2, progress=False)
    assert result["system"] == "chain-3" and (api_run / "evaluation.json").is_file()
    assert len(result["samples"]["reverse_ess"]["draws"]) == 2
    out = tmp_path / "s.npz"
    assert main(["sample", str(api_run), "--n", "50", "--out", str(out), "--quiet"]) == 0
    assert np.load(out)["positions"].shape == (50, 3, 3)


def test_evaluate_reads_the_users_own_dcd_trajectory(api_run, tmp_path, capsys):
    target = cmt_openmm.Target.load(api_run / "target")
    frames = target.positions + 0.002 * np.random.default_rng(0).normal(size=(20, 3, 3))
    trajectory = mdtraj.Trajectory(frames.astype(np.float32), mdtraj.Topology.from_openmm(target.topology))
    trajectory.save_dcd(str(tmp_path / "md.dcd"))
    assert main(["evaluate", str(api_run), "--reference", str(tmp_path / "md.dcd"), "--n", "200", "--draws", "2",
                 "--quiet"]) == 0
    reference = json.loads(capsys.readouterr().out)["reference"]
    assert reference["n_reference"] == 20
    (tmp_path / "bad.dcd").write_bytes(b"not a trajectory")
    assert main(["evaluate", str(api_run), "--reference", str(tmp_path / "bad.dcd"), "--quiet"]) == 2
    assert "mdtraj cannot read" in capsys.readouterr().err


def test_a_move_of_a_loaded_generator_serialises_by_reference_to_its_file(api_run):
    generator = BoltzmannGenerator.load(api_run / "generator.safetensors")
    move = FlowIndependenceMove(generator, n_steps=2, seed=0)
    state = utils.serialize(move)
    assert state["generator"]["path"] == str((api_run / "generator.safetensors").resolve())
    restored = utils.deserialize(state)
    assert restored.generator.content_hash() == generator.content_hash()


def test_damaged_generator_file_is_reported_as_damaged_even_with_a_target(api_run, tmp_path):
    broken = tmp_path / "generator.safetensors"
    broken.write_bytes((api_run / "generator.safetensors").read_bytes()[:200])
    with pytest.raises(CMTInputError, match="not a cmt_openmm generator file|damaged"):
        FlowIndependenceMove(str(broken), target=chain_molecule(3))


def test_corrupted_checkpoint_says_how_to_recover(tmp_path):
    run_dir = tmp_path / "run"
    train(chain_molecule(3), TINY, run_dir=run_dir, progress=False)
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CMTInputError, match="start the run afresh"):
        train(chain_molecule(3), TINY, run_dir=run_dir, resume=True, progress=False)
