"""The ``cmt-openmm`` command line: train, sample, evaluate, mcmc, reference-md, bridge-remd, demo, presets.

Each command parses its arguments, drives a :class:`cmt_openmm.runs.Run` (or the reference-MD
and bridged replica-exchange drivers) and prints: ``train RUN.yaml --out DIR`` (run files:
:mod:`cmt_openmm.runs.run_files`) or ``--preset NAME`` (:mod:`cmt_openmm.runs.presets`) trains
into a run directory and writes its report and plots; ``sample`` and ``evaluate`` work on that
directory; ``mcmc`` runs MD with the trained generator's exact flow moves (the same driver as
``reference-md``, which writes replica-exchange reference frames); ``demo`` is the README's main
job. Commands print progress on stderr and their result (JSON, or the demo's summary) on stdout;
library banners are kept off stdout. Bad input ends with one sentence on stderr and exit code 2,
never a traceback. SIGTERM or SIGINT during training end
``train`` and ``demo`` at the last complete step with one sentence naming the command that
continues the run, and exit code 128 + the signal's number (143, 130), as a shell reports it; a
file that cannot be written during ``train`` (full disk, read-only folder) ends it with one sentence
that names the path, why, and the exact command that continues the run. SIGTERM or SIGINT during
``sample`` remove its half-written files (it writes as it draws), leaving no file under an output's
name, and exit 143 or 130.
argparse rather than click/typer: no extra dependency, and the standard library's behaviour.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Sequence

import yaml

from ..coordinates.backbone import is_peptide
from ..errors import CMTInputError, CMTPeerLost, CMTWriteError
from ..files import atomic_write, json_default, to_json
from ..runs.presets import get_preset, list_presets
from ..runs.run import Run
from ..runs.run_files import build_target, parse_run_config, read_yaml, resolve_system
from ..training.distributed import World, join, launched, leave
from ..training.checkpoints import CHECKPOINT_FILE
from .options import add_storage_options

EXIT_INPUT = 2
SHARED_COMMANDS = ("train", "sample")  # the commands that run under torchrun, sharing their work
TRAIN_OVERRIDES = ("max_steps", "budget", "max_minutes", "seed", "threads", "device")
"""``train`` options that override the run file's settings."""


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    if args.config and args.preset:
        raise CMTInputError("pass either a CONFIG file or --preset, not both.")
    overrides = {key: getattr(args, key, None) for key in TRAIN_OVERRIDES}
    if args.config:
        config = args.config
    elif args.preset:
        config = get_preset(args.preset)
    elif args.resume and Path(args.out).is_dir():
        config = Run.open(args.out).spec
    else:
        raise CMTInputError("name a run file (cmt-openmm train CONFIG.yaml) or a preset (--preset aldp-quick).")
    run = Run.create(args.out, config, overrides=overrides, resume=args.resume)
    finished = run.finished  # train() then returns the stored report
    result = run.train(progress=not args.quiet)
    interrupted = result.get("stop_reason") == "interrupted"
    if not launched().main:  # under torchrun rank 0 alone speaks; the others only train
        return 128 + signal.Signals[result["signal"]] if interrupted else 0
    if interrupted:
        return _interrupted(result, _train_command(args), args)
    if finished or result["training"].get("verdict"):
        _say(finished or result["training"]["verdict"])
    _emit(result, args)
    return 0


def _train_command(args: argparse.Namespace) -> str:
    """The command that continues the ``train`` of ``args``: with ``--resume`` once a checkpoint
    exists (none yet: the same command, to start again), and the command's overrides."""
    out = Path(args.out).expanduser().resolve()
    command = ["cmt-openmm", "train", *([str(Path(args.config).resolve())] if args.config else []),
               *(["--preset", args.preset] if args.preset else []), "--out", str(out),
               *(["--resume"] if (out / CHECKPOINT_FILE).is_file() else [])]
    command += [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in TRAIN_OVERRIDES
                if getattr(args, key, None) is not None]
    return shlex.join(command)


def cmd_sample(args: argparse.Namespace) -> int:
    run = Run.open(args.run_dir)
    world = join("cpu") if launched().size > 1 else World()  # torchrun: share the draw (gloo: chunks go by the CPU)
    try:
        return _sample(run, args, world)
    finally:
        leave(world)


def _sample(run: Run, args: argparse.Namespace, world: World) -> int:
    with _signals_interrupt() as stopped:
        try:
            summary = run.write_samples(
                args.n, args.out, pdb=args.pdb, dcd=args.dcd, weights=args.weights, resample=args.resample,
                seed=args.seed, batch_size=args.batch_size, temperature=args.temperature, progress=not args.quiet,
                world=world)
            if not world.main:
                return 0
        except KeyboardInterrupt:
            name = stopped.name or "SIGINT"
            outputs = ", ".join(str(p) for p in (args.out, args.dcd, args.pdb) if p)
            if world.main:
                _say(f"{name} stopped sampling before its files were complete; nothing was written under {outputs} "
                     "(previous files there are intact), so run the command again.")
            return 128 + signal.Signals[name]
    if "resampled_note" in summary:
        _say(summary["resampled_note"])
    _emit(summary, args)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = Run.open(args.run_dir).evaluate(args.reference, n_samples=args.n, n_draws=args.draws, seed=args.seed,
                                             progress=not args.quiet)
    _say(f"verdict: {result['verdict']['summary']}")
    if args.out:
        atomic_write(Path(args.out), to_json(result))
    _emit(result, args)
    return 0


def cmd_reference_md(args: argparse.Namespace) -> int:
    if Path(args.system).suffix in (".yaml", ".yml"):
        spec = parse_run_config(read_yaml(args.system), Path(args.system).resolve().parent)
        system, temperature = spec.system, args.temperature or spec.temperature
    elif Path(args.system).is_dir():
        spec = Run.open(args.system).spec
        system, temperature = spec.system, args.temperature or spec.temperature
    else:
        system, temperature = resolve_system(args.system, Path.cwd()), args.temperature or 300.0
    summary = _replica_exchange(build_target(system, temperature), args)
    _emit(summary, args)
    return 0


def cmd_mcmc(args: argparse.Namespace) -> int:
    run = Run.open(args.run_dir)
    if not run.trained:
        raise CMTInputError(f"{run.directory} holds no trained generator yet; train it first "
                            f"(cmt-openmm train ... --out {run.directory}).")
    target = run.target if args.temperature is None else build_target(run.spec.system, args.temperature)
    if args.timestep is None:
        args.timestep = target.langevin_timestep_fs
    summary = _replica_exchange(target, args, generator=run.generator, flow_attempts=args.flow_attempts)
    _say(_mcmc_verdict(summary, args))
    _emit(summary, args)
    return 0


def _replica_exchange(target, args: argparse.Namespace, generator=None, flow_attempts: int = 20) -> dict:
    """Run `run_reference_md` with the command's options (``flow_attempts`` flow moves with ``generator``); write and
    return the summary: the frames' provenance and, for a peptide, the φ > 0 populations of the
    target-temperature frames (correlated errors) with their φ transitions, by residue."""
    from ..sampling.reference_md import run_reference_md

    result = run_reference_md(
        target, args.out, n_replicas=args.replicas, t_max=args.t_max, n_iterations=args.iterations,
        steps_per_iteration=args.steps_per_iteration, timestep=args.timestep, seed=args.seed,
        storage=args.storage, resume=not args.restart, progress=not args.quiet,
        n_equilibration=args.equilibration, platform=args.platform, generator=generator,
        flow_attempts=flow_attempts,
    )
    summary = {"out": str(result.path), "n_frames": int(result.positions.shape[0]), **result.provenance}
    if is_peptide(target):
        from ..analysis.metrics import md_populations

        summary["populations"] = md_populations(target, result.positions)
    atomic_write(Path(args.out).with_suffix(".json"), to_json(summary))
    return summary


def _mcmc_verdict(summary: dict, args: argparse.Namespace) -> str:
    """One sentence on an MCMC run: frames, flow-move acceptance at the target temperature and, for a
    peptide, each residue's φ > 0 population with its error and transitions, or how to get more."""
    from ..analysis.metrics import MIN_TRANSITIONS, by_residue
    from ..analysis.report import md_population_text
    from ..sampling.estimators import MIN_EFFECTIVE_SAMPLES

    flow = summary["flow_moves"][0]
    text = (f"{summary['n_frames']:,} frames at {summary['temperature']:g} K; flow moves accepted "
            f"{100 * flow['acceptance']:.1f} % of {flow['n_proposed']:,} proposals")
    if flow["n_proposed"] and not flow["n_accepted"]:
        text += " (none: this chain is MD alone, so train the generator further for moves that cross barriers)"
    if "populations" not in summary:
        return text + "."
    residues = by_residue(summary["populations"]["phi_positive_population"]).values()
    cells = [md_population_text(e) + ("" if e["transitions"] < MIN_TRANSITIONS else f" ({e['transitions']} φ transitions)")
             for e in residues]  # below MIN_TRANSITIONS the text says how few there were
    text += f"; φ > 0 population by residue: {' / '.join(cells)}"
    if any(e.get("reliable") is False for e in residues):
        text += (f"; a population resting on fewer than {MIN_TRANSITIONS} φ transitions or {MIN_EFFECTIVE_SAMPLES:g} "
                 "effective frames is "
                 f"unreliable: run longer (the same command with --iterations {2 * args.iterations} resumes this run)")
    return text + "."


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    resume = (out / CHECKPOINT_FILE).is_file()
    run = Run.from_preset(out, args.preset, resume=resume)
    if resume:
        _say(run.finished or f"{out} already holds a run: resuming it")
    result = run.train(progress=not args.quiet)
    if result.get("stop_reason") == "interrupted":  # demo resumes a run it finds in --out
        return _interrupted(result, shlex.join(["cmt-openmm", "demo", "--out", str(run.directory),
                                                "--preset", args.preset, "--n", str(args.n)]), args)
    run.write_samples(args.n, out / "samples.npz", pdb=out / "samples.pdb", dcd=out / "samples.dcd",
                      weights=out / "weights.npy", resample=args.n, progress=not args.quiet)
    _emit(_demo_summary(result, out), args)
    return 0


class _signals_interrupt(contextlib.AbstractContextManager):
    """Inside the block SIGTERM raises KeyboardInterrupt as SIGINT does, so that the files being
    written are removed as the exception unwinds; ``name`` is the signal's name once one came."""

    def __enter__(self):
        self.name = None
        self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def _raise(self, signum, frame):
        self.name = signal.Signals(signum).name
        raise KeyboardInterrupt

    def __exit__(self, *_):
        signal.signal(signal.SIGTERM, self._previous)


def _interrupted(result: dict, command: str, args: argparse.Namespace) -> int:
    """A run stopped by a signal: say how to continue it, print the result, return 128 + the signal's number."""
    done = (f"after step {result['steps']}, whose checkpoint is in {result['run_dir']}" if result["steps"] else
            "in its first step, before any checkpoint")
    _say(f"{result['signal']} stopped training {done}; continue with: {command}")
    _emit(result, args)
    return 128 + signal.Signals[result["signal"]]


def _demo_summary(result: dict, out: Path) -> str:
    """The demo's closing lines: training, reverse ESS, the phi > 0 population, where the files are."""
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
        if p.get("reliable") is False:  # too few effective samples in or out of the basin: the error is meaningless
            n_eff = p.get("n_effective", 0.0)
            lines.append(f"  phi > 0 basin population (reweighted): unreliable (N_eff = {n_eff:.1f} effective samples)")
        else:
            fmt = ".4f" if p["value"] >= 1e-3 else ".1e"
            lines.append(f"  phi > 0 basin population (reweighted): {p['value']:{fmt}} ± {p['error'] or 0:{fmt}}")
    lines += [f"  report: {out / 'report.md'}", f"  plots: {', '.join(str(out / p) for p in result['plots'])}",
              f"  samples: {out / 'samples.npz'} (+ samples.pdb, samples.dcd resampled, weights.npy)"]
    return "\n".join(lines)


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
    p.add_argument("--max-minutes", dest="max_minutes", type=float,
                   help="override max_minutes, the training time over all stretches of the run (may change on resume)")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the device (may change on resume)")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw weighted samples from a trained generator")
    p.add_argument("run_dir")
    p.add_argument("--n", "--samples", dest="n", type=int, required=True,
                   help="number of samples (--samples under torchrun, which reads --n as its own --nnodes)")
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

    def replica_exchange(p, replicas: int):
        p.add_argument("--out", required=True, help="output .npz (frames of the target temperature; "
                                                     "a .json summary and the netCDF storage beside it)")
        p.add_argument("--iterations", type=int, default=1000, help="iterations in all (a resumed run continues to this)")
        p.add_argument("--steps-per-iteration", dest="steps_per_iteration", type=int, default=500,
                       help="Langevin steps per iteration")
        p.add_argument("--replicas", type=int, default=replicas, help="temperatures of the geometric ladder")
        p.add_argument("--t-max", dest="t_max", type=float, default=600.0, help="the ladder's top temperature, K")
        add_storage_options(p)
        common(p)

    p = sub.add_parser("reference-md", help="replica-exchange reference samples (openmmtools)")
    p.add_argument("system", help="built-in system name, run YAML file or run directory")
    p.add_argument("--temperature", type=float, help="target temperature in K (default 300 or the run file's)")
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    replica_exchange(p, replicas=4)
    p.set_defaults(func=cmd_reference_md)

    p = sub.add_parser("mcmc", help="MD with the trained generator's exact flow moves: populations with error bars")
    p.add_argument("run_dir")
    p.add_argument("--flow-attempts", dest="flow_attempts", type=int, default=20,
                   help="flow proposals after each Langevin segment")
    p.add_argument("--temperature", type=float, help="K (default the run's)")
    p.add_argument("--timestep", type=float, help="fs (default: 2 where the System constrains every bond to "
                   "hydrogen, else 1)")
    replica_exchange(p, replicas=1)
    p.set_defaults(func=cmd_mcmc)

    p = sub.add_parser("demo", help="the README's main job: train aldp-quick, sample, reweight, plot")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="aldp-quick", choices=list_presets())
    p.add_argument("--n", type=int, default=10_000, help="samples written to OUT/samples.npz")
    common(p)
    p.set_defaults(func=cmd_demo)

    from .flow_bridged_remd import add_parser as add_bridge_remd

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


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as the command's own one-line notes on stderr, without Python's file, line and source."""
    print(f"cmt-openmm: warning: {_one_sentence(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cmt-openmm`` console script; returns the exit code."""
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    args.stdout = sys.stdout  # results go here; library chatter (banners) is sent to stderr
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        return _run_command(args)
    finally:
        warnings.showwarning = shown


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a bad input ends in one sentence and exit code 2."""
    try:
        if hasattr(args, "threads"):
            if args.threads is not None and args.threads < 1:
                raise CMTInputError(f"--threads must be at least 1, got {args.threads}.")
            import torch

            torch.set_num_threads(args.threads or 1)  # train() then applies the run's own `threads`
        if launched().size > 1 and args.command not in SHARED_COMMANDS:
            raise CMTInputError(f"cmt-openmm {args.command} runs in one process; run it without torchrun "
                                f"({' and '.join(SHARED_COMMANDS)} share their work among torchrun's processes).")
        with contextlib.redirect_stdout(sys.stderr):
            return int(args.func(args) or 0)
    except CMTWriteError as exc:
        message = _one_sentence(exc)
        if args.command == "train":
            message = f"{message[:-1]}; then continue the run with: {_train_command(args)}"
    except (CMTInputError, CMTPeerLost) as exc:
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
