"""The flow energy as an OpenMM force (to_openmm_force): PythonForce and TorchForce beside a System, copies.

What may crash the process (deserialising a TorchForce with some openmm-torch builds) runs in subprocesses.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import openmm
import pytest
from export_helpers import KJ, evaluate, minus_kT_log_q, particles_only, samples
from helpers import ROOT
from openmm import unit

from cmt_openmm.errors import CMTInputError
from cmt_openmm.export.flow_energy import FlowEnergy
from cmt_openmm.export.force import (
    openmmtorch_error,
    to_openmm_force,
    torchforce_copies_are_safe,
)


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_force_beside_the_system_on_reference_and_cpu_with_its_scale(target, generator64, backend):
    if backend == "torch" and openmmtorch_error() is not None:
        pytest.skip(f"openmm-torch cannot be imported: {openmmtorch_error()}")
    x = samples(generator64, 1, seed=3)[0]
    u_q = minus_kT_log_q(generator64, x[None])[0]
    system = copy.deepcopy(target.system)
    system.addForce(to_openmm_force(generator64, backend=backend, allow_uncopyable=True))
    flow_only = particles_only(target)
    flow_only.addForce(to_openmm_force(generator64, backend="python", scale_parameter=None))
    _, f_q = evaluate(flow_only, x)
    assert evaluate(flow_only, x)[0] == pytest.approx(u_q, rel=1e-11, abs=1e-9)
    for platform in ("Reference", "CPU"):
        u, f_u = evaluate(target.system, x, platform)
        e1, f1 = evaluate(system, x, platform)
        e3, f3 = evaluate(system, x, platform, lambda_flow=0.3)
        assert e1 == pytest.approx(u + u_q, rel=1e-9, abs=1e-6)
        assert e3 == pytest.approx(u + 0.3 * u_q, rel=1e-9, abs=1e-6)
        np.testing.assert_allclose(f1, f_u + f_q, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(f3, f_u + 0.3 * f_q, rtol=1e-6, atol=1e-4)


def test_python_force_at_scale_zero_skips_the_flow(target, generator64, monkeypatch):
    """At scale 0 (λ = 1 of a bridge) the PythonForce adds exactly nothing and never runs the flow."""
    x = samples(generator64, 1, seed=4)[0]
    u, f_u = evaluate(target.system, x)
    system = copy.deepcopy(target.system)
    system.addForce(to_openmm_force(generator64, backend="python"))
    calls = []
    original = FlowEnergy.forward
    monkeypatch.setattr(FlowEnergy, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    e0, f0 = evaluate(system, x, lambda_flow=0.0)
    assert e0 == u and np.array_equal(f0, f_u) and not calls
    evaluate(system, x, lambda_flow=0.5)
    assert calls


def test_python_force_evaluates_the_flow_once_per_configuration(target, generator64, monkeypatch):
    """The energies of one configuration at every λ of a ladder cost one flow evaluation; a new
    configuration is evaluated afresh (energies and forces equal to an uncached force's)."""
    x, y = samples(generator64, 2, seed=5)
    system = particles_only(target)
    system.addForce(to_openmm_force(generator64, backend="python"))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    other = particles_only(target)  # another force: its own cache
    other.addForce(to_openmm_force(generator64, backend="python"))
    f_q = {id(p): evaluate(other, p)[1] for p in (x, y)}
    calls = []
    original = FlowEnergy.forward
    monkeypatch.setattr(FlowEnergy, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    for positions in (x, y, x):
        context.setPositions(positions)
        u_q = minus_kT_log_q(generator64, positions[None])[0]
        n_calls = len(calls)
        for scale in (1.0, 0.6, 0.3):
            context.setParameter("lambda_flow", scale)
            state = context.getState(getEnergy=True, getForces=True)
            assert state.getPotentialEnergy().value_in_unit(KJ) == pytest.approx(scale * u_q, rel=1e-11, abs=1e-9)
            np.testing.assert_allclose(state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer),
                                       scale * f_q[id(positions)], rtol=1e-12, atol=1e-12)
        assert len(calls) == n_calls + 1


# ------------------------------------------------------------------ copies: XML, deepcopy, pickle
_COPY_CHECK = textwrap.dedent("""
    import copy, json, pickle, sys
    import numpy as np, openmm
    system = openmm.XmlSerializer.deserialize(open(sys.argv[1]).read())
    x = np.load(sys.argv[2])
    energies = []
    for s in (system, copy.deepcopy(system), pickle.loads(pickle.dumps(system))):
        context = openmm.Context(s, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(x)
        context.setParameter("lambda_flow", 0.5)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    print(json.dumps(energies))
""")


def _copies_in_subprocess(system, x, tmp_path) -> subprocess.CompletedProcess:
    (tmp_path / "system.xml").write_text(openmm.XmlSerializer.serialize(system))  # serialising is safe
    np.save(tmp_path / "x.npy", x)
    return subprocess.run([sys.executable, "-c", _COPY_CHECK, str(tmp_path / "system.xml"), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_python_force_survives_xml_deepcopy_and_pickle_in_a_fresh_process(target, generator64, tmp_path):
    system = copy.deepcopy(target.system)
    system.addForce(to_openmm_force(generator64, backend="python"))
    x = samples(generator64, 1, seed=5)[0]
    expected = evaluate(system, x, lambda_flow=0.5)[0]
    run = _copies_in_subprocess(system, x, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_allclose(json.loads(run.stdout.strip().splitlines()[-1]), [expected] * 3, rtol=1e-12)
    assert isinstance(to_openmm_force(generator64), openmm.PythonForce) == (not torchforce_copies_are_safe())


def test_missing_openmm_torch_names_the_extra_that_installs_it(generator64, monkeypatch):
    from cmt_openmm.export import force

    monkeypatch.setitem(force._PROBED, "import_error", "ModuleNotFoundError: No module named 'openmmtorch'")
    with pytest.raises(CMTInputError, match=r"pip install cmt_openmm\[torch-force\]") as error:
        to_openmm_force(generator64, backend="torch")
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_torchforce_copies_are_refused_where_they_crash(target, generator64, tmp_path):
    if openmmtorch_error() is not None:
        pytest.skip(f"openmm-torch cannot be imported: {openmmtorch_error()}")
    safe = torchforce_copies_are_safe()
    if not safe:
        with pytest.raises(CMTInputError, match="crashes the process when a System holding a TorchForce"):
            to_openmm_force(generator64, backend="torch")
    system = copy.deepcopy(target.system)
    system.addForce(to_openmm_force(generator64, backend="torch", allow_uncopyable=True))
    x = samples(generator64, 1, seed=6)[0]
    expected = evaluate(system, x, lambda_flow=0.5)[0]
    run = _copies_in_subprocess(system, x, tmp_path)
    if safe:
        assert run.returncode == 0, run.stderr[-2000:]
        np.testing.assert_allclose(json.loads(run.stdout.strip().splitlines()[-1]), [expected] * 3, rtol=1e-9)
    else:  # what the refusal prevents: the copy kills the process
        assert run.returncode != 0
