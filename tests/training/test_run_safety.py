"""Faults a long run meets, each injected with a negative control (issue 25): a second writer
into a run directory is refused while readers go on."""
import errno
import os
import re
import socket
import subprocess
import sys

import pytest

from cmt_openmm import Run
from cmt_openmm.cli import main
from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems import get_target
from cmt_openmm.training import load_history, train
from cmt_openmm.training import faults
from cmt_openmm.training.faults import LOCK_FILE
from helpers import ROOT

FLOW = {"n_layers": 2, "hidden": 8, "n_bins": 4}
CMT = {"method": "cmt", "seed": 3, "max_steps": 4, "flow": FLOW, "energy": {"backend": "openmm"},
       "cmt": {"n_samples": 200, "batch_size": 100, "lr": 5e-3, "fit_steps": 2}}


@pytest.fixture(scope="module")
def toy():
    return get_target("toy-double-well")


# -- one writer per run directory -------------------------------------------------------------
def test_one_writer_per_run_directory_while_readers_go_on(toy, tmp_path):
    folder = tmp_path / "run"
    train(toy, {**CMT, "max_steps": 1}, folder, progress=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cmt_openmm.training.faults import training_lock\n"
         "with training_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n", str(folder)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(CMTInputError) as info:
            train(toy, {**CMT, "max_steps": 2}, folder, resume=True, progress=False)
        assert str(info.value) == (f"another process (pid {holder.pid} on {socket.gethostname()}) is training the run "
                                   f"in {folder}; wait for it to end or stop it, then train there again.")
        with pytest.raises(CMTInputError, match="another process"):
            Run.create(folder, Run.open(folder).spec, overrides={"max_steps": 2}, resume=True)
        assert not (folder / "run.yaml").exists() and len(load_history(folder)) == 1  # nothing written
        assert main(["sample", str(folder), "--n", "100", "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
        assert len(Run.open(folder).sample(100, progress=False)) == 100
    finally:
        holder.kill()
        holder.wait()
    # negative control: the lock went with its process
    assert len(train(toy, {**CMT, "max_steps": 2}, folder, resume=True, progress=False).history) == 2
    assert (folder / LOCK_FILE).read_text() == ""


def test_a_file_system_without_locks_trains_with_a_warning(toy, tmp_path, monkeypatch):
    def no_locks(*_):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(faults.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=re.escape(f"cannot lock {tmp_path / 'run'} (no locks available)")):
        assert train(toy, {**CMT, "max_steps": 1}, tmp_path / "run", progress=False).stop_reason == "max_steps"
