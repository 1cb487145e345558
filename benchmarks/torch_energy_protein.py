"""Time and peak memory per configuration of a ~2,600-atom implicit-solvent protein on both
energy backends (issue 24: the torch energy of this system once died of memory).

The system: openmmtools' T4 lysozyme L99A receptor (2,603 atoms; ``receptor.prmtop`` and
``receptor.crd`` of its data folder) in OBC2 (``implicitSolvent: OBC2``, no cutoff, no
constraints), configurations the minimised structure plus 0.01 nm Gaussian noise. Rows:

- ``openmm_<platform>``: the OpenMM bridge (``OpenMMEnergy``, one in-process Context) on the
  Reference and CPU platforms, energies + forces;
- ``torch_default``: ``TorchEnergy(target)`` as shipped: its memory plan refuses the system
  (one configuration needs ~1.4 GB, more than 4 x the 256 MiB chunk budget), so ``auto`` uses
  OpenMM; the refusal's sentence and its time are recorded;
- ``torch_budget_<GiB>``: the same with ``memory.CHUNK_BYTES`` raised so that one configuration
  fits (what the torch path would cost), float64, eager, energies + forces and energies only,
  checked against the Reference bridge on the same configurations.

Per configuration: best wall time of ``--repeats`` calls on ``--batch`` configurations, and the
rise of this process's peak resident memory during the call divided by the batch. A few minutes
on 2 cores. Usage, from the repository root:
``python -m benchmarks.torch_energy_protein [--batch 4] [--repeats 2] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, write_record
from benchmarks.torch_energy_throughput import peak_rss_bytes
from cmt_openmm.energy import OpenMMEnergy
from cmt_openmm.energy.torch import memory
from cmt_openmm.energy.torch.energy import TorchEnergy
from cmt_openmm.errors import CMTInputError
from cmt_openmm.systems.inputs import target_from_entry


def lysozyme_obc2():
    """openmmtools' T4 lysozyme L99A receptor in OBC2, as a Target (300 K)."""
    import openmmtools

    data = Path(openmmtools.__file__).parent / "data" / "T4-lysozyme-L99A-implicit"
    entry = {"prmtop": str(data / "receptor.prmtop"), "inpcrd": str(data / "receptor.crd"),
             "implicitSolvent": "OBC2", "name": "t4-lysozyme-obc2"}
    return target_from_entry(entry, 300.0)


def measure(call, batch: int, repeats: int) -> dict:
    """Best seconds per configuration of ``call()`` over ``repeats`` and its peak memory rise per
    configuration (bytes), from the first repeat."""
    seconds, rise = [], 0
    for k in range(repeats):
        before = peak_rss_bytes(reset=True)
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
        if k == 0:
            rise = max(0, peak_rss_bytes() - before)
    return {"s_per_config": min(seconds) / batch, "peak_memory_bytes_per_config": rise / batch, "times_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "torch_energy_protein.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=2.0, help="chunk budget of the torch_budget row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    target = lysozyme_obc2()
    rows: dict[str, dict] = {}
    info = {"n_atoms": target.n_atoms, "target_build_s": time.perf_counter() - start,
            "forces": [type(f).__name__ for f in target.system.getForces()]}
    x = target.positions + 0.01 * np.random.default_rng(args.seed).standard_normal((args.batch, target.n_atoms, 3))

    reference = None
    for platform in ("Reference", "CPU"):
        with OpenMMEnergy(target, platform, n_workers=1) as bridge:
            bridge.energy_and_forces(x[:1])  # the Context
            rows[f"openmm_{platform}"] = measure(lambda: bridge.energy_and_forces(x), args.batch, args.repeats)
            if platform == "Reference":
                reference = bridge.energy_and_forces(x)

    start = time.perf_counter()
    try:
        TorchEnergy(target, compile=False)
        rows["torch_default"] = {"refused": None}
    except CMTInputError as error:
        rows["torch_default"] = {"refused": str(error), "refusal_s": time.perf_counter() - start}

    key = f"torch_budget_{args.budget_gib:g}GiB"
    saved = memory.CHUNK_BYTES
    memory.CHUNK_BYTES = int(args.budget_gib * 2**30)
    try:
        start = time.perf_counter()
        energy = TorchEnergy(target, compile=False, verify=False)
        build = time.perf_counter() - start
        energy.energy_and_forces(x[:1])  # first-call allocations
        rows[key] = measure(lambda: energy.energy_and_forces(x), args.batch, args.repeats)
        with torch.no_grad():
            xt = torch.as_tensor(x)
            rows[key + "_energies_only"] = measure(lambda: energy(xt), args.batch, args.repeats)
        u, f = energy.energy_and_forces(x)
        rows[key].update(
            build_s=build, threads=energy.n_threads, chunk_bytes=energy._chunk_bytes,
            max_abs_energy_diff_kT=float(np.abs(u - reference[0]).max()),
            max_abs_force_diff_kT_per_nm=float(np.abs(f - reference[1]).max()),
        )
        energy.close()
    finally:
        memory.CHUNK_BYTES = saved

    print(f"\n{target.n_atoms}-atom T4 lysozyme receptor in OBC2, float64, batch {args.batch}, best of "
          f"{args.repeats}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"{'backend':<34}{'s/config':>10}{'peak MB/config':>16}")
    for name, row in rows.items():
        if "refused" in row:
            print(f"{name:<34}{'refused':>10}  {row['refused'] or ''}")
        else:
            print(f"{name:<34}{row['s_per_config']:>10.3f}{row['peak_memory_bytes_per_config'] / 1e6:>16.0f}")
    if key in rows:
        print(f"torch vs Reference: max |dU| {rows[key]['max_abs_energy_diff_kT']:.1e} kT, "
              f"max |dF| {rows[key]['max_abs_force_diff_kT_per_nm']:.1e} kT/nm")
    record = {"settings": vars(args) | {"out": str(args.out)},
              "machine": machine(torch_threads=torch.get_num_threads(), torch=torch.__version__),
              "system": info, "results": rows}
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
