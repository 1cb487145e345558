"""OpenMMEnergy: exact agreement with a plain OpenMM loop, workers, failures, lifetime."""
import copy
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from cmt_openmm.energy import OpenMMEnergy, regularize_energy
from cmt_openmm.energy.openmm.energy import MAX_WORKER_RESTARTS
from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems import get_target
from cmt_openmm.target import Target

ALDP = ["aldp-vacuum", "aldp-obc", "aldp-implicit"]
_K = 50.0  # kJ/mol/nm^2, harmonic restraint of the toy forces
_CENTER = 0.1  # nm


@pytest.fixture(scope="module")
def targets():
    return {name: get_target(name) for name in ALDP}


def _perturbed(target, n, scale=0.005, seed=0):
    rng = np.random.default_rng(seed)
    return target.positions + scale * rng.standard_normal((n, target.n_atoms, 3))


def _direct(target, x, platform="Reference"):
    """Reduced energies and forces/kT from a plain loop over one OpenMM Context (public API)."""
    context = openmm.Context(
        target.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform)
    )
    u, f = [], []
    for positions in x:
        context.setPositions(positions)
        state = context.getState(getEnergy=True, getForces=True)
        u.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / target.kT)
        f.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer) / target.kT)
    return np.array(u), np.array(f)


def _with_failures(x):
    """Rows 1-3 of a copy of ``x`` fail: NaN positions, inf positions, two overlapping atoms."""
    x = x.copy()
    x[1, 3] = np.nan
    x[2, 0, 2] = np.inf
    x[3, 21] = x[3, 0]
    return x


def _alive(pid):
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _toy(force, n_atoms=3):
    system, topology = openmm.System(), app.Topology()
    residue = topology.addResidue("TOY", topology.addChain())
    for i in range(n_atoms):
        system.addParticle(1.0)
        topology.addAtom(f"A{i}", app.element.argon, residue)
    system.addForce(force)
    return Target(system, topology, np.zeros((n_atoms, 3)), 300.0, name="toy")


def _toy_expected(target, x):
    u = 0.5 * _K * ((x - _CENTER) ** 2).sum(axis=(1, 2)) / target.kT
    return u, -_K * (x - _CENTER) / target.kT


def harmonic_python_force(state):
    """PythonForce function (top level: picklable, importable by spawned workers).

    A configuration with x[0, 0] > 50 nm kills the worker evaluating it (never the main process).
    """
    x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    if x[0, 0] > 50.0 and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return 0.5 * _K * float(((x - _CENTER) ** 2).sum()), -_K * (x - _CENTER)


class HarmonicRestraint(torch.nn.Module):
    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return 0.5 * 50.0 * torch.sum((positions - 0.1) ** 2)  # _K, _CENTER (TorchScript: literals)


# -- agreement with OpenMM ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALDP)
def test_matches_direct_openmm_loop_energies_gradients_and_finite_difference(targets, name):
    target = targets[name]
    x_np = _perturbed(target, 5)
    u_ref, f_ref = _direct(target, x_np)
    with OpenMMEnergy(target) as energy:
        x = torch.tensor(x_np, requires_grad=True)
        u = energy(x)
        u.sum().backward()
        assert u.dtype == torch.float64 and u.shape == (5,)
        np.testing.assert_allclose(u.detach().numpy(), u_ref, rtol=1e-8)
        np.testing.assert_allclose(x.grad.numpy(), -f_ref, rtol=1e-8, atol=1e-8 * np.abs(f_ref).max())
        np.testing.assert_allclose(energy(x_np).numpy(), u_ref, rtol=1e-8)  # energies-only path

        h, (b, i, k) = 1e-5, (0, 4, 1)
        shifted = np.stack([x_np[b], x_np[b]])
        shifted[0, i, k] += h
        shifted[1, i, k] -= h
        u_plus, u_minus = energy(shifted).numpy()
        np.testing.assert_allclose((u_plus - u_minus) / (2 * h), x.grad[b, i, k].item(), rtol=1e-5)
        assert energy.n_evaluations == 12 and energy.n_failed == 0


def test_cpu_platform_in_process_and_workers(targets):
    target = targets["aldp-obc"]
    x = _perturbed(target, 6)
    u_ref, f_ref = _direct(target, x)
    with OpenMMEnergy(target, platform="CPU") as single, OpenMMEnergy(target, platform="CPU", n_workers=2) as pool:
        u1, f1 = single.energy_and_forces(x)
        u2, f2 = pool.energy_and_forces(x)
        assert single.in_process and not pool.in_process and len(pool.worker_pids) == 2
    np.testing.assert_allclose(u1, u_ref, rtol=1e-5)  # CPU platform: mixed precision
    np.testing.assert_allclose(f1, f_ref, rtol=1e-3, atol=1e-4 * np.abs(f_ref).max())
    np.testing.assert_allclose(u2, u1, rtol=1e-6)
    np.testing.assert_allclose(f2, f1, rtol=1e-4, atol=1e-6 * np.abs(f1).max())


# -- workers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["aldp-vacuum", "aldp-implicit"])
def test_one_and_two_workers_agree_and_context_manager_stops_workers(targets, name):
    target = targets[name]
    x = _with_failures(_perturbed(target, 7))
    with OpenMMEnergy(target) as single:
        u1, f1 = single.energy_and_forces(x)
    with OpenMMEnergy(target, n_workers=2) as pool:
        assert pool.worker_pids == []  # started lazily
        u2, f2 = pool.energy_and_forces(x)
        pids = pool.worker_pids
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        assert (pool.n_evaluations, pool.n_failed) == (7, 3)
    assert not any(_alive(pid) for pid in pids)
    np.testing.assert_array_equal(u2, u1)
    np.testing.assert_array_equal(f2, f1)


def test_worker_in_separate_process_matches_in_process(targets):
    target = targets["aldp-vacuum"]
    x = _perturbed(target, 4)
    with OpenMMEnergy(target, in_process=False) as energy:
        u, f = energy.energy_and_forces(x)
        assert not energy.in_process and len(energy.worker_pids) == 1
    u_ref, f_ref = _direct(target, x)
    np.testing.assert_allclose(u, u_ref, rtol=1e-12)
    np.testing.assert_allclose(f, f_ref, rtol=1e-12, atol=1e-12)


def test_worker_module_imports_neither_torch_nor_the_rest_of_the_package():
    # what a spawned worker imports on unpickling worker_main: its module and the packages above it
    code = ("import sys, cmt_openmm.energy.openmm.worker; "
            "print(sorted(m for m in sys.modules if 'torch' in m or 'cmt' in m))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == str(
        ["cmt_openmm", "cmt_openmm.energy", "cmt_openmm.energy.openmm", "cmt_openmm.energy.openmm.worker"]
    )


def test_interpreter_exit_stops_workers_and_killed_parent_leaves_no_orphans(targets):
    # The pool alone (no torch import) keeps the two child interpreters quick to start.
    script = textwrap.dedent(
        """
        import os, signal, sys
        import numpy as np
        from cmt_openmm.energy.openmm.worker import WorkerPool
        pool = WorkerPool(sys.stdin.read(), 22, "Reference", {}, n_workers=2)
        pool.evaluate(np.zeros((2, 22, 3)), forces=True)
        print(*(process.pid for process in pool.processes), flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    system_xml = openmm.XmlSerializer.serialize(targets["aldp-vacuum"].system)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for how in ("exit", "kill"):
        done = subprocess.run(
            [sys.executable, "-c", script, how], input=system_xml, capture_output=True, text=True, timeout=120, env=env
        )
        pids = [int(pid) for pid in done.stdout.split()]
        assert len(pids) == 2, done.stderr
        deadline = time.monotonic() + 10.0
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), how


# -- failures -------------------------------------------------------------------------------------
def test_failed_configurations_get_infinite_energy_zero_gradient_and_are_counted(targets):
    target = targets["aldp-obc"]
    x = torch.tensor(_with_failures(_perturbed(target, 5)), requires_grad=True)
    with OpenMMEnergy(target) as energy:
        u = energy(x)
        u.sum().backward()
        assert torch.isposinf(u[1:4]).all() and torch.isfinite(u[[0, 4]]).all()
        assert (x.grad[1:4] == 0).all() and torch.isfinite(x.grad).all()
        assert (energy.n_evaluations, energy.n_failed) == (5, 3)
        energy(x.detach()[:1])
        assert (energy.n_evaluations, energy.n_failed) == (6, 3)


def test_python_force_exception_is_a_failed_configuration():
    def explode(state):
        raise RuntimeError("boom")

    with OpenMMEnergy(_toy(openmm.PythonForce(explode))) as energy:
        assert torch.isposinf(energy(np.zeros((2, 3, 3)))).all() and energy.n_failed == 2


# -- any force --------------------------------------------------------------------------------------
def test_torchforce_in_process():
    import openmmtorch  # a missing or broken openmm-torch must fail here, not skip

    target = _toy(openmmtorch.TorchForce(torch.jit.script(HarmonicRestraint())))
    x = np.random.default_rng(1).standard_normal((6, 3, 3))
    u_ref, f_ref = _toy_expected(target, x)
    with OpenMMEnergy(target) as energy:
        u, f = energy.energy_and_forces(x)
    np.testing.assert_allclose(u, u_ref, rtol=1e-10)
    np.testing.assert_allclose(f, f_ref, rtol=1e-10)


def test_torchforce_and_python_force_in_workers_and_worker_dying_mid_batch():
    import openmmtorch  # a missing or broken openmm-torch must fail here, not skip

    # One System with both forces and one worker: a worker start imports torch (seconds).
    target = _toy(openmmtorch.TorchForce(torch.jit.script(HarmonicRestraint())))
    target.system.addForce(openmm.PythonForce(harmonic_python_force))
    x = np.random.default_rng(2).standard_normal((6, 3, 3))
    u_ref, f_ref = _toy_expected(target, x)
    with OpenMMEnergy(target, in_process=False) as energy:
        u, f = energy.energy_and_forces(x)
        assert len(energy.worker_pids) == 1
        np.testing.assert_allclose(u, 2 * u_ref, rtol=1e-10)
        np.testing.assert_allclose(f, 2 * f_ref, rtol=1e-10)
        poisoned = x.copy()
        poisoned[4, 0, 0] = 100.0
        energy.n_restarts = MAX_WORKER_RESTARTS  # spent: no fresh pools (each imports torch)
        start = time.monotonic()
        with pytest.raises(CMTInputError, match=r"the last time worker 0 .* killed by SIGKILL \(signal 9, out of "
                           r"memory\?\) while evaluating 6 configurations"):
            energy(poisoned)
        assert time.monotonic() - start < 5.0


def test_unpicklable_python_force_is_evaluated_in_process():
    def closure(state):  # a local function: XmlSerializer cannot pickle it
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return 0.5 * _K * float(((x - _CENTER) ** 2).sum()), -_K * (x - _CENTER)

    target = _toy(openmm.PythonForce(closure))
    x = np.random.default_rng(3).standard_normal((4, 3, 3))
    with pytest.warns(UserWarning, match="cannot be sent to worker processes"):
        energy = OpenMMEnergy(target, n_workers=2)
    with energy:
        u, f = energy.energy_and_forces(x)
        assert energy.in_process and energy.worker_pids == []
    u_ref, f_ref = _toy_expected(target, x)
    np.testing.assert_allclose(u, u_ref, rtol=1e-12)
    np.testing.assert_allclose(f, f_ref, rtol=1e-12)
    with pytest.raises(CMTInputError, match="in_process=False is impossible"):
        OpenMMEnergy(target, n_workers=2, in_process=False)


# -- torch interface and input checks ----------------------------------------------------------------
def test_dtypes_and_regularized_energy_are_differentiable(targets):
    target = targets["aldp-vacuum"]
    x = torch.tensor(_perturbed(target, 3), dtype=torch.float32, requires_grad=True)
    with OpenMMEnergy(target) as energy:
        u = energy(x)
        u.sum().backward()
        assert u.dtype == torch.float64 and x.grad.dtype == torch.float32
        grad = x.grad.clone()
        x.grad = None
        low = energy.regularized(x, threshold=1e6)  # all below threshold: identical to raw
        low.sum().backward()
        torch.testing.assert_close(low, u)
        torch.testing.assert_close(x.grad, grad)
        x.grad = None
        high = energy.regularized(x, threshold=-1e3)  # all above: gradient scaled by 1/(1 + u - t)
        high.sum().backward()
        scale = (1.0 / (1.0 + u.detach() + 1e3)).float()
        torch.testing.assert_close(x.grad, grad * scale[:, None, None])


def test_regularize_energy():
    u = torch.tensor([-5.0, 10.0, 100.0, 1e8, float("inf")], dtype=torch.float64, requires_grad=True)
    r = regularize_energy(u, threshold=10.0)
    r.sum().backward()
    expected = torch.tensor([-5.0, 10.0, 10.0 + np.log1p(90.0), 10.0 + np.log1p(1e8 - 10.0)], dtype=torch.float64)
    torch.testing.assert_close(r[:4], expected)
    assert torch.isfinite(r[4]) and r[4] > r[3]
    expected_grad = torch.tensor([1.0, 1.0, 1.0 / 91.0, 1.0 / (1e8 - 9.0), 0.0], dtype=torch.float64)
    torch.testing.assert_close(u.grad, expected_grad)


def test_input_checks(targets):
    target = targets["aldp-vacuum"]
    with pytest.raises(CMTInputError, match=r"shape \(22, 3\).*\(B, 22, 3\)"):
        OpenMMEnergy(target)(target.positions)
    with pytest.raises(CMTInputError, match="not available here"):
        OpenMMEnergy(target, platform="NoSuchPlatform")
    with pytest.raises(CMTInputError, match="positive integer"):
        OpenMMEnergy(target, n_workers=0)
    with OpenMMEnergy(target) as energy:
        quantity = unit.Quantity(target.positions[None] * 10.0, unit.angstrom)
        np.testing.assert_allclose(energy(quantity).numpy(), energy(target.positions[None]).numpy(), rtol=1e-12)
        assert energy(np.zeros((0, 22, 3))).shape == (0,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OpenMMEnergy(target, n_workers=2).close()  # never started: nothing to stop, no warning


def test_platform_object_stands_for_its_name(targets):
    target = targets["aldp-vacuum"]
    with OpenMMEnergy(target, platform=openmm.Platform.getPlatformByName("CPU")) as energy:
        assert energy.platform == "CPU" and np.isfinite(energy(target.positions[None]).numpy()).all()


def test_copy_starts_its_own_context(targets):
    target = targets["aldp-vacuum"]
    with OpenMMEnergy(target) as energy:
        u = energy(target.positions[None])
        clone = copy.deepcopy(energy)
        assert clone._evaluator is None and clone.n_evaluations == 1
        torch.testing.assert_close(clone(target.positions[None]), u, rtol=1e-12, atol=0.0)
