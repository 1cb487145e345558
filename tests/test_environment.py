"""The pinned stack is what the tests run on: openmmtorch must load (CI fails without it)."""
from importlib.metadata import version
from pathlib import Path

import pytest

CONSTRAINTS = Path(__file__).resolve().parents[1] / ".ci" / "constraints.txt"


def _pins():
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, pinned = line.split("==")
            yield name, pinned


@pytest.mark.parametrize("name,pinned", list(_pins()))
def test_installed_versions_match_constraints(name, pinned):
    assert version(name).split("+")[0] == pinned


def test_openmmtorch_loads_with_this_torch():
    import openmm
    import openmmtorch  # noqa: F401  (a missing/incompatible plugin must fail CI, not skip)
    import torch

    assert torch.__version__.startswith("2.9.")
    assert any(
        openmm.Platform.getPlatform(i).getName() == "Reference"
        for i in range(openmm.Platform.getNumPlatforms())
    )
