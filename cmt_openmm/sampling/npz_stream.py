"""npz files written and read a block of rows at a time, so that their size is not bounded by memory.

``np.savez`` needs every array in memory; 1e7 samples of alanine dipeptide are 5.3 GB of float64
positions. An npz file is a zip of ``.npy`` members, stored uncompressed by ``np.savez``: a member
whose shape is known in advance can be written block by block (:class:`NpzWriter`), and read
back block by block or memory-mapped (:func:`member_layout`, :func:`iter_rows`, :func:`open_memmap`).
The files are ordinary npz files: ``np.load`` reads them, and these readers read ``np.savez``'s.
"""
from __future__ import annotations

import contextlib
import os
import struct
import zipfile
from typing import BinaryIO, Iterator, NamedTuple

import numpy as np

from ..errors import CMTInputError

_LOCAL_HEADER = 30
"""Bytes of a zip local file header before its file name and extra field."""


class NpzWriter:
    """Write an npz file into ``handle`` (a seekable binary file, e.g. from
    :func:`~cmt_openmm.files.atomic_writer`): :meth:`stream` members row block by row block,
    :meth:`add` whole arrays, then :meth:`close` (which flushes ``handle``). As a context manager
    it closes on leaving the block, or on an error leaves ``handle`` to be discarded.

    Example:
        >>> import io, numpy as np
        >>> buffer = io.BytesIO()
        >>> npz = NpzWriter(buffer)
        >>> with npz.stream("x", (4, 2), np.float64) as x:
        ...     x.write(np.zeros((3, 2))); x.write(np.ones((1, 2)))
        >>> npz.add(n=np.int64(4)); npz.close()
        >>> np.load(io.BytesIO(buffer.getvalue()))["x"].sum()
        np.float64(2.0)
    """

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self._zip = zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def stream(self, name: str, shape: tuple[int, ...], dtype) -> "RowStream":
        """A member ``name`` of ``shape`` (rows first) and ``dtype``, written by :meth:`RowStream.write`."""
        return RowStream(self._zip.open(f"{name}.npy", "w", force_zip64=True), name, tuple(shape), np.dtype(dtype))

    def add(self, **arrays) -> None:
        """Whole members, in the order given (as ``np.savez`` writes them)."""
        for name, value in arrays.items():
            with self._zip.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

    def close(self) -> None:
        """Write the zip directory and flush ``handle`` (it stays open); again, does nothing."""
        if self._zip.fp is not None:
            self._zip.close()
            self.handle.flush()

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:  # an abandoned file: end the zip without raising over the error that abandoned it
            with contextlib.suppress(ValueError, OSError):
                self._zip.close()


class RowStream:
    """One npz member written in row blocks; closing it with fewer or more rows than its shape says
    raises (a file whose header lies would be read wrongly)."""

    def __init__(self, member: BinaryIO, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self._member, self.name, self.shape, self.dtype = member, name, shape, dtype
        self.rows = 0
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(member, header)

    def write(self, block: np.ndarray) -> None:
        """Append rows (b, *shape[1:]) (converted to the member's dtype)."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise CMTInputError(f"{self.name}: rows of shape {block.shape[1:]} after {self.rows} rows do not fit "
                                f"the member's shape {self.shape}.")
        self._member.write(block.data.cast("B"))
        self.rows += len(block)

    def close(self) -> None:
        self._member.close()
        if self.rows != self.shape[0]:
            raise CMTInputError(f"{self.name}: {self.rows} rows written of the {self.shape[0]} its header declares.")

    def __enter__(self) -> "RowStream":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self._member.close()  # the file is being abandoned: no row count to check


class Layout(NamedTuple):
    """Where an uncompressed npz member's data lies: byte ``offset`` in the file, ``dtype``, ``shape``."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


def member_layout(path: str | os.PathLike, name: str) -> Layout:
    """The :class:`Layout` of member ``name`` of the npz file ``path`` (uncompressed, C order)."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(f"{name}.npy")
        except KeyError:
            raise CMTInputError(f"{path} has no array {name!r}; it holds {archive.namelist()}.") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise CMTInputError(f"{path} is compressed (np.savez_compressed); read it with np.load, or save it with "
                            "np.savez to read it in blocks.")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(_LOCAL_HEADER)
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + _LOCAL_HEADER + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(handle)
        if fortran_order:
            raise CMTInputError(f"{path}: array {name!r} is stored in Fortran order; save it in C order.")
        return Layout(handle.tell(), dtype, tuple(shape))


def iter_rows(path: str | os.PathLike, name: str, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) of member ``name``, ``rows`` rows at a time, read from the file in turn."""
    layout = member_layout(path, name)
    row_items = int(np.prod(layout.shape[1:], dtype=np.int64))
    with open(path, "rb") as handle:
        handle.seek(layout.offset)
        for start in range(0, layout.shape[0], rows):
            count = min(rows, layout.shape[0] - start)
            block = np.fromfile(handle, dtype=layout.dtype, count=count * row_items)
            yield start, block.reshape((count,) + layout.shape[1:])


def open_memmap(path: str | os.PathLike, name: str) -> np.memmap:
    """Member ``name`` of the npz file ``path`` as a read-only memory map (pages read when used)."""
    layout = member_layout(path, name)
    return np.memmap(path, dtype=layout.dtype, mode="r", offset=layout.offset, shape=layout.shape)
