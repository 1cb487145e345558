"""``cmt-openmm bridge-remd RUN_DIR --out FRAMES.npz``: flow-bridged replica exchange of a trained run.

States U_λ = (1 - λ) U_q + λ U from the run's generator (λ = 0) to its target (λ = 1), with
Langevin dynamics and flow moves in every state (:mod:`cmt_openmm.export.flow_bridged_remd`). Writes the
λ = 1 frames to ``--out`` like ``reference-md`` (positions nm, reduced_energy, provenance) and
a JSON summary beside it; the netCDF storage (``--out`` with ``.nc``) makes it resumable: the
same command continues a stopped run up to ``--iterations`` (``--restart`` starts afresh).
Registered in :mod:`cmt_openmm.cli.main` by ``add_parser``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..coordinates.backbone import is_peptide
from ..errors import CMTInputError
from ..files import atomic_write, json_default, to_json
from ..runs.run import Run
from .options import add_storage_options


def _lambdas(text: str):
    if text in ("auto", "uniform"):
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise CMTInputError(f"--lambdas must be auto, uniform or comma-separated numbers such as 1,0.5,0, "
                            f"not {text!r}.") from None


def cmd_bridge_remd(args: argparse.Namespace) -> int:
    from ..export.flow_bridged_remd import run_bridge_remd

    run = Run.open(args.run_dir)
    target, generator = run.target, run.generator
    result = run_bridge_remd(
        generator, target, args.out, n_replicas=args.replicas, n_iterations=args.iterations,
        lambdas=_lambdas(args.lambdas), steps_per_iteration=args.steps_per_iteration,
        flow_proposals=args.flow_proposals, timestep=args.timestep, collision_rate=args.collision_rate,
        seed=args.seed, storage=args.storage, resume=not args.restart, progress=not args.quiet,
        n_equilibration=args.equilibration, platform=args.platform, backend=args.backend,
        pilot_iterations=args.pilot_iterations, minimize=not args.no_minimize,
    )
    summary = {"out": str(result.path), "n_frames": int(result.positions.shape[0]), **result.provenance}
    if is_peptide(target) and len(result.positions):
        from ..analysis.metrics import md_populations

        summary["populations"] = md_populations(target, result.positions)
    atomic_write(Path(args.out).with_suffix(".json"), to_json(summary))
    print(json.dumps(summary, indent=2, default=json_default), file=getattr(args, "stdout", None) or sys.stdout,
          flush=True)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bridge-remd`` subcommand to ``cmt-openmm``'s subparsers; returns its parser."""
    from ..export.force import BACKENDS

    p = subparsers.add_parser("bridge-remd", help="flow-bridged replica exchange: generator (λ=0) to target (λ=1)")
    p.add_argument("run_dir", help="a run directory written by `cmt-openmm train`")
    p.add_argument("--out", required=True, help="output .npz of the λ = 1 frames (a .json summary goes beside it)")
    p.add_argument("--replicas", type=int, default=4, help="states = replicas, λ = 1 and λ = 0 included")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--steps-per-iteration", dest="steps_per_iteration", type=int, default=500,
                   help="Langevin steps per iteration (0: flow moves only)")
    p.add_argument("--flow-proposals", dest="flow_proposals", type=int, default=10,
                   help="flow proposals per iteration and replica")
    p.add_argument("--lambdas", default="auto",
                   help="auto (a pilot run places them for equal exchange acceptance), uniform, or e.g. 1,0.6,0.2,0")
    p.add_argument("--pilot-iterations", dest="pilot_iterations", type=int, default=50)
    p.add_argument("--timestep", type=float, help="fs (default: 2 where the System constrains every bond to "
                   "hydrogen, else 1)")
    p.add_argument("--collision-rate", dest="collision_rate", type=float, default=1.0, help="1/ps")
    add_storage_options(p)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="the flow force: TorchForce or PythonForce")
    p.add_argument("--no-minimize", dest="no_minimize", action="store_true",
                   help="start from the run's structure without minimising")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    p.set_defaults(func=cmd_bridge_remd)
    return p
