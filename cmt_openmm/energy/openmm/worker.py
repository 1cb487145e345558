"""Worker side of OpenMMEnergy: Contexts that evaluate slices of a batch, in spawned processes.

:class:`ContextEvaluator` is one OpenMM Context; :class:`WorkerPool` is a pool of spawned worker
processes that each own one and share the batch through shared memory. Hand-written because
the standard pools do not fit: ``multiprocessing.Pool`` waits forever for a task whose worker
was killed, and both it and ``ProcessPoolExecutor`` pickle every batch through a pipe, a
noticeable share of a small molecule's evaluation. A spawned worker imports this module (and the
package ``__init__`` modules above it, which import nothing), never torch (except for a System
with a TorchForce) or the rest of ``cmt_openmm``, so its start-up is mostly spent re-importing
the parent's ``__main__`` module, as ``spawn`` does. Energies here are in kJ/mol and forces in
kJ/mol/nm; reduction by kT happens in :mod:`cmt_openmm.energy.openmm.energy`.
"""
from __future__ import annotations

import io
import os
import re
import signal
import sys
import traceback
import weakref
from multiprocessing import connection as mp_connection
from multiprocessing import get_context
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NoReturn
from xml.etree import ElementTree

import numpy as np
import openmm

#: Platforms evaluated with one Context in the calling process (a worker pool buys nothing there).
GPU_PLATFORMS = frozenset({"CUDA", "OpenCL", "HIP", "Metal"})

_STOP_TIMEOUT_S = 5.0


class WorkerError(RuntimeError):
    """A worker process died, could not build its Context, or raised unexpectedly."""


class WorkerDied(WorkerError):
    """A worker process exited while the pool was using it (killed, e.g. by the out-of-memory
    killer, or crashed); the pool is already shut down. ``what`` says which worker, how it ended
    and what it was doing."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what


def load_torch_plugins() -> None:
    """Retry loading OpenMM's openmm-torch plugins once torch is imported.

    ``import openmm`` loads every plugin at once; if torch was not imported before, the
    openmm-torch platform plugins fail to load (libtorch/libnvrtc not resolved yet) and a
    Context with a TorchForce later fails with "does not support all required kernels".
    Call after ``import torch``; retries each failed Torch plugin once (idempotent).
    """
    for failure in openmm.Platform.getPluginLoadFailures():
        match = re.match(r"Error loading library (\S+?): ", failure)
        path = match.group(1) if match else ""
        if "OpenMMTorch" in os.path.basename(path) and path not in _RETRIED_PLUGINS:
            _RETRIED_PLUGINS.add(path)
            try:
                openmm.Platform.loadPluginLibrary(path)
            except Exception:  # e.g. the OpenCL plugin without libOpenCL: nothing to recover
                pass


_RETRIED_PLUGINS: set[str] = set()


def platform_name(platform: Any) -> Any:
    """The name of an OpenMM platform given by name or as an ``openmm.Platform`` object."""
    return platform.getName() if isinstance(platform, openmm.Platform) else platform


def threads_per_worker(n_workers: int) -> int:
    """CPU threads each of ``n_workers`` processes may use without oversubscribing the machine."""
    return max(1, (os.cpu_count() or 1) // n_workers)


def _read_forces(state: openmm.State, out: np.ndarray) -> None:
    """Copy the forces of ``state`` (kJ/mol/nm) into ``out`` (n_atoms, 3) float64.

    ``State._getVectorAsNumpy`` writes straight into ``out``; the public ``getForces(asNumpy=True)``
    wraps the array in a unit Quantity, which doubles the cost per configuration for
    small molecules.
    """
    fast = getattr(state, "_getVectorAsNumpy", None)
    if fast is not None:
        fast(openmm.State.Forces, out)
    else:  # pragma: no cover - only if OpenMM renames its private helper
        out[:] = state.getForces(asNumpy=True).value_in_unit(
            openmm.unit.kilojoule_per_mole / openmm.unit.nanometer
        )


class ContextEvaluator:
    """One OpenMM Context evaluating energies (and forces) configuration by configuration.

    A configuration fails (energy +inf, forces 0) when its positions are not finite, OpenMM
    raises, or the energy or a force component is not finite.
    """

    def __init__(self, system: openmm.System, platform: str, properties: dict[str, str]):
        self.n_atoms = system.getNumParticles()
        self.context = openmm.Context(
            system,
            openmm.VerletIntegrator(0.001),
            openmm.Platform.getPlatformByName(platform),
            dict(properties),
        )

    def evaluate(self, positions: np.ndarray, energies: np.ndarray, forces: np.ndarray | None) -> None:
        """Write the energies (b,) in kJ/mol and, unless ``forces`` is None, the forces
        (b, n_atoms, 3) in kJ/mol/nm of ``positions`` (b, n_atoms, 3) nm into the given arrays.
        A failed configuration gets energy +inf and zero forces."""
        energies[:] = np.inf
        set_positions, get_state, want_forces = self.context.setPositions, self.context.getState, forces is not None
        for i in np.flatnonzero(np.isfinite(positions).all(axis=(1, 2))).tolist():
            try:
                set_positions(positions[i])
                state = get_state(getEnergy=True, getForces=want_forces)
                if want_forces:
                    _read_forces(state, forces[i])
                energies[i] = state.getPotentialEnergy()._value  # OpenMM's internal unit: kJ/mol
            except Exception:  # OpenMMException, or whatever a PythonForce/TorchForce raised
                energies[i] = np.inf
        failed = ~np.isfinite(energies)
        if want_forces:
            failed |= ~np.isfinite(forces).all(axis=(1, 2))
            forces[failed] = 0.0
        energies[failed] = np.inf


def deserialize_system(system_xml: str) -> openmm.System:
    """``XmlSerializer.deserialize``, except that TorchForces are rebuilt in Python.

    openmm-torch 1.5's own TorchForce deserializer kills the process (SIGSEGV in its C++ model
    loader with the PyPI torch 2.9.1 wheel), so the TorchForce nodes are taken out of the XML, the
    rest is deserialised, and each model is decoded from the node and loaded with
    ``torch.jit.load``. TorchForces are appended after the other forces (order does not change
    energies; force groups, properties and global parameters are kept).
    """
    if 'type="TorchForce"' not in system_xml:
        return openmm.XmlSerializer.deserialize(system_xml)
    import torch  # before openmmtorch: loads the CUDA/libtorch libraries it links

    import openmmtorch

    load_torch_plugins()
    root = ElementTree.fromstring(system_xml)
    forces = root.find("Forces")
    nodes = [node for node in forces if node.get("type") == "TorchForce"]
    for node in nodes:
        forces.remove(node)
    system = openmm.XmlSerializer.deserialize(ElementTree.tostring(root, encoding="unicode"))
    for node in nodes:
        module = torch.jit.load(io.BytesIO(bytes.fromhex(node.get("encodedFileContents"))))
        properties = {p.get("name"): p.get("value") for p in node.findall("Properties/Property")}
        force = openmmtorch.TorchForce(module, properties)
        force.setForceGroup(int(node.get("forceGroup", "0")))
        force.setUsesPeriodicBoundaryConditions(node.get("usesPeriodic") == "1")
        force.setOutputsForces(node.get("outputsForces") == "1")
        for parameter in node.findall("GlobalParameters/Parameter"):
            force.addGlobalParameter(parameter.get("name"), float(parameter.get("default")))
        for parameter in node.findall("ParameterDerivatives/Parameter"):
            force.addEnergyParameterDerivative(parameter.get("name"))
        system.addForce(force)
    return system


class SharedBatch:
    """A batch in shared memory, seen by the parent and every worker, so that only (start, stop)
    travels through the pipes: positions and forces (capacity, n_atoms, 3) and energies
    (capacity,), float64. The parent creates and unlinks it; workers attach by name."""

    def __init__(self, capacity: int, n_atoms: int, name: str | None = None):
        block = capacity * n_atoms * 3 * 8
        size = 2 * block + 8 * capacity
        self.memory = SharedMemory(name=name, create=name is None, size=size if name is None else 0)
        self.capacity, self.name = capacity, self.memory.name
        shape = (capacity, n_atoms, 3)
        self.positions = np.ndarray(shape, np.float64, self.memory.buf, 0)
        self.forces = np.ndarray(shape, np.float64, self.memory.buf, block)
        self.energies = np.ndarray((capacity,), np.float64, self.memory.buf, 2 * block)

    def close(self, unlink: bool) -> None:
        self.positions = self.forces = self.energies = None
        try:
            self.memory.close()
        except BufferError:  # a view is still referenced somewhere; the mapping dies with it
            pass
        if unlink:
            self.memory.unlink()


def worker_main(conn, system_xml: str, platform: str, properties: dict[str, str], threads: int):
    """Entry point of a spawned worker: build the Context here, then evaluate the slices of the
    shared batch it is sent until told to stop or until the parent's end of the pipe closes
    (parent gone: no orphan).

    Messages: ``("batch", name, capacity)`` attaches a new shared batch; ``("eval", start, stop,
    forces)`` evaluates rows start:stop in place and answers ``("ok", None)`` or ``("error", tb)``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        system = deserialize_system(system_xml)
        if "torch" in sys.modules:  # a TorchForce: keep libtorch to this worker's share of cores
            sys.modules["torch"].set_num_threads(threads)
        evaluator = ContextEvaluator(system, platform, properties)
    except Exception:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    batch = None
    while True:
        try:
            message = conn.recv()
            if message[0] == "stop":
                return
            if message[0] == "batch":
                if batch is not None:
                    batch.close(unlink=False)
                batch = SharedBatch(message[2], evaluator.n_atoms, name=message[1])
                continue
            _, start, stop, forces = message
            try:
                rows = slice(start, stop)
                evaluator.evaluate(batch.positions[rows], batch.energies[rows], batch.forces[rows] if forces else None)
                reply = ("ok", None)
            except Exception:
                reply = ("error", traceback.format_exc())
            conn.send(reply)
        except (EOFError, OSError):  # the parent is gone: exit instead of lingering
            return


def _describe_exit(process) -> str:
    """How ``process`` ended, e.g. "was killed by SIGKILL (signal 9, out of memory?)"."""
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"was killed by signal {-code}"
        hint = ", out of memory?" if -code == signal.SIGKILL else ""  # what the OOM killer sends
        return f"was killed by {name} (signal {-code}{hint})"
    return f"exited with code {code}"


def _shutdown(processes: list, connections: list, batches: list) -> None:
    """Stop workers politely, then terminate and kill what is left; never blocks for long."""
    for conn, process in zip(connections, processes):
        if process.is_alive():
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
    for process in processes:
        process.join(_STOP_TIMEOUT_S)
        if process.is_alive():
            process.terminate()
            process.join(1.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
    for conn in connections:
        conn.close()
    for batch in batches:
        batch.close(unlink=True)
    processes.clear()
    connections.clear()
    batches.clear()


class WorkerPool:
    """``n_workers`` spawned processes, each owning one Context built from ``system_xml``.

    :meth:`evaluate` puts the batch in shared memory and gives each worker one contiguous
    slice, then waits for the replies together with the process sentinels, so a worker that
    dies is reported at once (:class:`WorkerDied`) instead of being waited on. Any error shuts
    the whole pool down. Workers are daemons, stopped by :meth:`close`, by garbage collection
    and at interpreter exit.
    """

    def __init__(
        self, system_xml: str, n_atoms: int, platform: str, properties: dict[str, str], n_workers: int
    ):
        mp = get_context("spawn")
        threads = threads_per_worker(n_workers)
        self.n_atoms = n_atoms
        self.processes: list = []
        self._connections: list = []
        self._batches: list[SharedBatch] = []  # the current one, last
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, self._connections, self._batches)
        for rank in range(n_workers):
            parent_end, child_end = mp.Pipe()
            process = mp.Process(
                target=worker_main,
                args=(child_end, system_xml, platform, properties, threads),
                name=f"cmt-openmm-energy-{rank}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self.processes.append(process)
            self._connections.append(parent_end)
        try:
            replies = [self._receive(rank, "starting") for rank in range(n_workers)]
        except BaseException:
            self.close()
            raise
        for rank, (kind, payload) in enumerate(replies):
            if kind != "ready":
                self.close()
                reason = payload.strip().splitlines()[-1]
                raise WorkerError(
                    f"OpenMM energy worker {rank} could not build its Context on the {platform} "
                    f"platform ({reason}).\n{payload}"
                )

    @property
    def n_workers(self) -> int:
        return len(self.processes)

    def _receive(self, rank: int, doing: str) -> tuple[str, Any]:
        """The next reply of worker ``rank``; raises :class:`WorkerError` as soon as it dies."""
        conn, process = self._connections[rank], self.processes[rank]
        if conn in mp_connection.wait([conn, process.sentinel]):
            try:
                return conn.recv()
            except (EOFError, OSError):
                pass
        self._died(rank, doing)

    def _send(self, rank: int, message: tuple, doing: str) -> None:
        try:
            self._connections[rank].send(message)
        except OSError:
            self._died(rank, doing)

    def _died(self, rank: int, doing: str) -> NoReturn:
        process = self.processes[rank]
        process.join(1.0)
        what = f"worker {rank} (pid {process.pid}) {_describe_exit(process)} while {doing}"
        message = f"OpenMM energy {what}; the worker pool was shut down."
        if doing == "starting":
            message += (
                " A PythonForce function must be importable in a fresh process (top level of a"
                " module), and a script that starts workers must guard its main code with"
                " `if __name__ == '__main__':`."
            )
        self.close()
        raise WorkerDied(message, what)

    def _batch(self, size: int) -> SharedBatch:
        """The shared batch, replaced by a larger one (announced to every worker) if needed."""
        if self._batches and self._batches[-1].capacity >= size:
            return self._batches[-1]
        batch = SharedBatch(size, self.n_atoms)
        self._batches.append(batch)
        for rank in range(self.n_workers):
            self._send(rank, ("batch", batch.name, batch.capacity), "attaching shared memory")
        while len(self._batches) > 1:  # workers drop the old mapping on reading the message
            self._batches.pop(0).close(unlink=True)
        return batch

    def evaluate(self, positions: np.ndarray, forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Energies (B,) kJ/mol (+inf where failed) and forces (B, n_atoms, 3) kJ/mol/nm or None
        of ``positions`` (B, n_atoms, 3) nm, one contiguous slice per worker."""
        if not self.processes:
            raise WorkerError("The OpenMM energy worker pool is closed; create a new one.")
        size = len(positions)
        bounds = [rank * size // self.n_workers for rank in range(self.n_workers + 1)]
        slices = [(start, stop) for start, stop in zip(bounds[:-1], bounds[1:]) if stop > start]
        try:
            batch = self._batch(size)
            batch.positions[:size] = positions
            for rank, (start, stop) in enumerate(slices):
                self._send(rank, ("eval", start, stop, forces), "receiving its slice")
            for rank, (start, stop) in enumerate(slices):
                kind, payload = self._receive(rank, f"evaluating {stop - start} configurations")
                if kind != "ok":
                    raise WorkerError(f"OpenMM energy worker {rank} raised:\n{payload}")
            return batch.energies[:size].copy(), (batch.forces[:size].copy() if forces else None)
        except BaseException:  # dead worker, Ctrl-C: the remaining replies are out of step
            self.close()
            raise

    def close(self) -> None:
        """Stop all workers and free the shared memory (idempotent)."""
        self._finalizer()
