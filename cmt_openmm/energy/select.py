"""Which energy a run uses: TorchEnergy or OpenMMEnergy, chosen once per run.

:func:`make_energy` with ``backend="auto"`` builds the torch backend when every force of the
System is supported and it agrees with OpenMM's Reference platform (verification at
construction), times both on a batch of perturbed structures and keeps the faster; otherwise
(an unsupported force, a failed check) it uses OpenMM and says why in one sentence.
``"torch"`` refuses instead of falling back; ``"openmm"`` always uses OpenMM. Which is faster
depends on the system (benchmarks/torch_energy_throughput.py measures it): torch wins where
OpenMM evaluates forces through slow generic kernels (a CustomGBForce), OpenMM where its
native kernels are fast (vacuum, GBSAOBCForce); "auto" therefore picks per system.

:func:`recheck_against_openmm` re-evaluates a random subset of a run's samples with OpenMM so
that reports can show that the energies behind weights and ESS were right.
"""
from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import CMTInputError
from .openmm.energy import OpenMMEnergy

if TYPE_CHECKING:
    from ..target import Target

BACKENDS = ("auto", "torch", "openmm")
_TIMING_BATCH = 512  # configurations timed per backend by backend="auto"


def make_energy(target: "Target", backend: str = "auto", device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float64, platform: str = "Reference", n_workers: int = 1,
                verify: bool = True, *, compile: bool | str = False):
    """The energy of ``target``: a :class:`~.torch.energy.TorchEnergy` or an :class:`OpenMMEnergy`
    (see the module docstring). Both have ``backend`` ("torch" / "openmm"); the choice and why
    are in ``energy.selection`` (one sentence)."""
    from .torch.energy import TorchEnergy

    if backend not in BACKENDS:
        raise CMTInputError(f"energy backend {backend!r} is unknown; use {', '.join(BACKENDS)}.")
    name = getattr(target, "name", "the target")
    if backend == "openmm":
        return _chosen(OpenMMEnergy(target, platform=platform, n_workers=n_workers), "asked for")
    try:
        torch_energy = TorchEnergy(target, device=device, dtype=dtype, verify=verify, compile=compile)
    except CMTInputError as error:
        if backend == "torch":
            raise
        warnings.warn(f"Energies of {name} come from OpenMM, not torch: {str(error).rstrip('.')}.", stacklevel=2)
        return _chosen(OpenMMEnergy(target, platform=platform, n_workers=n_workers), "torch cannot evaluate it")
    if backend == "torch" or torch_energy.device.type != "cpu":
        return _chosen(torch_energy, "asked for" if backend == "torch" else "on a GPU")
    openmm_energy = OpenMMEnergy(target, platform=platform, n_workers=n_workers)
    x = _perturbed(target.positions, _TIMING_BATCH)
    t_torch, t_openmm = _seconds(torch_energy, x), _seconds(openmm_energy, x)
    torch_energy.n_evaluations = openmm_energy.n_evaluations = 0  # the timing is not part of any budget
    faster, slower = (torch_energy, openmm_energy) if t_torch <= t_openmm else (openmm_energy, torch_energy)
    slower.close()
    why = f"faster here ({min(t_torch, t_openmm) / x.shape[0] * 1e6:.0f} vs {max(t_torch, t_openmm) / x.shape[0] * 1e6:.0f} us per configuration with gradients)"
    return _chosen(faster, why)


def _chosen(energy, why: str):
    energy.selection = f"{energy.backend}: {why}"
    return energy


def _perturbed(positions: np.ndarray, n: int, scale: float = 0.005, seed: int = 0) -> torch.Tensor:
    """n configurations near ``positions`` (n, n_atoms, 3) nm, float64, requiring grad."""
    rng = np.random.default_rng(seed)
    x = positions[None] + scale * rng.normal(size=(n, *positions.shape))
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def _seconds(energy, x: torch.Tensor) -> float:
    """Wall time of energies and gradients of x, after a warm-up call (Contexts, workers, caches)."""
    energy(x[:8]).sum().backward()
    start = time.perf_counter()
    energy(x).sum().backward()
    return time.perf_counter() - start


def recheck_against_openmm(target: "Target", positions: np.ndarray, reduced_energy: np.ndarray, n: int = 64,
                           seed: int = 0) -> dict[str, Any]:
    """Re-evaluate ``n`` random samples of ``positions`` (N, n_atoms, 3) nm with OpenMM (Reference)
    and compare with the ``reduced_energy`` (N,) a run used: the largest absolute and relative
    differences (kT) and whether they are within float64 rounding (1e-6 relative or 1e-6 kT)."""
    finite = np.flatnonzero(np.isfinite(reduced_energy))
    if finite.size == 0:
        return {"n_checked": 0, "passed": None}
    rows = np.random.default_rng(seed).choice(finite, size=min(n, finite.size), replace=False)
    with OpenMMEnergy(target) as energy:
        reference = energy(positions[rows]).numpy()
    difference = np.abs(reference - reduced_energy[rows])
    relative = difference / np.maximum(np.abs(reference), 1.0)
    return {"n_checked": int(rows.size), "max_abs_difference_kT": float(np.max(difference)),
            "max_relative_difference": float(np.max(relative)), "passed": bool(np.all(relative <= 1e-6))}
