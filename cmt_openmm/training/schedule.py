"""Sizing a run to its limits: how many steps it will take, and the CMT schedules that follow.

A run's *plan* is the number of steps it will take: the least of ``max_steps``, the budget at
the step's cost and, with ``max_minutes``, the wall time at the measured seconds per step.
The seconds per step are measured over steps 2 to :data:`MEASURED_STEPS` (the first step
carries one-off costs: worker start, compilation, caches) and measured again every
:data:`REPLAN_EVERY` steps as the mean since step 2, since a machine's load changes during an
hour (a plan measured while other jobs ran would let the learning rate decay long before the
run ends). The measured speed is stored in the checkpoint, so the plan is a function of the
settings and that number: a resumed run follows the same schedule, and one resumed with more
budget or minutes stretches it. ``budget: auto`` leaves the
budget to ``max_minutes``: the run then takes as many evaluations as fit in its time, and says
how many it expects once it has measured them.

Two CMT settings use the plan (:mod:`.cmt`):

- ``eps_ent: auto``: a deadline for cooling. Each annealing step may lower the entropy by
  ε_ent = (ENTROPY_PER_COORDINATE × d − shed) / (steps left to ``cool_fraction`` × plan), d the
  flow's coordinates and ``shed`` the entropy the flow has lost so far (the buffers' estimates
  H(q_0) − H(q_i)); the paper's rule of thumb puts the cooling point about halfway. At the start
  this is ENTROPY_PER_COORDINATE × d / (cool_fraction × plan): alanine dipeptide (d = 60) and the
  tetrapeptide (d = 120) with ε_ent = 0.5 then 1 cooled once the drops asked for summed to about
  5–6 nats per coordinate. The flow sheds far less than it is asked (~0.66 nats per coordinate
  by cooling on both), so ε_ent then grows as the cooling point nears: a path that has not
  cooled by then is let cool.
- ``lr_decay_after_target: auto``: from the step the decay starts (``lr_decay_from``) the learning
  rate shrinks by a constant factor per step that reaches ``lr_final_fraction`` of its value
  at the planned last step; a fixed factor instead freezes a long run's flow long before its
  end, or never settles a short one.

Before the plan is measured, ``eps_ent: auto`` uses :data:`EPS_ENT_BEFORE_PLAN`.

A step is sized to the device (``cmt.step_scale: auto``, :func:`pick_step_scale`): the samples
per annealing step and per Adam step are multiplied by the largest power of two up to which each
doubling brought a step's time per sample to at most :data:`STEP_SCALE_GAIN` of what it was. On
the CPUs measured a step's time grows with its samples, and at equal time a twice larger step
follows the same curve (benchmarks/RESULTS.md, "Session 14", "Session 20"), so the scale stays 1
there; a GPU should run a larger batch in little more time than a small one (not yet measured),
and there the larger step is the one to take.
"""
from __future__ import annotations

import math
from collections.abc import Callable

MEASURED_STEPS = 5
REPLAN_EVERY = 100
ENTROPY_PER_COORDINATE = 5.8  # nats per flow coordinate (see the module docstring)
EPS_ENT_RANGE = (0.2, 4.0)  # nats per annealing step
EPS_ENT_BEFORE_PLAN = 0.5
MAX_STEP_SCALE = 16
STEP_SCALE_GAIN = 0.75  # a doubling is taken when it brings the time per sample to at most this fraction


def plan_steps(max_steps: int, budget: int | str, step_cost: int, max_minutes: float | None,
                  seconds_per_step: float | None) -> tuple[int | None, str]:
    """The run's planned number of steps and the limit that sets it (None while a time limit
    has no measured speed yet, or when no limit is finite)."""
    limits = {"max_steps": max_steps}
    if budget != "auto":
        limits["budget"] = int(budget) // max(step_cost, 1)
    if max_minutes is not None:
        if seconds_per_step is None:
            return None, "max_minutes"
        limits["max_minutes"] = max(int(60.0 * max_minutes / seconds_per_step), 1)
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def auto_eps_ent(n_coordinates: int, entropy_shed: float, step: int, plan: int | None,
                 cool_fraction: float) -> float:
    """ε_ent (nats) for annealing step ``step`` (0-based) of ``plan``: the entropy left to shed,
    ENTROPY_PER_COORDINATE × n_coordinates − ``entropy_shed``, over the steps left until
    ``cool_fraction`` × plan, within EPS_ENT_RANGE."""
    if plan is None:
        return EPS_ENT_BEFORE_PLAN
    left = ENTROPY_PER_COORDINATE * n_coordinates - entropy_shed
    steps_left = max(cool_fraction * plan - step, 1.0)
    low, high = EPS_ENT_RANGE
    return min(max(left / steps_left, low), high)


def auto_lr_decay(start_step: int, plan: int | None, final_fraction: float) -> float:
    """The per-step learning-rate factor that reaches ``final_fraction`` of the learning rate at
    step ``plan`` when the decay starts at ``start_step`` (1: no decay when no plan is known or
    no step is left)."""
    if plan is None or plan <= start_step:
        return 1.0
    return math.exp(math.log(final_fraction) / (plan - start_step))


def pick_step_scale(seconds_at: Callable[[int], float | None],
                    max_scale: int = MAX_STEP_SCALE) -> tuple[int, dict[int, float]]:
    """The step scale to train at, and the seconds of one step measured at each scale tried.

    ``seconds_at(scale)`` is the time of one step at that scale, or None where a step larger than
    the run's own does not fit (memory). Starting at 1, the scale doubles while the doubled step
    takes at most 2 × STEP_SCALE_GAIN times as long as the current one, up to ``max_scale``.
    """
    timings = {1: seconds_at(1)}
    scale = 1
    while 2 * scale <= max_scale:
        seconds = seconds_at(2 * scale)
        if seconds is None:
            break
        timings[2 * scale] = seconds
        if seconds > 2 * STEP_SCALE_GAIN * timings[scale]:
            break
        scale *= 2
    return scale, timings
