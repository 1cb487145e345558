"""Runs sized to their limits: the plan, budget: auto, eps_ent: auto and the auto learning-rate decay."""
import math

import pytest

from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems import get_target
from cmt_openmm.training import TrainConfig, load_history, train
from cmt_openmm.training.schedule import (ENTROPY_PER_COORDINATE, EPS_ENT_RANGE, MEASURED_STEPS,
                                          auto_eps_ent, auto_lr_decay, plan_steps)

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
