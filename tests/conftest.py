"""Shared test setup: single-threaded torch (CI has 2 cores) and fixed seeds."""
import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)
