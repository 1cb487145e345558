"""Runs: a training run directory as one library object, its run files and the built-in presets.

- :mod:`.run`: :class:`Run` (create or open a run directory; train, sample, evaluate) and :func:`report`;
- :mod:`.run_files`: run files (YAML) validated into a :class:`RunSpec`;
- :mod:`.presets`: the built-in run configurations (``cmt-openmm presets``).
"""
from .presets import get_preset, list_presets
from .run import Run, report
from .run_files import RunSpec, parse_run_config

__all__ = ["Run", "RunSpec", "get_preset", "list_presets", "parse_run_config", "report"]
