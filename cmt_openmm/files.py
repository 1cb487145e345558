"""Writing files so that a crash never leaves a half-written one: the one home of atomic writes.

Every file the package writes (checkpoints, generators, reports, plots, samples, reference
frames) goes through :func:`atomic_writer`: the bytes land in a temporary file beside the
target, are flushed to disk, and replace the target in one ``os.replace``. A reader therefore
sees the old file or the new one, never a mixture. :func:`to_json` writes numpy scalars and
arrays and paths as plain JSON.
:func:`cache_dir` names the per-machine cache folders (compiled kernels, compile-probe verdicts).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` when the block ends without error.

    The temporary file keeps ``path``'s suffix (some writers, e.g. matplotlib, choose the format
    by it) and is removed when the block raises.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_writer(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def cache_dir(*parts: str) -> Path:
    """A folder of the package's per-machine cache: ``~/.cache/cmt-openmm/<parts>``
    (``$XDG_CACHE_HOME`` instead of ``~/.cache`` where set); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "cmt-openmm", *parts)


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python values, paths as strings."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def to_json(obj: Any) -> str:
    """Indented JSON text of ``obj`` (with :func:`json_default`), ending in a newline."""
    return json.dumps(obj, indent=2, default=json_default) + "\n"
