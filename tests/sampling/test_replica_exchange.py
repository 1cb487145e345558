"""The shared replica-exchange driver: fresh runs, resume, the settings check, seeding, and both of its users."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit
import pytest
from openmmtools import states
from openmmtools.multistate import ReplicaExchangeSampler

from cmt_openmm.errors import CMTInputError
from cmt_openmm.sampling.reference_md import load_reference, run_reference_md
from cmt_openmm.sampling.replica_exchange import (ReplicaExchangeOptions, SeededLangevinMove, run_replica_exchange,
                                                  write_frames)
from cmt_openmm.systems.toys import double_well_3d

TEMPERATURES = (300.0, 450.0)
SETTINGS = {"ladder": list(TEMPERATURES), "steps": 10}


@pytest.fixture(scope="module")
def toy():
    return double_well_3d(300.0)


def _run(toy, storage, calls=None, settings=SETTINGS, **options):
    """The driver on a two-temperature ladder of the toy; ``calls`` counts the ladder's constructions."""
    def ladder():
        if calls is not None:
            calls.append(1)
        move = SeededLangevinMove(timestep=2.0 * unit.femtosecond, collision_rate=5.0 / unit.picosecond, n_steps=10)
        return [states.ThermodynamicState(toy.system, t * unit.kelvin) for t in TEMPERATURES], move

    options = ReplicaExchangeOptions(**{"storage": storage, "n_iterations": 3, "seed": 5, "progress": False,
                                        "n_equilibration": 1, **options})
    return run_replica_exchange(ladder=ladder, start=states.SamplerState(toy.positions * unit.nanometer),
                                settings=settings, options=options)


def _same_state(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def test_driver_runs_resumes_refuses_other_settings_and_restarts(toy, tmp_path):
    storage, calls = tmp_path / "rx.nc", []
    np.random.seed(99)
    caller_state, logger = np.random.get_state(), logging.getLogger("openmmtools.multistate")
    level = logger.level
    first = _run(toy, storage, calls)
    assert _same_state(np.random.get_state(), caller_state) and logger.level == level  # the caller's state is back
    assert "_global_citation_silence" not in ReplicaExchangeSampler.__dict__
    assert calls == [1] and first.n_iterations_stored == 3 and first.n_replicas == 2
    assert first.positions.shape == (2, 1, 3) and (tmp_path / "rx_checkpoint.nc").exists()  # iterations 2 and 3
    # state 0's frames, with u at state 0 (300 K)
    np.testing.assert_allclose(first.reduced_energy, [toy.reduced_potential(x) for x in first.positions], rtol=1e-5)

    # seeded: the same frames from another storage whatever the caller's generator; another seed differs
    np.random.seed(1)
    again = _run(toy, tmp_path / "again.nc")
    np.testing.assert_array_equal(again.positions, first.positions)
    np.testing.assert_array_equal(again.reduced_energy, first.reduced_energy)
    assert not np.array_equal(_run(toy, tmp_path / "other.nc", seed=6).positions, first.positions)

    # other settings: refused in one sentence naming them, before anything is built or run
    with pytest.raises(CMTInputError, match=r"other settings \(steps\): pass resume=False") as refused:
        _run(toy, storage, calls, settings={**SETTINGS, "steps": 11}, n_iterations=5)
    assert str(refused.value).count(". ") == 0 and calls == [1]

    # a resume is reseeded from (seed, iteration), not from the caller's generator: two copies of
    # the storage continue with the same next iteration. (Later ones are not reproducible on
    # resume: a Context made with an unseeded integrator, as openmmtools' energy cache makes,
    # reseeds the Reference platform's shared generator.)
    copies = []
    for name, caller_seed in (("b", 1), ("c", 2)):
        (tmp_path / name).mkdir()
        for path in (storage, tmp_path / "rx_checkpoint.nc"):
            shutil.copy(path, tmp_path / name / path.name)
        np.random.seed(caller_seed)
        copies.append(_run(toy, tmp_path / name / storage.name, n_iterations=4).positions)
    np.testing.assert_array_equal(copies[0][:3], copies[1][:3])
    np.testing.assert_array_equal(copies[0][:2], first.positions)

    # same settings: the stored run continues to 5 iterations, its frames kept
    resumed = _run(toy, storage, calls, n_iterations=5)
    assert calls == [1] and resumed.n_iterations_stored == 5 and resumed.positions.shape == (4, 1, 3)
    np.testing.assert_array_equal(resumed.positions[:2], first.positions)
    assert np.all(np.isfinite(resumed.positions))

    # resume=False discards the storage: a fresh run again, the same frames as the first
    restarted = _run(toy, storage, calls, resume=False)
    assert calls == [1, 1] and restarted.n_iterations_stored == 3
    np.testing.assert_array_equal(restarted.positions, first.positions)

    provenance = restarted.provenance(extra=1)
    assert list(provenance)[: len(SETTINGS)] == list(SETTINGS) and list(provenance)[-4:] == \
        ["extra", "openmm", "openmmtools", "cmt_openmm"]
    assert provenance["n_frames"] == 2 and provenance["seed"] == 5 and provenance["storage"] == str(storage)
    out = write_frames(tmp_path / "frames.npz", restarted.positions, restarted.reduced_energy, provenance)
    positions, loaded = load_reference(out)
    np.testing.assert_array_equal(positions, restarted.positions)
    assert loaded == json.loads(json.dumps(provenance))


def test_options_are_checked(tmp_path):
    with pytest.raises(CMTInputError, match="n_equilibration"):
        ReplicaExchangeOptions(n_iterations=2, storage=tmp_path / "x.nc", n_equilibration=2)
    with pytest.raises(CMTInputError, match="NoSuchPlatform"):
        ReplicaExchangeOptions(n_iterations=2, storage=tmp_path / "x.nc", platform="NoSuchPlatform")
    cpu = openmm.Platform.getPlatformByName("CPU")
    assert ReplicaExchangeOptions(n_iterations=2, storage=tmp_path / "x.nc", platform=cpu).platform == "CPU"


def _raised_in_driver(excinfo) -> bool:
    return Path(str(excinfo.traceback[-1].path)).name == "replica_exchange.py"


def test_both_users_are_refused_a_resume_by_the_driver(toy, tmp_path):
    """The temperature ladder and the flow-bridged λ ladder resume through the one driver and its settings check."""
    from helpers import perturbed_generator

    from cmt_openmm.export.flow_bridged_remd import run_bridge_remd
    from cmt_openmm.generator import BoltzmannGenerator

    tiny = dict(n_replicas=2, t_max=400.0, steps_per_iteration=5, seed=1, progress=False, platform="Reference")
    reference = run_reference_md(toy, tmp_path / "ref.npz", n_iterations=2, **tiny)
    assert reference.positions.shape == (2, 1, 3)
    with pytest.raises(CMTInputError, match=r"other settings \(steps_per_iteration\)") as refused:
        run_reference_md(toy, tmp_path / "ref.npz", n_iterations=3, **{**tiny, "steps_per_iteration": 6})
    assert _raised_in_driver(refused)

    perturbed_generator(toy, scale=0.1, seed=5, n_layers=2, hidden=8).save(tmp_path / "g.safetensors")
    generator = BoltzmannGenerator.load(tmp_path / "g.safetensors", toy)
    bridged = dict(n_replicas=3, lambdas=[1.0, 0.5, 0.0], steps_per_iteration=2, flow_proposals=2, seed=2,
                   progress=False, minimize=False, platform="Reference")
    run = run_bridge_remd(generator, toy, tmp_path / "bridge.npz", n_iterations=2, **bridged)
    assert run.positions.shape == (2, 1, 3) and run.provenance["n_replicas"] == 3
    again = run_bridge_remd(generator, toy, tmp_path / "again.npz", n_iterations=2, **bridged)
    np.testing.assert_array_equal(again.positions, run.positions)  # seeded, flow moves included
    with pytest.raises(CMTInputError, match=r"other settings \(flow_proposals\)") as refused:
        run_bridge_remd(generator, toy, tmp_path / "bridge.npz", n_iterations=3, **{**bridged, "flow_proposals": 3})
    assert _raised_in_driver(refused)
    resumed = run_bridge_remd(generator, toy, tmp_path / "bridge.npz", n_iterations=3, **bridged)
    np.testing.assert_array_equal(resumed.positions[:2], run.positions)
    assert resumed.provenance["n_iterations_stored"] == 3


def test_storage_of_another_system_or_unreadable_is_refused_in_one_sentence(toy, tmp_path):
    """Issue 25: another system's storage (toy-gaussian-mixture resumed as the double well) is refused
    naming the system; the same system resumes (the control); a file that is not storage is refused."""
    from cmt_openmm.systems import get_target

    tiny = dict(n_replicas=2, t_max=400.0, steps_per_iteration=5, seed=1, progress=False, platform="Reference")
    mixture = get_target("toy-gaussian-mixture")
    run_reference_md(mixture, tmp_path / "ref.npz", n_iterations=2, **tiny)
    with pytest.raises(CMTInputError) as refused:
        run_reference_md(toy, tmp_path / "ref.npz", n_iterations=3, **tiny)
    assert str(refused.value) == (f"storage {tmp_path / 'ref.nc'} was written for another system (toy-gaussian-mixture: "
                                  "its System differs) than toy-double-well; pass resume=False (--restart) to start afresh "
                                  "or choose another storage path.")
    assert run_reference_md(mixture, tmp_path / "ref.npz", n_iterations=3, **tiny).positions.shape == (3, 1, 3)
    (tmp_path / "junk.nc").write_bytes(b"not netCDF")
    with pytest.raises(CMTInputError, match=r"^storage .*junk.nc cannot be read as replica-exchange storage \(.*\); "
                                            r"pass resume=False \(--restart\) to start afresh or choose another "
                                            r"storage path\.$"):
        run_reference_md(toy, tmp_path / "junk.npz", n_iterations=2, **tiny)


STOP = 4
"""The killed runs die in iteration STOP + 1, with STOP iterations stored."""

DIE_MID_ITERATION = (
    "import os, signal\n"
    "from openmmtools.multistate import ReplicaExchangeSampler\n"
    "propagate = ReplicaExchangeSampler._propagate_replica\n"
    "def dying(self, replica_id):  # SIGKILL between the replicas' MCMC moves of iteration STOP + 1\n"
    f"    if self.iteration > {STOP} and replica_id == 1:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    return propagate(self, replica_id)\n"
    "ReplicaExchangeSampler._propagate_replica = dying\n")


def _killed(code: str, storage: Path) -> int:
    """Run ``code`` (python, a run that never ends by itself) in a subprocess that SIGKILLs itself in
    the middle of iteration STOP + 1; returns the last iteration its storage holds."""
    import subprocess
    import sys

    import netCDF4
    from helpers import ROOT

    process = subprocess.run([sys.executable, "-c", DIE_MID_ITERATION + code], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == -9, process.stderr
    with netCDF4.Dataset(storage) as stored:
        return int(stored.variables["last_iteration"][0])


@pytest.mark.slow
def test_reference_replica_exchange_killed_mid_run_resumes_where_it_stopped(toy, tmp_path):
    """SIGKILL in the middle of an iteration of a long reference run; the same call continues from the last stored iteration:
    its frames up to there are those of an uninterrupted run with the killed run's seed, then the rest."""
    tiny = dict(n_replicas=2, t_max=400.0, steps_per_iteration=20, seed=3, progress=False, platform="Reference")
    code = ("from cmt_openmm.sampling.reference_md import run_reference_md\n"
            "from cmt_openmm.systems.toys import double_well_3d\n"
            f"run_reference_md(double_well_3d(300.0), {str(tmp_path / 'ref.npz')!r}, n_iterations=10**6, **{tiny!r})\n")
    stopped = _killed(code, tmp_path / "ref.nc")
    assert stopped == STOP
    # the seed is no setting: another one proves the stored iterations are kept, not redrawn
    resumed = run_reference_md(toy, tmp_path / "ref.npz", n_iterations=stopped + 3, **{**tiny, "seed": 4})
    assert resumed.provenance["n_iterations_stored"] == stopped + 3 and resumed.positions.shape == (stopped + 3, 1, 3)
    uninterrupted = run_reference_md(toy, tmp_path / "fresh.npz", n_iterations=stopped, **tiny)
    np.testing.assert_array_equal(resumed.positions[:stopped], uninterrupted.positions)
    assert np.all(np.isfinite(resumed.positions))


@pytest.mark.slow
def test_bridged_replica_exchange_killed_mid_run_resumes_where_it_stopped(toy, tmp_path):
    """The same for the flow-bridged λ ladder (fixed λ's, no pilot)."""
    from helpers import perturbed_generator

    from cmt_openmm.export.flow_bridged_remd import run_bridge_remd
    from cmt_openmm.generator import BoltzmannGenerator

    perturbed_generator(toy, scale=0.1, seed=5, n_layers=2, hidden=8).save(tmp_path / "g.safetensors")
    bridged = dict(n_replicas=3, lambdas=[1.0, 0.5, 0.0], steps_per_iteration=5, flow_proposals=2, seed=2,
                   progress=False, minimize=False)
    code = ("from cmt_openmm.export.flow_bridged_remd import run_bridge_remd\n"
            "from cmt_openmm.generator import BoltzmannGenerator\n"
            "from cmt_openmm.systems.toys import double_well_3d\n"
            "toy = double_well_3d(300.0)\n"
            f"generator = BoltzmannGenerator.load({str(tmp_path / 'g.safetensors')!r}, toy)\n"
            f"run_bridge_remd(generator, toy, {str(tmp_path / 'b.npz')!r}, n_iterations=10**6, **{bridged!r})\n")
    stopped = _killed(code, tmp_path / "b.nc")
    assert stopped == STOP
    generator = BoltzmannGenerator.load(tmp_path / "g.safetensors", toy)
    # the seed is no setting: another one proves the stored iterations are kept, not redrawn
    resumed = run_bridge_remd(generator, toy, tmp_path / "b.npz", n_iterations=stopped + 3, **{**bridged, "seed": 9})
    assert resumed.provenance["n_iterations_stored"] == stopped + 3 and len(resumed.positions) == stopped + 3
    uninterrupted = run_bridge_remd(generator, toy, tmp_path / "fresh.npz", n_iterations=stopped, **bridged)
    np.testing.assert_array_equal(resumed.positions[:stopped], uninterrupted.positions)
