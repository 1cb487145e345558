"""Every GPU check in one prepared command (≤ 8 minutes on one H100/H200); a tiny mode for CPUs.

Prints a table and writes JSON (``--out``):

(a) the OpenMM bridge on the CUDA platform against the Reference platform (energies, forces)
    on perturbed aldp-implicit structures;
(b) the torch energies (``TorchEnergy``) on the device against OpenMM Reference, float64 and
    float32, for aldp-vacuum, aldp-obc and aldp-implicit;
(c) throughput: torch energies (energies + gradients) at batch 1k / 4k / 16k against the
    bridge on its fastest platform in the same run, and the flow's sampling and training
    throughput (samples/s);
(d) a CMT run on aldp-implicit (the paper's system: ff96 + OBC1, CustomGBForce) for a fixed
    wall clock (``--minutes``) on the device, with its reverse ESS on fresh samples (median of
    5 draws) and its φ > 0 population;
(e) the ``ala4-hour`` preset (the tetrapeptide) for ``--peptide-minutes`` on the device: the step
    scale it picks there (``cmt.step_scale: auto``, with the time per sample at each scale), its
    steps, λ, reverse ESS and φ > 0 populations, to set beside the CPU runs in RESULTS.md.

On a machine without CUDA every check runs on the CPU (and (a) says it was skipped);
``--tiny`` shrinks everything to seconds so the test suite can run it. The GPU machines have
torch 2.11 without openmmtorch: nothing here needs it. Usage::

    python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU machine
    python benchmarks/gpu_check.py --tiny --out /tmp/check.json     # anywhere
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform as host
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openmm
import torch

from cmt_openmm.analysis.metrics import by_residue, sample_metrics
from cmt_openmm.coordinates.backbone import in_phi_positive_basin
from cmt_openmm.energy.openmm.energy import OpenMMEnergy
from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.errors import CMTInputError
from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.runs.presets import get_preset
from cmt_openmm.sampling.reweighting import reweight
from cmt_openmm.systems import get_target
from cmt_openmm.training import train

SYSTEMS = ("aldp-vacuum", "aldp-obc", "aldp-implicit")


def perturbed(target, n: int, scale: float = 0.005, seed: int = 0) -> np.ndarray:
    return target.positions[None] + scale * np.random.default_rng(seed).normal(size=(n, *target.positions.shape))


def platforms() -> list[str]:
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def check_openmm_cuda(n: int) -> dict:
    """(a) CUDA against Reference through the bridge."""
    if "CUDA" not in platforms():
        return {"skipped": f"no OpenMM CUDA platform here (platforms: {', '.join(platforms())})"}
    target = get_target("aldp-implicit")
    x = torch.tensor(perturbed(target, n), requires_grad=True)
    results = {}
    for name in ("Reference", "CUDA"):
        with OpenMMEnergy(target, platform=name) as energy:
            u, f = energy.energy_and_forces(x)
            results[name] = (u, f)
    (u_ref, f_ref), (u_cuda, f_cuda) = results["Reference"], results["CUDA"]
    return {"n": n, "max_abs_energy_diff_kT": float(np.max(np.abs(u_cuda - u_ref))),
            "max_rel_force_diff": float(np.max(np.abs(f_cuda - f_ref)) / np.max(np.abs(f_ref)))}


def check_torch_energies(device: str) -> dict:
    """(b) TorchEnergy on the device against OpenMM Reference (its own verification at construction)."""
    out = {}
    for name in SYSTEMS:
        for dtype in (torch.float64, torch.float32):
            try:
                energy = TorchEnergy(get_target(name), device=device, dtype=dtype)
                v = energy.verification
                out[f"{name}/{str(dtype)[6:]}"] = {"passed": v["passed"], "energy": v["max_relative_energy_error"],
                                                   "force": v["max_relative_force_error"]}
            except CMTInputError as error:
                out[f"{name}/{str(dtype)[6:]}"] = {"passed": False, "error": str(error)}
    return out


def _rate(function, n: int, repeats: int = 2) -> float:
    """Configurations (or samples) per second of ``function()`` on n items, best of ``repeats`` after a warm-up."""
    function()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return n / best


def check_throughput(device: str, batches: tuple[int, ...], bridge_batch: int) -> dict:
    """(c) torch energies vs the bridge (same structures), and the flow's throughput."""
    out = {}
    bridge_platform = "CUDA" if "CUDA" in platforms() else "Reference"
    for name in SYSTEMS:
        target = get_target(name)
        with OpenMMEnergy(target, platform=bridge_platform) as bridge:
            x = torch.tensor(perturbed(target, bridge_batch), requires_grad=True)
            bridge_rate = _rate(lambda: bridge(x).sum().backward(), bridge_batch, repeats=1)
        energy = TorchEnergy(target, device=device, verify=False)
        row = {"bridge_platform": bridge_platform, "bridge_configs_per_s": bridge_rate}
        for b in batches:
            xb = torch.tensor(perturbed(target, b, seed=1), device=device, requires_grad=True)
            rate = _rate(lambda: energy(xb).sum().backward(), b)
            row[f"torch_configs_per_s@{b}"] = rate
            row[f"ratio@{b}"] = rate / bridge_rate
        out[name] = row
    generator = BoltzmannGenerator.build(get_target("aldp-vacuum"), n_layers=6, hidden=64).to(device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-4)
    rng = torch.Generator(device=device).manual_seed(0)
    b = batches[-1]
    x, _ = generator.sample(b, generator=rng)

    def fit_step():
        optimizer.zero_grad()
        (-generator.log_prob(x).mean()).backward()
        optimizer.step()

    out["flow"] = {"batch": b, "sample_per_s": _rate(lambda: generator.sample(b, generator=rng), b),
                   "train_samples_per_s": _rate(fit_step, b)}
    return out


def five_draws(generator, target, n: int) -> list:
    """Five independent reweighted draws of n flow samples (seeds 0-4), as the reports take them."""
    return [reweight(generator, target, n, seed=k, progress=False, min_effective_samples=0) for k in range(5)]


def check_cmt_run(device: str, minutes: float, n_samples: int, n_report: int) -> dict:
    """(d) CMT on aldp-implicit for a fixed wall clock; ESS on fresh samples (median of 5 draws)."""
    target = get_target("aldp-implicit")
    config = {"method": "cmt", "seed": 0, "budget": 10**9, "max_steps": 10**6, "max_minutes": minutes,
              "device": device, "energy": {"backend": "auto"}, "flow": {"n_layers": 6, "hidden": 64, "n_bins": 8},
              "cmt": {"eps_tr": 0.5, "eps_ent": 1.0, "n_samples": n_samples, "fit_steps": 8, "batch_size": 256,
                      "lr": 1e-3, "strata": "phi-sign"}}
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = train(target, config, run_dir=Path(run_dir) / "run", progress=False)
        wall = time.perf_counter() - start
    draws = five_draws(result.generator, target, n_report)
    pooled = type(draws[0]).concatenate(draws)
    phi = pooled.ramachandran_angles()[:, 0, 0]
    last = result.history[-1] if result.history else {}
    return {"minutes": minutes, "wall_s": wall, "steps": len(result.history), "stop_reason": result.stop_reason,
            "energy_evaluations": last.get("energy_evaluations", 0), "energy_backend": last.get("energy_backend"),
            "lam": last.get("lam"), "eta": last.get("eta"),
            "ess_median": float(np.median([d.ess for d in draws])), "ess_draws": [d.ess for d in draws],
            "phi_positive": float(np.sum(pooled.weights * in_phi_positive_basin(phi))),
            "n_effective_pooled": pooled.n_effective}


def check_peptide_run(device: str, minutes: float, n_report: int, tiny: bool) -> dict:
    """(e) The ala4-hour preset for ``minutes`` on the device (tiny: a small flow on OpenMM energies)."""
    preset = get_preset("ala4-hour")
    target = get_target(preset["system"])
    config = {key: value for key, value in preset.items() if key not in ("system", "temperature", "report")}
    config.update(max_minutes=minutes, device=device)
    if tiny:
        config.update(energy={"backend": "openmm"}, flow={"n_layers": 2, "hidden": 8},
                      cmt={**config["cmt"], "n_samples": 100, "batch_size": 50})
    said = io.StringIO()
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stderr(said):
        start = time.perf_counter()
        result = train(target, config, run_dir=Path(run_dir) / "run", progress=True)
        wall = time.perf_counter() - start
    draws = five_draws(result.generator, target, n_report)
    metrics = sample_metrics(draws)
    last = result.history[-1]
    return {"minutes": minutes, "wall_s": wall, "steps": len(result.history), "stop_reason": result.stop_reason,
            "step_scale": last["n_samples"] // config["cmt"]["n_samples"], "n_samples": last["n_samples"],
            "said": [line for line in said.getvalue().splitlines() if line.startswith("[cmt-openmm]")],
            "energy_evaluations": last["energy_evaluations"], "energy_backend": last.get("energy_backend"),
            "lam": last.get("lam"), "eta": last.get("eta"), "training_reverse_ess": last.get("reverse_ess"),
            "reverse_ess": metrics["reverse_ess"], "reverse_ess_pooled": metrics["reverse_ess_pooled"],
            "n_effective_pooled": metrics["n_effective"],
            "phi_positive_by_residue": by_residue(metrics.get("phi_positive_population", {}))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds on a CPU (for the test suite)")
    parser.add_argument("--minutes", type=float, default=1.5, help="wall clock of the CMT run (d)")
    parser.add_argument("--peptide-minutes", type=float, default=2.5, help="wall clock of the ala4 run (e)")
    parser.add_argument("--out", help="JSON file")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny
    result = {"host": host.node(), "device": device, "torch": torch.__version__, "openmm": openmm.__version__,
              "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    start = time.perf_counter()
    result["a_openmm_cuda_vs_reference"] = check_openmm_cuda(8 if tiny else 200)
    result["b_torch_vs_openmm"] = check_torch_energies(device)
    result["c_throughput"] = check_throughput(device, (64,) if tiny else (1024, 4096, 16384), 32 if tiny else 512)
    result["d_cmt_aldp_implicit"] = check_cmt_run(device, 0.05 if tiny else args.minutes, 200 if tiny else 8000,
                                                  100 if tiny else 5000)
    result["e_ala4_hour_preset"] = check_peptide_run(device, 0.05 if tiny else args.peptide_minutes,
                                                     100 if tiny else 5000, tiny)
    result["total_wall_s"] = time.perf_counter() - start
    print(json.dumps(result, indent=1, default=float))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
