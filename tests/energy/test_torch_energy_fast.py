"""The fast paths of the torch energy equal OpenMM's Reference platform in the corners that they
handle without masks, and the evaluation plumbing (thread pool, energies-only path) changes nothing.

:class:`~cmt_openmm.energy.torch.obc.OBCKernel` gives the Born-radius pair integral h_ij its zero
outside the integration domain (r + sr_j < or_i) through U = max(r + sr_j, or_i) (then L = U),
and GBSAOBCForce's inner-sphere correction (or_i < sr_j - r) through a clamp, not through masks;
the distance matrix is shared by the OBC, GBn2 and Nonbonded terms. Clashed structures below put
pairs in every branch (asserted), and energies and forces are compared with OpenMM in float64
(1e-10 relative energy, 1e-9 of the largest force, as in tests/energy/test_torch_energy.py).

Negative controls, run once by hand: dropping ``U.clamp_min_(o)`` in ``OBCKernel._integrals``
made test_clashes_in_every_branch_match_openmm fail for both systems (aldp-obc: "relative energy
error 4.45e-07"; aldp-implicit: the OBC1 fast path disagreed with the generic CustomGBTerm at
construction and was not used); flipping the sign of the inner-sphere correction made only the
GBSAOBCForce-alone case fail (in the whole System the clashes' Lennard-Jones energy hides it);
removing the ``os.register_at_fork`` hook of energy/torch/energy.py made the forked child deadlock and
test_a_forked_child_evaluates_with_its_own_threads fail.
"""

from __future__ import annotations

import copy

import numpy as np
import openmm
import pytest
import torch

from cmt_openmm.energy.torch.energy import TorchEnergy, _compiled_chunk_size, _pool
from cmt_openmm.energy.torch.obc import GBSAOBCTerm, OBCFamilyGBTerm
from cmt_openmm.systems import aldp_pdb_path, get_target
from cmt_openmm.target import Target

from test_torch_energy import E_RTOL, F_RTOL, openmm_reference, structures, with_forces


def clashed(positions: np.ndarray, n: int, seed: int, low: float = 0.004, high: float = 0.08) -> np.ndarray:
    """``n`` perturbed structures, each with three random atoms moved to low..high nm of another."""
    rng = np.random.default_rng(seed)
    x = structures(positions, n, seed)
    n_atoms = positions.shape[0]
    for b in range(n):
        for _ in range(3):
            i, j = rng.choice(n_atoms, 2, replace=False)
            direction = rng.standard_normal(3)
            x[b, j] = x[b, i] + rng.uniform(low, high) * direction / np.linalg.norm(direction)
    return x


def branches(term, x: np.ndarray) -> dict[str, int]:
    """How many ordered pairs (i != j) of ``x`` fall in each branch of the OBC pair integral."""
    kernel = term.kernel
    o = kernel.or_i[:, :, 0].numpy()
    s = kernel.sr_j[:, :, 0].numpy()
    r = np.linalg.norm(x[:, None, :, :] - x[:, :, None, :], axis=-1)  # (B, n, n)
    off = ~np.eye(x.shape[1], dtype=bool)
    return {
        "outside the domain (r + sr_j < or_i)": int(((r + s < o) & off).sum()),
        "inside sr_j (or_i < sr_j - r)": int(((s - r > o) & off).sum()),
        "overlapping (|r - sr_j| <= or_i)": int(((np.abs(r - s) <= o) & (r + s >= o) & off).sum()),
        "apart (r - sr_j > or_i)": int(((r - s > o) & off).sum()),
    }


def assert_matches(target: Target, energy: TorchEnergy, x: np.ndarray) -> None:
    u, f = energy.energy_and_forces(x)
    e_ref, f_ref = openmm_reference(target.system, x)
    assert np.all(np.isfinite(e_ref)), "OpenMM itself failed on a test structure"
    e_err = (np.abs(u * target.kT - e_ref) / np.maximum(np.abs(e_ref), 1.0)).max()
    f_err = (np.abs(f * target.kT - f_ref).max(axis=(1, 2)) / np.abs(f_ref).max(axis=(1, 2))).max()
    assert e_err < E_RTOL, f"{target.name}: relative energy error {e_err:.2e}"
    assert f_err < F_RTOL, f"{target.name}: relative force error {f_err:.2e}"
    with torch.no_grad():  # the energies-only path (what training calls) gives the same energies
        u_only = energy(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(u_only, u, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alone", [False, True], ids=["system", "gb-force-alone"])
@pytest.mark.parametrize(
    "name, force_type", [("aldp-implicit", openmm.CustomGBForce), ("aldp-obc", openmm.GBSAOBCForce)]
)
def test_clashes_in_every_branch_match_openmm(name, force_type, alone):
    """The whole System, and its GB force alone (in clashes the Lennard-Jones energy is ~1e20
    kJ/mol and would hide a GB error from a relative tolerance)."""
    target = get_target(name)
    if alone:
        (force,) = [copy.deepcopy(f) for f in target.system.getForces() if isinstance(f, force_type)]
        target = with_forces(target, force, name=f"{name}-gb")
    energy = TorchEnergy(target, verify=False, compile=False)
    (term,) = [t for t in energy.terms if isinstance(t, (OBCFamilyGBTerm, GBSAOBCTerm))]  # the fast path
    x = np.concatenate(
        [clashed(target.positions, 12, seed=1), clashed(target.positions, 12, seed=2, low=0.0005, high=0.012)]
    )
    counts = branches(term, x)
    wanted = [k for k in counts if "inside" not in k or term.kernel.inner]
    assert all(counts[k] > 0 for k in wanted), counts
    assert_matches(target, energy, x)


def test_gbn2_on_the_shared_distance_matrix_matches_openmm_on_clashes():
    target = Target.from_pdb(aldp_pdb_path(), ["amber14-all.xml", "implicit/gbn2.xml"], 300.0, name="aldp-gbn2")
    energy = TorchEnergy(target, verify=False, compile=False)
    assert_matches(target, energy, clashed(target.positions, 10, seed=3, low=0.05, high=0.12))


def test_pool_of_chunks_equals_one_chunk_and_leaves_the_callers_threads_alone():
    target = get_target("aldp-implicit")
    x = structures(target.positions, 100, seed=4)
    threads = torch.get_num_threads()
    pooled = TorchEnergy(target, verify=False, compile=False, chunk_size=16, n_threads=2)
    single = TorchEnergy(target, verify=False, compile=False, chunk_size=128, n_threads=1)
    (u1, f1), (u2, f2) = pooled.energy_and_forces(x), single.energy_and_forces(x)
    np.testing.assert_allclose(u1, u2, rtol=1e-13)
    np.testing.assert_allclose(f1, f2, rtol=1e-11, atol=1e-11 * np.abs(f2).max())
    with torch.no_grad():
        np.testing.assert_allclose(pooled(torch.as_tensor(x)).numpy(), u2, rtol=1e-13)
    assert torch.get_num_threads() == threads


def test_chunk_sizes_are_whole_vector_registers():
    energy = TorchEnergy(get_target("aldp-obc"), verify=False, compile=False)
    assert [len(group) for group, _, _ in energy._groups] == [2, 3]  # Nonbonded joins the dense GB chunk
    assert all(size % 8 == 0 for _, _, size in energy._groups)
    # compiled: a power of two >= 16 (AVX-512: 16 float64 per vector) near 4 x 32768 elements of
    # (n, n) (twice that for energies only), so a batch of 1,024 is whole chunks, one per thread at least
    for gradient, budget in ((True, 256), (False, 512)):
        size = energy.compiled_chunk_sizes[gradient]
        assert size & (size - 1) == 0 and 16 <= size <= budget and 1024 // size >= min(energy.n_threads, 64)
    assert _compiled_chunk_size(22**2, 2, True) == 256 and _compiled_chunk_size(22**2, 1, False) == 512
    assert _compiled_chunk_size(22**2, 16, False) == 64  # many threads: a 1k batch still fills them
    assert _compiled_chunk_size(300**2, 2, False) == 16  # large molecules: the budget decides


def test_chunks_on_a_gpu_hold_tens_of_thousands_of_configurations():
    """A GPU runs one chunk at a time: CPU-sized chunks (64 configurations of ALDP) would leave it idle.
    Planned on the "meta" device (no GPU needed: only shapes)."""
    target = get_target("aldp-obc")
    device = TorchEnergy(target, device="meta", verify=False)
    cpu = TorchEnergy(target, verify=False, compile=False)
    assert min(size for _, _, size in device._groups) >= 16384 and device._rows >= 16384
    assert max(size for _, _, size in cpu._groups) <= 512


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_a_pool_with_one_thread_per_cpu_binds_each_to_its_own():
    import os
    import threading

    cpus = os.sched_getaffinity(0)
    arrived = threading.Barrier(len(cpus), timeout=30)

    def where() -> frozenset:  # every thread of the pool takes one job
        arrived.wait()
        return frozenset(os.sched_getaffinity(0))

    bound = list(_pool(len(cpus)).map(lambda _: where(), range(len(cpus))))
    assert os.sched_getaffinity(0) == cpus  # the calling thread is left alone
    if len(cpus) > 1:
        assert sorted(bound, key=min) == [frozenset({cpu}) for cpu in sorted(cpus)]
        arrived = threading.Barrier(len(cpus) - 1, timeout=30)
        unbound = list(_pool(len(cpus) - 1).map(lambda _: where(), range(len(cpus) - 1)))
        assert unbound == [frozenset(cpus)] * (len(cpus) - 1)  # fewer threads than CPUs: free to move


def test_failures_in_a_pooled_batch_are_inf_with_zero_gradient():
    target = get_target("aldp-obc")
    energy = TorchEnergy(target, verify=False, compile=False, chunk_size=8, n_threads=2)
    x = structures(target.positions, 40, seed=5)
    x[3, 0, 0] = np.nan
    x[17, 5] = x[17, 6]  # coincident atoms: infinite energy
    u, f = energy.energy_and_forces(x)
    assert np.isinf(u[[3, 17]]).all() and np.isfinite(np.delete(u, [3, 17])).all()
    assert (f[[3, 17]] == 0).all() and energy.n_failed == 2
    with torch.no_grad():
        u_only = energy(torch.as_tensor(x)).numpy()
    np.testing.assert_array_equal(np.isinf(u_only), np.isinf(u))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_evaluates_with_its_own_threads():
    import os

    target = get_target("aldp-vacuum")
    energy = TorchEnergy(target, verify=False, compile=False, chunk_size=64, n_threads=2)
    x = torch.as_tensor(structures(target.positions, 300, seed=6))
    with torch.no_grad():
        expected = energy(x).numpy()  # starts the parent's pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool threads do not exist here
        try:
            with torch.no_grad():
                ok = np.allclose(energy(x).numpy(), expected, rtol=1e-13)
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    import select
    import signal

    os.close(write)
    ready, _, _ = select.select([read], [], [], 120.0)
    if not ready:  # a deadlocked child (a pool of threads that the fork did not copy)
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert ready and os.read(read, 1) == b"1"
