"""Runs sized to their limits: the plan, budget: auto, eps_ent: auto, the auto learning-rate decay and
the step sized to the device (step_scale)."""
import math

import pytest

from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems import get_target
from cmt_openmm.training import TrainConfig, load_history, train
from cmt_openmm.training.schedule import (ENTROPY_PER_COORDINATE, EPS_ENT_RANGE, MAX_STEP_SCALE, MEASURED_STEPS,
                                          auto_eps_ent, auto_lr_decay, pick_step_scale, plan_steps)

TINY = {"method": "cmt", "seed": 1, "flow": {"n_layers": 2, "hidden": 8, "n_bins": 4},
        "cmt": {"n_samples": 200, "batch_size": 100, "fit_steps": 2}}


def test_plan_is_the_tightest_limit():
    assert plan_steps(1000, 80_000, 4000, None, None) == (20, "budget")
    assert plan_steps(10, 80_000, 4000, None, None) == (10, "max_steps")
    assert plan_steps(10_000, "auto", 4000, None, None) == (10_000, "max_steps")
    assert plan_steps(10_000, "auto", 4000, 60.0, None) == (None, "max_minutes")  # speed not measured yet
    assert plan_steps(10_000, "auto", 4000, 60.0, 0.5) == (7200, "max_minutes")
    assert plan_steps(10_000, 4e6, 4000, 60.0, 0.5) == (1000, "budget")


def test_auto_eps_ent_spreads_the_entropy_left_over_the_steps_to_the_cooling_point():
    d, plan, f = 120, 4000, 0.5
    for step, shed in [(0, 0.0), (500, 300.0), (1500, 500.0)]:
        eps = auto_eps_ent(d, shed, step, plan, f)
        assert eps * (f * plan - step) == pytest.approx(ENTROPY_PER_COORDINATE * d - shed)
    assert auto_eps_ent(d, 2000.0, 100, plan, f) == EPS_ENT_RANGE[0]  # more shed than expected: the floor
    assert auto_eps_ent(d, 0.0, 2500, plan, f) == EPS_ENT_RANGE[1]  # past the cooling point: let it cool
    # twice the coordinates, twice the entropy per step (the schedule is sized to the system)
    assert auto_eps_ent(2 * d, 0.0, 0, plan, f) == pytest.approx(2 * auto_eps_ent(d, 0.0, 0, plan, f))


def test_auto_lr_decay_reaches_its_final_fraction_at_the_planned_end():
    factor = auto_lr_decay(400, 1440, 0.04)
    assert factor ** (1440 - 400) == pytest.approx(0.04)
    assert auto_lr_decay(400, None, 0.04) == 1.0 and auto_lr_decay(1440, 1440, 0.04) == 1.0


def test_budget_auto_needs_max_minutes():
    with pytest.raises(CMTInputError, match="needs max_minutes"):
        TrainConfig.from_dict({"budget": "auto"})
    config = TrainConfig.from_dict({"budget": "auto", "max_minutes": 1, "cmt": {"eps_ent": "auto",
                                                                                 "lr_decay_after_target": "auto"}})
    assert (config.budget, config.cmt.eps_ent, config.cmt.lr_decay_after_target) == ("auto", "auto", "auto")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(CMTInputError, match="eps_ent"):
        TrainConfig.from_dict({"cmt": {"eps_ent": "automatic"}})


def test_budget_auto_run_plans_from_its_measured_speed_and_follows_the_plan(tmp_path, capsys):
    """A run with budget: auto measures its seconds per step, plans its steps from max_minutes, sizes
    eps_ent to the plan from then on, and a resumed run keeps the same plan."""
    target = get_target("toy-double-well")
    config = {**TINY, "budget": "auto", "max_minutes": 10.0, "max_steps": MEASURED_STEPS + 3,
              "cmt": {**TINY["cmt"], "eps_ent": "auto", "lr_decay_after_target": "auto"}}
    train(target, config, tmp_path / "run", progress=True)
    records = load_history(tmp_path / "run")
    assert len(records) == MEASURED_STEPS + 3
    before, after = records[:MEASURED_STEPS], records[MEASURED_STEPS:]
    assert all(r["planned_steps"] is None for r in before)
    seconds = (records[MEASURED_STEPS - 1]["wall_time"] - records[0]["wall_time"]) / (MEASURED_STEPS - 1)
    plan = min(int(600.0 / seconds), config["max_steps"])
    assert all(r["planned_steps"] == plan for r in after)
    assert "plan: " in capsys.readouterr().err
    train(target, {**config, "max_steps": MEASURED_STEPS + 5}, tmp_path / "run", resume=True, progress=False)
    resumed = load_history(tmp_path / "run")[MEASURED_STEPS + 3:]
    assert [r["planned_steps"] for r in resumed] == [MEASURED_STEPS + 5] * 2  # the stored speed, the new limit


def test_cmt_sizes_eps_ent_and_the_lr_decay_to_the_plan():
    """On alanine dipeptide (60 flow coordinates), each step's eps_ent is the entropy left to shed
    (from the buffers' own estimates) over the steps left to the cooling point of the plan."""
    import torch

    from cmt_openmm.energy import OpenMMEnergy
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.training.cmt import CMTTrainer

    target = get_target("aldp-vacuum")
    config = TrainConfig.from_dict({**TINY, "cmt": {**TINY["cmt"], "eps_ent": "auto", "cool_fraction": 0.4,
                                                    "lr_decay_from": "cooled", "lr_decay_after_target": "auto",
                                                    "lr_final_fraction": 0.01}})
    generator = BoltzmannGenerator.build(target, n_layers=2, hidden=8, n_bins=4, seed=0)
    with OpenMMEnergy(target) as energy:
        trainer = CMTTrainer(target, generator, energy, config, torch.Generator().manual_seed(0))
        trainer.plan = 300
        records = []
        for _ in range(4):
            records.append(trainer.step())
            trainer.steps_done += 1
        trainer.cooled_at = trainer.steps_done  # as if this step had cooled: the decay starts here
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.step()
    assert generator.dim == 60
    for step, r in enumerate(records):
        left = ENTROPY_PER_COORDINATE * 60 - (records[0]["entropy"] - r["entropy"])
        assert EPS_ENT_RANGE[0] < r["eps_ent"] < EPS_ENT_RANGE[1]
        assert r["eps_ent"] == pytest.approx(left / (0.4 * 300 - step), rel=1e-9)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.01 ** (1 / (300 - 4)))


def test_fixed_settings_take_no_plan_into_account(tmp_path):
    """Without auto settings the schedule ignores the plan: eps_ent and the learning rate are the given ones."""
    target = get_target("toy-double-well")
    config = {**TINY, "budget": 10_000, "max_steps": 4, "cmt": {**TINY["cmt"], "eps_ent": 0.7}}
    result = train(target, config, progress=False)
    assert all(r["eps_ent"] == 0.7 and r["lr"] == TrainConfig().cmt.lr for r in result.history)
    assert all(r["planned_steps"] == 4 for r in result.history)
    assert math.isfinite(result.history[-1]["loss"])


def test_the_plan_follows_the_measured_speed_as_it_changes(monkeypatch):
    """Every REPLAN_EVERY steps the speed is measured again (the mean since step 2), so a run whose
    machine gets faster or slower stretches or shrinks its plan; in between the plan stays."""
    import types

    import cmt_openmm.training.loop as loop

    monkeypatch.setattr(loop, "REPLAN_EVERY", 10)
    config = TrainConfig.from_dict({"budget": "auto", "max_minutes": 10.0, "max_steps": 1_000_000})
    trainer = types.SimpleNamespace(plan=None, step_cost=lambda: 4000)
    walls = [2.0 + 1.0 * i for i in range(15)] + [16.0 + 0.5 * i for i in range(1, 16)]  # 1 s steps, then 0.5 s
    plans = []
    for step in range(1, len(walls) + 1):
        state = {"step": step, "wall_time": walls[step - 1], "history": [{"wall_time": w} for w in walls[:step]],
                 "seconds_per_step": getattr(trainer, "sps", None)}
        loop._plan(trainer, config, state, say=False)
        trainer.sps = state["seconds_per_step"]
        plans.append(trainer.plan)
    assert plans[:MEASURED_STEPS - 1] == [None] * (MEASURED_STEPS - 1)
    assert plans[MEASURED_STEPS - 1:10] == [600] * (10 - MEASURED_STEPS + 1)  # 1 s per step: 600 s, 600 steps
    assert plans[19] == int(600 / ((walls[19] - walls[0]) / 19))  # re-measured at step 20: faster, longer plan
    assert plans[19] > 600 and plans[19] == plans[28] and plans[29] > plans[19]


def test_max_minutes_counts_the_time_spent_writing_checkpoints(tmp_path, monkeypatch):
    """Checkpoints written at every step (checkpoint_minutes: 0) add up, so max_minutes counts them."""
    import time

    import cmt_openmm.training.checkpoints as checkpoints

    save = checkpoints.save_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(0.1)
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", slow_save)
    config = {**TINY, "budget": "auto", "max_minutes": 0.005, "max_steps": 1000, "checkpoint_minutes": 0}  # 0.3 s
    result = train(get_target("toy-double-well"), config, tmp_path / "run", progress=False)
    assert result.stop_reason == "max_minutes" and len(result.history) <= 4
    assert result.history[-1]["wall_time"] >= 0.1 * (len(result.history) - 1)


def test_step_scale_doubles_while_a_sample_gets_cheaper():
    """A CPU's step costs in proportion to its samples: scale 1. A GPU's fixed cost per step is
    amortised until the device is full: the scale grows to there, never past max_scale or into a
    step that does not fit in memory; a doubling that saves less than a quarter per sample is not taken."""
    def timings(seconds):
        calls = []

        def seconds_at(scale):
            calls.append(scale)
            return seconds(scale)
        return seconds_at, calls

    cpu, calls = timings(lambda s: 0.45 * s)
    assert pick_step_scale(cpu) == (1, {1: 0.45, 2: 0.9}) and calls == [1, 2]
    launch_bound, _ = timings(lambda s: 0.4 + 0.001 * s)
    assert pick_step_scale(launch_bound)[0] == MAX_STEP_SCALE
    assert pick_step_scale(launch_bound, max_scale=4)[0] == 4
    saturating, _ = timings(lambda s: max(0.4, 0.1 * s))  # full from scale 4 on: 8 takes twice as long
    assert pick_step_scale(saturating)[0] == 4
    out_of_memory, calls = timings(lambda s: None if s >= 8 else 0.4)
    assert pick_step_scale(out_of_memory)[0] == 4 and calls == [1, 2, 4, 8]
    small_gain, _ = timings(lambda s: 1.0 if s == 1 else 1.6 * s / 2)  # 20 % cheaper per sample: not enough
    assert pick_step_scale(small_gain)[0] == 1


def _tiny_scaled(scale, **extra):
    return {**TINY, "budget": 10**6, "max_steps": 3, "energy": {"backend": "openmm"},
            "cmt": {**TINY["cmt"], "step_scale": scale}, **extra}


def test_a_scaled_step_draws_and_fits_more_samples(monkeypatch):
    """step_scale multiplies the samples per annealing step (evaluations, the record) and per Adam step."""
    import cmt_openmm.training.cmt as cmt

    batches = []
    fit = cmt.fit_to_buffer

    def spy(generator, optimizer, x, log_weights, n_steps, batch_size, *args, **kwargs):
        batches.append((len(x), n_steps, batch_size))
        return fit(generator, optimizer, x, log_weights, n_steps, batch_size, *args, **kwargs)

    monkeypatch.setattr(cmt, "fit_to_buffer", spy)
    result = train(get_target("toy-double-well"), _tiny_scaled(3), progress=False)
    assert [r["energy_evaluations"] for r in result.history] == [600, 1200, 1800]
    assert all(r["n_samples"] == 600 for r in result.history)
    assert batches == [(600, 2, 300)] * 3  # fit_steps unchanged, each on a 3x minibatch
    with pytest.raises(CMTInputError, match="step_scale"):
        TrainConfig.from_dict({"cmt": {"step_scale": 0}})
    with pytest.raises(CMTInputError, match="step_scale"):
        TrainConfig.from_dict({"cmt": {"step_scale": 1.5}})


def test_step_scale_auto_measures_once_says_so_and_a_resumed_run_keeps_it(tmp_path, monkeypatch, capsys):
    import cmt_openmm.training.cmt as cmt

    asked = []

    def seconds_at(self, scale):  # a device whose steps cost the same up to scale 4
        asked.append(scale)
        return 0.5 if scale <= 4 else 2.0 * scale / 8

    monkeypatch.setattr(cmt.CMTTrainer, "seconds_at", seconds_at)
    target = get_target("toy-double-well")
    result = train(target, _tiny_scaled("auto"), tmp_path / "run", progress=True)
    assert asked == [1, 2, 4, 8]
    assert all(r["n_samples"] == 800 for r in result.history)
    assert "step scale 4: 800 samples per annealing step, minibatches of 400" in capsys.readouterr().err
    asked.clear()
    again = train(target, _tiny_scaled("auto", max_steps=5), tmp_path / "run", resume=True, progress=False)
    assert asked == [] and [r["n_samples"] for r in again.history] == [800] * 5
    assert again.history[-1]["energy_evaluations"] == 5 * 800


def test_measuring_the_step_leaves_the_run_as_it_was(monkeypatch):
    """The measurement's draws and backward passes change neither the weights, nor Adam's state, nor the
    run's random stream: a run whose measurement keeps scale 1 is the run with step_scale 1, step by step."""
    import cmt_openmm.training.cmt as cmt

    measured = []

    def measure_then_keep_one(seconds_at):
        measured.extend(seconds_at(scale) for scale in (1, 2))
        return 1, {}

    monkeypatch.setattr(cmt, "pick_step_scale", measure_then_keep_one)
    target = get_target("toy-double-well")
    fixed = train(target, _tiny_scaled(1), progress=False).history
    probed = train(target, _tiny_scaled("auto"), progress=False).history
    assert len(measured) == 2 and all(t > 0 for t in measured)
    keys = ("lam", "eta", "loss", "reverse_ess", "energy_evaluations")
    assert [[r[k] for k in keys] for r in probed] == [[r[k] for k in keys] for r in fixed]


def test_a_run_stored_with_a_fixed_step_resumes_under_step_scale_auto():
    """A preset run started before step_scale existed (or with a number) resumes when its run file now
    says auto: auto takes the stored scale. A different number is a different run and is refused."""
    from cmt_openmm.training.config import resume_conflicts

    auto = TrainConfig.from_dict({"cmt": {"step_scale": "auto"}}).to_dict()
    before = {**auto, "cmt": {k: v for k, v in auto["cmt"].items() if k != "step_scale"}}
    assert resume_conflicts(before, auto) == []
    assert resume_conflicts({**auto, "cmt": {**auto["cmt"], "step_scale": 4}}, auto) == []
    assert resume_conflicts(before, {**auto, "cmt": {**auto["cmt"], "step_scale": 2}}) == ["cmt"]
    assert resume_conflicts(before, {**auto, "cmt": {**auto["cmt"], "eps_tr": 1.0}}) == ["cmt"]
