"""Data-parallel training under torchrun (issue 26): a run on 2 ranks equals a one-process run with
2 shards, whatever the method; it writes its run directory once, resumes on another number of
ranks, and survives a rank that dies (torchrun --max-restarts). Every launch here is a real
``torchrun`` of the ``cmt-openmm`` command with the gloo backend on CPUs."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cmt_openmm import Run
from cmt_openmm.cli.main import EXIT_INPUT
from cmt_openmm.errors import CMTInputError
from cmt_openmm.generator import GENERATOR_FILE
from cmt_openmm.training import load_history
from cmt_openmm.training.config import resolve_threads
from cmt_openmm.training.distributed import World, check_shards, Layout
from helpers import ROOT, assert_same_history

TOLERANCE = 1e-5  # sums split over ranks round differently; a wrong gather or gradient is off by far more
TINY = {"n_samples": 400, "batch_size": 100, "lr": 5e-3, "fit_steps": 4}
METHODS = {
    "cmt": {"cmt": TINY},
    "reverse_kl": {"reverse_kl": {"batch_size": 64, "steps_per_record": 3, "lr": 5e-3}},
    "temperature_annealing": {"temperature_annealing": {"t_high": 600.0, "n_temperatures": 3, "reverse_kl_steps": 4,
                                                        "steps_per_record": 2, "batch_size": 64, **TINY}},
}


def _run_file(tmp_path, method="cmt", **settings) -> str:
    data = {"system": "toy-double-well", "temperature": 300, "method": method, "seed": 3, "max_steps": 4,
            "budget": 100_000, "flow": {"n_layers": 2, "hidden": 8}, "energy": {"backend": "openmm"},
            **METHODS[method], **settings}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _torchrun(*args, ranks=2, torchrun=(), script=None, timeout=180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node ranks [torchrun] -m cmt_openmm ARGS`` (or SCRIPT ARGS)."""
    target = [script] if script else ["-m", "cmt_openmm"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               *torchrun, *target, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _one_process(run_file, out, **overrides):
    Run.create(out, run_file, overrides=overrides).train(progress=False, report=False)
    return load_history(out)


def _weights(run_dir) -> dict:
    return load_file(str(run_dir / GENERATOR_FILE))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=TOLERANCE, atol=TOLERANCE, msg=name)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_ranks_equal_one_process_with_two_shards(tmp_path, method):
    run_file = _run_file(tmp_path, method)
    done = _torchrun("train", run_file, "--out", str(tmp_path / "ranks"), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = load_history(tmp_path / "ranks")
    alone = _one_process(run_file, tmp_path / "alone", shards=2)
    assert len(ranks) == 4  # rank 0 alone wrote the records: one line per step
    assert_same_history(ranks, alone, rel_tol=TOLERANCE)  # evaluations summed over ranks: equal counts
    _assert_same_weights(_weights(tmp_path / "ranks"), _weights(tmp_path / "alone"))
    assert yaml.safe_load((tmp_path / "ranks" / "config.yaml").read_text())["shards"] == 2  # auto: one per rank
    assert done.stdout.count('"stop_reason"') == 1  # one report, from rank 0


def test_one_shard_differs_from_two(tmp_path):
    """The comparison above can fail: a one-process run with one stream is another run."""
    run_file = _run_file(tmp_path)
    one, two = _one_process(run_file, tmp_path / "one", shards=1), _one_process(run_file, tmp_path / "two", shards=2)
    with pytest.raises(AssertionError):
        assert_same_history(one, two, rel_tol=TOLERANCE)


def test_resume_on_another_number_of_ranks(tmp_path):
    """Two steps on 2 ranks, then two more in one process: the same run as four steps straight."""
    run_file = _run_file(tmp_path)
    out = tmp_path / "run"
    done = _torchrun("train", run_file, "--out", str(out), "--max-steps", "2", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    Run.create(out, run_file, resume=True).train(progress=False, report=False)  # shards: auto keeps 2
    straight = _one_process(run_file, tmp_path / "straight", shards=2)
    assert_same_history(load_history(out), straight, rel_tol=TOLERANCE)
    _assert_same_weights(_weights(out), _weights(tmp_path / "straight"))


def test_shards_that_ranks_cannot_split_are_refused():
    check_shards(4, 2)
    with pytest.raises(CMTInputError, match="2 shards, which 3 processes cannot split evenly; run it on a number "
                                            "of processes that divides 2"):
        check_shards(2, 3)


def _dying_rank_script(tmp_path) -> str:
    """The CLI, with rank 1 exiting in step 3 of a run's first attempt (as the OOM killer would: no clean-up)."""
    script = tmp_path / "dying_rank.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from cmt_openmm.cli.main import main
        from cmt_openmm.training.cmt import CMTTrainer

        step = CMTTrainer.step

        def dying_step(self):
            first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if os.environ["RANK"] == "1" and first and self.steps_done == 2:
                os._exit(3)
            return step(self)

        CMTTrainer.step = dying_step
        sys.exit(main(sys.argv[1:]))
    """))
    return str(script)


def test_a_rank_that_dies_is_restarted_and_the_run_resumes(tmp_path):
    """Rank 1 exits in step 3 of the first attempt; torchrun restarts both ranks, which resume from
    the checkpoint of step 2 and end with the run an uninterrupted one gives."""
    run_file = _run_file(tmp_path)
    out = tmp_path / "run"
    done = _torchrun("train", run_file, "--out", str(out), "--quiet", script=_dying_rank_script(tmp_path),
                     torchrun=("--max-restarts=1",))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(exitcode: 3) local_rank: 1" in done.stderr  # the rank did die, and the restart then succeeded
    straight = _one_process(run_file, tmp_path / "straight", shards=2)
    assert_same_history(load_history(out), straight, rel_tol=TOLERANCE)
    _assert_same_weights(_weights(out), _weights(tmp_path / "straight"))
    assert not list(out.glob("*.tmp*"))  # no half-written file


def test_the_rank_whose_peer_died_says_so_in_one_sentence(tmp_path):
    """Two ranks started by hand (torchrun's environment, no agent to stop the survivor first): rank 1
    exits in step 3, and rank 0's next collective ends in one sentence, not a traceback."""
    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_file, script = _run_file(tmp_path), _dying_rank_script(tmp_path)
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen([sys.executable, script, "train", run_file, "--out", str(tmp_path / "run"),
                                       "--quiet"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    stderr = [process.communicate(timeout=180)[1] for process in ranks]
    assert ranks[1].returncode == 3, stderr[1][-3000:]
    assert ranks[0].returncode == EXIT_INPUT, stderr[0][-3000:]
    assert "cmt-openmm train: error: rank 0 lost contact with the run's other processes" in stderr[0]
    assert "Traceback" not in stderr[0]
    assert load_history(tmp_path / "run")[-1]["step"] == 2  # its checkpoint of step 2 is intact


def test_the_layout_splits_draws_by_shard():
    layout = Layout(World(rank=1, size=2), 4, seed=0, rng=torch.Generator())
    assert layout.sizes(10) == [3, 3, 2, 2]
    assert layout.local_range(10) == (6, 10)  # rank 1 holds shards 2 and 3
    layout.begin_step(0)
    again = Layout(World(rank=0, size=1), 4, seed=0, rng=torch.Generator())
    again.begin_step(0)  # one process, all four shards: the same streams for shards 2 and 3
    for mine, alone in zip(layout.streams, again.streams[2:]):
        assert torch.equal(torch.rand(3, generator=mine), torch.rand(3, generator=alone))


def test_auto_threads_share_the_cores_between_ranks(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))
    assert resolve_threads("auto", processes=1) == 4
    assert resolve_threads("auto", processes=2) == 2
    assert resolve_threads("auto", processes=8) == 1
    assert resolve_threads(3, processes=2) == 3


@pytest.mark.slow
def test_two_nodes_on_one_machine_equal_one_process(tmp_path):
    """The multi-node command (c10d rendezvous, one agent per node), with two local "nodes"."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    run_file, out = _run_file(tmp_path), tmp_path / "nodes"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=cmt-test",
               "-m", "cmt_openmm", "train", run_file, "--out", str(out), "--quiet"]
    nodes = [subprocess.Popen([*command[:5], f"--node-rank={rank}", *command[5:]], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=180)
        assert node.returncode == 0, err[-3000:]
    alone = _one_process(run_file, tmp_path / "alone", shards=2)
    assert_same_history(load_history(out), alone, rel_tol=TOLERANCE)


def test_sample_under_torchrun_writes_what_one_process_writes(tmp_path):
    """``cmt-openmm sample`` on 2 ranks: each draws every other chunk, rank 0 writes the files, and
    they hold the very samples, energies and weights one process draws (9 chunks: 5 and 4)."""
    import numpy as np

    run_dir = tmp_path / "run"
    Run.create(run_dir, _run_file(tmp_path, max_steps=2)).train(progress=False, report=False)
    common = ["--batch-size", "300", "--resample", "500", "--seed", "5", "--quiet"]
    from cmt_openmm.cli import main

    assert main(["sample", str(run_dir), "--n", "2500", "--out", str(tmp_path / "one.npz"), *common]) == 0
    done = _torchrun("sample", str(run_dir), "--samples", "2500", "--out", str(tmp_path / "two.npz"), *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"resampled_distinct"') == 1  # one summary, from rank 0
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert sorted(one.files) == sorted(two.files)
        for name in one.files:
            np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two.json", "two.npz"]


def test_skip_keeps_the_random_stream_in_step():
    import cmt_openmm
    from cmt_openmm.generator import BoltzmannGenerator

    generator = BoltzmannGenerator.build(cmt_openmm.get_target("aldp-vacuum"), n_layers=2, hidden=8, seed=0)
    drawn, skipped = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    generator.sample(7, generator=drawn)
    generator.skip(7, generator=skipped)
    torch.testing.assert_close(generator.sample(3, generator=drawn)[0], generator.sample(3, generator=skipped)[0],
                               rtol=0, atol=0)


def test_commands_that_run_in_one_process_refuse_torchrun(tmp_path):
    done = _torchrun("evaluate", str(tmp_path))
    assert done.returncode != 0
    assert "cmt-openmm evaluate runs in one process; run it without torchrun" in done.stderr
