"""Built-in run configurations for ``cmt-openmm train --preset NAME``.

A preset is the same dictionary a user would write as a YAML run file: ``system`` and
``temperature`` name the target, the remaining training keys go to
:class:`cmt_openmm.training.TrainConfig`, and ``report`` sets how many flow samples the final
report draws. Presets are plain data so that ``cmt-openmm train --preset X`` and
``cmt-openmm train X.yaml`` (with the preset written out) are the same run.
"""
from __future__ import annotations

import copy

from ..errors import CMTInputError

# The alanine dipeptide settings every ALDP preset shares (benchmarks/cmt_settings_study.py;
# docs/cmt_settings.md says why).
ALDP_FLOW = {"n_layers": 6, "hidden": 64, "n_bins": 8}
ALDP_CMT = {"eps_tr": 0.5, "eps_ent": 1.0, "eps_ent_warmup": 0.5, "warmup_steps": 120, "n_samples": 4_000,
            "fit_steps": 8, "batch_size": 256, "lr": 1e-3, "strata": "phi-sign", "strata_floor": 0.1}
ALDP_REPORT = {"n_samples": 5_000, "n_draws": 5}
# 1,440 annealing steps whose learning rate decays from the cooled path on (see aldp-quick)
ALDP_CMT_1440 = {**ALDP_CMT, "lr_decay_from": "cooled", "lr_decay_after_target": 0.997, "steps_after_target": 1_440}

# Peptides sized to a wall-clock limit (training/schedule.py): as many evaluations as fit in
# max_minutes, the entropy budget spread so the path cools at cool_fraction of the planned steps,
# the learning rate decaying from cooling to a few percent at the planned end.
# On ala4, cooling at 0.3 of the plan with lr 2e-3 gave the best of the settings tried (RESULTS.md).
# step_scale: auto: larger steps where the device runs them for little more time (a GPU), 1 on CPUs.
PEPTIDE_CMT = {**ALDP_CMT, "eps_ent": "auto", "cool_fraction": 0.3, "lr": 2e-3, "lr_decay_from": "cooled",
               "lr_decay_after_target": "auto", "steps_after_target": 1_000_000, "step_scale": "auto"}


# bfloat16 conditioners where the hardware has them (a faster step, the same ESS per step) and the
# weights' moving average as the generator; benchmarks/RESULTS.md, "Peptides sized to a
# wall-clock limit", has the measurements.
PEPTIDE_FLOW = {**ALDP_FLOW, "train_dtype": "auto"}
PEPTIDE_EMA_DECAY = 0.999


def _sized_to(system: str, minutes: float) -> dict:
    """A CMT run of a built-in peptide that trains for ``minutes`` (the report follows), on up to
    4 cores (more steps per hour: the fit sets the pace, docs/cmt_settings.md)."""
    return {"system": system, "temperature": 300.0, "method": "cmt", "seed": 0, "budget": "auto",
            "max_minutes": minutes, "threads": "auto", "max_steps": 1_000_000, "ema_decay": PEPTIDE_EMA_DECAY,
            "flow": PEPTIDE_FLOW, "cmt": PEPTIDE_CMT, "report": ALDP_REPORT}


_PRESETS: dict[str, dict] = {
    # Seconds on one core; the CLI tests use it end to end. A one-particle double well with
    # an exact answer, so the report's mode weights can be checked by eye.
    "toy-quick": {
        "system": "toy-double-well",
        "temperature": 300.0,
        "method": "cmt",
        "seed": 0,
        "budget": 20_000,
        "max_steps": 6,
        "flow": {"n_layers": 2, "hidden": 16, "n_bins": 8},
        "cmt": {
            "eps_tr": 0.5,
            "eps_ent": 1.0,
            "n_samples": 1_000,
            "fit_steps": 20,
            "batch_size": 250,
            "lr": 5e-3,
        },
        "report": {"n_samples": 1_000, "n_draws": 3},
    },
    # The demo's training run: alanine dipeptide in vacuum at 300 K, ~5-6 min on 2 CPU cores; the
    # learning rate decays once the path has cooled (docs/cmt_settings.md). Figures:
    # benchmarks/RESULTS.md, "aldp-quick".
    "aldp-quick": {
        "system": "aldp-vacuum",
        "temperature": 300.0,
        "method": "cmt",
        "seed": 0,
        "budget": 5_760_000,
        "max_steps": 1_440,
        "flow": ALDP_FLOW,
        "cmt": ALDP_CMT_1440,
        "report": ALDP_REPORT,
    },
    # The paper's own ALDP system (ff96 + OBC1 as a CustomGBForce) with the aldp-quick settings on
    # the torch energies ("auto" picks them here), ~5 min on 2 cores; the 14-minute limit is a
    # safety net; energy compile: auto compiles the torch energies where a subprocess probe found
    # that safe. Figures (measured with eager torch): benchmarks/RESULTS.md, "aldp-implicit-quick".
    "aldp-implicit-quick": {
        "system": "aldp-implicit",
        "temperature": 300.0,
        "method": "cmt",
        "seed": 0,
        "budget": 3_000_000,
        "max_steps": 750,
        "max_minutes": 14.0,
        "energy": {"backend": "auto"},
        "flow": ALDP_FLOW,
        "cmt": ALDP_CMT_1440,
        "report": ALDP_REPORT,
    },
    # aldp-quick with 2.5x its budget and a 30-minute limit, for the steps after the target is
    # reached (steps_after_target, lr decaying) where ESS still grows; 20-30 min on 2 cores.
    # Figures: benchmarks/RESULTS.md, "aldp-30min".
    "aldp-30min": {
        "system": "aldp-vacuum",
        "temperature": 300.0,
        "method": "cmt",
        "seed": 0,
        "budget": 14_400_000,
        "max_steps": 3_600,
        "max_minutes": 30.0,
        "flow": ALDP_FLOW,
        "cmt": {**ALDP_CMT, "steps_after_target": 2_000, "lr_decay_after_target": 0.999},
        "report": ALDP_REPORT,
    },
    # The paper's tetrapeptide (Ace-A3-Nme, 120 flow coordinates) in an hour on 2 cores, report
    # included; any peptide with `preset: ala4-hour` and its own `system` in a run file.
    "ala4-hour": _sized_to("ala4", 54.0),
    # The hexapeptide (Ace-A5-Nme, 180 coordinates) and ELIL (zwitterion, 219) in two hours.
    "ala6-2h": _sized_to("ala6", 112.0),
    "elil-2h": _sized_to("elil", 112.0),
}


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return sorted(_PRESETS)


def get_preset(name: str) -> dict:
    """A deep copy of the run configuration called ``name``.

    >>> get_preset("toy-quick")["system"]
    'toy-double-well'
    """
    if name not in _PRESETS:
        raise CMTInputError(
            f"unknown preset {name!r}; choose one of {', '.join(list_presets())}."
        )
    return copy.deepcopy(_PRESETS[name])
