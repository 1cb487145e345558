"""Whether ``torch.compile``-d TorchEnergy chunks are safe here: probed once in a subprocess, cached.

Compiled chunks are several times faster than eager torch on CPUs, but compiled code can crash
the process (inductor has generated code that read a strided view out of bounds), and a
segfault cannot be caught in-process. :func:`compile_verdict` therefore compiles and checks the
energy in a fresh Python process (``python -m cmt_openmm.energy.torch.compile_probe SPEC REPORT``,
:func:`probe`): it builds the TorchEnergy of the same System with the same dtype, device and
chunk sizes, compiles the chunks with and without gradients, evaluates a batch of perturbed
structures (plus one with non-finite positions) that fills whole and padded compiled chunks,
and compares energies and forces with the eager path and with OpenMM's Reference platform, at
the tolerances of :mod:`.verification`. It writes a JSON report (errors, timings per
configuration of compiled, eager and OpenMM). A probe that crashes (signal or non-zero exit),
does not finish within ``PROBE_TIMEOUT`` seconds, or disagrees gives the verdict "unsafe" with
its reason in one sentence; :func:`judge` reads a report.

The verdict is cached in ``~/.cache/cmt-openmm/compile-probes`` (beside the spline kernels:
``$XDG_CACHE_HOME``), one JSON file per key, written atomically. The key (:func:`key_parts`)
hashes what a compiled kernel depends on: the System's fingerprint, dtype, device type, the
compiled chunk sizes (fixed shapes, from the thread count), the torch version, the CPU
(architecture, torch's SIMD level, feature flags), the source of the torch terms and the
probe's own version. A damaged or foreign cache file is ignored and the probe runs again.

``CMT_OPENMM_COMPILE=0`` turns compiling off for :func:`~cmt_openmm.energy.select.make_energy`
(no probe, no compiled chunks, whatever ``compile`` says): :func:`enabled`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...files import atomic_write, to_json
from ...files import cache_dir as _cache_dir

if TYPE_CHECKING:
    from .energy import TorchEnergy

__all__ = ["ENVIRONMENT_VARIABLE", "PROBE_TIMEOUT", "compile_verdict", "enabled", "judge", "key_parts", "probe"]

ENVIRONMENT_VARIABLE = "CMT_OPENMM_COMPILE"
PROBE_TIMEOUT = 300.0  # seconds; compiling two chunk functions takes tens of seconds on a loaded CPU
_PROBE_VERSION = 1  # raised when the probe checks something new: older verdicts are not reused
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding cmt_openmm, for the child's path
_WARNED: set[str] = set()  # keys whose "unsafe" verdict was warned about in this process


def enabled() -> bool:
    """False when ``CMT_OPENMM_COMPILE=0``: make_energy then never compiles nor probes."""
    return os.environ.get(ENVIRONMENT_VARIABLE, "1") != "0"


def cache_dir() -> Path:
    """``~/.cache/cmt-openmm/compile-probes`` (``$XDG_CACHE_HOME``), beside the spline kernels."""
    return _cache_dir("compile-probes")


def _cpu() -> str:
    """The CPU as compiled code sees it: architecture, torch's SIMD level and the feature flags
    (inductor compiles for the CPU it runs on; a shared home folder may serve several CPUs)."""
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(), flags or platform.processor()])


def _source_hash() -> str:
    """sha256 of the torch terms' source: what the compiled graph is traced from."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key_parts(energy: "TorchEnergy") -> dict[str, Any]:
    """What a verdict about ``energy``'s compiled chunks depends on (hashed by :func:`verdict_key`)."""
    sizes = energy.compiled_chunk_sizes
    return {
        "probe": _PROBE_VERSION,
        "system": energy.target.system_fingerprint(),
        "dtype": str(energy.dtype).replace("torch.", ""),
        "device": energy.device.type,
        "chunk_sizes": [sizes[True], sizes[False]],
        "torch": torch.__version__,
        "cpu": _cpu(),
        "source": _source_hash(),
    }


def verdict_key(parts: dict[str, Any]) -> str:
    """A file-name-safe hash of :func:`key_parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def read_verdict(path: Path, key: str) -> dict[str, Any] | None:
    """The cached verdict for ``key`` at ``path``, or None when missing, damaged or for another key."""
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    valid = (isinstance(verdict, dict) and verdict.get("key") == key and isinstance(verdict.get("safe"), bool)
             and isinstance(verdict.get("reason"), str))
    return verdict if valid else None


def compile_verdict(energy: "TorchEnergy", timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """Whether ``energy``'s compiled chunks are safe here: the cached verdict, else a fresh probe
    (:func:`run_probe`, cached). Returns ``{"safe", "reason", "key", "path", "probed", ...}``;
    ``probed`` is True when this call ran the probe. An "unsafe" verdict warns once per process."""
    parts = key_parts(energy)
    key = verdict_key(parts)
    path = cache_dir() / f"{key}.json"
    verdict = read_verdict(path, key)
    if verdict is None:  # the target's name and the key's parts are kept for people reading the file
        verdict = {"key": key, "target": getattr(energy.target, "name", None), "key_parts": parts,
                   **run_probe(energy, timeout)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, to_json(verdict))
        except OSError as error:
            warnings.warn(f"The compile probe's verdict cannot be cached in {path.parent} ({error.strerror or error}), "
                          "so the next run probes again.", stacklevel=3)
        verdict["probed"] = True
    else:
        verdict["probed"] = False
    verdict["path"] = str(path)
    if not verdict["safe"] and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"Energies of {getattr(energy.target, 'name', 'the target')} stay eager in torch: "
                      f"{verdict['reason'].rstrip('.')} (delete {path} to probe again, or set energy compile: false "
                      "to skip the probe).", stacklevel=3)
    return verdict


def probe_command(spec: Path, report: Path) -> list[str]:
    """The command that probes the energy described in ``spec`` and writes ``report``."""
    return [sys.executable, "-m", "cmt_openmm.energy.torch.compile_probe", str(spec), str(report)]


def run_probe(energy: "TorchEnergy", timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """Run :func:`probe` for ``energy`` in a fresh process (its own session, so a timeout ends
    inductor's compile workers too) and judge it: ``{"safe", "reason", "probe_seconds", "report"}``."""
    start = time.perf_counter()

    def verdict(safe: bool, reason: str, report: dict | None = None) -> dict[str, Any]:
        return {"safe": safe, "reason": reason, "probe_seconds": round(time.perf_counter() - start, 3),
                "report": report}

    try:
        spec = {"target": energy.target.to_dict(), "dtype": str(energy.dtype).replace("torch.", ""),
                "device": str(energy.device), "n_threads": energy.n_threads, "chunk_size": energy._chunk_size}
    except Exception as error:  # a target that cannot be written as data cannot be probed
        return verdict(False, f"the target cannot be handed to the compile probe ({type(error).__name__})")
    with tempfile.TemporaryDirectory(prefix="cmt-openmm-probe-") as folder:
        spec_path, report_path = Path(folder) / "spec.json", Path(folder) / "report.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")])))
        process = subprocess.Popen(probe_command(spec_path, report_path), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return verdict(False, f"the compile probe did not finish within {timeout:.0f} s")
        except BaseException:  # e.g. KeyboardInterrupt: leave no probe behind
            _kill_group(process)
            raise
        code = process.returncode
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return verdict(False, f"the compile probe crashed ({name})")
        if code != 0:
            last = (stderr.strip().splitlines() or ["no message"])[-1][:200]
            return verdict(False, f"the compile probe failed with exit code {code} ({last.rstrip('.')})")
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            return verdict(False, "the compile probe exited without a readable report")
    safe, reason = judge(report)
    return verdict(safe, reason, report)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.communicate()


def judge(report: Any) -> tuple[bool, str]:
    """(safe, reason in one sentence) of a probe report: safe when compiled chunks were used, the
    failures (+inf, zero gradient) are the eager path's, and every error is within tolerance."""
    try:
        if not report["compiled"]:
            return False, f"torch.compile failed in the compile probe ({report.get('compile_error') or 'no reason'})"
        tolerances = report["tolerances"]
        errors = report["max_relative_errors"]
        checks = [(against, kind, float(errors[against][kind]), float(tolerances[kind.split("_")[0]]))
                  for against in ("eager", "openmm") for kind in ("energy", "force", "energy_only")]
        failures_agree = report["failures_agree"] is True
    except (KeyError, TypeError, ValueError, AttributeError):
        return False, "the compile probe's report is incomplete"
    if not failures_agree:
        return False, "compiled chunks flag other configurations as failed than eager torch does"
    for against, kind, error, tolerance in checks:
        if not error <= tolerance:  # NaN disagrees too
            what = {"energy": "energy", "force": "force", "energy_only": "energy (without gradients)"}[kind]
            name = {"eager": "eager torch", "openmm": "OpenMM's Reference platform"}[against]
            return False, (f"compiled torch energies disagree with {name}: relative {what} error {error:.2e} "
                           f"(tolerance {tolerance:.0e})")
    largest = max(error for *_, error, _ in checks)
    return True, f"compiled energies and forces agree with eager torch and OpenMM (largest relative error {largest:.1e})"


# -- the probe itself (in the subprocess) ---------------------------------------------------------
def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile the TorchEnergy of ``spec`` (target data, dtype, device, threads, chunk size) and
    compare it with eager torch and OpenMM Reference on a batch that fills two whole compiled
    chunks and a padded one, with gradients and without; the report :func:`judge` reads."""
    from ...target import Target
    from .energy import TorchEnergy
    from .verification import (ENERGY_TOLERANCE, FLOAT32_ENERGY_TOLERANCE, FLOAT32_FORCE_TOLERANCE, FORCE_TOLERANCE,
                               _openmm_by_term, _relative_errors, verification_structures)

    target = Target.from_dict(spec["target"], "the probe's target")
    dtype = getattr(torch, spec["dtype"])
    options = {"device": spec["device"], "dtype": dtype, "verify": False, "n_threads": spec["n_threads"],
               "chunk_size": spec.get("chunk_size")}
    eager = TorchEnergy(target, compile=False, **options)
    compiled = TorchEnergy(target, compile=True, **options)
    size = max(compiled.compiled_chunk_sizes.values())
    n_high = 8
    n_scaled = 4  # the compressed and stretched structures (no cutoff distances passed)
    n_perturbed = max(0, 2 * size + size // 2 - n_high - n_scaled)
    x = verification_structures(np.asarray(target.positions, float), n_perturbed, n_high, n_wide=0)
    x = np.concatenate([x, np.full((1, *x.shape[1:]), np.nan)])  # a failure, found inside the chunk
    kT = float(target.kT)

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # a failed torch.compile warns and stays eager
        warnings.simplefilter("always")
        compiled.energy_and_forces(x[:1])
        compiled(torch.as_tensor(x[:1]))  # energies only: their own compiled function
    compile_seconds = time.perf_counter() - start
    used = compiled.compile is True and compiled._compiled is not None and compiled._compiled_energy is not None
    report: dict[str, Any] = {
        "compiled": bool(used),
        "compile_error": None if used else "; ".join(str(w.message) for w in caught) or "no compiled function",
        "n_configurations": int(len(x)),
        "chunk_sizes": {"gradient": compiled.compiled_chunk_sizes[True], "energy": compiled.compiled_chunk_sizes[False]},
        "n_threads": compiled.n_threads,
        "compile_seconds": round(compile_seconds, 3),
    }
    if not used:
        return report

    def timed(energy) -> tuple[np.ndarray, np.ndarray, float]:
        best = np.inf
        for _ in range(2):
            start = time.perf_counter()
            u, f = energy.energy_and_forces(x)
            best = min(best, time.perf_counter() - start)
        return u, f, best / len(x)

    u_c, f_c, t_c = timed(compiled)
    u_e, f_e, t_e = timed(eager)
    with torch.no_grad():
        u_c_only = compiled(torch.as_tensor(x)).to(torch.float64).numpy()
    ok = np.isfinite(x).all(axis=(1, 2))
    start = time.perf_counter()
    e_ref, f_ref, _, _ = _openmm_by_term(target.system, [], x[ok])
    t_o = (time.perf_counter() - start) / int(ok.sum())
    ref_ok = np.isfinite(e_ref) & np.isfinite(f_ref).all(axis=(1, 2))
    eager_ok = np.isfinite(u_e)

    def errors(u, f, u_ref, f_ref) -> tuple[float, float]:
        if len(u) == 0:
            return 0.0, 0.0
        e_err, f_err = _relative_errors(u * kT, f * kT, u_ref, f_ref, kT)
        return float(np.max(e_err)), float(np.max(f_err))

    vs_eager = errors(u_c[eager_ok], f_c[eager_ok], u_e[eager_ok] * kT, f_e[eager_ok] * kT)
    vs_openmm = errors(u_c[ok][ref_ok], f_c[ok][ref_ok], e_ref[ref_ok], f_ref[ref_ok])
    only_eager = errors(u_c_only[eager_ok], f_e[eager_ok], u_e[eager_ok] * kT, f_e[eager_ok] * kT)[0]
    only_openmm = errors(u_c_only[ok][ref_ok], f_ref[ref_ok] / kT, e_ref[ref_ok], f_ref[ref_ok])[0]
    failed_c, failed_e = ~np.isfinite(u_c), ~eager_ok
    float32 = dtype == torch.float32
    report.update({
        "tolerances": {"energy": FLOAT32_ENERGY_TOLERANCE if float32 else ENERGY_TOLERANCE,
                       "force": FLOAT32_FORCE_TOLERANCE if float32 else FORCE_TOLERANCE},
        "max_relative_errors": {
            "eager": {"energy": vs_eager[0], "force": vs_eager[1], "energy_only": only_eager},
            "openmm": {"energy": vs_openmm[0], "force": vs_openmm[1], "energy_only": only_openmm},
        },
        "failures_agree": bool(np.array_equal(failed_c, failed_e) and np.array_equal(failed_c, ~np.isfinite(u_c_only))
                               and np.all(f_c[failed_c] == 0)),
        "seconds_per_configuration": {"compiled": t_c, "eager": t_e, "openmm_reference": t_o},
    })
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m cmt_openmm.energy.torch.compile_probe SPEC.json REPORT.json``."""
    spec_path, report_path = (sys.argv[1:] if argv is None else argv)[:2]
    report = probe(json.loads(Path(spec_path).read_text()))
    atomic_write(report_path, to_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
