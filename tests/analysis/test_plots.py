"""The report's peptide plots: every residue's Ramachandran surface and F(φ), labelled with its
residue, with reference MD's surface and curve beside the flow's."""
import numpy as np
import pytest

import cmt_openmm
from cmt_openmm.analysis import plots
from cmt_openmm.sampling.reweighting import ReweightedEnsemble


def _ensemble(angles: np.ndarray) -> ReweightedEnsemble:
    """Equally weighted samples whose (φ, ψ) are ``angles`` (N, n_pairs, 2)."""
    target = cmt_openmm.get_target("aldp-vacuum")
    n = len(angles)
    ensemble = ReweightedEnsemble(target, np.repeat(target.positions[None], n, axis=0), np.zeros(n), np.zeros(n))
    ensemble.ramachandran_angles = lambda: angles
    return ensemble


def test_every_residue_is_drawn_and_labelled_beside_the_reference(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    flow = rng.uniform(-np.pi, np.pi, (3000, 3, 2))
    reference = np.stack([rng.normal(-1.5, 0.3, (2000, 3)), rng.normal(2.5, 0.3, (2000, 3))], axis=-1)
    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    names = plots.make_plots(tmp_path, [], _ensemble(flow), "ala4", prefix="evaluation_", reference_angles=reference)
    assert names == ["evaluation_ramachandran_fes.png", "evaluation_phi_free_energy.png"]
    assert all((tmp_path / name).is_file() for name in names)
    surfaces, profiles = figures
    assert [ax.get_title() for ax in surfaces.axes if ax.get_title()] == [
        f"residue {i}: {panel}" for i in (1, 2, 3) for panel in ("flow, reweighted", "error bar (1σ)", "reference MD")]
    edges = np.linspace(-np.pi, np.pi, plots.FES_BINS + 1)
    for i, ax in enumerate(ax for ax in profiles.axes if ax.get_title()):
        assert ax.get_title() == f"residue {i + 1}"
        (curve,) = [line for line in ax.get_lines() if line.get_label() == "reference MD"]
        with np.errstate(divide="ignore"):
            expected = -np.log(np.histogram(reference[:, i, 0], edges)[0])
        expected -= expected[np.isfinite(expected)].min()  # F(φ) = -ln p(φ) in kT, minimum 0; empty bins not drawn
        np.testing.assert_allclose(curve.get_ydata(), np.where(np.isfinite(expected), expected, np.nan))
    assert [line.get_label() for line in profiles.axes[0].get_lines()] == ["flow, reweighted", "reference MD"]


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_empty_bins_draw_no_band_and_warn_nothing(tmp_path):
    """Flow samples in one φ region only (the demo's case): the other bins are empty, F is
    infinite there, and the error band is left out there without an invalid-value warning."""
    rng = np.random.default_rng(1)
    flow = np.stack([rng.normal(-1.5, 0.2, (2000, 1)), rng.normal(2.5, 0.2, (2000, 1))], axis=-1)
    assert plots.make_plots(tmp_path, [], _ensemble(flow), "aldp") == ["ramachandran_fes.png", "phi_free_energy.png"]
