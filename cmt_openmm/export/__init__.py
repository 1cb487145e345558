"""The generator inside OpenMM: its energy U_q = -kT log q as an OpenMM force, and replica exchange bridged by it.

- :mod:`.flow_energy`: :class:`FlowEnergy`, U_q as a TorchScript-compatible module (exact
  -kT log q in the flow's domain, a harmonic wall outside);
- :mod:`.force`: :func:`to_openmm_force` (openmm-torch ``TorchForce`` or ``PythonForce``, a
  global parameter scaling the energy);
- :mod:`.flow_bridged_remd`: flow-bridged Hamiltonian replica exchange U_λ = (1 - λ) U_q + λ U with
  openmmtools (:func:`bridge_system`, :class:`FlowBridgeState`, :func:`run_bridge_remd`);
- :mod:`.ladder`: λ ladders with equal estimated exchange acceptance from a pilot run, and
  exchange statistics (neighbour acceptance, round trips) of a stored run.

Submodules load on first use (openmmtools is imported only by the flow-bridged replica exchange).
"""
from importlib import import_module

_PUBLIC = {
    "FlowEnergy": "flow_energy",
    "to_openmm_force": "force",
    "torchforce_copies_are_safe": "force",
    "bridge_system": "flow_bridged_remd",
    "bridge_states": "flow_bridged_remd",
    "FlowBridgeState": "flow_bridged_remd",
    "run_bridge_remd": "flow_bridged_remd",
    "AcceptanceModel": "ladder",
    "equal_acceptance_ladder": "ladder",
    "exchange_statistics": "ladder",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'cmt_openmm.export' has no attribute {name!r}")
