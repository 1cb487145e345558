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

# The alanine dipeptide settings every ALDP preset shares (benchmarks/cmt_settings_study.py).
ALDP_FLOW = {"n_layers": 6, "hidden": 64, "n_bins": 8}
ALDP_CMT = {"eps_tr": 0.5, "eps_ent": 1.0, "eps_ent_warmup": 0.5, "warmup_steps": 120, "n_samples": 4_000,
            "fit_steps": 8, "batch_size": 256, "lr": 1e-3, "strata": "phi-sign", "strata_floor": 0.1}
ALDP_REPORT = {"n_samples": 5_000, "n_draws": 5}
# 1,440 annealing steps whose learning rate decays from the cooled path on (see aldp-quick)
ALDP_CMT_1440 = {**ALDP_CMT, "lr_decay_from": "cooled", "lr_decay_after_target": 0.997, "steps_after_target": 1_440}

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
    # The README's main job: alanine dipeptide in vacuum at 300 K, ~9-10 min on 2 CPU cores
    # (1,440 annealing steps at ~0.37 s each, one thread). Once the path has cooled (the first
    # post-warm-up step with eta = 0, step ~400) the learning rate shrinks by 0.997 per step:
    # the flow then refines at lambda < 1, where the noise of a constant learning rate capped
    # ESS. Seeds 0 / 1 / 2: reverse ESS 69.6 / 57.2 / 68.2 % (median of 5 draws of 5,000; was
    # 37.3 / 25.0 / 37.4 % with a constant rate), every basin kept, phi > 0 at 2.58 / 2.43 /
    # 2.49 % (REMD 1.8 +- 0.7 %); decay 0.998 gave 56.4 % on seed 1. 360 steps gave 16.6 %.
    # Vacuum keeps OpenMM's cost negligible (the spline flow bounds CPU training, see
    # method.md "Calibration"). Settings from benchmarks/cmt_settings_study.py (runs/study):
    # a 4,000-sample buffer with 8 Adam steps per annealing step beat a 2,000-sample buffer
    # with a full pass (ESS 20 % vs 6 % at equal CPU), and a two-phase entropy constraint
    # (eps_ent 0.5 for the first 120 steps, then 1.0) kept the phi > 0 basin in 2 of 4 seeds;
    # phi-sign strata with a 0.1 floor (cmt_openmm.training.strata) kept it in the seeds that
    # had lost it (phi > 0 at 1.7-2.1 % against 1.8 +- 0.7 % from replica exchange).
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
    # The paper's own ALDP system (AlanineDipeptideImplicit: ff96 + OBC1 as a CustomGBForce, ~1 ms
    # per configuration in OpenMM): the aldp-quick settings with the torch energies ("auto" picks
    # them for this System), 750 annealing steps (3e6 evaluations) and a 14-minute safety limit.
    # Seeds 0 / 1 on one core each (benchmarks/paper_table.py --preset cpu-small, the same run):
    # reverse ESS 48.7 / 42.0 % (median of 5 draws of 10,000) in 590 / 601 s of training, every
    # basin kept (phi > 0 0.22 +- 0.015 %; a 0.5 ns replica exchange gives 1.8 +- 1.3 %). With 360
    # steps and a constant learning rate it gave ESS 19.5 % in 553 s. Alone on a quiet machine,
    # seed 0 trains in 343 s (6:07 with the report; ESS 50.3 %, 5 draws of 5,000), and with the
    # compiled spline kernel of the flow in 238 s (4:22; ESS 49.7 %, every basin kept). Before the
    # kernel, adding ``energy: {compile: true}`` gave the same run in 261 s (4:50, ~25 s compiling); with
    # the faster compiled energies of issue 11 (38.5 -> 25.7 ms per 4,000 configurations), 265 s
    # against 304 s before, both runs at once on the 2 cores.
    # Compiling stays opt-in: a crash of the compiler could not be caught.
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
    # aldp-quick with 2.5x its budget and a 30-minute limit, for the steps after the target
    # is reached (steps_after_target, lr decaying) where ESS still grows. Seed 0 on 2 cores:
    # target at step 1,291, stopped at 3,291 after 22 min of training (24 min in all), reverse
    # ESS 71.5 % (54.2-73.7, median of 5 draws of 5,000), every basin kept, phi > 0 2.43 +- 0.10 %.
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
