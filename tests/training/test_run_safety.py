"""Faults a long run meets, each injected with a negative control (issue 25): SIGTERM and SIGINT
end a run at its last complete step, a second writer into a run directory is refused while
readers go on, and a step gone non-finite is rolled back and taken again at half the learning
rate, or ends the run in one sentence."""
import errno
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from cmt_openmm import Run
from cmt_openmm.cli import main
from cmt_openmm.errors import CMTInputError, CMTTrainingDiverged
from cmt_openmm.generator import GENERATOR_FILE
from cmt_openmm.systems import get_target
from cmt_openmm.training import TRAINERS, load_history, train
from cmt_openmm.training import checkpoints, faults, loop
from cmt_openmm.training.faults import LOCK_FILE, MAX_ROLLBACKS
from cmt_openmm.training.checkpoints import CHECKPOINT_FILE
from helpers import ROOT, assert_same_history

FLOW = {"n_layers": 2, "hidden": 8, "n_bins": 4}
CMT = {"method": "cmt", "seed": 3, "max_steps": 4, "flow": FLOW, "energy": {"backend": "openmm"},
       "cmt": {"n_samples": 200, "batch_size": 100, "lr": 5e-3, "fit_steps": 2}}
METHODS = {
    "cmt": CMT,
    "cmt-averaged": {**CMT, "ema_decay": 0.9},
    "reverse_kl": {**CMT, "method": "reverse_kl", "reverse_kl": {"batch_size": 32, "lr": 1e-2, "steps_per_record": 3}},
    "temperature_annealing": {**CMT, "method": "temperature_annealing", "temperature_annealing": {
        "t_high": 1200, "n_temperatures": 2, "reverse_kl_steps": 6, "steps_per_record": 3, "batch_size": 32,
        "n_samples": 200, "fit_steps": 2, "lr": 1e-2, "final_steps": 1}},  # 2 reverse-KL steps, then 2 fits
}


@pytest.fixture(scope="module")
def toy():
    return get_target("toy-double-well")


@pytest.fixture
def sigterm_guard():
    """A SIGTERM the loop fails to take fails the test instead of ending pytest."""
    def guard(*_):
        raise AssertionError("SIGTERM reached the test, not the training loop")

    previous = signal.signal(signal.SIGTERM, guard)
    yield guard
    signal.signal(signal.SIGTERM, previous)


def _wrap_step(monkeypatch, method: str, wrapper) -> list[int]:
    """Replace the method's Trainer.step by ``wrapper(step, trainer, call)``; the steps_done of each call."""
    cls, calls = TRAINERS[method], []
    step = cls.step

    def wrapped(self):
        calls.append(self.steps_done)
        return wrapper(step, self, len(calls))

    monkeypatch.setattr(cls, "step", wrapped)
    return calls


def _signal_in_call(number: int, signum=signal.SIGTERM):
    """A step wrapper that sends ``signum`` to this process at the end of call ``number``."""
    def wrapper(step, trainer, call):
        record = step(trainer)
        if call == number:
            os.kill(os.getpid(), signum)
        return record
    return wrapper


# -- signals --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["in a step", "writing a checkpoint"])
def test_a_signal_ends_the_run_at_the_last_complete_step(toy, tmp_path, monkeypatch, sigterm_guard, where):
    sigint_before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN in a background job
    full = train(toy, CMT, tmp_path / "full", progress=False)  # negative control: no signal
    assert full.stop_reason == "max_steps" and full.signal is None and (tmp_path / "full" / GENERATOR_FILE).is_file()
    split = tmp_path / "split"
    with monkeypatch.context() as patch:
        if where == "in a step":  # SIGTERM at the end of step 3's work: the step is abandoned
            _wrap_step(patch, "cmt", _signal_in_call(3))
            signum = signal.SIGTERM
        else:  # SIGINT while step 2's checkpoint is written: it is finished, then the run stops
            save = checkpoints.save_checkpoint

            def save_then_signal(run_dir, trainer, average, config, state):
                save(run_dir, trainer, average, config, state)
                if state["step"] == 2:
                    os.kill(os.getpid(), signal.SIGINT)

            patch.setattr(checkpoints, "save_checkpoint", save_then_signal)
            signum = signal.SIGINT
        result = train(toy, {**CMT, "checkpoint_minutes": 0}, split, progress=False)  # a checkpoint every step
    assert (result.stop_reason, result.signal, len(result.history)) == ("interrupted", signum.name, 2)
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the handlers are put back
    assert signal.getsignal(signal.SIGINT) is sigint_before
    assert not (split / GENERATOR_FILE).exists()  # not a trained result
    checkpoint = torch.load(split / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["step"] == 2 and load_history(split) == result.history
    for name, value in result.generator.state_dict().items():  # the abandoned step was rolled back
        assert torch.equal(value, checkpoint["generator"][name]), name
    resumed = train(toy, CMT, split, resume=True, progress=False)
    assert_same_history(resumed.history, full.history)
    for name, value in full.generator.state_dict().items():
        torch.testing.assert_close(resumed.generator.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_a_run_interrupted_after_its_report_resumes(tmp_path, monkeypatch, sigterm_guard):
    """The report of an earlier stretch (stopped by max_steps) does not make the interrupted
    stretch after it look finished."""
    config = {"system": "toy-double-well", **CMT, "max_steps": 2, "report": {"n_samples": 200, "n_draws": 1}}
    folder = tmp_path / "run"
    Run.create(folder, config).train(progress=False)
    assert Run.open(folder).finished is not None  # negative control: a report of the last step counts
    report = (folder / "report.json").read_bytes()
    with monkeypatch.context() as patch:
        _wrap_step(patch, "cmt", _signal_in_call(2))
        stopped = Run.create(folder, config, overrides={"max_steps": 4}, resume=True).train(progress=False)
    assert stopped == {"run_dir": str(folder), "stop_reason": "interrupted", "signal": "SIGTERM", "steps": 3}
    assert (folder / "report.json").read_bytes() == report
    again = Run.create(folder, config, overrides={"max_steps": 4}, resume=True)
    assert again.stop_reason is None and again.finished is None
    assert again.train(progress=False, report=False)["stop_reason"] == "max_steps" and len(again.history) == 4


def test_sigterm_to_the_command_line_and_a_second_writer(tmp_path, capsys):
    """`cmt-openmm train` in a subprocess (each step slowed by 0.4 s, its numbers unchanged): a
    second `train --resume` is refused while it trains and readers work; SIGTERM ends it with 143
    and one sentence whose command continues the run to the history of an uninterrupted one."""
    run_file = tmp_path / "toy.yaml"
    run_file.write_text(yaml.safe_dump({"system": "toy-double-well", **CMT, "max_steps": 20,
                                        "cmt": {**CMT["cmt"], "steps_after_target": 20},  # all 20 steps
                                        "report": {"n_samples": 200, "n_draws": 1}}))
    out = (tmp_path / "run").resolve()
    slowed = ("import sys, time\n"
              "from cmt_openmm.training.cmt import CMTTrainer\n"
              "step = CMTTrainer.step\n"
              "CMTTrainer.step = lambda self: (step(self), time.sleep(0.4))[0]\n"
              "from cmt_openmm.cli.main import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    process = subprocess.Popen([sys.executable, "-c", slowed, "train", str(run_file), "--out", str(out), "--quiet"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(load_history(out) if (out / "metrics.jsonl").is_file() else []) < 3:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        capsys.readouterr()
        assert main(["train", str(run_file), "--out", str(out), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == (f"cmt-openmm train: error: another process (pid {process.pid} on {socket.gethostname()}) is "
                       f"training the run in {out}; wait for it to end or stop it, then train there again.\n")
        assert len(Run.open(out).history) >= 3  # a reader
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    steps = len(load_history(out))
    assert process.returncode == 143 and 3 <= steps < 20, stderr
    command = shlex.join(["cmt-openmm", "train", str(run_file), "--out", str(out), "--resume"])
    assert stderr.splitlines()[-1] == (f"[cmt-openmm] SIGTERM stopped training after step {steps}, whose checkpoint is "
                                       f"in {out}; continue with: {command}")
    assert json.loads(stdout) == {"run_dir": str(out), "stop_reason": "interrupted", "signal": "SIGTERM",
                                  "steps": steps}
    assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["step"] == steps
    assert not (out / GENERATOR_FILE).exists() and not (out / "report.json").exists()
    assert main(shlex.split(command)[1:] + ["--quiet"]) == 0  # the lock died with the process
    full = Run.create(tmp_path / "full", run_file).train(progress=False, report=False)
    assert full["stop_reason"] == "max_steps"
    assert_same_history(load_history(out), load_history(tmp_path / "full"))


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


# -- divergence ---------------------------------------------------------------------------------
def _poison(what: str):
    """Make a trainer's state after a step non-finite: a weight, a gradient, or the recorded loss."""
    def poisoned(step, trainer, record):
        p = next(p for p in trainer.generator.parameters() if p.grad is not None)
        with torch.no_grad():
            if what == "weight":
                p.view(-1)[0] = float("nan")
            elif what == "gradient":
                p.grad.view(-1)[0] = float("inf")
        return {**record, "loss": float("nan")} if what == "loss" else record
    return poisoned


@pytest.mark.parametrize("method", list(METHODS))
def test_a_non_finite_step_is_rolled_back_and_retaken_at_half_the_learning_rate(toy, tmp_path, monkeypatch, method):
    """Step 3 turns NaN once: the run takes it again from the state before it at half the learning
    rate, and goes on exactly as a run whose learning rate was halved by hand before step 3."""
    config, name = METHODS[method], method.replace("-averaged", "")
    poison = _poison("weight")
    with monkeypatch.context() as patch:
        calls = _wrap_step(patch, name, lambda step, t, call: poison(step, t, step(t)) if call == 3 else step(t))
        rolled = train(toy, config, tmp_path / "rolled", progress=False)

    def halve_first(step, t, call):
        if call == 3:
            t.set_lr(t.optimizer.param_groups[0]["lr"] / 2)
        return step(t)

    _wrap_step(monkeypatch, name, halve_first)
    halved = train(toy, config, tmp_path / "halved", progress=False)  # negative control: nothing rolled back
    assert calls == [0, 1, 2, 2, 3]
    assert [r.get("rollbacks") for r in rolled.history] == [None, None, 1, None]
    assert all("rollbacks" not in r for r in halved.history)
    assert rolled.history[2]["lr"] == halved.history[2].get("lr", config[name]["lr"] / 2) == config[name]["lr"] / 2
    assert_same_history(rolled.history, halved.history, ignore=("rollbacks", "lr", "energy_evaluations"))
    cost = rolled.history[2]["energy_evaluations"] - rolled.history[1]["energy_evaluations"]
    assert cost == 2 * (halved.history[2]["energy_evaluations"] - halved.history[1]["energy_evaluations"])
    for key, value in halved.generator.state_dict().items():
        assert torch.equal(rolled.generator.state_dict()[key], value), key
    checkpoint = torch.load(tmp_path / "rolled" / CHECKPOINT_FILE, weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["generator"].values())


def test_a_flow_gone_non_finite_within_a_step_is_rolled_back(toy, tmp_path, monkeypatch):
    """Reverse KL takes several Adam steps per step: a weight turned NaN after the first of them
    makes the later samples' log q NaN, and the step is still rolled back and taken again."""
    def poison_after_first_adam_step(step, trainer, call):
        if call != 2:
            return step(trainer)

        def poison(*_):
            with torch.no_grad():
                next(trainer.generator.parameters()).view(-1)[0] = float("nan")
            handle.remove()
        handle = trainer.optimizer.register_step_post_hook(poison)
        return step(trainer)

    _wrap_step(monkeypatch, "reverse_kl", poison_after_first_adam_step)
    result = train(toy, METHODS["reverse_kl"], tmp_path / "run", progress=False)
    assert result.stop_reason == "max_steps"
    assert [r.get("rollbacks") for r in result.history] == [None, 1, None, None]
    assert all(torch.isfinite(v).all() for v in result.generator.state_dict().values())


@pytest.mark.parametrize("what", ["weight", "gradient", "loss"])
def test_a_step_that_stays_non_finite_ends_the_run_in_one_sentence(toy, tmp_path, monkeypatch, what):
    poison = _poison(what)
    calls = _wrap_step(monkeypatch, "cmt", lambda step, t, call: poison(step, t, step(t)) if call >= 2 else step(t))
    folder = tmp_path / "run"
    with pytest.raises(CMTInputError) as info:
        train(toy, CMT, folder, progress=False)
    assert calls == [0] + [1] * (MAX_ROLLBACKS + 1)
    assert isinstance(info.value, CMTTrainingDiverged) and info.value.step == 1
    message = str(info.value)
    assert message.startswith(f"training diverged: step 2 gave a non-finite {what} {MAX_ROLLBACKS + 1} times in a row")
    assert f"the checkpoint in {folder} holds step 1" in message and "lower cmt.lr" in message
    assert "\n" not in message and message.endswith(".") and ". " not in message
    checkpoint = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["step"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["generator"].values())
    assert not (folder / GENERATOR_FILE).exists() and len(load_history(folder)) == 1


def test_a_non_finite_generator_is_never_written(toy, tmp_path, monkeypatch):
    run = loop._run

    def run_then_corrupt(trainer, *args):
        reason = run(trainer, *args)
        with torch.no_grad():
            next(trainer.generator.parameters()).view(-1)[0] = float("nan")
        return reason

    monkeypatch.setattr(loop, "_run", run_then_corrupt)
    with pytest.raises(RuntimeError, match="non-finite weights"):
        train(toy, {**CMT, "max_steps": 1}, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / GENERATOR_FILE).exists()


def test_a_first_step_that_stays_non_finite_names_no_checkpoint(toy, tmp_path, monkeypatch):
    """No step was completed, so no checkpoint exists: the sentence must not point at one."""
    poison = _poison("loss")
    _wrap_step(monkeypatch, "cmt", lambda step, t, call: poison(step, t, step(t)))
    folder = tmp_path / "run"
    with pytest.raises(CMTInputError) as info:
        train(toy, CMT, folder, progress=False)
    assert str(info.value).startswith("training diverged: step 1 gave a non-finite loss")
    assert "checkpoint" not in str(info.value) and not (folder / CHECKPOINT_FILE).exists()


# -- when checkpoints are written ------------------------------------------------------------
def _count_saves(monkeypatch) -> list[int]:
    """Make checkpoints.save_checkpoint note the step of every checkpoint it writes."""
    steps, save = [], checkpoints.save_checkpoint

    def noted(run_dir, trainer, average, config, state):
        steps.append(state["step"])
        save(run_dir, trainer, average, config, state)

    monkeypatch.setattr(checkpoints, "save_checkpoint", noted)
    return steps


@pytest.mark.parametrize("minutes, written", [(0, [1, 2, 3, 4]), (1e-9, [1, 2, 3, 4]), (60, [4])])
def test_checkpoints_are_written_every_checkpoint_minutes_and_when_the_run_stops(toy, tmp_path, monkeypatch, minutes,
                                                                                 written):
    saves = _count_saves(monkeypatch)
    result = train(toy, {**CMT, "checkpoint_minutes": minutes}, tmp_path / "run", progress=False)
    assert saves == written and len(result.history) == 4
    assert torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)["step"] == 4


def test_a_run_killed_outright_resumes_from_its_last_checkpoint_and_drops_the_later_records(toy, tmp_path,
                                                                                            monkeypatch):
    """A process that ends without running the loop's handlers (SystemExit inside step 5 stands in for
    SIGKILL) leaves the checkpoint of step 2, the last one written, and the records of steps 3 and 4;
    resuming continues from step 2 to the history of an uninterrupted run."""
    full = train(toy, {**CMT, "max_steps": 6}, tmp_path / "full", progress=False)
    run = tmp_path / "run"
    train(toy, {**CMT, "max_steps": 2}, run, progress=False)
    with monkeypatch.context() as patch:
        def exit_in_call_3(step, trainer, call):
            if call == 3:
                raise SystemExit(137)
            return step(trainer)

        _wrap_step(patch, "cmt", exit_in_call_3)
        with pytest.raises(SystemExit):
            train(toy, {**CMT, "max_steps": 6, "checkpoint_minutes": 60}, run, resume=True, progress=False)
    assert torch.load(run / CHECKPOINT_FILE, weights_only=True)["step"] == 2 and len(load_history(run)) == 4
    resumed = train(toy, {**CMT, "max_steps": 6}, run, resume=True, progress=False)
    assert_same_history(resumed.history, full.history)
    for name, value in full.generator.state_dict().items():
        torch.testing.assert_close(resumed.generator.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_a_step_that_fails_leaves_the_checkpoint_of_the_step_before(toy, tmp_path, monkeypatch):
    """An error inside step 3 (after its fit changed the weights) rolls the step back and writes the
    checkpoint of step 2 before the error goes on, however long until the next checkpoint was due."""
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        def fail_after_call_3(step, trainer, call):
            record = step(trainer)
            if call == 3:
                raise RuntimeError("energy server lost")
            return record

        _wrap_step(patch, "cmt", fail_after_call_3)
        with pytest.raises(RuntimeError, match="energy server lost"):
            train(toy, {**CMT, "checkpoint_minutes": 60}, run, progress=False)
    two = train(toy, {**CMT, "max_steps": 2}, tmp_path / "two", progress=False)
    checkpoint = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["step"] == 2
    for name, value in two.generator.state_dict().items():  # step 3's fit was rolled back
        assert torch.equal(checkpoint["generator"][name], value), name
