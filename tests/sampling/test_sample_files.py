"""Streamed samples (issue 25): the files of `cmt-openmm sample` written as chunks are drawn hold
exactly the in-memory draw of the same seed; a failed or killed sample leaves no file under its
final name; npz members written and read in blocks; ensembles that keep no positions."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import mdtraj as md
import numpy as np
import pytest
import torch

from cmt_openmm.energy.select import make_energy
from cmt_openmm.errors import CMTInputError
from cmt_openmm.sampling import reweighting, sample_files
from cmt_openmm.sampling.npz_stream import NpzWriter, iter_rows, member_layout, open_memmap
from cmt_openmm.sampling.reweighting import LowESSWarning, ReweightedEnsemble, reweight
from cmt_openmm.sampling.sample_files import write_samples
from cmt_openmm.systems import get_target
from cmt_openmm.systems.toys import double_well_3d
from helpers import ROOT

N, BATCH, SEED = 1000, 64, 7


class NoisyStart:
    """A stand-in generator: Gaussian noise around a target's start positions, with its exact log density."""

    def __init__(self, target, scale=0.3):
        self.center = torch.as_tensor(target.positions, dtype=torch.float64)
        self.scale = scale

    def sample(self, n, generator=None):
        z = torch.randn((n,) + self.center.shape, generator=generator, dtype=torch.float64)
        return self.center + self.scale * z, (-0.5 * z**2 - np.log(self.scale) - 0.5 * np.log(2 * np.pi)).sum((1, 2))


@pytest.fixture(scope="module")
def toy():
    return double_well_3d(300.0)


@pytest.fixture(scope="module")
def energy(toy):
    with make_energy(toy, "auto") as e:
        yield e


@pytest.fixture
def small_blocks(monkeypatch):
    """Read and convert 100 rows at a time, so that N = 1000 samples cross many blocks."""
    monkeypatch.setattr(reweighting, "ROWS_PER_BLOCK", 100)
    monkeypatch.setattr(sample_files, "ROWS_PER_BLOCK", 100)


def reference_draw(generator, target, energy):
    """The draw as the non-streaming code made it: every batch sampled, then every energy at once."""
    rng = torch.Generator().manual_seed(SEED)
    x, lq = zip(*(generator.sample(min(BATCH, N - s), generator=rng) for s in range(0, N, BATCH)))
    x, lq = torch.cat(x).numpy(), torch.cat(lq).numpy()
    return ReweightedEnsemble(target, x, lq, energy(x).numpy())


@pytest.mark.parametrize("resample", [None, 300])
def test_streamed_files_equal_the_in_memory_draw(toy, energy, small_blocks, tmp_path, resample):
    generator = NoisyStart(toy)
    expected = reference_draw(generator, toy, energy)
    files = {k: tmp_path / f"s.{k}" for k in ("npz", "dcd", "pdb", "csv")}
    ensemble, summary = write_samples(generator, toy, N, files["npz"], dcd=files["dcd"], pdb=files["pdb"],
                                      weights=files["csv"], resample=resample, seed=SEED, batch_size=BATCH,
                                      energy=energy, progress=False, min_effective_samples=0)
    with np.load(files["npz"]) as data:
        np.testing.assert_array_equal(data["positions"], expected.positions)
        for key in ("log_q", "reduced_energy", "log_weights", "invalid"):
            np.testing.assert_array_equal(data[key], getattr(expected, key))
        frames = data["resampled_indices"] if resample else None
    in_memory = reweight(generator, toy, N, batch_size=BATCH, seed=SEED, energy=energy, progress=False,
                         min_effective_samples=0)
    np.testing.assert_array_equal(in_memory.positions, expected.positions)
    np.testing.assert_array_equal(in_memory.log_weights, expected.log_weights)
    assert summary["ess"] == expected.ess and summary["n"] == N and ensemble.positions is None
    if resample:
        np.testing.assert_array_equal(frames, expected.resample_indices(resample, seed=SEED))
        assert summary["resampled_distinct"] == len(np.unique(frames))
    trajectory = expected.to_mdtraj(frames)  # what the non-streaming path wrote
    trajectory.save_dcd(str(tmp_path / "expected.dcd"))
    trajectory[0].save_pdb(str(tmp_path / "expected.pdb"))
    np.testing.assert_array_equal(md.load(str(files["dcd"]), top=str(files["pdb"])).xyz,
                                  md.load(str(tmp_path / "expected.dcd"), top=str(files["pdb"])).xyz)
    assert _atoms(files["pdb"]) == _atoms(tmp_path / "expected.pdb")
    expected.save_weights(tmp_path / "expected.csv")
    rows = np.column_stack([np.arange(N), expected.log_weights, expected.weights])
    np.savetxt(tmp_path / "one_block.csv", rows, delimiter=",", header="index,log_weight,weight", comments="",
               fmt=["%d", "%.17g", "%.17g"])
    assert files["csv"].read_text() == (tmp_path / "expected.csv").read_text() == (tmp_path / "one_block.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def _atoms(pdb):
    return [line for line in pdb.read_text().splitlines() if line.startswith(("ATOM", "HETATM"))]


def test_reweight_out_and_without_positions_match_the_in_memory_ensemble(energy, tmp_path):
    aldp = get_target("aldp-vacuum")
    generator = NoisyStart(aldp, scale=0.002)
    with make_energy(aldp, "openmm") as aldp_energy:
        kwargs = dict(batch_size=BATCH, seed=SEED, energy=aldp_energy, progress=False, min_effective_samples=0)
        whole = reweight(generator, aldp, 300, **kwargs)
        mapped = reweight(generator, aldp, 300, out=tmp_path / "r.npz", **kwargs)
        lean = reweight(generator, aldp, 300, positions=False, **kwargs)
    assert isinstance(mapped.positions, np.memmap) and lean.positions is None
    np.testing.assert_array_equal(mapped.positions, whole.positions)
    np.testing.assert_array_equal(lean.ramachandran_angles(), whole.ramachandran_angles())
    for other in (mapped, lean):
        np.testing.assert_array_equal(other.log_weights, whole.log_weights)
        assert other.summary() == whole.summary()
    pooled = ReweightedEnsemble.concatenate([lean, lean])
    assert pooled.positions is None and pooled.ramachandran_angles().shape == (600, 1, 2)
    with pytest.warns(LowESSWarning):
        assert lean.reweight_to(350.0).ramachandran_angles() is lean.ramachandran_angles()
    for use in (lambda e: e.resample(5), lambda e: e.to_mdtraj(), lambda e: e.save_npz(tmp_path / "x.npz"),
                lambda e: e.expectation(lambda x: x[:, 0, 0])):
        with pytest.raises(CMTInputError, match="does not keep"):
            use(lean)


class FailingEnergy:
    """The toy's energy, raising in the ``fail_at``-th call (a crash in the middle of a draw)."""

    def __init__(self, energy, fail_at):
        self.energy, self.fail_at, self.calls = energy, fail_at, 0

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # what the command line makes of SIGTERM and SIGINT
        return self.energy(x)


def test_a_failed_sample_leaves_previous_files_and_no_temporary(toy, energy, tmp_path):
    files = {k: tmp_path / f"s.{k}" for k in ("npz", "dcd", "pdb", "npy")}
    for path in files.values():
        path.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        write_samples(NoisyStart(toy), toy, N, files["npz"], dcd=files["dcd"], pdb=files["pdb"], weights=files["npy"],
                      seed=SEED, batch_size=BATCH, energy=FailingEnergy(energy, 5), progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {p.name: b"previous" for p in files.values()}


@pytest.mark.slow
def test_sigkill_during_sample_leaves_no_file_under_its_final_name(tmp_path):
    """SIGKILL while the npz and DCD are half written: only temporary names exist, then nothing is
    under the final names (the temporaries are left: nothing runs after SIGKILL)."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / "tests" / "sampling")!r})
        from test_sample_files import NoisyStart
        from cmt_openmm.energy.select import make_energy
        from cmt_openmm.sampling.sample_files import write_samples
        from cmt_openmm.systems.toys import double_well_3d

        toy = double_well_3d(300.0)
        with make_energy(toy, "auto") as energy:
            def slow(x):
                time.sleep(0.05)
                return energy(x)
            write_samples(NoisyStart(toy), toy, 10**6, "s.npz", dcd="s.dcd", batch_size=100, energy=slow,
                          progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while not any(p.name.startswith(".s.tmp-") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few chunks into the files
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = {p.name for p in tmp_path.iterdir()}
    assert not {"s.npz", "s.dcd"} & names
    assert {f".s.tmp-{proc.pid}.npz", f".s.tmp-{proc.pid}.dcd"} <= names
    # the next sample to the same files removes the killed one's temporaries and writes them whole
    toy = double_well_3d(300.0)
    with make_energy(toy, "auto") as energy:
        _, summary = write_samples(NoisyStart(toy), toy, N, tmp_path / "s.npz", dcd=tmp_path / "s.dcd", seed=SEED,
                                   batch_size=BATCH, energy=energy, progress=False)
        clean = tmp_path / "clean"
        clean.mkdir()
        write_samples(NoisyStart(toy), toy, N, clean / "s.npz", seed=SEED, batch_size=BATCH, energy=energy,
                      progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "s.dcd", "s.npz"]
    assert sorted(summary["removed_temporaries"]) == sorted(str(tmp_path / f".s.tmp-{proc.pid}.{e}") for e in ("dcd", "npz"))
    with np.load(tmp_path / "s.npz") as again, np.load(clean / "s.npz") as reference:
        for key in ("positions", "log_weights", "reduced_energy"):
            np.testing.assert_array_equal(again[key], reference[key])
    assert md.load_dcd(str(tmp_path / "s.dcd"), top=md.Topology.from_openmm(toy.topology)).n_frames == N


def _dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_sample_removes_a_dead_writers_temporaries_and_never_a_live_ones(toy, energy, tmp_path):
    """Temporaries ``.s.tmp-PID.*`` of the same outputs whose process is gone are removed by the next
    sample; those of a live process (here: a sleeping child), of other outputs, or of a dead PID
    whose file a live writer still holds locked (another host sharing the file system) are kept."""
    dead, stranger = _dead_pid(), tmp_path / ".other.tmp-1.npz"
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = [tmp_path / f".s.tmp-{dead}.{e}" for e in ("npz", "dcd", "npy")]
        kept = [tmp_path / f".s.tmp-{live.pid}.npz", tmp_path / f".s.tmp-{os.getppid()}.dcd", stranger,
                tmp_path / f".s.tmp-{dead}x.npz"]
        for path in stale + kept:
            path.write_bytes(b"half written")
        held = tmp_path / f".s.tmp-{_dead_pid()}.npz"
        held.write_bytes(b"locked by a writer elsewhere")
        with open(held, "rb") as lock:
            sample_files._locked(lock)
            _, summary = write_samples(NoisyStart(toy), toy, N, tmp_path / "s.npz", dcd=tmp_path / "s.dcd",
                                       weights=tmp_path / "s.npy", seed=SEED, batch_size=BATCH, energy=energy,
                                       progress=False)
        assert sorted(summary["removed_temporaries"]) == sorted(str(p) for p in stale)
        assert not any(p.exists() for p in stale)
        assert all(p.read_bytes() == b"half written" for p in kept) and held.exists()
        with np.load(tmp_path / "s.npz") as data:
            assert data["positions"].shape[0] == N
    finally:
        live.kill()
        live.wait()


# -- npz members in blocks ---------------------------------------------------------------------
def test_npz_written_in_blocks_reads_as_savez(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 4, 3))
    with open(tmp_path / "a.npz", "wb") as handle:
        npz = NpzWriter(handle)
        with npz.stream("x", x.shape, np.float64) as member:
            for block in np.array_split(x, 3):
                member.write(block)
        npz.add(flag=np.ones(10, bool), note=np.array("text"))
        npz.close()
    np.savez(tmp_path / "b.npz", x=x)
    with np.load(tmp_path / "a.npz") as data:
        np.testing.assert_array_equal(data["x"], x)
        assert data["flag"].all() and str(data["note"]) == "text"
    for path in (tmp_path / "a.npz", tmp_path / "b.npz"):  # ours and np.savez's, read alike
        assert member_layout(path, "x").shape == (10, 4, 3)
        np.testing.assert_array_equal(np.concatenate([b for _, b in iter_rows(path, "x", 4)]), x)
        np.testing.assert_array_equal(open_memmap(path, "x"), x)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    with pytest.raises(CMTInputError, match="compressed"):
        member_layout(tmp_path / "c.npz", "x")
    with pytest.raises(CMTInputError, match="no array 'y'"):
        member_layout(tmp_path / "b.npz", "y")


def test_a_member_with_missing_or_extra_rows_is_refused(tmp_path):
    with open(tmp_path / "a.npz", "wb") as handle, NpzWriter(handle) as npz:
        with pytest.raises(CMTInputError, match="9 rows written of the 10"):
            with npz.stream("x", (10, 3), np.float64) as member:
                member.write(np.zeros((9, 3)))
        with pytest.raises(CMTInputError, match="do not fit"), npz.stream("y", (2, 3), np.float64) as member:
            member.write(np.zeros((3, 3)))
