"""recheck(): a few of a run's own samples against OpenMM, and the switch to OpenMM on a mismatch
(issue 24: verification that follows the flow).

Negative controls, run once by hand: with recheck's count of disagreements forced to 0,
test_a_mismatch_switches_to_openmm_with_one_warning failed ("DID NOT WARN"); with
TorchEnergy._evaluate ignoring ``fallback``, it failed on the energies after the switch (torch's
shifted energies, 5 kJ/mol per configuration off OpenMM's).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.energy.torch.recheck import recheck
from cmt_openmm.systems import get_target


@pytest.fixture(scope="module")
def aldp():
    return get_target("aldp-vacuum")


def samples(target, n: int = 16, sigma: float = 0.05) -> np.ndarray:
    """Configurations far from the reference, as a flow in training may draw them (nm)."""
    return target.positions + sigma * np.random.default_rng(1).standard_normal((n, target.n_atoms, 3))


def test_agreeing_samples_pass_and_nothing_changes(aldp):
    energy = TorchEnergy(aldp, verify=False, compile=False)
    record = recheck(energy, torch.as_tensor(samples(aldp)), n=4)
    json.dumps(record, allow_nan=False)  # a metrics.jsonl record
    assert record["recheck_n"] == 4 and record["recheck_passed"] is True
    assert record["recheck_max_relative_energy_error"] < 1e-9 and not record["recheck_switched_to_openmm"]
    assert energy.backend == "torch" and energy.fallback is None and energy.n_evaluations == 0


def test_a_mismatch_switches_to_openmm_with_one_warning(aldp, monkeypatch):
    energy = TorchEnergy(aldp, verify=False, compile=False)
    term = energy.terms[0]
    original = type(term).__call__
    monkeypatch.setattr(type(term), "__call__", lambda self, geometry, gradient=False: original(
        self, geometry, gradient) + 5.0)  # a fault the verification near the reference did not see
    x = samples(aldp)
    with pytest.warns(UserWarning) as caught:
        record = recheck(energy, x, n=4)
    message = str(caught[0].message)
    assert len(caught) == 1 and "\n" not in message and message.startswith("Energies of aldp-vacuum come from OpenMM")
    assert record["recheck_passed"] is False and record["recheck_switched_to_openmm"]
    assert record["recheck_max_abs_energy_error_kT"] == pytest.approx(5.0 / aldp.kT)
    json.dumps(record, allow_nan=False)
    assert energy.backend == "openmm" and energy.selection.startswith("openmm: torch disagreed")
    u, f = energy.energy_and_forces(x[:3])  # OpenMM's from now on
    for b in range(3):
        assert u[b] == pytest.approx(aldp.reduced_potential(x[b]), rel=1e-12)
    assert energy(torch.as_tensor(x[:2])).dtype == torch.float64
    assert recheck(energy, x)["recheck_n"] == 0  # not torch any more: nothing to check
