"""What a long training run meets: a second writer.

- **One writer.** :func:`training_lock` holds ``train.lock`` in the run directory while a process
  trains there (``fcntl.flock``: the system releases it when the process dies, even by SIGKILL),
  so a second ``train`` into it is refused instead of interleaving two runs' records and
  checkpoints. Readers (sampling, reports) never take it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import warnings
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None

from ..errors import CMTInputError

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def training_lock(run_dir: str | os.PathLike, mark: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s ``train.lock`` (``fcntl.flock``; the file and folder are made if
    missing) for the block, or refuse in one sentence while another process holds it. The system
    releases it when the process ends, however it ends. ``mark`` writes this process's id and
    host into the file while held, for the refusal to name. Where the file system has no locks
    (some Lustre and NFS mounts), a warning says so and the block runs unlocked.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:  # "a+": no truncation before the lock is ours
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "whose id is not written yet"
            raise CMTInputError(f"another process ({holder}) is training the run in {run_dir}; wait for it to end "
                                "or stop it, then train there again.") from None
        except OSError as error:  # e.g. a Lustre mount without flock: go on unlocked, but say so
            if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            warnings.warn(f"cannot lock {run_dir} ({os.strerror(error.errno).lower()}); make sure that no other "
                          "process trains it meanwhile.", stacklevel=3)
        if mark:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        try:
            yield
        finally:
            if mark:
                handle.truncate(0)
