"""Helpers of the export tests: rotated samples, OpenMM evaluation of a System, -kT log q."""
import numpy as np
import openmm
import torch
from helpers import random_rotation
from openmm import unit

from cmt_openmm.units import kT

KJ = unit.kilojoule_per_mole


def samples(generator, n: int, seed: int) -> np.ndarray:
    """Generator samples (n, 22, 3) nm, each randomly rotated and translated."""
    x, _ = generator.sample(n, torch.Generator().manual_seed(seed))
    x = x.numpy()
    return np.stack([xi @ random_rotation(seed + i).T + 0.3 * (i % 3) for i, xi in enumerate(x)])


def particles_only(target) -> openmm.System:
    system = openmm.System()
    for i in range(target.system.getNumParticles()):
        system.addParticle(target.system.getParticleMass(i))
    return system


def evaluate(system, x, platform="Reference", **parameters):
    """(energy kJ/mol, forces (n, 3) kJ/mol/nm) of ``system`` at x."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(x)
    for name, value in parameters.items():
        context.setParameter(name, value)
    state = context.getState(getEnergy=True, getForces=True)
    forces = state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer)
    return state.getPotentialEnergy().value_in_unit(KJ), forces


def minus_kT_log_q(generator, x) -> np.ndarray:
    with torch.no_grad():
        return -kT(300.0) * generator.log_prob(torch.as_tensor(x)).numpy()


