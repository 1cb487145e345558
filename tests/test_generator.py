"""BoltzmannGenerator: Cartesian densities consistent between sample and log_prob, normalised,
chirality kept, safe and exact save/load."""
import hashlib
import json
import math
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmt_openmm.errors import CMTInputError
from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.systems import get_target
from helpers import perturbed_generator, random_rotation


@pytest.fixture(scope="module")
def aldp():
    return get_target("aldp-vacuum")


@pytest.fixture(scope="module")
def toy():
    return get_target("toy-double-well")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float64, 1e-8)])
def test_aldp_log_prob_matches_sample(aldp, dtype, tol):
    bg = perturbed_generator(aldp, hidden=32, dtype=dtype)
    x, log_q = bg.sample(300, torch.Generator().manual_seed(1))
    assert x.shape == (300, 22, 3) and x.dtype == torch.float64 and log_q.dtype == torch.float64
    assert bool(torch.isfinite(log_q).all())
    torch.testing.assert_close(bg.log_prob(x), log_q, atol=tol, rtol=0)
    moved = x @ torch.as_tensor(random_rotation(2)).T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(bg.log_prob(moved), log_q, atol=tol, rtol=0)  # rigid-motion invariant


def test_aldp_chirality_kept(aldp):
    bg = perturbed_generator(aldp, scale=0.1, hidden=32)
    x, _ = bg.sample(2000, torch.Generator().manual_seed(3))
    assert int(bg.chirality_flipped(x).sum()) == 0
    mirrored = -x[:10]
    assert bool(bg.chirality_flipped(mirrored).all())
    assert bool(torch.isneginf(bg.log_prob(mirrored)).all())


def test_md_frames_inside_support(aldp):
    """300 K MD from the reference stays inside the flow's intervals (finite log q: EUBO, forward ESS)."""
    import openmm
    import openmm.unit as unit

    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
    integrator.setRandomNumberSeed(7)
    context = openmm.Context(aldp.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(aldp.positions)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    frames = []
    for _ in range(100):
        integrator.step(100)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    bg = BoltzmannGenerator.build(aldp, n_layers=2, hidden=8)
    assert bool(torch.isfinite(bg.log_prob(np.array(frames))).all())


def test_rsample_is_differentiable(aldp):
    bg = BoltzmannGenerator.build(aldp, n_layers=2, hidden=16)
    x, log_q = bg.rsample(16, torch.Generator().manual_seed(4))
    ((x**2).sum() + log_q.sum()).backward()
    last = bg.flow.couplings.layers[-1].net[-1].weight
    assert last.grad is not None and last.grad.abs().sum() > 0
    x_no, _ = bg.sample(4)
    assert not x_no.requires_grad


@pytest.mark.parametrize("backend", ["openmm", "torch"])
def test_reverse_kl_gradient_on_a_molecule_equals_finite_differences(aldp, backend):
    """Reverse KL's pathwise gradient, as the baseline forms it (samples from ``rsample``, the
    energy's forces, the lin-log regularised energy, log q), along a random direction of the
    flow's parameters equals the central difference of the same loss with the same prior draws:
    the chain rule through the flow, the internal-to-Cartesian map and the forces is right."""
    from cmt_openmm.energy.regularize import regularize_energy
    from cmt_openmm.energy.select import make_energy

    bg = perturbed_generator(aldp, scale=0.1, hidden=16, n_layers=2, dtype=torch.float64)
    energy = make_energy(aldp, backend=backend, compile=False)
    params = [p for p in bg.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
                 for i, p in enumerate(params)]

    def loss() -> torch.Tensor:
        x, log_q = bg.rsample(8, torch.Generator().manual_seed(6))
        return (log_q + regularize_energy(energy(x), 1e3)).mean()

    slope = sum(float((g * v).sum()) for g, v in zip(torch.autograd.grad(loss(), params), direction))

    def shifted(step: float) -> float:
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(step * v)
            value = float(loss())
            for p, v in zip(params, direction):
                p.sub_(step * v)
        return value

    h = 1e-6
    assert abs(slope) > 1.0  # the direction moves the loss: the check below is not of a flat function
    assert (shifted(h) - shifted(-h)) / (2 * h) == pytest.approx(slope, rel=1e-5)


def test_toy_density_integrates_to_one(toy):
    bg = perturbed_generator(toy, scale=0.1, hidden=32)
    x, log_q = bg.sample(500, torch.Generator().manual_seed(5))
    torch.testing.assert_close(bg.log_prob(x), log_q, atol=1e-3, rtol=0)
    n = 48  # midpoint rule over the flow's support, a box inside the target's box
    s = bg.flow.scaling
    lo, hi = s.from_flow(s.lower[None])[0], s.from_flow(s.upper[None])[0]
    assert bool((lo >= torch.as_tensor(toy.box[:, 0])).all() and (hi <= torch.as_tensor(toy.box[:, 1])).all())
    centres = [lo[i] + (hi[i] - lo[i]) * (torch.arange(n, dtype=torch.float64) + 0.5) / n for i in range(3)]
    grid = torch.stack(torch.meshgrid(*centres, indexing="ij"), -1).reshape(-1, 1, 3)
    with torch.no_grad():
        p = bg.log_prob(grid).exp()
    mass = p.sum().item() * float((hi - lo).prod()) / n**3
    assert mass == pytest.approx(1.0, abs=5e-3)


def test_save_load_round_trip(aldp, tmp_path):
    bg = perturbed_generator(aldp, hidden=32, n_layers=4)
    path = bg.save(tmp_path / "bg.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["bg.safetensors"]  # no temporary file left
    assert hashlib.sha256(path.read_bytes()).hexdigest() == bg.content_hash()
    loaded = BoltzmannGenerator.load(path, aldp)
    assert loaded.settings == bg.settings and loaded.content_hash() == bg.content_hash()
    x, log_q = bg.sample(50, torch.Generator().manual_seed(6))
    assert torch.equal(loaded.log_prob(x), bg.log_prob(x))
    x2, log_q2 = loaded.sample(50, torch.Generator().manual_seed(6))
    assert torch.equal(x2, x) and torch.equal(log_q2, log_q)
    assert BoltzmannGenerator.load(path).target_name == "aldp-vacuum"  # built-in target found by name


def test_a_flipped_byte_in_the_tensors_is_refused_and_files_without_a_checksum_still_load(aldp, tmp_path):
    bg = perturbed_generator(aldp, hidden=8, n_layers=2)
    data = bytearray(bg.save(tmp_path / "bg.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + (len(data) - 8 - n) // 2] ^= 0x10  # one bit in the middle of the tensor data region
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(CMTInputError, match="do not match the checksum") as error:
        BoltzmannGenerator.load(tmp_path / "flipped.safetensors", aldp)
    assert "\n" not in str(error.value) and str(error.value).endswith(".")
    with safe_open(tmp_path / "bg.safetensors", "pt") as f:  # the same file as saved before checksums
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["cmt_openmm"])
    old = tmp_path / "old.safetensors"
    del meta["tensors_sha256"]
    save_file(tensors, old, metadata={"cmt_openmm": json.dumps(meta, sort_keys=True, separators=(",", ":"))})
    loaded = BoltzmannGenerator.load(old, aldp)
    assert loaded.content_hash() == hashlib.sha256(old.read_bytes()).hexdigest()  # re-saves byte for byte
    x, _ = bg.sample(20, torch.Generator().manual_seed(2))
    assert torch.equal(loaded.log_prob(x), bg.log_prob(x))


def test_load_refuses_other_topology_and_warns_on_other_system(aldp, toy, tmp_path):
    path = BoltzmannGenerator.build(aldp, n_layers=2, hidden=8).save(tmp_path / "bg.safetensors")
    with pytest.raises(CMTInputError, match="different molecule"):
        BoltzmannGenerator.load(path, toy)
    with pytest.warns(UserWarning, match="another System"):
        BoltzmannGenerator.load(path, get_target("aldp-obc"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BoltzmannGenerator.load(path, aldp)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_never_unpickles(aldp, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    torch_file = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(3), "payload": _Payload(marker)}, torch_file)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, plain)
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(3)}, future, metadata={"cmt_openmm": json.dumps({"format": "x/99"})})
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01")
    for path in (evil, torch_file, plain, future, short):
        with pytest.raises(CMTInputError):
            BoltzmannGenerator.load(path, aldp)
    assert not marker.exists()
    with pytest.raises(CMTInputError):
        BoltzmannGenerator.load(tmp_path / "missing.safetensors", aldp)


def test_bad_input_refused(aldp):
    bg = BoltzmannGenerator.build(aldp, n_layers=2, hidden=8)
    with pytest.raises(CMTInputError):
        bg.log_prob(torch.zeros(22, 3))
    with pytest.raises(CMTInputError):
        BoltzmannGenerator.build(aldp, dtype=torch.float16)
    x = torch.as_tensor(aldp.positions)[None].clone()
    x[0, 0, 0] = math.nan
    assert bool(torch.isneginf(bg.log_prob(x)).all())
