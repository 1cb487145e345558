"""TorchEnergy's memory plan (issue 24, item 4): chunks sized from a byte budget per chunk and the
system size, down to one configuration; the verification evaluated in the same chunks; a refusal
in one sentence (and OpenMM under make_energy("auto")) when one configuration would not fit.

Every test fakes a small budget (``memory.CHUNK_BYTES``) or a small amount of available memory on
alanine dipeptide: no large allocation. One configuration of aldp-implicit's distance-matrix
terms is estimated at 26 tensors x 22^2 elements x 8 bytes = 100,672 bytes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import cmt_openmm
from cmt_openmm.energy.openmm.energy import OpenMMEnergy
from cmt_openmm.energy.torch import energy as torch_energy_module
from cmt_openmm.energy.torch import memory
from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.errors import CMTInputError

PER_CONFIGURATION = 26 * 22**2 * 8  # bytes, aldp-implicit's OBC term (the largest)


@pytest.fixture(scope="module")
def target():
    return cmt_openmm.get_target("aldp-implicit")


def structures(positions: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return positions[None] + 0.01 * rng.standard_normal((n, *positions.shape))


def dense_chunk(energy: TorchEnergy) -> int:
    return next(size for _, dense, size in energy._groups if dense)


def test_planned_chunks_shrink_with_the_byte_budget_and_energies_stay_equal(target, monkeypatch):
    x = structures(target.positions, 21, seed=1)
    whole = TorchEnergy(target, verify=False, compile=False, chunk_size=1000)  # one chunk, unchunked
    u_ref, f_ref = whole.energy_and_forces(x)
    terms_ref = whole.term_energies(x)
    sizes = []
    for budget in (None, 2**20, 3 * PER_CONFIGURATION, PER_CONFIGURATION):
        if budget is not None:
            monkeypatch.setattr(memory, "CHUNK_BYTES", budget)
        energy = TorchEnergy(target, verify=False, compile=False)
        sizes.append(dense_chunk(energy))
        assert all(size <= max(1, energy._chunk_bytes // energy._bytes_per_configuration(group))
                   for group, _, size in energy._groups)
        u, f = energy.energy_and_forces(x)
        np.testing.assert_allclose(u, u_ref, rtol=1e-12)
        np.testing.assert_allclose(f, f_ref, rtol=1e-10, atol=1e-12 * np.abs(f_ref).max())
        for label, e in energy.term_energies(x).items():
            np.testing.assert_allclose(e, terms_ref[label], rtol=1e-12)
    # the element budget decides for small systems; the byte budget below it, down to 1 configuration
    assert sizes == [64, 8, 3, 1]
    assert energy.compiled_chunk_sizes == {True: 1, False: 1}


def test_the_verification_is_evaluated_in_the_planned_chunks(target, monkeypatch):
    budget = 2 * PER_CONFIGURATION
    monkeypatch.setattr(memory, "CHUNK_BYTES", budget)
    batches = []
    evaluate = torch_energy_module._evaluate_terms

    def spy(x, terms, dense, gradient):
        batches.append((x.shape[0], list(terms)))
        return evaluate(x, terms, dense, gradient)

    monkeypatch.setattr(torch_energy_module, "_evaluate_terms", spy)
    energy = TorchEnergy(target, compile=False)  # verified against OpenMM at construction
    assert energy.verification["passed"] and energy.verification["n_configurations"] == 45
    assert dense_chunk(energy) == 2
    # every chunk, term by term and in total, within the byte budget: never the 45 structures at once
    assert len(batches) > 45 and all(n * energy._bytes_per_configuration(terms) <= budget for n, terms in batches)
    assert max(n for n, terms in batches if any(t.needs_dense for t in terms)) == 2


def test_a_budget_too_small_for_one_configuration_refuses_torch_and_auto_uses_openmm(target, monkeypatch):
    budget = PER_CONFIGURATION // (memory.CHUNK_BYTES_SAFETY + 1)
    monkeypatch.setattr(memory, "CHUNK_BYTES", budget)
    with pytest.raises(CMTInputError) as refused:
        cmt_openmm.make_energy(target, "torch", compile=False)
    message = str(refused.value)
    assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message
    assert "22 atoms" in message and "use the OpenMM backend" in message
    with pytest.warns(UserWarning, match="come from OpenMM, not torch: The torch energy of aldp-implicit") as caught:
        energy = cmt_openmm.make_energy(target, "auto", compile=False)
    try:
        assert len([w for w in caught if "come from OpenMM" in str(w.message)]) == 1
        assert isinstance(energy, OpenMMEnergy) and energy.selection == "openmm: torch cannot evaluate it"
    finally:
        energy.close()


def test_too_little_available_memory_shrinks_the_chunks_then_refuses(target, monkeypatch):
    # the chunks of both threads within the memory available: 4 configurations each
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * 4 * PER_CONFIGURATION + 1)
    energy = TorchEnergy(target, verify=False, compile=False, n_threads=2)
    assert dense_chunk(energy) == 4
    x = structures(target.positions, 5, seed=2)
    with torch.no_grad():
        u = energy(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(u, [target.reduced_potential(c) for c in x], rtol=1e-9)
    # not even one configuration per thread fits: refused before the verification
    monkeypatch.setattr(memory, "available_memory", lambda device: PER_CONFIGURATION)
    with pytest.raises(CMTInputError, match=r"one configuration in each of 2 threads, more than the .* available here"):
        TorchEnergy(target, compile=False, n_threads=2)


def test_available_memory_is_read_from_proc_meminfo_where_it_exists():
    available = memory.available_memory(torch.device("cpu"))
    try:
        open("/proc/meminfo").close()
    except OSError:
        assert available is None
    else:
        assert available is not None and available > 0
    assert memory.available_memory(torch.device("meta")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TorchEnergy(cmt_openmm.get_target("aldp-vacuum"), device="meta", verify=False)  # planned, not refused
