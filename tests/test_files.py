"""Atomic writes on a full disk or in a read-only folder: the previous file stays, no temporary
file is left, and one sentence names the path, the reason and what to do."""
import errno
import io
import os

import pytest

from cmt_openmm import files
from cmt_openmm.errors import CMTInputError, CMTWriteError
from cmt_openmm.files import atomic_write, atomic_writer


class _FullDisk(io.FileIO):
    """A file whose disk fills after 4 bytes: ``write`` then raises ENOSPC."""

    def write(self, data):
        if self.tell() + len(data) > 4:
            super().write(bytes(data)[: max(0, 4 - self.tell())])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _fail(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("step", ["write", "fsync", "replace"])
def test_full_disk_leaves_the_previous_file_and_says_which_path_and_why(tmp_path, monkeypatch, step):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous checkpoint")
    if step == "write":
        monkeypatch.setattr(files, "open", _FullDisk, raising=False)  # atomic_writer's open(tmp, "wb")
    else:
        monkeypatch.setattr(files.os, step, _fail(errno.ENOSPC))
    with pytest.raises(CMTWriteError) as error:
        atomic_write(path, b"new checkpoint, longer than the disk has room for")
    monkeypatch.undo()
    assert str(error.value) == (f"cannot write {path}: no space left on device (errno 28); the previous file is "
                                "intact; free space and write it again.")
    assert isinstance(error.value, CMTInputError) and isinstance(error.value, OSError)  # one sentence; caches tolerate it
    assert error.value.__cause__.errno == errno.ENOSPC
    assert path.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # the temporary file is gone


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_read_only_folder_leaves_the_previous_file_and_says_which_path_and_why(tmp_path, monkeypatch, code):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "report.json").write_text("{}\n")
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0 or code == errno.EROFS:  # root writes through chmod; no read-only mount here
            def refused(file, *args, **kwargs):
                raise OSError(code, os.strerror(code), str(file))

            monkeypatch.setattr(files, "open", refused, raising=False)
        with pytest.raises(CMTWriteError) as old, atomic_writer(folder / "report.json") as handle:
            handle.write(b'{"new": 1}\n')
        with pytest.raises(CMTWriteError) as new:
            atomic_write(folder / "plot.png", b"png")
    finally:
        folder.chmod(0o755)
    reason, todo = {errno.EACCES: ("permission denied (errno 13)", "make the folder writable or write to another one"),
                    errno.EROFS: ("read-only file system (errno 30)", "write to another folder")}[code]
    assert str(old.value) == f"cannot write {folder / 'report.json'}: {reason}; the previous file is intact; {todo}."
    assert str(new.value) == f"cannot write {folder / 'plot.png'}: {reason}; no file was left there; {todo}."
    assert (folder / "report.json").read_text() == "{}\n" and os.listdir(folder) == ["report.json"]


def test_errors_that_are_not_the_write_pass_through(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(FileNotFoundError) as missing, atomic_writer(path) as handle:
        handle.write(open(tmp_path / "absent.json", "rb").read())  # a file the block reads
    with pytest.raises(PermissionError) as other, atomic_writer(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "elsewhere"))
    assert not isinstance(missing.value, CMTWriteError) and not isinstance(other.value, CMTWriteError)
    assert os.listdir(tmp_path) == []
