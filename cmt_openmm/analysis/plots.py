"""PNG plots written by the CLI: training curves, Ramachandran free-energy surfaces, marginals.

Figures are built with :class:`matplotlib.figure.Figure` directly (no ``pyplot``), so plotting
never touches a global backend or interactive state and works on headless machines.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..coordinates.backbone import is_peptide
from ..files import atomic_writer
from ..sampling.reweighting import ReweightedEnsemble

FES_BINS = 60
"""Bins per axis of the reweighted Ramachandran free-energy surface."""

_CURVES = (
    ("reverse_ess", "reverse ESS (target)", "log"),
    ("ess_step", "ESS between steps", "linear"),
    ("lam", "λ (trust region)", "symlog"),
    ("eta", "η (entropy)", "linear"),
    ("loss", "loss", "linear"),
    ("entropy", "entropy H(q)", "linear"),
)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as handle:
        fig.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    return path


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for i, rec in enumerate(records):
        value = rec.get(key)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            steps.append(rec.get("step", i))
            values.append(value)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def plot_training_curves(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Reverse ESS, ESS between steps, λ, η, loss and entropy against the annealing step.

    ``records`` are the per-step dictionaries of ``metrics.jsonl``; keys a method does not
    record (e.g. λ for reverse KL) are drawn as empty panels labelled "not recorded".
    """
    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, label, scale) in zip(axes, _CURVES):
        steps, values = _series(records, key)
        if values.size:
            ax.plot(steps, values, marker="o", ms=2.5, lw=1)
            if scale == "log" and np.all(values > 0):
                ax.set_yscale("log")
            elif scale == "symlog" and values.max() > 10 * max(values.min(), 0.1):
                ax.set_yscale("symlog", linthresh=0.1)  # λ spans orders of magnitude and may reach 0
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_free_energy_surface(
    fes: np.ndarray,
    x_edges: np.ndarray,
    y_edges: np.ndarray,
    path: str | os.PathLike,
    uncertainty: np.ndarray | None = None,
    title: str = "",
    labels: tuple[str, str] = ("φ (rad)", "ψ (rad)"),
    vmax: float = 12.0,
) -> Path:
    """Free-energy surface ``fes`` (nx, ny) in kT over bin edges; ``inf`` bins are left blank.

    With ``uncertainty`` (same shape, kT) a second panel shows the error bar of each bin.
    """
    fes = np.asarray(fes, dtype=float)
    panels = 1 if uncertainty is None else 2
    fig = Figure(figsize=(5.4 * panels, 4.5))
    axes = np.atleast_1d(fig.subplots(1, panels))
    shown = np.where(np.isfinite(fes), fes - np.nanmin(np.where(np.isfinite(fes), fes, np.nan)), np.nan)
    mesh = axes[0].pcolormesh(x_edges, y_edges, shown.T, cmap="viridis", vmin=0.0, vmax=vmax)
    fig.colorbar(mesh, ax=axes[0], label="free energy (kT)")
    axes[0].set_title("free energy" if not title else title)
    if uncertainty is not None:
        err = np.where(np.isfinite(fes), np.asarray(uncertainty, dtype=float), np.nan)
        mesh = axes[1].pcolormesh(x_edges, y_edges, err.T, cmap="magma", vmin=0.0, vmax=2.0)
        fig.colorbar(mesh, ax=axes[1], label="uncertainty (kT)")
        axes[1].set_title("error bar (1σ)")
    for ax in axes:
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_aspect("equal" if np.isclose(np.ptp(x_edges), np.ptp(y_edges)) else "auto")
    fig.tight_layout()
    return _save(fig, path)


def plot_marginal(
    edges: np.ndarray,
    model: np.ndarray,
    path: str | os.PathLike,
    exact: np.ndarray | None = None,
    raw: np.ndarray | None = None,
    xlabel: str = "x (nm)",
    title: str = "",
) -> Path:
    """Bin probabilities along one coordinate: reweighted model, raw flow and exact if known."""
    edges = np.asarray(edges, dtype=float)
    centers = 0.5 * (edges[1:] + edges[:-1])
    widths = np.diff(edges)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if exact is not None:
        ax.plot(centers, np.asarray(exact) / widths, "k-", lw=2, label="exact")
    ax.step(centers, np.asarray(model) / widths, where="mid", label="flow, reweighted")
    if raw is not None:
        ax.step(centers, np.asarray(raw) / widths, where="mid", alpha=0.6, label="flow, raw")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def make_plots(run_dir: Path, history: Sequence[dict], pooled: ReweightedEnsemble | None, title: str,
               prefix: str = "") -> list[str]:
    """Training curves, and the reweighted Ramachandran FES (peptides) or x-marginal (toys).

    Files are ``{prefix}training_curves.png`` and ``{prefix}ramachandran_fes.png`` or
    ``{prefix}marginal_x.png`` in ``run_dir``; returns their names.
    """
    run_dir = Path(run_dir)
    written = []
    if history:
        written.append(plot_training_curves(history, run_dir / f"{prefix}training_curves.png", title))
    if pooled is not None and pooled.weights.any():
        target = pooled.target
        if is_peptide(target):
            written.append(plot_ramachandran(pooled, run_dir / f"{prefix}ramachandran_fes.png", title))
        elif getattr(target, "box", None) is not None:
            written.append(plot_toy_marginal(pooled, run_dir / f"{prefix}marginal_x.png", title))
    return [str(Path(p).name) for p in written]


def plot_ramachandran(pooled: ReweightedEnsemble, path: Path, title: str = "", bins: int = FES_BINS) -> Path:
    """Reweighted (φ, ψ) free-energy surface of the first backbone pair, with bootstrap errors."""
    angles = pooled.ramachandran_angles()[:, 0]
    fes = pooled.free_energy_surface(angles, bins=bins, range=[(-np.pi, np.pi)] * 2, n_bootstrap=50)
    return plot_free_energy_surface(fes.free_energy, fes.edges[0], fes.edges[1], path,
                                          uncertainty=fes.error, title=title or "reweighted FES")


def plot_toy_marginal(pooled: ReweightedEnsemble, path: Path, title: str = "", bins: int = 60) -> Path:
    """Marginal of the first coordinate: reweighted flow, raw flow and the exact one when known."""
    target = pooled.target
    edges = np.linspace(target.box[0, 0], target.box[0, 1], bins + 1)
    x = pooled.positions[:, 0, 0]
    model = np.histogram(x, edges, weights=pooled.weights)[0]
    raw = np.histogram(x, edges)[0] / max(len(x), 1)
    exact = target.marginal(0, edges) if hasattr(target, "marginal") else None
    return plot_marginal(edges, model, path, exact=exact, raw=raw, title=title)
