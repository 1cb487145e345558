"""Fixtures of the export tests: alanine dipeptide and small perturbed (untrained) generators."""
import pytest
import torch
from helpers import perturbed_generator

from cmt_openmm.systems import get_target


@pytest.fixture(scope="module")
def target():
    return get_target("aldp-vacuum")


@pytest.fixture(scope="module")
def generator64(target):
    return perturbed_generator(target, scale=0.05, seed=3, n_layers=2, hidden=16, dtype=torch.float64)


@pytest.fixture(scope="module")
def generator_file(target, tmp_path_factory):
    """A float32 perturbed generator saved in a run directory (run.yaml + generator.safetensors)."""
    import yaml

    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.runs.presets import get_preset
    from cmt_openmm.runs.run_files import parse_run_config

    run_dir = tmp_path_factory.mktemp("run")
    spec = parse_run_config({**get_preset("aldp-quick"), "system": "aldp-vacuum", "temperature": 300.0}, run_dir)
    (run_dir / "run.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    perturbed_generator(target, scale=0.05, seed=4, n_layers=2, hidden=16, n_bins=4).save(
        run_dir / "generator.safetensors")
    return BoltzmannGenerator.load(run_dir / "generator.safetensors", target), run_dir


