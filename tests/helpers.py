"""Helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


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
