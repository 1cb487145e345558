"""The generator's energy U_q = -kT log q as an OpenMM Force: openmm-torch ``TorchForce`` or ``PythonForce``.

:func:`to_openmm_force` returns a Force whose energy is ``scale * U_q(x)`` in kJ/mol
(:mod:`cmt_openmm.export.flow_energy`: exact -kT log q inside the flow's domain, a documented
harmonic wall outside) and whose forces are its negative gradient, with ``scale`` the global
parameter ``scale_parameter`` (default ``"lambda_flow"``, default value 1; ``None``: no
parameter, the energy is U_q). Add it to a System beside the System's own forces and the
Context's energy is U + scale * U_q. Two backends compute the same module:

- ``"torch"``: an openmm-torch ``TorchForce`` of the TorchScript-compiled module
  (``torch.jit.script``: exact for all inputs, no traced control flow); the global parameter
  is the module's second ``forward`` argument.
- ``"python"``: an ``openmm.PythonForce`` whose computation evaluates the module with torch
  autograd in this process (any torch version, no openmm-torch needed; the global parameter
  comes from the State). It serialises (XML, ``copy.deepcopy``, pickling, openmmtools
  storage) as a safetensors payload of the module's tensors, rebuilt on load; only read
  System XML you trust, since OpenMM unpickles a PythonForce's computation.
- ``"auto"`` (default): ``"torch"`` when openmm-torch imports *and* a System holding a
  TorchForce survives ``copy.deepcopy`` and an XML round trip here (checked once per process
  in a subprocess, :func:`torchforce_copies_are_safe`), else ``"python"``.

Copies. openmm-torch 1.5's wheels with OpenMM 8.6 crash the process (segfault in
``TorchForceProxy::deserialize``) when a System holding a TorchForce is deep-copied or read
from XML -- and openmmtools copies Systems all the time. Where that is so, ``backend="torch"``
is refused with one sentence unless ``allow_uncopyable=True`` (for a plain ``Simulation``
that never copies its System), and ``"auto"`` picks the PythonForce, which copies safely.

It is a function of the generator, not a ``BoltzmannGenerator`` method: the generator's layer
sits below this one (docs/design.md, "Layers"; ``tests/test_layout.py`` keeps imports going down).

Example (a runnable one: :func:`to_openmm_force`)::

    force = to_openmm_force(generator)                  # U_q at the generator's temperature
    system.addForce(force)                              # energy: U + lambda_flow * U_q
    simulation.context.setParameter("lambda_flow", 0.5)
"""
from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import numpy as np
import openmm
import torch
from openmm import unit
from torch import Tensor, nn

from ..errors import CMTInputError
from .flow_energy import FlowEnergy, flow_energy_from_bytes

BACKENDS = ("auto", "torch", "python")
FORCE_NAME = "cmt_openmm flow energy"

_PROBE = r"""
import copy, torch, openmm, openmmtorch
class M(torch.nn.Module):
    def forward(self, positions, scale):
        return scale * (positions ** 2).sum()
force = openmmtorch.TorchForce(torch.jit.script(M()))
force.addGlobalParameter("scale", 1.0)
system = openmm.System()
system.addParticle(1.0)
system.addForce(force)
copy.deepcopy(system)
openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
print("copies ok")
"""
_PROBED: dict[str, Any] = {}


def openmmtorch_error() -> str | None:
    """None when openmm-torch imports here, else why not (one line)."""
    if "import_error" not in _PROBED:
        root = logging.getLogger()
        quiet = _DropSimtkWarning()
        root.addFilter(quiet)  # openmmtorch imports simtk.openmm, which logs a deprecation warning
        try:
            import openmmtorch  # noqa: F401
            _PROBED["import_error"] = None
        except Exception as error:  # ImportError, or an OSError/undefined symbol from a torch mismatch
            _PROBED["import_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        finally:
            root.removeFilter(quiet)
    return _PROBED["import_error"]


class _DropSimtkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "simtk.openmm" not in record.getMessage()


def torchforce_copies_are_safe(timeout: float = 300.0) -> bool:
    """Whether a System holding a TorchForce survives ``copy.deepcopy`` and an XML round trip in
    this installation (False where openmm-torch cannot be imported). Tried once per process in
    a subprocess, since where it fails it kills the process."""
    if "copies_safe" not in _PROBED:
        if openmmtorch_error() is not None:
            _PROBED["copies_safe"] = False
        else:
            try:
                run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
                _PROBED["copies_safe"] = run.returncode == 0 and "copies ok" in run.stdout
            except (OSError, subprocess.TimeoutExpired):
                _PROBED["copies_safe"] = False
    return _PROBED["copies_safe"]


def resolve_backend(backend: str) -> str:
    """``"torch"`` or ``"python"`` for a ``backend`` argument (``"auto"`` decides as the module docstring says)."""
    if backend not in BACKENDS:
        raise CMTInputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}.")
    if backend == "auto":
        return "torch" if torchforce_copies_are_safe() else "python"
    return backend


class _ScaledEnergy(nn.Module):
    """TorchForce module: forward(positions (N, 3) nm, scale) -> scale * U_q (kJ/mol)."""

    def __init__(self, energy: FlowEnergy) -> None:
        super().__init__()
        self.energy = energy

    def forward(self, positions: Tensor, scale: Tensor) -> Tensor:
        return scale.to(torch.float64) * self.energy(positions.to(torch.float64).unsqueeze(0))[0]


class _Energy(nn.Module):
    """TorchForce module without a global parameter: forward(positions (N, 3) nm) -> U_q (kJ/mol)."""

    def __init__(self, energy: FlowEnergy) -> None:
        super().__init__()
        self.energy = energy

    def forward(self, positions: Tensor) -> Tensor:
        return self.energy(positions.to(torch.float64).unsqueeze(0))[0]


class FlowForceComputation:
    """The computation of the PythonForce backend: ``(State) -> (energy kJ/mol, forces kJ/mol/nm)``.

    Holds the :class:`FlowEnergy` payload (safetensors bytes); pickles as that payload, so the
    PythonForce survives XML serialisation and ``copy.deepcopy`` (modules rebuilt from the same
    payload are shared within a process). U_q and its gradient of the last configuration are
    kept: a replica exchange asks for the energy of one configuration at every state of its
    ladder (only the scale differs), and OpenMM cannot say that it wants no forces, so each
    evaluation is a forward and a backward pass of the flow (~10 ms for ALDP).
    """

    def __init__(self, payload: bytes, scale_parameter: str | None) -> None:
        self.payload = bytes(payload)
        self.scale_parameter = scale_parameter
        self.module = flow_energy_from_bytes(self.payload)
        self._last: tuple[bytes, float, np.ndarray] | None = None  # (positions' bytes, U_q, dU_q/dx)

    def __reduce__(self):
        return (FlowForceComputation, (self.payload, self.scale_parameter))

    def __call__(self, state: openmm.State):
        positions = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
        scale = 1.0 if self.scale_parameter is None else float(state.getParameters()[self.scale_parameter])
        if scale == 0.0:  # exactly zero: the flow (milliseconds per call) is not evaluated, e.g. at λ = 1 of a bridge
            return 0.0, np.zeros((len(positions), 3))
        key = positions.tobytes()
        last = self._last
        if last is None or last[0] != key:
            x = torch.tensor(positions).unsqueeze(0).requires_grad_(True)
            with torch.enable_grad():
                energy = self.module(x)[0]
                (gradient,) = torch.autograd.grad(energy, x)
            last = self._last = (key, float(energy.detach()), gradient[0].detach().numpy())
        return scale * last[1], -scale * last[2]


def to_openmm_force(generator, temperature=None, scale_parameter: str | None = "lambda_flow", *,
                    backend: str = "auto", wall: float = 10.0, dtype: torch.dtype | None = None,
                    force_group: int | None = None, allow_uncopyable: bool = False) -> openmm.Force:
    """An OpenMM Force with energy ``scale_parameter * U_q(x)``, U_q = -kT log q(x) (kJ/mol).

    Args:
        generator: a ``BoltzmannGenerator`` (its ``coordinates`` and ``flow`` are read once; later
            changes to it do not reach the force).
        temperature: K or Quantity for kT; default the generator's temperature.
        scale_parameter: name of the global parameter scaling the energy (default value 1), or
            None for no parameter.
        backend: ``"auto"``, ``"torch"`` (openmm-torch TorchForce) or ``"python"`` (PythonForce);
            see the module docstring.
        wall: kT per scaled unit² of the restraint outside the flow's domain
            (:mod:`~cmt_openmm.export.flow_energy`).
        dtype: dtype of the coupling layers (default the generator's).
        force_group: the force group (default OpenMM's, 0).
        allow_uncopyable: accept a TorchForce where copying it would crash the process.

    Example (the PythonForce backend, which needs no openmm-torch and no copy check):
        >>> import cmt_openmm, copy, openmm
        >>> target = cmt_openmm.get_target("aldp-vacuum")
        >>> bg = cmt_openmm.BoltzmannGenerator.build(target, n_layers=2, hidden=8)
        >>> system = copy.deepcopy(target.system)
        >>> index = system.addForce(cmt_openmm.to_openmm_force(bg, backend="python"))   # U + lambda_flow * U_q
        >>> reference = openmm.Platform.getPlatformByName("Reference")
        >>> context = openmm.Context(system, openmm.VerletIntegrator(0.001), reference)
        >>> context.setPositions(target.positions)
        >>> context.setParameter("lambda_flow", 0.5)
        >>> energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        >>> u_q = -bg.log_prob(target.positions[None]).item()          # U_q / kT = -log q
        >>> round((energy / target.kT - target.reduced_potential(target.positions)) / u_q, 6)
        0.5
    """
    backend = resolve_backend(backend)
    if scale_parameter is not None and not (isinstance(scale_parameter, str) and scale_parameter.isidentifier()):
        raise CMTInputError(f"scale_parameter must be a name such as 'lambda_flow' or None, not {scale_parameter!r}.")
    energy = FlowEnergy.from_generator(generator, temperature, wall=wall, dtype=dtype)
    if backend == "torch":
        problem = openmmtorch_error()
        if problem is not None:
            raise CMTInputError(f"openmm-torch cannot be imported here ({problem}); install it with "
                                "pip install cmt_openmm[torch-force], or use backend='python' or 'auto'.")
        if not allow_uncopyable and not torchforce_copies_are_safe():
            raise CMTInputError(
                "openmm-torch in this installation crashes the process when a System holding a TorchForce is "
                "deep-copied or read from XML (openmmtools does both), so use backend='python' (or 'auto'), or pass "
                "allow_uncopyable=True for a Simulation that never copies its System.")
        import openmmtorch

        module = _Energy(energy) if scale_parameter is None else _ScaledEnergy(energy)
        force = openmmtorch.TorchForce(torch.jit.script(module))
        if scale_parameter is not None:
            force.addGlobalParameter(scale_parameter, 1.0)
    else:
        computation = FlowForceComputation(energy.to_bytes(), scale_parameter)
        force = openmm.PythonForce(computation, {} if scale_parameter is None else {scale_parameter: 1.0})
    force.setName(FORCE_NAME)
    if force_group is not None:
        force.setForceGroup(int(force_group))
    return force

