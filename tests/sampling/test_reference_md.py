"""Replica-exchange reference data: file layout, resume, seeding, settings check, toy distribution."""
import json

import numpy as np
import pytest

from cmt_openmm import get_target
from cmt_openmm.errors import CMTInputError
from cmt_openmm.sampling.reference_md import load_reference, run_reference_md, temperature_ladder
from cmt_openmm.target import Target
from cmt_openmm.systems.toys import double_well_3d

# a named platform: "auto" times the platforms, and a fresh run repeats bit for bit only on one platform
TINY = dict(n_replicas=3, t_max=600.0, steps_per_iteration=20, progress=False, platform="Reference")


@pytest.fixture(scope="module")
def toy():
    return double_well_3d(300.0)


def test_ladder():
    np.testing.assert_allclose(temperature_ladder(300.0, 1200.0, 3), [300.0, 600.0, 1200.0])
    assert temperature_ladder(300.0, 300.0, 1).tolist() == [300.0]
    with pytest.raises(CMTInputError):
        temperature_ladder(300.0, 200.0, 3)


def test_tiny_run_writes_frames_and_resumes(toy, tmp_path, capsys):
    out = tmp_path / "ref.npz"
    first = run_reference_md(toy, out, n_iterations=3, seed=7, **TINY)
    assert "cite" not in capsys.readouterr().out  # no openmmtools citation banner without progress output
    assert first.positions.shape == (3, 1, 3) and first.reduced_energy.shape == (3,)
    assert (tmp_path / "ref.nc").exists() and (tmp_path / "ref_checkpoint.nc").exists()
    # u stored by openmmtools at state 0 is the target's reduced potential
    assert first.reduced_energy[-1] == pytest.approx(toy.reduced_potential(first.positions[-1]), rel=1e-5)

    resumed = run_reference_md(toy, out, n_iterations=5, seed=7, **TINY)
    assert resumed.positions.shape == (5, 1, 3)
    np.testing.assert_array_equal(resumed.positions[:3], first.positions)
    positions, provenance = load_reference(out)
    np.testing.assert_array_equal(positions, resumed.positions)
    assert positions.dtype == np.float64
    assert provenance["system"] == "toy-double-well" and provenance["n_frames"] == 5
    assert provenance["temperatures"] == pytest.approx([300.0, 300.0 * 2**0.5, 600.0])
    assert provenance["steps_per_iteration"] == 20 and provenance["seed"] == 7
    assert provenance["openmm"] and provenance["openmmtools"]
    with np.load(out) as data:
        assert json.loads(str(data["provenance"]))["timestep_fs"] == 1.0

    # same seed, fresh run: the same first 5 frames; other settings on resume are refused
    fresh = run_reference_md(toy, tmp_path / "fresh.npz", n_iterations=5, seed=7, **TINY)
    np.testing.assert_array_equal(fresh.positions[:3], first.positions)
    with pytest.raises(CMTInputError, match="steps_per_iteration"):
        run_reference_md(toy, out, n_iterations=6, seed=7, **{**TINY, "steps_per_iteration": 21})
    again = run_reference_md(toy, out, n_iterations=2, seed=7, resume=False, **TINY)
    assert again.positions.shape == (2, 1, 3) and again.provenance["n_iterations_stored"] == 2


def test_aldp_vacuum_tiny_run(tmp_path):
    from openmmtools.testsystems import AlanineDipeptideVacuum

    target = Target.from_openmmtools(AlanineDipeptideVacuum(constraints=None), 300.0, name="aldp-vacuum")
    ref = run_reference_md(target, tmp_path / "aldp.npz", n_replicas=2, t_max=400.0, n_iterations=2,
                           steps_per_iteration=10, n_equilibration=1, progress=False)
    assert ref.positions.shape == (1, 22, 3) and np.all(np.isfinite(ref.positions))
    assert ref.provenance["n_equilibration"] == 1


def test_auto_platform_takes_the_faster_of_reference_and_cpu(monkeypatch):
    from cmt_openmm.energy.openmm import platforms

    target = get_target("aldp-vacuum")
    seconds = platforms.md_seconds_per_step(target.system, target.positions, "Reference", n_steps=5)
    assert 0 < seconds < 1
    for timings, expected in (({"Reference": 2e-4, "CPU": 1e-4}, "CPU"), ({"Reference": 1e-4, "CPU": 2e-4}, "Reference")):
        monkeypatch.setattr(platforms, "md_seconds_per_step", lambda system, x, name, n=40, t=timings: t[name])
        assert platforms.resolve_md_platform("auto", target.system, target.positions) == expected
        assert platforms.resolve_md_platform("CPU", target.system, target.positions) == "CPU"  # a named one is kept


def test_auto_platform_run_records_the_platform_it_chose(tmp_path):
    target = get_target("aldp-vacuum")
    ref = run_reference_md(target, tmp_path / "aldp.npz", n_replicas=2, t_max=400.0, n_iterations=2,
                           steps_per_iteration=5, progress=False)
    assert ref.provenance["platform"] in ("Reference", "CPU")


def test_bad_inputs(toy, tmp_path):
    with pytest.raises(CMTInputError):
        run_reference_md(toy, tmp_path / "x.npz", n_iterations=0, **TINY)
    with pytest.raises(CMTInputError):
        run_reference_md(toy, tmp_path / "x.npz", n_iterations=2, **{**TINY, "platform": "NoSuchPlatform"})
    with pytest.raises(CMTInputError):
        load_reference(tmp_path / "missing.npz")


def test_toy_frames_follow_the_exact_distribution(toy, tmp_path):
    # 200 iterations x 200 steps (0.2 ps, ~independent frames); seed fixed so the test is deterministic
    ref = run_reference_md(toy, tmp_path / "dw.npz", n_replicas=3, t_max=1200.0, n_iterations=200,
                           steps_per_iteration=200, seed=3, progress=False, platform="Reference")
    n = len(ref.positions)
    left = np.mean(np.asarray(toy.mode_of(ref.positions)) == 0)
    p = toy.mode_weights()[0]
    assert abs(left - p) < 4 * np.sqrt(2 * p * (1 - p) / n)  # x2 for residual correlation
    edges = np.linspace(-0.3, 0.3, 7)
    counts, _ = np.histogram(ref.positions[:, 0, 1], bins=edges)
    expected = toy.marginal(1, edges) * n
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(2 * expected) + 2)


def test_reference_md_command_for_a_named_peptide_reports_every_residue(tmp_path, capsys, monkeypatch):
    import json

    from cmt_openmm.cli import main

    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    out = tmp_path / "ala4.npz"
    assert main(["reference-md", "ala4", "--out", str(out), "--iterations", "4", "--steps-per-iteration", "10",
                 "--replicas", "2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_frames"] == 4 and summary["system"] == "ala4"
    assert sorted(summary["populations"]["phi_positive_population"]) == ["residue_1", "residue_2", "residue_3"]


def test_flow_moves_run_at_every_temperature_and_bind_the_storage_to_the_generator(toy, tmp_path):
    from cmt_openmm import BoltzmannGenerator

    generator = BoltzmannGenerator.build(toy, n_layers=2, hidden=8, bound=3.0)
    generator.save(tmp_path / "g.safetensors")
    loaded = BoltzmannGenerator.load(tmp_path / "g.safetensors")
    out = tmp_path / "chain.npz"
    chain = run_reference_md(toy, out, n_iterations=4, seed=1, generator=loaded, flow_attempts=5,
                             **{**TINY, "n_replicas": 2})
    moves = chain.provenance["flow_moves"]
    assert [m["temperature"] for m in moves] == [300.0, 600.0] and [m["n_proposed"] for m in moves] == [20, 20]
    assert all(0 < m["n_accepted"] <= 20 for m in moves) and chain.provenance["exchange_acceptance"] is not None
    assert chain.provenance["flow_generator"] == loaded.content_hash() and chain.provenance["flow_attempts"] == 5
    other = BoltzmannGenerator.build(toy, n_layers=2, hidden=8, bound=3.0, seed=5)
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(CMTInputError, match="flow_generator"):
        run_reference_md(toy, out, n_iterations=6, seed=1, generator=BoltzmannGenerator.load(tmp_path / "other.safetensors"),
                         flow_attempts=5, **{**TINY, "n_replicas": 2})
    with pytest.raises(CMTInputError, match="flow_attempts must be at least 1"):
        run_reference_md(toy, tmp_path / "x.npz", n_iterations=2, generator=loaded, flow_attempts=0, **TINY)
