"""Run files and run directories: what ``cmt-openmm train`` reads, writes and reloads.

A run file (YAML) holds the target (``system``: a built-in name such as ``aldp-vacuum`` or
``toy-double-well``, or a mapping naming the user's files: PDB + force field, Amber prmtop,
GROMACS top/gro, a System XML, an openmmtools test system or a peptide sequence, see
:mod:`cmt_openmm.systems.inputs`; relative paths are relative to the file), ``temperature``
(K), an optional ``report`` section (``n_samples``, ``n_draws``, ``seed``: the flow samples of
the final report), the training settings of :class:`cmt_openmm.training.TrainConfig` (method,
seed, budget, max_steps, flow, energy and the method's section) and optionally a ``preset``
whose settings the file's own complete (:func:`with_preset`)::

    system: aldp-vacuum
    temperature: 300
    method: cmt
    budget: 5e5
    flow: {n_layers: 6, hidden: 64, n_bins: 8}
    cmt: {eps_tr: 0.5, eps_ent: 1.0, n_samples: 2000}

A run directory holds ``run.yaml`` (the validated run file, defaults filled in and paths
made absolute) beside what training writes (``config.yaml``, ``checkpoint.pt``,
``metrics.jsonl``, ``generator.safetensors``), so that ``sample`` and ``evaluate`` can rebuild
the target and load the generator from the directory alone. Every problem with a run file is
a :class:`~cmt_openmm.errors.CMTInputError` of one sentence.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import CMTInputError
from ..units import kelvin

if TYPE_CHECKING:
    from ..training.config import TrainConfig

RUN_FILE = "run.yaml"
_REPORT_DEFAULTS = {"n_samples": 5000, "n_draws": 5, "seed": 1_000_003}


@dataclass
class RunSpec:
    """A run file split into the target's part, the training part and the report settings."""

    system: Any
    temperature: float
    train: TrainConfig
    report: dict

    def to_dict(self) -> dict:
        """The run mapping (YAML-safe), as a run file would hold it."""
        return {"system": self.system, "temperature": self.temperature, **self.train.to_dict(), "report": self.report}


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file, turning missing files and syntax errors into one-sentence errors."""
    path = Path(path)
    if not path.is_file():
        raise CMTInputError(f"config file {path} does not exist; pass the path of a YAML run file.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise CMTInputError(f"config file {path} is not valid YAML ({problem}{where}); fix the file.") from None


def parse_run_config(data: Any, base_dir: str | os.PathLike = ".") -> RunSpec:
    """Validate a run mapping (YAML-parsed) and resolve relative PDB/XML paths against ``base_dir``."""
    from ..training.config import TrainConfig  # imports torch: not at the command line's start

    if not isinstance(data, dict):
        raise CMTInputError("a run file must be a YAML mapping with at least a `system` key.")
    data = with_preset(data)
    if "system" not in data:
        raise CMTInputError("the run file names no `system`; add e.g. `system: aldp-vacuum`.")
    system = resolve_system(data.pop("system"), Path(base_dir))
    temperature = kelvin(data.pop("temperature", 300.0))
    report = data.pop("report", None) or {}
    if not isinstance(report, dict) or set(report) - set(_REPORT_DEFAULTS):
        raise CMTInputError(f"the report section may only set {', '.join(_REPORT_DEFAULTS)}.")
    report = {**_REPORT_DEFAULTS, **report}
    for key, value in report.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
            raise CMTInputError(f"report.{key} must be a positive whole number, got {value!r}.")
    if data.get("method") == "forward_kl" and isinstance(data.get("forward_kl"), dict) and data["forward_kl"].get("data"):
        data["forward_kl"] = {**data["forward_kl"], "data": str(_existing(data["forward_kl"]["data"], base_dir, "forward_kl.data"))}
    return RunSpec(system, temperature, TrainConfig.from_dict(data), report)


def with_preset(data: dict) -> dict:
    """The run mapping with its ``preset`` (a built-in run configuration) filled in: the preset's
    settings, then the mapping's own on top, section by section (``cmt``, ``flow``, ...). Lets a
    user train their own molecule with tuned settings: ``system: {pdb: ...}`` and
    ``preset: ala4-hour``."""
    from .presets import get_preset

    data = dict(data)
    name = data.pop("preset", None)
    if name is None:
        return data
    if not isinstance(name, str):
        raise CMTInputError(f"preset must be the name of a preset (cmt-openmm presets), got {name!r}.")
    merged = get_preset(name)
    for key, value in data.items():
        section = merged.get(key)
        merged[key] = {**section, **value} if isinstance(section, dict) and isinstance(value, dict) else value
    return merged


def _existing(path: str, base_dir: str | os.PathLike, what: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    p = p if p.is_absolute() else Path(base_dir) / p
    if not p.is_file():
        raise CMTInputError(f"{what} file {p} does not exist; fix the path in the run file.")
    return p.resolve()


def resolve_system(system: Any, base_dir: Path) -> Any:
    """The checked ``system`` entry with absolute paths (:func:`cmt_openmm.systems.inputs.resolve_entry`)."""
    from ..systems.inputs import resolve_entry

    return resolve_entry(system, base_dir)


def build_target(system: Any, temperature: float):
    """The Target a (resolved) ``system`` entry names, at ``temperature`` K."""
    from ..systems.inputs import target_from_entry

    return target_from_entry(system, temperature)


def saved_target_entry(target, saved: Path) -> Any:
    """The system entry of a Target saved (:meth:`~cmt_openmm.target.Target.save`) in ``saved``: the
    built-in name when it is that built-in target, else the saved System XML and PDB."""
    from ..systems import get_target, list_targets

    if target.name in list_targets() and \
            get_target(target.name, target.temperature).system_fingerprint() == target.system_fingerprint():
        return target.name
    return {"xml": str(saved / "system.xml"), "pdb": str(saved / "structure.pdb"), "name": target.name}


def run_from_api(run_dir: Path) -> tuple[RunSpec, Any]:
    """A run trained through ``cmt_openmm.train(target, config, run_dir)``: no run file, but its
    ``config.yaml`` and the saved ``target/`` (:func:`saved_target_entry` names it)."""
    from ..target import Target
    from ..training.checkpoints import CONFIG_FILE, TARGET_DIR

    run_dir = Path(run_dir).resolve()
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / TARGET_DIR / "target.json").is_file():
        raise CMTInputError(f"{run_dir} holds neither {RUN_FILE} nor {CONFIG_FILE} with {TARGET_DIR}/; is it a "
                            "directory written by `cmt-openmm train` or cmt_openmm.train(..., run_dir=...)?")
    target = Target.load(run_dir / TARGET_DIR)
    system = saved_target_entry(target, run_dir / TARGET_DIR)
    data = {"system": system, "temperature": target.temperature, **(read_yaml(run_dir / CONFIG_FILE) or {})}
    return parse_run_config(data, run_dir), (None if isinstance(system, str) else target)
