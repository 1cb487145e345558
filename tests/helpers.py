"""Helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]

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
