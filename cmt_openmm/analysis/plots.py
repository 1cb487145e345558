"""PNG plots written by the CLI: training curves, Ramachandran free-energy surfaces and F(φ) per
residue (beside reference MD's when given), marginals.

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
from ..sampling.estimators import PHI_POSITIVE
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
    _surface(fig, axes[0], _from_minimum(fes), x_edges, y_edges, title or "free energy", labels, vmax=vmax)
    if uncertainty is not None:
        err = np.where(np.isfinite(fes), np.asarray(uncertainty, dtype=float), np.nan)
        _surface(fig, axes[1], err, x_edges, y_edges, "error bar (1σ)", labels, error=True)
    fig.tight_layout()
    return _save(fig, path)


def _surface(fig: Figure, ax, values: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray, title: str,
             labels: tuple[str, str] = ("φ (rad)", "ψ (rad)"), vmax: float = 12.0, error: bool = False) -> None:
    """One panel of free energies (kT, from 0 to ``vmax``), or with ``error`` of their error bars
    (kT, 0 to 2), with its colour bar; non-finite bins are left blank."""
    shown = np.where(np.isfinite(values), values, np.nan)
    mesh = ax.pcolormesh(x_edges, y_edges, shown.T, cmap="magma" if error else "viridis", vmin=0.0,
                         vmax=2.0 if error else vmax)
    fig.colorbar(mesh, ax=ax, label="uncertainty (kT)" if error else "free energy (kT)")
    ax.set_title(title)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_aspect("equal" if np.isclose(np.ptp(x_edges), np.ptp(y_edges)) else "auto")


def _from_minimum(fes: np.ndarray) -> np.ndarray:
    """Free energies shifted so that the lowest finite one is 0 (+inf stays)."""
    finite = np.isfinite(fes)
    return fes - fes[finite].min() if finite.any() else fes


def _histogram_free_energy(values: np.ndarray, edges: Sequence[np.ndarray]) -> np.ndarray:
    """F = −ln(p / bin volume) in kT, minimum 0, +inf in empty bins, of unweighted samples
    (M, d) (reference MD frames) on the grid of ``edges`` (d edge arrays)."""
    counts = np.histogramdd(values, bins=list(edges))[0]
    volumes = np.prod(np.meshgrid(*(np.diff(e) for e in edges), indexing="ij"), axis=0)
    with np.errstate(divide="ignore"):
        return _from_minimum(-np.log(counts / volumes))


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
               prefix: str = "", reference_angles: np.ndarray | None = None) -> list[str]:
    """Training curves, and the reweighted Ramachandran FES and F(φ) of every residue (peptides,
    beside the reference's given ``reference_angles`` (M, n_pairs, 2) rad) or the x-marginal (toys).

    Files are ``{prefix}training_curves.png``, and ``{prefix}ramachandran_fes.png`` and
    ``{prefix}phi_free_energy.png`` or ``{prefix}marginal_x.png`` in ``run_dir``; returns their names.
    """
    run_dir = Path(run_dir)
    written = []
    if history:
        written.append(plot_training_curves(history, run_dir / f"{prefix}training_curves.png", title))
    if pooled is not None and pooled.weights.any():
        target = pooled.target
        if is_peptide(target):
            written.append(plot_ramachandran(pooled, run_dir / f"{prefix}ramachandran_fes.png", title,
                                             reference_angles=reference_angles))
            written.append(plot_phi_free_energy(pooled, run_dir / f"{prefix}phi_free_energy.png", title,
                                                reference_angles=reference_angles))
        elif getattr(target, "box", None) is not None:
            written.append(plot_toy_marginal(pooled, run_dir / f"{prefix}marginal_x.png", title))
    return [str(Path(p).name) for p in written]


def plot_ramachandran(pooled: ReweightedEnsemble, path: Path, title: str = "", bins: int = FES_BINS,
                      reference_angles: np.ndarray | None = None) -> Path:
    """Reweighted (φ, ψ) free-energy surface of every backbone pair, one row per residue: the
    surface, its bootstrap errors and, given ``reference_angles`` (M, n_pairs, 2) rad, the
    reference MD's surface on the same bins."""
    angles = pooled.ramachandran_angles()
    n_pairs, columns = angles.shape[1], 2 if reference_angles is None else 3
    fig = Figure(figsize=(5.4 * columns, 4.5 * n_pairs), layout="constrained")  # room for the suptitle
    axes = np.asarray(fig.subplots(n_pairs, columns)).reshape(n_pairs, columns)
    for i, row in enumerate(axes):
        fes = pooled.free_energy_surface(angles[:, i], bins=bins, range=[(-np.pi, np.pi)] * 2, n_bootstrap=50)
        (x, y), residue = fes.edges, f"residue {i + 1}"
        _surface(fig, row[0], _from_minimum(fes.free_energy), x, y, f"{residue}: flow, reweighted")
        _surface(fig, row[1], np.where(np.isfinite(fes.free_energy), fes.error, np.nan), x, y,
                 f"{residue}: error bar (1σ)", error=True)
        if reference_angles is not None:
            _surface(fig, row[2], _histogram_free_energy(reference_angles[:, i], fes.edges), x, y,
                     f"{residue}: reference MD")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_phi_free_energy(pooled: ReweightedEnsemble, path: Path, title: str = "", bins: int = FES_BINS,
                         reference_angles: np.ndarray | None = None) -> Path:
    """F(φ) in kT of every backbone pair, one panel per residue: the reweighted flow with its
    bootstrap error band and, given ``reference_angles`` (M, n_pairs, 2) rad, the reference MD's
    curve on the same bins; the φ > 0 basin of the reports (0° ≤ φ < 120°) shaded."""
    angles = pooled.ramachandran_angles()
    n_pairs = angles.shape[1]
    fig = Figure(figsize=(4.5 * n_pairs, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n_pairs))
    for i, ax in enumerate(axes):
        profile = pooled.free_energy_profile(angles[:, i, 0], bins=bins, range=(-np.pi, np.pi), n_bootstrap=50)
        f = _from_minimum(profile.free_energy)
        shown = np.isfinite(f) & np.isfinite(profile.error)
        ax.axvspan(*PHI_POSITIVE["phi>0"][0], color="0.92", label="φ > 0 basin")
        ax.plot(profile.centers, np.where(np.isfinite(f), f, np.nan), lw=1.5, label="flow, reweighted")
        low, high = (np.where(shown, f + sign * np.where(shown, profile.error, 0.0), np.nan) for sign in (-1.0, 1.0))
        ax.fill_between(profile.centers, low, high, where=shown, alpha=0.3, lw=0)  # empty bins: no band, no warning
        if reference_angles is not None:
            ref = _histogram_free_energy(reference_angles[:, i, :1], [profile.edges])
            ax.plot(profile.centers, np.where(np.isfinite(ref), ref, np.nan), "k--", lw=1.2, label="reference MD")
        ax.set_title(f"residue {i + 1}")
        ax.set_ylim(-0.5, 15.0)  # as the surfaces' colour scale: what lies higher is rarely sampled
        ax.set_xlabel("φ (rad)")
        ax.set_ylabel("free energy (kT)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_toy_marginal(pooled: ReweightedEnsemble, path: Path, title: str = "", bins: int = 60) -> Path:
    """Marginal of the first coordinate: reweighted flow, raw flow and the exact one when known."""
    target = pooled.target
    edges = np.linspace(target.box[0, 0], target.box[0, 1], bins + 1)
    x = pooled.positions[:, 0, 0]
    model = np.histogram(x, edges, weights=pooled.weights)[0]
    raw = np.histogram(x, edges)[0] / max(len(x), 1)
    exact = target.marginal(0, edges) if hasattr(target, "marginal") else None
    return plot_marginal(edges, model, path, exact=exact, raw=raw, title=title)
