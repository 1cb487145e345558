"""The ``cmt-openmm`` command line: train, sample, evaluate, reference-md, bridge-remd, demo, presets.

``cmt-openmm train RUN.yaml --out DIR`` (run files: :mod:`.run_files`) or
``--preset NAME`` (:mod:`.presets`) trains into a run directory and finishes with
``report.json`` / ``report.md`` and PNG plots (:mod:`cmt_openmm.analysis.report`); ``sample``,
``evaluate`` work on that directory; ``reference-md`` writes MD reference frames; ``demo`` is
the README's main job. Commands print progress on stderr and their result (JSON, or the
demo's summary) on stdout; library banners are kept off stdout. Bad input ends with one
sentence on stderr and exit code 2, never a traceback. argparse rather than click/typer: no
extra dependency, and the standard library's behaviour.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from ..coordinates.backbone import is_peptide, ramachandran_angles
from ..errors import CMTInputError
from ..files import atomic_write, atomic_writer, json_default, to_json
from ..generator import load_generator
from ..training.config import RESUMABLE, resume_conflicts
from ..training.loop import CHECKPOINT_FILE
from .presets import get_preset, list_presets
from .run_files import (
    RUN_FILE,
    RunSpec,
    build_target,
    load_run,
    parse_run_config,
    read_yaml,
    resolve_system,
)

EXIT_INPUT = 2


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    spec = _train_spec(args, out)
    result = run_training(spec, out, resume=args.resume, progress=not args.quiet)
    _emit(result, args)
    return 0


def _train_spec(args: argparse.Namespace, out: Path) -> RunSpec:
    if args.config and args.preset:
        raise CMTInputError("pass either a CONFIG file or --preset, not both.")
    if args.config:
        data, base = read_yaml(args.config), Path(args.config).resolve().parent
    elif args.preset:
        data, base = get_preset(args.preset), Path.cwd()
    elif args.resume and (out / RUN_FILE).is_file():
        data, base = read_yaml(out / RUN_FILE), out
    else:
        raise CMTInputError("name a run file (cmt-openmm train CONFIG.yaml) or a preset (--preset aldp-quick).")
    if isinstance(data, dict):
        for key in ("max_steps", "budget", "seed", "threads", "device"):
            if getattr(args, key, None) is not None:
                data[key] = getattr(args, key)
    return parse_run_config(data, base)


def run_training(spec: RunSpec, out: Path, resume: bool = False, progress: bool = True,
                 report: bool = True) -> dict:
    """Train per ``spec`` into ``out`` (resuming if asked), then write the report and plots.

    Returns the report dictionary (or, with ``report=False``, the run directory and why
    training stopped).
    """
    from ..training import train

    out = Path(out)
    stored_path = out / RUN_FILE
    if resume:
        if not (out / CHECKPOINT_FILE).is_file():
            raise CMTInputError(f"{out} holds no checkpoint to resume; start the run without --resume.")
        if stored_path.is_file():
            stored = parse_run_config(read_yaml(stored_path), out)
            if (stored.system, stored.temperature) != (spec.system, spec.temperature):
                raise CMTInputError(f"{out} was trained on {stored.system} at {stored.temperature} K; resume it with the same system.")
            changed = resume_conflicts(stored.train, spec.train)
            if changed:
                raise CMTInputError(f"the run in {out} was trained with other {', '.join(changed)} settings; "
                                    f"only {' and '.join(RESUMABLE)} may change on --resume.")
    elif (out / CHECKPOINT_FILE).exists():
        raise CMTInputError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    target = build_target(spec.system, spec.temperature)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(stored_path, yaml.safe_dump(spec.to_dict(), sort_keys=False))
    _say(f"training {spec.train['method']} on {target.name} at {spec.temperature:g} K into {out}")
    result = train(target, spec.train, run_dir=out, resume=resume, progress=progress)
    if not report:
        return {"run_dir": str(out), "stop_reason": result.stop_reason}
    return write_run_report(out, spec, target, result.generator, result.history, result.stop_reason, progress)


def write_run_report(run_dir: Path, spec: RunSpec, target, generator, history, stop_reason: str | None,
                     progress: bool = True, reference: str | None = None, n_samples: int | None = None,
                     n_draws: int | None = None, name: str = "report") -> dict:
    """The run's report (:func:`cmt_openmm.analysis.report.write_run_report`) with the run file's settings."""
    from ..analysis.report import write_run_report as write

    n_samples = n_samples or spec.report["n_samples"]
    n_draws = n_draws or spec.report["n_draws"]
    _say(f"report: {n_draws} draws of {n_samples} samples")
    with run_energy(spec, target) as energy:
        return write(run_dir, target, generator, history, stop_reason, method=spec.train["method"],
                     seed=spec.train["seed"], n_samples=n_samples, n_draws=n_draws, sample_seed=spec.report["seed"],
                     progress=progress, reference_file=reference, name=name, energy=energy,
                     reference_positions=None if reference is None else _reference_positions(reference, target))


def run_energy(spec: RunSpec, target):
    """The energy the run's settings name (``energy.backend``, ``platform``, ``n_workers``), for
    sampling and reports as for training; a context manager that closes it."""
    from ..energy.select import make_energy

    settings = spec.train["energy"]
    return make_energy(target, settings.get("backend", "auto"), platform=settings["platform"],
                       n_workers=settings["n_workers"], compile=settings.get("compile", False))


def _reference_positions(path: str, target) -> np.ndarray:
    from ..sampling.reference_md import load_reference

    positions, _ = load_reference(path, target.topology)
    if positions.shape[1] != target.n_atoms:
        raise CMTInputError(f"reference {path} has {positions.shape[1]} atoms but {target.name} has {target.n_atoms}; pass frames of the same system.")
    return positions


def cmd_sample(args: argparse.Namespace) -> int:
    from ..sampling.reweighting import reweight

    if args.n < 1:
        raise CMTInputError(f"--n must be a positive number of samples, got {args.n}.")
    if args.resample is not None and args.resample < 1:
        raise CMTInputError(f"--resample must be a positive number of frames, got {args.resample}.")
    if args.weights and Path(args.weights).suffix not in (".npy", ".csv"):
        raise CMTInputError(f"--weights {args.weights} must end in .npy or .csv.")
    if Path(args.out).suffix != ".npz":
        raise CMTInputError(f"--out {args.out} must end in .npz.")
    for path in (args.out, args.pdb, args.dcd, args.weights):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise CMTInputError(f"the folder of {path} does not exist; create it first.")
    spec, target = load_run(args.run_dir)
    generator = load_generator(args.run_dir, target=target)
    with run_energy(spec, target) as energy:
        ens = reweight(generator, target, args.n, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                       energy=energy)
    if args.temperature is not None:
        ens = ens.reweight_to(args.temperature)
    out = Path(args.out)
    ens.save_npz(out)
    summary = {"out": str(out), **ens.summary(), "generator_hash": ens.metadata.get("generator_hash")}
    frames = None
    if args.resample is not None:
        frames = ens.resample_indices(args.resample, seed=args.seed)
        _add_to_npz(out, resampled_indices=frames)
        summary["resampled"] = int(len(frames))
    if args.weights:
        ens.save_weights(args.weights)
        summary["weights"] = str(args.weights)
    if args.dcd or args.pdb:
        traj = ens.to_mdtraj(frames)
        if args.dcd:
            traj.save_dcd(str(args.dcd))
            summary["dcd"] = str(args.dcd)
            summary["dcd_frames"] = "resampled, unweighted" if frames is not None else "all samples, weights in the npz"
        if args.pdb:
            traj[0].save_pdb(str(args.pdb))
            summary["pdb"] = str(args.pdb)
    atomic_write(out.with_suffix(".json"), to_json(summary))
    _emit(summary, args)
    return 0


def _add_to_npz(path: Path, **arrays: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as data:
        content = {k: data[k] for k in data.files}
    content.update(arrays)
    with atomic_writer(path) as handle:
        np.savez(handle, **content)


def report(run_dir: str | os.PathLike, reference: str | os.PathLike | None = None, n_samples: int | None = None,
           n_draws: int | None = None, seed: int | None = None, progress: bool = True, name: str = "evaluation") -> dict:
    """Evaluate a run directory (made by ``cmt-openmm train`` or ``cmt_openmm.train(..., run_dir=)``):
    draw reweighted samples, compute the metrics, draw the plots and write ``name``.json/.md there.

    ``reference``: MD frames to compare with (the npz of ``cmt-openmm reference-md`` or a
    trajectory mdtraj reads with the run's topology: DCD, XTC, netCDF, PDB, ...). Returns the
    report dictionary; ``cmt-openmm evaluate`` is this function.
    """
    from ..training import load_history

    run_dir = Path(run_dir)
    spec, target = load_run(run_dir)
    generator = load_generator(run_dir, target=target)
    if reference is not None:
        _reference_positions(str(reference), target)  # fail before sampling
    history = load_history(run_dir)
    if seed is not None:
        spec.report["seed"] = seed
    return write_run_report(run_dir, spec, target, generator, history, _stored_stop_reason(run_dir), progress,
                            reference=None if reference is None else str(reference), n_samples=n_samples,
                            n_draws=n_draws, name=name)


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = report(args.run_dir, args.reference, args.n, args.draws, args.seed, not args.quiet)
    if args.out:
        atomic_write(Path(args.out), to_json(result))
    _emit(result, args)
    return 0


def _stored_stop_reason(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "report.json").read_text())["training"]["stop_reason"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_reference_md(args: argparse.Namespace) -> int:
    from ..sampling.reference_md import run_reference_md

    if Path(args.system).suffix in (".yaml", ".yml"):
        spec = parse_run_config(read_yaml(args.system), Path(args.system).resolve().parent)
        system, temperature = spec.system, args.temperature or spec.temperature
    elif Path(args.system).is_dir():
        spec, _ = load_run(args.system)
        system, temperature = spec.system, args.temperature or spec.temperature
    else:
        system, temperature = resolve_system(args.system, Path.cwd()), args.temperature or 300.0
    target = build_target(system, temperature)
    result = run_reference_md(
        target, args.out, n_replicas=args.replicas, t_max=args.t_max, n_iterations=args.iterations,
        steps_per_iteration=args.steps_per_iteration, timestep=args.timestep, seed=args.seed,
        storage=args.storage, resume=not args.restart, progress=not args.quiet,
        n_equilibration=args.equilibration, platform=args.platform,
    )
    summary = {"out": str(result.path), "n_frames": int(result.positions.shape[0]), **result.provenance}
    if is_peptide(target):
        from ..analysis.metrics import peptide_populations

        summary["populations"] = peptide_populations(
            ramachandran_angles(target.topology, result.positions), None, target.kT)
    atomic_write(Path(args.out).with_suffix(".json"), to_json(summary))
    _emit(summary, args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    spec = parse_run_config(get_preset(args.preset), Path.cwd())
    resume = (out / CHECKPOINT_FILE).is_file()
    if resume:
        _say(f"{out} already holds a run: resuming it (a finished run only redoes the report)")
    result = run_training(spec, out, resume=resume, progress=not args.quiet)
    sample_args = argparse.Namespace(
        run_dir=str(out), n=args.n, out=str(out / "samples.npz"), pdb=str(out / "samples.pdb"),
        dcd=str(out / "samples.dcd"), weights=str(out / "weights.npy"), resample=args.n, seed=0,
        batch_size=1000, temperature=None, quiet=args.quiet, stdout=io.StringIO(),
    )
    cmd_sample(sample_args)
    s = result["samples"]
    lines = [
        f"demo finished: {result['system']} at {result['temperature']:g} K, {result['method']}",
        f"  training: {result['training']['steps']} steps, {result['training']['energy_evaluations']:,} energy evaluations, "
        f"{result['training']['wall_time_s']:.0f} s ({result['training']['stop_reason']})",
        f"  reverse ESS: {100 * s['reverse_ess']['median']:.2f} % (median of {s['n_draws']} draws, "
        f"range {100 * s['reverse_ess']['min']:.2f}-{100 * s['reverse_ess']['max']:.2f} %)",
    ]
    if "phi_positive_population" in s and "value" in s["phi_positive_population"]:
        p = s["phi_positive_population"]
        if p.get("reliable") is False:  # N·ESS too small: the delta-method error is meaningless
            n_eff = p.get("n_effective", 0.0)
            lines.append(f"  phi > 0 basin population (reweighted): unreliable (N_eff = {n_eff:.1f} effective samples)")
        else:
            fmt = ".4f" if p["value"] >= 1e-3 else ".1e"
            lines.append(f"  phi > 0 basin population (reweighted): {p['value']:{fmt}} ± {p['error'] or 0:{fmt}}")
    lines += [f"  report: {out / 'report.md'}", f"  plots: {', '.join(str(out / p) for p in result['plots'])}",
              f"  samples: {out / 'samples.npz'} (+ samples.pdb, samples.dcd resampled, weights.npy)"]
    _emit("\n".join(lines), args)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from ..systems import list_targets

    if args.name:
        _emit(yaml.safe_dump(get_preset(args.name), sort_keys=False).rstrip(), args)
    else:
        _emit({"presets": list_presets(), "systems": list_targets()}, args)
    return 0


# ---------------------------------------------------------------------------------------------
# Plumbing
# ---------------------------------------------------------------------------------------------
def _say(message: str) -> None:
    print(f"[cmt-openmm] {message}", file=sys.stderr, flush=True)


def _emit(result: dict | str, args: argparse.Namespace) -> None:
    """Print a command's result (JSON, or text) on the command's stdout."""
    text = result if isinstance(result, str) else json.dumps(result, indent=2, default=json_default)
    print(text, file=getattr(args, "stdout", None) or sys.stdout, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (and exit code 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cmt-openmm", description="Boltzmann generators trained with Constrained Mass Transport against OpenMM.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def common(p):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=int,
                       help="torch CPU threads (default 1, or the run file's `threads` for train: small flows "
                            "run fastest single-threaded, and more threads than free cores slow training down)")

    p = sub.add_parser("train", help="train a generator from a run file or a preset")
    p.add_argument("config", nargs="?", help="YAML run file (system, temperature, method, ...)")
    p.add_argument("--preset", choices=list_presets(), help="a built-in run file instead of CONFIG")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="override max_steps (may change on resume)")
    p.add_argument("--budget", type=float, help="override the energy-evaluation budget (may change on resume)")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the device (may change on resume)")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw weighted samples from a trained generator")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output .npz (positions nm, log_q, reduced_energy, log_weights)")
    p.add_argument("--pdb", help="also write a topology PDB (first frame)")
    p.add_argument("--dcd", help="also write a DCD trajectory (the resampled frames with --resample)")
    p.add_argument("--weights", help="also write the normalised weights as .npy or .csv")
    p.add_argument("--resample", type=int, metavar="M", help="systematic resampling to M unweighted frames")
    p.add_argument("--temperature", type=float, help="reweight the samples to this temperature (K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1000)
    common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="metrics of a trained generator (JSON)")
    p.add_argument("run_dir")
    p.add_argument("--reference", help="reference frames: the .npz of reference-md, or your own trajectory "
                                        "(DCD, XTC, netCDF, PDB, ... read by mdtraj with the run's topology)")
    p.add_argument("--n", type=int, help="samples per draw (default: the run's report.n_samples)")
    p.add_argument("--draws", type=int, help="independent draws (default: the run's report.n_draws)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="also write the JSON here (always written to RUN_DIR/evaluation.json)")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reference-md", help="replica-exchange reference samples (openmmtools)")
    p.add_argument("system", help="built-in system name, run YAML file or run directory")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--temperature", type=float, help="target temperature in K (default 300 or the run file's)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--steps-per-iteration", dest="steps_per_iteration", type=int, default=500)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--t-max", dest="t_max", type=float, default=600.0)
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--equilibration", type=int, default=0, help="iterations left out of the npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", help="netCDF storage (default: OUT with .nc)")
    p.add_argument("--restart", action="store_true", help="discard existing storage instead of resuming")
    p.add_argument("--platform", default="Reference")
    common(p)
    p.set_defaults(func=cmd_reference_md)

    p = sub.add_parser("demo", help="the README's main job: train aldp-quick, sample, reweight, plot")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="aldp-quick", choices=list_presets())
    p.add_argument("--n", type=int, default=10_000, help="samples written to OUT/samples.npz")
    common(p)
    p.set_defaults(func=cmd_demo)

    from .bridge_remd import add_parser as add_bridge_remd

    add_bridge_remd(sub)

    p = sub.add_parser("presets", help="list presets and systems, or print one preset as YAML")
    p.add_argument("name", nargs="?", choices=list_presets())
    p.set_defaults(func=cmd_presets)
    return parser


def _version() -> str:
    from .. import __version__

    return f"cmt-openmm {__version__}"


def _one_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.endswith((".", "?", "!")) else text + "."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cmt-openmm`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.stdout = sys.stdout  # results go here; library chatter (banners) is sent to stderr
    try:
        if hasattr(args, "threads"):
            if args.threads is not None and args.threads < 1:
                raise CMTInputError(f"--threads must be at least 1, got {args.threads}.")
            import torch

            torch.set_num_threads(args.threads or 1)  # train() then applies the run's own `threads`
        with contextlib.redirect_stdout(sys.stderr):
            return int(args.func(args) or 0)
    except CMTInputError as exc:
        message = _one_sentence(exc)
    except FileNotFoundError as exc:
        message = f"file not found: {exc.filename or exc}; check the path."
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        message = f"cannot use {exc.filename}: {exc.strerror.lower() if exc.strerror else exc}."
    except KeyboardInterrupt:
        print("cmt-openmm: interrupted; a training run continues with --resume.", file=sys.stderr)
        return 130
    print(f"cmt-openmm {args.command}: error: {message}", file=sys.stderr)
    return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
