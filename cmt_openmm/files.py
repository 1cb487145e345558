"""Writing files so that a crash never leaves a half-written one: the one home of atomic writes.

Every file the package writes (checkpoints, generators, reports, plots, samples, reference
frames) goes through :func:`atomic_writer`: the bytes land in a temporary file beside the
target, are flushed to disk, and replace the target in one ``os.replace``. A reader therefore
sees the old file or the new one, never a mixture; a full disk or a read-only or forbidden folder
leaves the old one and raises :class:`~cmt_openmm.errors.CMTWriteError` naming the path, the
reason and what to do. :func:`to_json` writes numpy scalars and arrays and paths as plain JSON.
:func:`cache_dir` names the per-machine cache folders (compiled kernels, compile-probe verdicts);
:func:`c_stdout_silenced` keeps what C readers print (mdtraj's DCD plugin) off the process's stdout.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from .errors import CMTWriteError

#: errno of a write refused for lack of room or rights -> what the person can do about it
_WRITE_FAILURES = {
    errno.ENOSPC: "free space and write it again",
    errno.EDQUOT: "free space or raise the quota and write it again",
    errno.EROFS: "write to another folder",
    errno.EACCES: "make the folder writable or write to another one",
    errno.EPERM: "make the folder writable or write to another one",
    errno.EIO: "check the disk and write it again",
}


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` when the block ends without error.

    The temporary file keeps ``path``'s suffix (some writers, e.g. matplotlib, choose the format
    by it) and is removed when the block raises. A write refused for lack of room or rights (an
    ``OSError`` of the handle, the temporary file or the replacement, errno in ``_WRITE_FAILURES``)
    raises :class:`~cmt_openmm.errors.CMTWriteError` instead.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno not in _WRITE_FAILURES or error.filename not in (None, str(tmp)):
            raise  # not this write's (e.g. a file the block reads)
        before = "the previous file is intact" if os.path.exists(path) else "no file was left there"
        raise CMTWriteError(f"cannot write {path}: {os.strerror(error.errno).lower()} (errno {error.errno}); "
                            f"{before}; {_WRITE_FAILURES[error.errno]}.") from error
    finally:
        with contextlib.suppress(OSError):  # a folder turned read-only refuses this too; the error above matters
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


@contextlib.contextmanager
def c_stdout_silenced() -> Iterator[None]:
    """Send what is written to file descriptor 1 (the process's stdout) inside the block to
    /dev/null, and restore it after.

    C libraries print there directly, past Python's ``sys.stdout`` (mdtraj's DCD plugin prints
    "dcdplugin) detected standard 32-bit DCD file ..." on every read), which would corrupt a
    command's JSON on stdout. Python's and C's buffered output are flushed before and after, so
    nothing written before the block is lost and nothing written inside it leaks out later.
    """
    libc = ctypes.CDLL(None)
    if sys.stdout is not None:
        sys.stdout.flush()
    libc.fflush(None)
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


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
