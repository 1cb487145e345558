"""Helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import math

import numpy as np
import openmm
import torch
from openmm import app
from scipy import stats

from cmt_openmm.target import Target
from cmt_openmm.units import kT

ROOT = Path(__file__).resolve().parents[1]

R0, SIGMA_R = 0.15, 0.012  # nm: bonds of chain_molecule
THETA0, SIGMA_THETA = 1.9, 0.15  # rad: its angles
TORSION = ((1, 2.5), (3, 1.5))  # its torsion: (periodicity, k in kJ/mol), phase 0

N_BATCHES = 25
"""Batches of a chain for batch-means standard errors (test_moves_exactness.py explains the design)."""
ALPHA = 1e-3
"""False-alarm probability of one exactness test (Bonferroni over its bins)."""


def load_script(relative_path: str):
    """Import a script of the repository (e.g. ``benchmarks/aldp_methods.py``) as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_history(a: list[dict], b: list[dict], ignore: tuple[str, ...] = (), rel_tol: float = 1e-9) -> None:
    """Two runs' per-step records are equal, floats to ``rel_tol``, but for their wall time, their
    plan (it follows the limits of the run a step was in) and the keys in ``ignore``."""
    assert len(a) == len(b)
    skip = ("wall_time", "planned_steps", *ignore)
    for ra, rb in zip(a, b):
        assert {k for k in ra if k not in skip} == {k for k in rb if k not in skip}
        for k in ra:
            if k in skip:
                continue
            if isinstance(ra[k], float):
                assert math.isclose(ra[k], rb[k], rel_tol=rel_tol, abs_tol=1e-12), (k, ra[k], rb[k])
            else:
                assert ra[k] == rb[k], k


def random_rotation(seed: int) -> np.ndarray:
    """A random proper rotation matrix (3, 3) float64."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diagonal(r))
    return q * np.sign(np.linalg.det(q))


def perturb_parameters(module: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Add N(0, scale²) noise to every parameter of ``module`` (in place), seeded; returns it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def perturbed_generator(target, scale: float = 0.05, seed: int = 0, **build_kwargs):
    """A BoltzmannGenerator for ``target`` whose flow is a random non-identity map."""
    from cmt_openmm.generator import BoltzmannGenerator

    generator = BoltzmannGenerator.build(target, **build_kwargs)
    perturb_parameters(generator.flow, scale, seed)
    return generator


def bin_z_scores(values: np.ndarray, exact: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z per bin of the chain's bin frequencies vs exact probabilities, SE from batch means.

    values: (T,) bin index per recorded state (burn-in already dropped); exact: (n_bins,).
    """
    n = len(values) // N_BATCHES * N_BATCHES
    onehot = (values[:n, None] == labels[None, :]).astype(float)
    batch_means = onehot.reshape(N_BATCHES, -1, len(labels)).mean(axis=1)
    estimate = batch_means.mean(axis=0)
    se = batch_means.std(axis=0, ddof=1) / np.sqrt(N_BATCHES)
    se = np.maximum(se, 1.0 / n)  # a bin the chain never (or always) visits still gets a finite z
    return (estimate - exact) / se


def critical_z(n_bins: int) -> float:
    return float(stats.t.ppf(1 - ALPHA / (2 * n_bins), df=N_BATCHES - 1))


def chain_molecule(n_atoms: int) -> Target:
    """A chain of ``n_atoms`` (3 or 4) carbons at 300 K: harmonic bonds (R0, SIGMA_R), angles
    (THETA0, SIGMA_THETA) and, for 4 atoms, the torsion TORSION (test_molecular_exactness.py)."""
    kt = kT(300.0)
    system, topology = openmm.System(), app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    atoms = [topology.addAtom(f"C{i}", app.element.carbon, residue) for i in range(n_atoms)]
    for _ in atoms:
        system.addParticle(12.0)
    bonds, angles = openmm.HarmonicBondForce(), openmm.HarmonicAngleForce()
    for i in range(n_atoms - 1):
        topology.addBond(atoms[i], atoms[i + 1])
        bonds.addBond(i, i + 1, R0, kt / SIGMA_R**2)
    for i in range(n_atoms - 2):
        angles.addAngle(i, i + 1, i + 2, THETA0, kt / SIGMA_THETA**2)
    system.addForce(bonds)
    system.addForce(angles)
    if n_atoms == 4:
        torsions = openmm.PeriodicTorsionForce()
        for n, k in TORSION:
            torsions.addTorsion(0, 1, 2, 3, n, 0.0, k)
        system.addForce(torsions)
    positions = [[0.0, 0.0, 0.0], [R0, 0.0, 0.0]]
    positions.append([R0 - R0 * math.cos(THETA0), R0 * math.sin(THETA0), 0.0])
    if n_atoms == 4:  # planar zig-zag: the same bond and angle, phi = 180 deg
        positions.append([positions[2][0] + R0, positions[2][1], 0.0])
    return Target(system, topology, positions, 300.0, name=f"chain-{n_atoms}")
