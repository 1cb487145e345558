"""OpenMMEnergy replaces workers that die: the call is evaluated again on a fresh pool (same
energies, counted in n_restarts), and a System that kills its workers every time ends in one
sentence after MAX_WORKER_RESTARTS restarts.

Workers unpickle this module's PythonForce functions by importing the module, so its top level
imports neither torch nor OpenMMEnergy (``_energy`` does, in the test process only).
"""
import multiprocessing
import os
import signal
import warnings

import numpy as np
import openmm
import openmm.app as app
import pytest

from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems import get_target
from cmt_openmm.target import Target

_K, _CENTER = 50.0, 0.1  # kJ/mol/nm^2 and nm, the harmonic restraint of the toy forces
_DIE_ONCE = "CMT_TEST_WORKER_DIE_ONCE"  # environment variable: a file whose removal kills a worker


def _energy(*args, **kwargs):
    from cmt_openmm.energy import OpenMMEnergy

    return OpenMMEnergy(*args, **kwargs)


def _harmonic(state):
    x = state.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)
    return 0.5 * _K * float(((x - _CENTER) ** 2).sum()), -_K * (x - _CENTER)


def dies_once_force(state):
    """Harmonic restraint; the first worker to evaluate while the file named by $CMT_TEST_WORKER_DIE_ONCE
    exists removes it and is killed by SIGKILL mid-call, as the out-of-memory killer would."""
    if multiprocessing.parent_process() is not None and os.environ.get(_DIE_ONCE):
        try:
            os.remove(os.environ[_DIE_ONCE])
        except FileNotFoundError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return _harmonic(state)


def always_exits_force(state):
    """Harmonic restraint that ends every worker evaluating it with exit code 3."""
    if multiprocessing.parent_process() is not None:
        os._exit(3)
    return _harmonic(state)


def _toy(function, n_atoms=3):
    system, topology = openmm.System(), app.Topology()
    residue = topology.addResidue("TOY", topology.addChain())
    for i in range(n_atoms):
        system.addParticle(1.0)
        topology.addAtom(f"A{i}", app.element.argon, residue)
    system.addForce(openmm.PythonForce(function))
    return Target(system, topology, np.zeros((n_atoms, 3)), 300.0, name="toy")


def test_worker_killed_between_calls_is_replaced_with_the_same_energies():
    target = get_target("aldp-vacuum")
    x = target.positions + 0.005 * np.random.default_rng(0).standard_normal((6, target.n_atoms, 3))
    with _energy(target) as reference:  # one Context in this process: nothing to kill
        u_ref, f_ref = reference.energy_and_forces(x)
    with _energy(target, n_workers=2) as energy:
        np.testing.assert_array_equal(energy.energy_and_forces(x)[0], u_ref)
        killed = energy.worker_pids[1]
        os.kill(killed, signal.SIGKILL)
        with pytest.warns(UserWarning, match=rf"worker 1 \(pid {killed}\) was killed by SIGKILL \(signal 9, "
                          r"out of memory\?\) .*on a fresh pool \(restart 1 of 3\)"):
            u, f = energy.energy_and_forces(x)
        np.testing.assert_array_equal(u, u_ref)
        np.testing.assert_array_equal(f, f_ref)
        assert energy.n_restarts == 1 and energy.n_evaluations == 12  # the retried batch counts once
        assert len(energy.worker_pids) == 2 and killed not in energy.worker_pids
    assert energy.n_restarts == 1  # a plain attribute: close() keeps it


def test_worker_killed_during_a_call_is_replaced_with_the_same_energies(tmp_path, monkeypatch):
    target = _toy(dies_once_force)
    x = np.random.default_rng(1).standard_normal((5, 3, 3))
    with _energy(target) as reference:  # in this process dies_once_force never kills
        u_ref, f_ref = reference.energy_and_forces(x)
    marker = tmp_path / "die"
    marker.touch()
    monkeypatch.setenv(_DIE_ONCE, str(marker))  # spawned workers inherit the environment
    with _energy(target, in_process=False) as energy:
        with pytest.warns(UserWarning, match=r"worker 0 .* killed by SIGKILL .* while evaluating 5 configurations"):
            u, f = energy.energy_and_forces(x)
        assert not marker.exists() and energy.n_restarts == 1 and energy.n_evaluations == 5
    np.testing.assert_array_equal(u, u_ref)
    np.testing.assert_array_equal(f, f_ref)


def test_a_system_that_kills_every_worker_ends_in_one_sentence_after_the_restarts():
    with _energy(_toy(always_exits_force), in_process=False) as energy:
        with warnings.catch_warnings(record=True) as caught, pytest.raises(CMTInputError) as error:
            warnings.simplefilter("always")
            energy(np.zeros((4, 3, 3)))
        assert energy.n_restarts == 3 and energy.n_evaluations == 0
    assert len(caught) == 3 and all(str(w.message).endswith(f"(restart {i} of 3).") for i, w in enumerate(caught, 1))
    message = str(error.value)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert message.startswith("OpenMM energy workers kept dying (3 pool restarts spent), the last time worker 0")
    assert "exited with code 3 while evaluating 4 configurations; if memory is short" in message
