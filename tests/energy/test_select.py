"""make_energy's choice of backend, and the re-check of a run's energies against OpenMM."""
import numpy as np

from cmt_openmm.energy.openmm.energy import OpenMMEnergy
from cmt_openmm.energy.select import make_energy, recheck_against_openmm
from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.systems import get_target


def test_auto_picks_torch_for_a_custom_gb_system():
    """aldp-implicit's CustomGBForce costs ~1 ms per configuration in OpenMM, ~25x more than torch."""
    energy = make_energy(get_target("aldp-implicit"))
    assert isinstance(energy, TorchEnergy), energy.selection
    assert energy.selection.startswith("torch: faster here") and energy.n_evaluations == 0


def test_recheck_against_openmm_finds_wrong_energies():
    target = get_target("aldp-vacuum")
    x = target.positions[None] + 0.003 * np.random.default_rng(0).normal(size=(20, 22, 3))
    with OpenMMEnergy(target) as energy:
        u = energy(x).numpy()
    good = recheck_against_openmm(target, x, u, n=10)
    assert good["n_checked"] == 10 and good["passed"] and good["max_relative_difference"] < 1e-12
    assert recheck_against_openmm(target, x, u * (1 + 1e-4), n=10)["passed"] is False


def test_a_run_on_the_torch_path_reports_its_energies_rechecked_against_openmm(tmp_path):
    import json

    import yaml

    from cmt_openmm.cli import main

    run_file = {"system": "toy-double-well", "method": "cmt", "budget": 2000, "max_steps": 2,
                "energy": {"backend": "torch"}, "flow": {"n_layers": 1, "hidden": 8, "n_bins": 4},
                "cmt": {"n_samples": 500, "fit_steps": 2, "batch_size": 250}, "report": {"n_samples": 300, "n_draws": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(run_file))
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["training"]["energy_backend"] == "torch" and report["energy"]["backend"] == "torch"
    assert report["energy"]["verification"]["passed"] and report["energy"]["recheck"]["passed"]
    assert report["energy"]["recheck"]["n_checked"] == 64
    assert "re-checked against OpenMM" in (tmp_path / "run" / "report.md").read_text()
