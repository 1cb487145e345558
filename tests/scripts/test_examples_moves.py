"""The flow-move examples run end to end at a tiny size with a freshly built (untrained) generator.

Acceptance is ~0 with an untrained generator; what is tested is that the scripts work:
flow moves are attempted and counted, the replica-exchange run is stored and resumed.
"""
from __future__ import annotations

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory) -> str:
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems import get_target

    generator = BoltzmannGenerator.build(get_target("aldp-vacuum"), n_layers=2, hidden=16, n_bins=4, seed=0)
    path = tmp_path_factory.mktemp("generator") / "aldp.safetensors"
    generator.save(path)
    return str(path)


def test_openmm_simulation_example_with_hbonds_at_2_fs(tmp_path):
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems.inputs import target_from_entry

    target = target_from_entry({"pdb": str(__import__("cmt_openmm").systems.aldp_pdb_path()),
                                "forcefield": ["amber99sbildn.xml"], "constraints": "HBonds"})
    path = tmp_path / "hbonds.safetensors"
    BoltzmannGenerator.build(target, n_layers=2, hidden=16, n_bins=4, seed=0).save(path)
    example = load_script("examples/openmm_simulation_with_flow_moves.py")
    stats = example.main(["--generator", str(path), "--tiny", "--flow-log", str(tmp_path / "flow.csv")])
    assert stats["n_proposed"] == 200 // 50 * 4  # the move accepted the HBonds System (else refused)


def test_openmm_simulation_example(generator_file, tmp_path):
    example = load_script("examples/openmm_simulation_with_flow_moves.py")
    log = tmp_path / "flow.csv"
    stats = example.main(["--generator", generator_file, "--tiny", "--flow-log", str(log)])
    assert stats["n_proposed"] == 200 // 50 * 4
    rows = log.read_text().splitlines()
    assert len(rows) == 1 + 200 // 50 and rows[-1].startswith("200,4,")


def test_replica_exchange_example_runs_and_resumes(generator_file, tmp_path):
    example = load_script("examples/replica_exchange_with_flow_moves.py")
    storage = str(tmp_path / "re.nc")
    summary = example.main(["--generator", generator_file, "--tiny", "--storage", storage])
    assert summary["iteration"] == 3 and len(summary["states"]) == 2
    assert all(s["n_proposed"] == 3 * 4 for s in summary["states"])
    with pytest.raises(SystemExit, match="exists"):
        example.main(["--generator", generator_file, "--tiny", "--storage", storage])
    resumed = example.main(["--generator", generator_file, "--storage", storage, "--resume",
                            "--iterations", "2"])
    assert resumed["iteration"] == 5
    assert all(s["n_proposed"] == 5 * 4 for s in resumed["states"])
