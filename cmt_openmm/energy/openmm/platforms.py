"""Which of OpenMM's CPU platforms runs Langevin dynamics of a System faster: Reference or CPU.

Neither wins everywhere on small molecules: the CPU platform is several times faster for a
CustomGBForce (the paper's ALDP with OBC1), Reference for small peptides with GBSAOBCForce or in
vacuum, where the CPU platform's per-step overhead dominates (benchmarks/RESULTS.md, "Reference
MD"). ``platform: auto`` therefore times a few Langevin steps of the System on each and takes the
faster; the choice is recorded in the run's provenance. Timing depends on the machine's load,
so name a platform where a fresh run must be reproducible bit for bit.
"""
from __future__ import annotations

import time

import numpy as np
import openmm
import openmm.unit as unit

AUTO = "auto"
CPU_PLATFORMS = ("Reference", "CPU")


def md_seconds_per_step(system: openmm.System, positions: np.ndarray, platform: str, n_steps: int = 40) -> float:
    """Seconds per 1-fs Langevin step of ``system`` from ``positions`` (n_atoms, 3) nm on ``platform``
    (the best of two timed blocks of ``n_steps``, after a few untimed steps)."""
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.001 * unit.picoseconds)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    try:
        context.setPositions(np.asarray(positions, dtype=float) * unit.nanometer)
        integrator.step(5)
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            integrator.step(n_steps)
            best = min(best, (time.perf_counter() - start) / n_steps)
        return best
    finally:
        del context, integrator


def fastest_md_platform(system: openmm.System, positions: np.ndarray, n_steps: int = 40) -> str:
    """The name of the faster of Reference and CPU for dynamics of ``system`` (Reference when the CPU
    platform is missing or fails on it)."""
    timings = {}
    for name in CPU_PLATFORMS:
        try:
            timings[name] = md_seconds_per_step(system, positions, name, n_steps)
        except openmm.OpenMMException:
            continue
    return min(timings, key=timings.get) if timings else "Reference"


def resolve_md_platform(platform, system: openmm.System, positions: np.ndarray):
    """``platform`` itself, or for ``"auto"`` the faster CPU platform for ``system`` (:func:`fastest_md_platform`)."""
    return fastest_md_platform(system, positions) if isinstance(platform, str) and platform == AUTO else platform
