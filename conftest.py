"""Setup shared by the tests and the package's doctests (setup.cfg collects both): single-threaded
torch (CI has 2 cores) and fixed seeds. It lives at the repository root because a conftest.py in
tests/ does not apply to the doctests in cmt_openmm/."""
import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)


@pytest.fixture(autouse=True)
def _no_compile_probe(monkeypatch):
    """Energies stay eager: make_energy's compile probe takes tens of seconds per System
    (tests of the probe turn it back on with ``monkeypatch.delenv``)."""
    monkeypatch.setenv("CMT_OPENMM_COMPILE", "0")
