"""The spline of :mod:`.splines` as one compiled C++ loop (``spline_kernel.cpp``) on CPUs.

Why by hand: at the batch sizes of training (256-4,096 samples, ~30 coordinates per layer) the
torch formulation of a coupling layer's spline is ~45 operations forward and ~50 backward on
tensors of a few thousand numbers each, and their fixed cost and memory passes, not arithmetic,
set the speed; on a few threads most of them are too small to be split. The loop computes each
element's spline in registers (columns vectorised with the CPU's SIMD instructions, exp and log
from glibc's vector library) and recomputes the forward quantities in the backward pass rather
than saving ~20 tensors. It runs on the calling thread: splitting the columns over threads
(``ctypes`` releases the GIL) was slower or no faster, the hand-offs competing with torch's own
threads. torch.compile was no faster for the same purpose (its gathers and scatters) and crashed
on CPU (see :func:`~.splines.spline_forward`). Timings: ``benchmarks/RESULTS.md``.

The library is compiled once per machine (C++ compiler ``$CXX`` or ``c++``; ``-O3 -march=native
-ffast-math``) into ``~/.cache/cmt-openmm/kernels`` (``$XDG_CACHE_HOME``), keyed by the source,
the flags, the compiler and the CPU's features, written atomically. Without a compiler, or with
``CMT_OPENMM_SPLINE_KERNEL=0``, :mod:`.splines` uses its torch operations (same values to
rounding; ``tests/flows/test_flows.py`` compares both, values and gradients).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..files import cache_dir

_SOURCE = Path(__file__).with_name("spline_kernel.cpp")
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c++17"]
# compiled, then linked apart: gcc < 13 links crtfastmath.o into a -shared -ffast-math library, whose
# constructor flushes denormals to zero in the whole process (numpy, torch, OpenMM) when it loads
_LINK_FLAGS = ["-shared"]
_FUNCTIONS = {torch.float32: "cmt_rq_spline_f32", torch.float64: "cmt_rq_spline_f64"}
_ARGTYPES = (
    [ctypes.c_int64] * 3 + [ctypes.c_int32] * 2 + [ctypes.c_double] * 2  # K, D, B, inverse, backward, limits
    + [ctypes.c_void_p, ctypes.c_int64]  # x
    + [ctypes.c_void_p] + [ctypes.c_int64] * 3  # bins
    + [ctypes.c_void_p] + [ctypes.c_int64] * 2  # derivatives
    + [ctypes.c_void_p, ctypes.c_int64] * 5  # out, logdet, g_out, g_logdet, g_x
    + [ctypes.c_void_p] + [ctypes.c_int64] * 3  # g_bins
    + [ctypes.c_void_p] + [ctypes.c_int64] * 2  # g_derivatives
)

_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None | bool = None  # False: tried and unavailable


def _cache_dir() -> Path:
    return cache_dir("kernels")


def _cpu_features() -> str:
    """The CPU's feature flags (a library built with -march=native must not move to another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS + _LINK_FLAGS).encode(), version.encode(),
                                     _cpu_features().encode()])).hexdigest()[:20]
    path = _cache_dir() / f"spline_kernel_{key}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built, objects = Path(tmp) / path.name, Path(tmp) / "spline_kernel.o"
            for command in ([compiler, *_FLAGS, "-c", str(_SOURCE), "-o", str(objects)],
                            [compiler, *_LINK_FLAGS, str(objects), "-o", str(built)]):
                proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            os.replace(built, path)  # atomic: another process sees the whole library or none
    library = ctypes.CDLL(str(path))
    for name in _FUNCTIONS.values():
        function = getattr(library, name)
        function.argtypes, function.restype = _ARGTYPES, None
    return library


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be (with one warning)."""
    global _LIBRARY
    if os.environ.get("CMT_OPENMM_SPLINE_KERNEL", "1") == "0":
        return None
    if _LIBRARY is None:
        with _LOCK:
            if _LIBRARY is None:
                try:
                    _LIBRARY = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    warnings.warn(f"The compiled spline kernel is unavailable ({error}); the flow uses torch "
                                  "operations (same values, slower on CPUs).", stacklevel=3)
                    _LIBRARY = False
    return _LIBRARY or None


def applies(x: Tensor, bins: Tensor, derivatives: Tensor) -> bool:
    """Whether the kernel takes these tensors: CPU, float32/64, x (D, B) with bins (K, 2, D, B) and
    derivatives (K + 1, D, B), every last dimension contiguous."""
    return (x.device.type == "cpu" and x.dtype in _FUNCTIONS and x.dim() == 2 and bins.dim() == 4
            and derivatives.dim() == 3 and bins.dtype == derivatives.dtype == x.dtype
            and bins.shape[1] == 2 and bins.shape[2:] == x.shape and derivatives.shape[1:] == x.shape
            and derivatives.shape[0] == bins.shape[0] + 1
            and x.stride(1) == 1 and bins.stride(3) == 1 and derivatives.stride(2) == 1
            and library() is not None)


def forward(x: Tensor, bins: Tensor, derivatives: Tensor, inverse: bool, min_bin: float,
            min_derivative: float) -> tuple[Tensor, Tensor]:
    """The spline's values (D, B) and log|det| per element (D, B) (see :func:`applies` for the shapes)."""
    out, logdet = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x)
    _run(inverse, False, min_bin, min_derivative, x, bins, derivatives, out=out, logdet=logdet)
    return out, logdet


def backward(x: Tensor, bins: Tensor, derivatives: Tensor, grad_out: Tensor, grad_logdet: Tensor, inverse: bool,
             min_bin: float, min_derivative: float, out_bins: Tensor | None = None,
             out_derivatives: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (x, bins, derivatives) from those of (out, logdet), (D, B) each with contiguous
    columns (grad_logdet may be expanded over rows); written into ``out_bins``/``out_derivatives``
    (any strides with contiguous columns) where given."""
    g_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    g_bins = torch.empty(bins.shape, dtype=x.dtype) if out_bins is None else out_bins
    g_derivatives = torch.empty(derivatives.shape, dtype=x.dtype) if out_derivatives is None else out_derivatives
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if grad_logdet.stride(-1) != 1:
        grad_logdet = grad_logdet.contiguous()
    for name, t, like in (("grad_out", grad_out, x), ("grad_logdet", grad_logdet, x), ("out_bins", g_bins, bins),
                          ("out_derivatives", g_derivatives, derivatives)):
        # the loop writes and reads through raw pointers: a mismatch must stop here, not overrun memory
        if t.shape != like.shape or t.dtype != x.dtype or t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError(f"spline_kernel.backward: {name} is {tuple(t.shape)} {t.dtype} on {t.device}; "
                             f"it must be {tuple(like.shape)} {x.dtype} on the CPU with contiguous columns.")
    _run(inverse, True, min_bin, min_derivative, x, bins, derivatives, g_out=grad_out, g_logdet=grad_logdet,
         g_x=g_x, g_bins=g_bins, g_derivatives=g_derivatives)
    return g_x, g_bins, g_derivatives


def _run(inverse: bool, backward: bool, min_bin: float, min_derivative: float, x: Tensor, bins: Tensor,
         derivatives: Tensor, out: Tensor | None = None, logdet: Tensor | None = None, g_out: Tensor | None = None,
         g_logdet: Tensor | None = None, g_x: Tensor | None = None, g_bins: Tensor | None = None,
         g_derivatives: Tensor | None = None) -> None:
    """Call the kernel on every column of x."""
    function = getattr(library(), _FUNCTIONS[x.dtype])

    def rows(t: Tensor | None) -> tuple[int | None, int]:  # pointer and row stride of a (D, B) array
        return (None, 0) if t is None else (t.data_ptr(), t.stride(0))

    args = [
        bins.shape[0], x.shape[0], x.shape[1], int(inverse), int(backward), min_bin, min_derivative,
        *rows(x), bins.data_ptr(), *bins.stride()[:3], derivatives.data_ptr(), *derivatives.stride()[:2],
        *rows(out), *rows(logdet), *rows(g_out), *rows(g_logdet), *rows(g_x),
        *((g_bins.data_ptr(), *g_bins.stride()[:3]) if g_bins is not None else (None, 0, 0, 0)),
        *((g_derivatives.data_ptr(), *g_derivatives.stride()[:2]) if g_derivatives is not None else (None, 0, 0)),
    ]
    function(*args)
