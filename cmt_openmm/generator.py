"""The Boltzmann generator: a spline flow on a target's flow coordinates, seen in Cartesian space.

``BoltzmannGenerator`` = :class:`~cmt_openmm.flows.SplineFlow` ∘ the target's
:class:`~cmt_openmm.coordinates.CoordinateTransform`. Its density is the one every part of the
library uses (docs/method.md, "Density conventions"): for a Cartesian configuration x (nm),

    log q(x) = log q_z(z(x)) - log J(z(x)),

the flow density on the internal (or toy Cartesian) coordinates minus the log-Jacobian of the
map z -> x. For molecules J = prod over every placed bond of r^2 times prod over every placed
angle of sin(theta), seed atoms included, so q is a density of x with respect to dx / (dt dR),
the Lebesgue measure on R^{3N} with the translation t and the rotation R (Haar measure) factored
out (log nm^-(3N-6)); for toys J = 1 and q is a density of x in R^{3N}. Importance weights
p̃(x)/q(x) = exp(-u(x))/q(x) and the Metropolis-Hastings moves of :mod:`cmt_openmm.sampling.moves`
are therefore exact for the Boltzmann distribution exp(-u(x)) dx (see
:mod:`cmt_openmm.coordinates.internal` for the derivation and the constrained case). q is
invariant under rigid motions of x, so ``log_prob`` accepts any orientation; ``sample`` returns
configurations in the transform's standard frame. The flow runs in float32 by default;
coordinates and densities are float64.

Files: ``save`` writes one ``.safetensors`` file (the flow's tensors plus JSON metadata:
settings, the target itself (System XML, topology, positions, temperature: ``load`` needs
nothing else), its fingerprints and name, the reference structure, the format version, and a
sha256 checksum of the tensors) atomically; ``load`` reads only safetensors and JSON, never
pickle, so a file from a stranger cannot run code, and refuses tensors that do not match their
checksum (files saved without one still load, and re-save byte for byte). Format 2 (this
version) reports the density above; a format-1 file (whose densities lacked the seed atoms'
Jacobian) still loads, with a one-line warning: its flow is a valid proposal and is now given
the physical density, so weights and moves are exact, but it was trained towards a slightly
different target.

Example: :class:`BoltzmannGenerator`.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from .coordinates import CoordinateTransform, coordinates_for
from .errors import CMTInputError
from .files import atomic_write
from .flows import DEFAULT_SCALES, SplineFlow
from .units import nanometers

FORMAT = "cmt_openmm.BoltzmannGenerator/2"
_OLD_FORMAT = "cmt_openmm.BoltzmannGenerator/1"  # densities without the seed atoms' Jacobian
_META_KEY = "cmt_openmm"
_MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_REQUIRED = {"settings", "topology_fingerprint", "system_fingerprint", "target_name", "temperature", "n_atoms",
             "coordinates"}


class BoltzmannGenerator(nn.Module):
    """Samples and densities of configurations x (B, n_atoms, 3) nm; see the module docstring.

    Attributes: ``coordinates`` (CoordinateTransform), ``flow`` (SplineFlow), ``settings``
    (JSON-able flow settings), ``topology_fingerprint``, ``system_fingerprint``,
    ``target_name``, ``reference_positions`` ((n_atoms, 3) nm, the structure the coordinates
    were built on), ``temperature`` (K, of the target it was built for; informational).

    Example (a small untrained flow; training makes it propose the Boltzmann distribution):
        >>> import cmt_openmm, os, tempfile, torch
        >>> target = cmt_openmm.get_target("aldp-vacuum")
        >>> bg = cmt_openmm.BoltzmannGenerator.build(target, n_layers=2, hidden=8, seed=0)
        >>> x, log_q = bg.sample(200, torch.Generator().manual_seed(1))
        >>> tuple(x.shape), tuple(log_q.shape), x.dtype   # nm, in the standard frame
        ((200, 22, 3), (200,), torch.float64)
        >>> bool(torch.allclose(bg.log_prob(x), log_q))
        True
        >>> quarter_turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        >>> bool(torch.allclose(bg.log_prob(x @ quarter_turn.T + 1.0), log_q))   # rigid motions change nothing
        True
        >>> bg.chirality_flipped(x).any().item(), bg.chirality_flipped(-x).all().item()   # mirror images are flagged
        (False, True)
        >>> path = bg.save(os.path.join(tempfile.mkdtemp(), "bg.safetensors"))
        >>> again = cmt_openmm.BoltzmannGenerator.load(path)   # the target is saved in the file
        >>> again.content_hash() == bg.content_hash(), bool(torch.allclose(again.log_prob(x), log_q))
        (True, True)
    """

    def __init__(
        self,
        coordinates: CoordinateTransform,
        settings: dict[str, Any],
        topology_fingerprint: str,
        system_fingerprint: str,
        target_name: str,
        reference_positions: np.ndarray,
        temperature: float | None = None,
        target_data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        s = settings
        self.coordinates = coordinates
        self.flow = SplineFlow(
            coordinates.circular_mask, coordinates.kinds, coordinates.reference_z, coordinates.valid_bounds,
            n_layers=s["n_layers"], hidden=s["hidden"], depth=s["depth"], n_bins=s["n_bins"], mask=s["mask"],
            seed=s["seed"], bound=s["bound"], scales=s["scales"], margin=s["margin"], dtype=_DTYPES[s["dtype"]],
            linear_bins=s.get("linear_bins"),
        )
        self.settings = dict(settings)
        self.topology_fingerprint = topology_fingerprint
        self.system_fingerprint = system_fingerprint
        self.target_name = target_name
        self.reference_positions = np.array(reference_positions, dtype=np.float64)
        self.temperature = temperature
        self.target_data = target_data  # Target.to_dict() of the target it was built for (saved in the file)
        self.source_path: str | None = None  # the file it was loaded from, and that file's sha256
        self.source_hash: str | None = None
        self._checksum = True  # False when loaded from a file without one: it then re-saves byte for byte

    @classmethod
    def build(
        cls,
        target,
        n_layers: int = 8,
        hidden: int = 128,
        n_bins: int = 8,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        *,
        depth: int = 2,
        mask: str = "random",
        bound: float = 6.0,
        scales: dict[str, float] | None = None,
        margin: float = 1e-4,
        linear_bins: int | None = None,
    ) -> BoltzmannGenerator:
        """A new generator for ``target``, the identity flow on its prior (weights from ``seed``).

        ``n_layers`` coupling layers of RQ splines with ``n_bins`` bins (``linear_bins`` on the
        non-circular coordinates, bonds and angles, where given), conditioners with
        ``depth`` hidden layers of width ``hidden``; ``mask``, ``bound``, ``scales``, ``margin``:
        see :mod:`cmt_openmm.flows`. ``dtype``: torch.float32 or torch.float64 for the flow.
        """
        names = {v: k for k, v in _DTYPES.items()}
        if dtype not in names:
            raise CMTInputError(f"dtype must be torch.float32 or torch.float64, not {dtype}.")
        settings = dict(n_layers=int(n_layers), hidden=int(hidden), depth=int(depth), n_bins=int(n_bins),
                        mask=str(mask), seed=int(seed), bound=float(bound),
                        scales={k: float(v) for k, v in {**DEFAULT_SCALES, **(scales or {})}.items()},
                        margin=float(margin),
                        dtype=names[dtype])
        if linear_bins is not None and int(linear_bins) != int(n_bins):  # files of one n_bins stay as they were
            settings["linear_bins"] = int(linear_bins)
        return cls(coordinates_for(target), settings, target.topology_fingerprint(), target.system_fingerprint(),
                   target.name, target.positions, target.temperature, target.to_dict())

    @property
    def n_atoms(self) -> int:
        return self.coordinates.n_atoms

    @property
    def dim(self) -> int:
        return self.coordinates.dim

    def rsample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n configurations x (n, n_atoms, 3) float64 nm and log q(x) (n,) float64.

        Differentiable with respect to the flow's parameters (reparameterised, for reverse KL).
        """
        z, log_q_z = self.flow.rsample(int(n), generator)
        x, log_det_xz = self.coordinates.inverse(z)
        return x, log_q_z - log_det_xz

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Like :meth:`rsample`, without gradients."""
        return self.rsample(n, generator)

    @torch.no_grad()
    def skip(self, n: int, generator: torch.Generator) -> None:
        """Advance ``generator`` as ``sample(n, generator)`` would, without the flow (only the prior
        draws random numbers): a process that leaves n samples of a draw to another keeps in step."""
        self.flow.prior.sample(int(n), generator)

    def log_prob(self, x) -> Tensor:
        """log q(x) (B,) float64 of x (B, n_atoms, 3) nm (array, tensor or Quantity), any orientation.

        Differentiable with respect to the flow's parameters; -inf outside the flow's support
        (e.g. a flipped chiral centre, a coordinate beyond the flow's interval) and for
        degenerate or non-finite x.
        """
        z, log_det_zx = self.coordinates(self._positions(x))
        log_q = self.flow.log_prob(z) + log_det_zx
        return torch.where(torch.isnan(log_q), torch.full_like(log_q, -torch.inf), log_q)

    def chirality_flipped(self, x) -> Tensor:
        """(B,) bool: True where a chiral centre of the reference structure is mirrored in x."""
        return self.coordinates.chirality_flipped(self._positions(x))

    def _positions(self, x) -> Tensor:
        if hasattr(x, "value_in_unit"):
            x = nanometers(x)
        device = self.flow.scaling.center.device
        x = torch.as_tensor(x, dtype=torch.float64, device=device)
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.n_atoms, 3):
            raise CMTInputError(f"Expected positions of shape (B, {self.n_atoms}, 3) in nm, got "
                                f"{tuple(x.shape)}; add a batch dimension or check the system.")
        return x

    # ------------------------------------------------------------------ files
    def _metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "settings": self.settings,
            "topology_fingerprint": self.topology_fingerprint,
            "system_fingerprint": self.system_fingerprint,
            "target_name": self.target_name,
            "temperature": self.temperature,
            "n_atoms": self.n_atoms,
            "coordinates": {"dim": self.dim, "kinds": list(self.coordinates.kinds),
                            "circular": self.coordinates.circular_mask.tolist()},
            "target": self.target_data,
        }

    def to_bytes(self) -> bytes:
        """The safetensors file content (deterministic for given weights and metadata)."""
        tensors = {f"flow.{k}": v.detach().cpu().contiguous() for k, v in self.flow.state_dict().items()}
        tensors["reference_positions"] = torch.as_tensor(self.reference_positions)
        meta = self._metadata()
        if self._checksum:  # one metadata entry: safetensors writes several in no fixed order
            meta["tensors_sha256"] = _tensors_sha256(tensors)
        return save_tensors(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})

    def content_hash(self) -> str:
        """sha256 (hex) of :meth:`to_bytes`, i.e. of the file :meth:`save` writes."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the generator to ``path`` (a single .safetensors file), atomically."""
        return atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike, target=None) -> BoltzmannGenerator:
        """Read a generator saved by :meth:`save` for ``target``.

        ``target`` rebuilds the coordinate transform; when None, a target given to
        :func:`register_target` with the file's topology is used, else the target saved in the
        file itself (its System XML, topology, positions and temperature), else (files of
        format 1) the built-in target named in the file. The generator remembers its file (``source_path``, ``source_hash``),
        so that moves built from it serialise by reference to the file. A target with another topology is refused; a target whose System
        differs (e.g. another force field on the same molecule) gives a warning.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CMTInputError(f"Cannot read generator file {path} ({error.strerror}); check the path.") from None
        meta = _read_metadata(data, path)
        checksum = meta.get("tensors_sha256")  # None in files saved before checksums
        if target is None:
            target = _target_for(meta, path)
        if target.topology_fingerprint() != meta["topology_fingerprint"]:
            raise CMTInputError(f"{path} was trained on a different molecule ({meta['target_name']!r}) than "
                                f"{target.name!r}; load it with the target it was trained for.")
        if target.system_fingerprint() != meta["system_fingerprint"]:
            warnings.warn(f"{path} was trained on another System ({meta['target_name']!r}) with the same "
                          f"topology as {target.name!r}; its densities are unchanged but its weights will be "
                          "for the new target.", stacklevel=2)
        try:
            tensors = load_tensors(data)
        except Exception:  # safetensors' own error type is not part of its public API
            raise CMTInputError(f"{path} is damaged: its tensors cannot be read; re-save it.") from None
        if checksum is not None and _tensors_sha256(tensors) != checksum:
            raise CMTInputError(f"{path} is damaged: its tensors do not match the checksum saved with them; "
                                "restore the file from a good copy or retrain.")
        try:
            reference = tensors.pop("reference_positions").double().numpy()
            if not np.array_equal(reference, target.positions):
                target = copy.copy(target)  # the coordinates depend on the reference structure
                target.positions = reference
            generator = cls(coordinates_for(target), meta["settings"], meta["topology_fingerprint"],
                            meta["system_fingerprint"], meta["target_name"], reference, meta["temperature"],
                            meta.get("target"))
            if generator._metadata()["coordinates"] != meta["coordinates"]:
                raise CMTInputError(f"{path}: the coordinates built for {target.name!r} differ from the saved "
                                    "ones (another cmt_openmm version?); retrain or use the matching version.")
            generator.flow.load_state_dict({k[len("flow."):]: v for k, v in tensors.items()}, strict=True)
        except CMTInputError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CMTInputError(f"{path} is damaged or from an incompatible version ({type(error).__name__}); "
                                "retrain or re-save it.") from None
        generator._checksum = checksum is not None
        generator.source_path = str(path.resolve())
        generator.source_hash = hashlib.sha256(data).hexdigest()
        return generator


def _tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 (hex) of the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _read_metadata(data: bytes, path: Path) -> dict[str, Any]:
    """Parse and check the safetensors header of a generator file; never unpickles."""
    refusal = CMTInputError(f"{path} is not a cmt_openmm generator file (a .safetensors file written by "
                            "BoltzmannGenerator.save); refusing to read it.")
    if len(data) < 8:
        raise refusal
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise refusal
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise refusal from None
    if not isinstance(meta, dict):
        raise refusal
    if meta.get("format") == _OLD_FORMAT:
        warnings.warn(f"{path} was trained before the seed atoms' Jacobian entered the density (format 1); "
                      "it loads as a proposal with exact weights and moves, but retrain it for the best ESS.",
                      stacklevel=3)
    elif meta.get("format") != FORMAT:
        raise CMTInputError(f"{path} has format {meta.get('format')!r}, this cmt_openmm reads {FORMAT!r}; "
                            "re-save it with a matching version.")
    missing = _REQUIRED - set(meta)
    if missing:
        raise CMTInputError(f"{path} is damaged: its metadata lacks {sorted(missing)}; re-save it.")
    return meta


# ---------------------------------------------------------------------------------------------
# Targets for files, and generators shared per process
# ---------------------------------------------------------------------------------------------
GENERATOR_FILE = "generator.safetensors"
"""The generator's file name in a run directory."""

_TARGETS: list[Any] = []  # targets of non-built-in systems (register_target)
_LOADED: dict[tuple[str, str], Any] = {}  # (realpath, content hash) -> generator
_FILE_HASH: dict[str, tuple[int, int, str]] = {}  # realpath -> (mtime_ns, size, content hash)


def register_target(target) -> None:
    """Make ``target`` known to :meth:`BoltzmannGenerator.load` without ``target=``: needed to load
    generators of a System that is not built in (e.g. when a replica-exchange run is resumed)."""
    if not any(t is target for t in _TARGETS):
        _TARGETS.append(target)


def _target_for(meta: dict[str, Any], path: Path):
    """The registered target with the file's topology, else the target saved in the file (format
    2), else the built-in target the file names (format-1 files)."""
    for target in _TARGETS:
        if target.topology_fingerprint() == meta["topology_fingerprint"]:
            return target
    if meta.get("target"):
        from .target import Target

        return Target.from_dict(meta["target"], f"the target saved in {path}")
    from .systems import get_target

    try:
        return get_target(meta["target_name"], temperature=meta["temperature"] or 300.0)
    except CMTInputError:
        raise CMTInputError(f"{path} was trained on {meta['target_name']!r}, which is not a built-in target; "
                            "pass target= to load it, or call cmt_openmm.register_target(target) first.") from None


def load_generator(path: str | os.PathLike, content_hash: str | None = None,
                   class_path: str = "cmt_openmm.generator.BoltzmannGenerator", target=None) -> Any:
    """The generator saved at ``path`` (a file, or a run directory holding :data:`GENERATOR_FILE`),
    loaded once per process and shared: callers only read it.

    ``content_hash`` (sha256 of the file, :meth:`BoltzmannGenerator.content_hash`) refuses a file
    that changed; None accepts what the file holds. ``class_path``: the generator class (any
    class with ``load(path[, target])`` and ``content_hash()``). ``target``: as in
    :meth:`BoltzmannGenerator.load`.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / GENERATOR_FILE).is_file():
            raise CMTInputError(f"{path / GENERATOR_FILE} does not exist; finish training with "
                                f"`cmt-openmm train --out {path} --resume`.")
        path = path / GENERATOR_FILE
    real = os.path.realpath(path)
    if content_hash is not None and (real, content_hash) in _LOADED:
        return _LOADED[(real, content_hash)]
    if not os.path.isfile(real):
        raise CMTInputError(f"The generator file {real} does not exist; pass the path of a "
                            "generator saved with BoltzmannGenerator.save().")
    stat = os.stat(real)
    known = _FILE_HASH.get(real)
    if known is not None and known[:2] == (stat.st_mtime_ns, stat.st_size) \
            and (content_hash is None or known[2] == content_hash):
        return _LOADED[(real, known[2])]
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    generator = cls.load(real) if target is None else cls.load(real, target)
    actual = generator.content_hash()
    if content_hash is not None and actual != content_hash:
        raise CMTInputError(f"The generator file {real} has changed since it was referenced "
                            f"(content hash {actual[:12]}..., expected {content_hash[:12]}...); "
                            "restore the original file to resume.")
    _LOADED[(real, actual)] = generator
    _FILE_HASH[real] = (stat.st_mtime_ns, stat.st_size, actual)
    return generator
