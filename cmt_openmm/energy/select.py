"""Which energy a run uses: TorchEnergy or OpenMMEnergy, chosen once per run.

:func:`make_energy` with ``backend="auto"`` builds the torch backend when every force of the
System is supported and it agrees with OpenMM's Reference platform (verification at
construction), times both on a batch of perturbed structures and keeps the faster; otherwise
(an unsupported force, a system whose torch chunks would not fit in memory even at one
configuration each, a failed check, any exception while building or verifying it) it uses
OpenMM and says why in one sentence (except for a System OpenMM would hang on,
:class:`~.torch.term.OpenMMWouldHangError`, which is raised).
``"torch"`` refuses instead of falling back; ``"openmm"`` always uses OpenMM. Which is faster
depends on the system (benchmarks/torch_energy_throughput.py measures it): torch wins where
OpenMM evaluates forces through slow generic kernels (a CustomGBForce), OpenMM where its
native kernels are fast (vacuum, GBSAOBCForce) against eager torch; "auto" therefore picks per
system.

On CPUs the torch candidate may be compiled (``compile="auto"``, the default): compiled chunks are
several times faster than eager torch, but a crash in compiled code would end the process, so
they are used only after :func:`~.torch.compile_probe.compile_verdict` has compiled and checked
them in a subprocess (once per System, dtype, chunk shape, torch version and CPU; the verdict is
cached on disk). They then join the timing (after their compilation) and ``selection`` says
"torch (compiled, probed safe)" when they win. An "unsafe" verdict warns once and leaves torch
eager. ``compile=False`` or ``CMT_OPENMM_COMPILE=0`` never probes; GPUs are not probed.

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
                verify: bool = True, *, compile: bool | str = "auto"):
    """The energy of ``target``: a :class:`~.torch.energy.TorchEnergy` or an :class:`OpenMMEnergy`
    (see the module docstring). Both have ``backend`` ("torch" / "openmm"); the choice and why
    are in ``energy.selection`` (one sentence).

    ``compile``: ``"auto"`` (default) compiles the torch energy on CPUs when the compile probe
    finds it safe here (:func:`~.torch.compile_probe.compile_verdict`, run once per System and
    machine) and the compiled chunks time faster; ``True`` compiles without a probe (the
    construction-time verification then runs on the compiled path); ``False`` never compiles.
    ``CMT_OPENMM_COMPILE=0`` in the environment makes every value act as ``False``.

    Example (named backends; ``"auto"`` is not run here: it times both backends and may first
    probe the compiled torch energy in a subprocess, tens of seconds once per System and machine):
        >>> import cmt_openmm, torch
        >>> target = cmt_openmm.get_target("aldp-vacuum")
        >>> openmm_energy = cmt_openmm.make_energy(target, backend="openmm")
        >>> torch_energy = cmt_openmm.make_energy(target, backend="torch", compile=False)   # eager torch
        >>> openmm_energy.selection, torch_energy.selection
        ('openmm: asked for', 'torch: asked for')
        >>> x = torch.tensor(target.positions)[None]
        >>> abs(torch_energy(x).item() - openmm_energy(x).item()) < 1e-9   # the same u = U / kT
        True
        >>> energy = cmt_openmm.make_energy(target)                       # doctest: +SKIP
    """
    from .torch import compile_probe
    from .torch.energy import TorchEnergy
    from .torch.term import OpenMMWouldHangError, exception_summary

    if backend not in BACKENDS:
        raise CMTInputError(f"energy backend {backend!r} is unknown; use {', '.join(BACKENDS)}.")
    if compile not in (True, False, "auto"):
        raise CMTInputError(f"compile={compile!r} is not one of True, False, 'auto'.")
    if not compile_probe.enabled():
        compile = False
    name = getattr(target, "name", "the target")
    if backend == "openmm":
        return _chosen(OpenMMEnergy(target, platform=platform, n_workers=n_workers), "asked for")
    try:  # with compile "auto", eager first: only a supported, verified energy is worth a probe
        torch_energy = TorchEnergy(target, device=device, dtype=dtype, verify=verify, compile=compile is True)
    except Exception as error:  # any failure to build or verify: OpenMM, never a crash
        if backend == "torch" or isinstance(error, OpenMMWouldHangError):  # (OpenMM would never return)
            raise
        cause = str(error).rstrip(".") if isinstance(error, CMTInputError) else exception_summary(error)
        warnings.warn(f"Energies of {name} come from OpenMM, not torch: {cause}.", stacklevel=2)
        return _chosen(OpenMMEnergy(target, platform=platform, n_workers=n_workers), "torch cannot evaluate it")
    if torch_energy.device.type != "cpu":  # GPUs: torch (eager unless compile=True), no probe
        return _chosen(torch_energy, "asked for" if backend == "torch" else "on a GPU")
    verdict = compile_probe.compile_verdict(torch_energy) if compile == "auto" else None
    unsafe = "; compiled torch probed unsafe here" if verdict is not None and not verdict["safe"] else ""
    if backend == "torch" and (verdict is None or unsafe):
        return _chosen(torch_energy, f"asked for{unsafe}")
    x = _perturbed(target.positions, _TIMING_BATCH)
    seconds = {"compiled torch" if compile is True else "eager torch": _seconds(torch_energy, x)}
    if verdict is not None and verdict["safe"]:
        torch_energy.compile = True  # compiles on its first call (inductor's disk cache holds the probe's kernels)
        compiled_seconds = _seconds(torch_energy, x)  # timed after the warm-up call that compiles
        if torch_energy.compile is True:  # else torch.compile failed here (warned) and the path stayed eager
            seconds["compiled torch"] = compiled_seconds
    openmm_energy = None
    if backend == "auto":
        openmm_energy = OpenMMEnergy(target, platform=platform, n_workers=n_workers)
        seconds["openmm"] = _seconds(openmm_energy, x)
        openmm_energy.n_evaluations = openmm_energy.n_failed = 0  # the timing is not part of any budget
    torch_energy.n_evaluations = torch_energy.n_failed = 0
    best = min(seconds, key=seconds.get)
    if best == "eager torch" and torch_energy.compile is True:  # probed safe, but slower here
        torch_energy.close()  # drops the compiled functions
        torch_energy.compile = False
    if best == "openmm":
        torch_energy.close()
        energy = openmm_energy
    else:
        if openmm_energy is not None:
            openmm_energy.close()
        energy = torch_energy
    per_configuration = {name: t / x.shape[0] * 1e6 for name, t in seconds.items()}
    others = ", ".join(f"{name} {t:.0f}" for name, t in per_configuration.items() if name != best)
    why = f"faster here ({per_configuration[best]:.0f} us per configuration with gradients; {others}){unsafe}"
    label = " (compiled, probed safe)" if best == "compiled torch" and verdict is not None else ""
    return _chosen(energy, f"asked for, {why}" if backend == "torch" else why, label)


def _chosen(energy, why: str, label: str = ""):
    energy.selection = f"{energy.backend}{label}: {why}"
    return energy


def _perturbed(positions: np.ndarray, n: int, scale: float = 0.005, seed: int = 0) -> torch.Tensor:
    """n configurations near ``positions`` (n, n_atoms, 3) nm, float64, requiring grad."""
    rng = np.random.default_rng(seed)
    x = positions[None] + scale * rng.normal(size=(n, *positions.shape))
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def _seconds(energy, x: torch.Tensor, repeats: int = 3) -> float:
    """Wall time of energies and gradients of x: the best of ``repeats`` calls after a warm-up
    call on the whole batch (Contexts, workers, caches; compilation, and every pool thread's first
    compiled chunk). The best, since other processes share the cores and only slow calls down."""
    energy(x).sum().backward()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        energy(x).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


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
