"""The generator's energy U_q(x) = -kT log q(x) as a self-contained, TorchScript-compatible module.

:class:`FlowEnergy` recomputes ``BoltzmannGenerator.log_prob`` from the generator's tensors
alone (Z-matrix indices, coordinate scaling, prior, coupling-layer weights), in code that
``torch.jit.script`` compiles and autograd differentiates with respect to the positions:

    U_q(x) = kT * (wall/2 * |y - y_c|^2 - log q(x_c))        (kJ/mol)

with y the flow's scaled coordinates of x, y_c = clamp(y, lower, upper) the nearest point of
the flow's domain (the box of the scaled coordinates; circular torsions are never clamped) and
x_c a configuration with coordinates y_c. Inside the domain y_c = y and U_q = -kT log q(x)
exactly (the density of ``log_prob``, with respect to dx / (dt dR)); outside it -- a bond
stretched beyond the spline interval, a flipped chiral centre -- ``log_prob`` is -inf, and
U_q is instead the energy at the nearest in-domain point plus a harmonic wall of ``wall`` kT
per scaled unit squared (default 10; a scaled unit is 0.005 nm for bonds, 0.1 rad for angles,
0.2 rad for relative torsions): finite, continuous (except where a relative torsion wraps
around, pi from its reference, deep inside the wall), with forces that push back into the
domain (they jump at the boundary, where the flow's own gradient stops). Inside, the forces
jump too, slightly, wherever a coordinate crosses a spline knot: a rational-quadratic spline is
C1, so log q (which holds its log-derivative) is continuous with a gradient that is not.

Why a re-implementation rather than a trace of ``log_prob``: the flows' spline is a
hand-written ``autograd.Function`` tuned for training (in-place and ``out=`` operations, a
closed-form backward) that TorchScript can neither serialise nor differentiate, and
``log_prob`` branches in Python. This module uses the textbook rational-quadratic spline
(Durkan et al. 2019) with the same parameters; ``tests/export/test_flow_energy.py`` checks it against
``log_prob`` to rounding. The coupling layers run in the generator's dtype (float32 by
default) unless ``dtype`` says otherwise; coordinates, Jacobians and the prior in float64.

Payload: :meth:`FlowEnergy.to_bytes` is a safetensors file of the module's tensors with its
settings as JSON metadata (no pickle), and :func:`flow_energy_from_bytes` rebuilds it; the
PythonForce backend serialises itself this way.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from ..errors import CMTInputError
from ..flows.coupling import bin_layout
from ..units import kT as thermal_energy

FORMAT = "cmt_openmm.FlowEnergy/1"
_META_KEY = "cmt_openmm_flow_energy"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_COORDINATE_KEYS = ("bond_i", "bond_j", "angle_ijk", "dihedral_ijkm", "is_narrow", "relative_centre", "free",
                    "fixed_length", "bond_perm")
_LAYER_KEYS = ("transformed", "cond_circular", "cond_linear", "periodic", "lower", "width", "shift")


def _wrap(a: Tensor) -> Tensor:
    """Angles onto [-pi, pi) (as cmt_openmm.units.wrap_angle)."""
    wrapped = torch.remainder(a + math.pi, 2.0 * math.pi) - math.pi
    return torch.where(wrapped >= math.pi, wrapped - 2.0 * math.pi, wrapped)


def _norm(v: Tensor) -> Tensor:
    return torch.sqrt((v * v).sum(-1))


class _InternalMeasure(nn.Module):
    """x (B, n, 3) -> the flow coordinates z of an ``InternalCoordinates`` and their log J."""

    def __init__(self, tensors: dict[str, Tensor], n_atoms: int) -> None:
        super().__init__()
        for key in _COORDINATE_KEYS:
            self.register_buffer(key, tensors[f"coordinates.{key}"].clone())
        self.n_atoms = n_atoms
        self.n_free = int(tensors["coordinates.free"].numel())

    def forward(self, x: Tensor) -> Tensor:
        r = _norm(x[:, self.bond_i] - x[:, self.bond_j])
        a = self.angle_ijk
        u = x[:, a[:, 0]] - x[:, a[:, 1]]
        v = x[:, a[:, 2]] - x[:, a[:, 1]]
        cross = torch.linalg.cross(u, v)
        # clamp: a finite (zero) gradient for exactly collinear atoms, unchanged values otherwise
        theta = torch.atan2(torch.sqrt(torch.clamp((cross * cross).sum(-1), min=1e-30)), (u * v).sum(-1))
        d = self.dihedral_ijkm
        p0, p1, p2, p3 = x[:, d[:, 0]], x[:, d[:, 1]], x[:, d[:, 2]], x[:, d[:, 3]]
        b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
        b1 = b1 / _norm(b1).unsqueeze(-1)
        w0 = b0 - (b0 * b1).sum(-1, keepdim=True) * b1
        w2 = b2 - (b2 * b1).sum(-1, keepdim=True) * b1
        phi = torch.atan2((torch.linalg.cross(b1, w0) * w2).sum(-1), (w0 * w2).sum(-1))
        centre = self.relative_centre
        phi = torch.where(self.is_narrow, centre + _wrap(phi - centre), _wrap(phi))
        return torch.cat([r[:, self.free], theta, phi], dim=-1)

    def log_jacobian(self, z: Tensor) -> Tensor:
        free = z[:, : self.n_free]
        theta = z[:, self.n_free : self.n_free + self.n_atoms - 2]
        fixed = self.fixed_length.unsqueeze(0).expand(z.shape[0], self.fixed_length.shape[0])
        r = torch.cat([free, fixed], dim=-1)[:, self.bond_perm]
        return 2.0 * torch.log(r).sum(-1) + torch.log(torch.sin(theta)).sum(-1)


class _CartesianMeasure(nn.Module):
    """x (B, n, 3) -> z = x flattened, log J = 0 (toy targets)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1] * 3)

    def log_jacobian(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z[:, 0])


def _rq_spline_inverse(y: Tensor, bins: Tensor, derivatives: Tensor, periodic: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of the monotone rational-quadratic spline of [0, 1] (cmt_openmm.flows.splines.rq_spline,
    textbook form): y (B, D), bins (B, D, 2, K), derivatives (B, D, K + 1), periodic (D,) ->
    x (B, D) and log|dx/dy| (B, D)."""
    min_bin, min_derivative = 1e-3, 1e-3  # as cmt_openmm.flows.splines (literals: TorchScript)
    k = bins.shape[-1]
    scale = 1.0 - min_bin * k
    p = torch.softmax(bins, dim=-1)
    cum = F.pad(torch.cumsum(p, dim=-1), [1, 0])  # (B, D, 2, K + 1)
    steps = torch.arange(1, k, dtype=y.dtype, device=y.device)
    inner = cum[:, :, 1, 1:k] * scale + min_bin * steps
    idx = (y.unsqueeze(-1) >= inner).sum(-1)  # (B, D)
    pair = idx.unsqueeze(-1).unsqueeze(-1).expand(idx.shape[0], idx.shape[1], 2, 1)
    knot = cum.gather(-1, pair).squeeze(-1) * scale + min_bin * idx.unsqueeze(-1).to(y.dtype)
    size = p.gather(-1, pair).squeeze(-1) * scale + min_bin
    x0, y0 = knot[:, :, 0], knot[:, :, 1]
    w, h = size[:, :, 0], size[:, :, 1]
    following = torch.where(periodic & (idx == k - 1), torch.zeros_like(idx), idx + 1)
    slopes = F.softplus(derivatives.gather(-1, torch.stack([idx, following], dim=-1))) + min_derivative
    d0, d1 = slopes[:, :, 0], slopes[:, :, 1]
    s = h / w
    slack = d0 + d1 - 2.0 * s
    dy = y - y0
    a = h * (s - d0) + dy * slack
    b = h * d0 - dy * slack
    c = -s * dy
    theta = torch.clamp(2.0 * c / (-b - torch.sqrt(torch.clamp(b * b - 4.0 * a * c, min=0.0))), 0.0, 1.0)
    t1 = theta * (1.0 - theta)
    denom = s + slack * t1
    logdet = 2.0 * torch.log(s) + torch.log(d1 * theta * theta + 2.0 * s * t1 + d0 * (1.0 - theta) ** 2) \
        - 2.0 * torch.log(denom)
    return x0 + theta * w, -logdet


class _InverseCoupling(nn.Module):
    """The inverse of one ``SplineCoupling`` layer (same stored tensors and parameter layout)."""

    def __init__(self, tensors: dict[str, Tensor], prefix: str, n_bins: int, linear_bins: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        for key in _LAYER_KEYS:
            value = tensors[f"{prefix}{key}"].clone()
            self.register_buffer(key, value.to(dtype) if value.is_floating_point() else value)
        start = f"{prefix}net."
        linear_ids = sorted(int(name[len(start):].split(".")[0]) for name in tensors
                            if name.startswith(start) and name.endswith(".weight"))
        n_linear = len(linear_ids)
        layers: list[nn.Module] = []
        for j, index in enumerate(linear_ids):  # Linear, SiLU, ..., Linear: ids 0, 2, 4, ...
            weight, bias = tensors[f"{start}{index}.weight"], tensors[f"{start}{index}.bias"]
            linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            layers.append(linear)
            if j < n_linear - 1:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        # (first row, last row + 1, first output, K) of each part (flows.coupling.bin_layout)
        self.parts = [(rows.start, rows.stop, cols.start, k)
                      for rows, cols, k in bin_layout(self.periodic.bool(), n_bins, linear_bins)]
        self.has_conditioning = int(self.cond_circular.numel() + self.cond_linear.numel()) > 0

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.has_conditioning:
            angles = y[:, self.cond_circular]
            features = torch.cat([torch.cos(angles), torch.sin(angles), y[:, self.cond_linear]], dim=-1)
        else:
            features = torch.ones_like(y[:, :1])
        params = self.net(features)
        u = (y[:, self.transformed] - self.lower) / self.width + self.shift
        u = torch.where(self.periodic, u - torch.floor(u), u)
        vs: list[Tensor] = []
        logdets: list[Tensor] = []
        for start, stop, first, k in self.parts:
            n = stop - start
            bins = params[:, first : first + n * 2 * k].reshape(-1, n, 2, k)
            derivatives = params[:, first + n * 2 * k : first + n * (3 * k + 1)].reshape(-1, n, k + 1)
            v_part, logdet_part = _rq_spline_inverse(u[:, start:stop], bins, derivatives, self.periodic[start:stop])
            vs.append(v_part)
            logdets.append(logdet_part)
        v, logdet = torch.cat(vs, dim=-1), torch.cat(logdets, dim=-1)
        v = v - self.shift
        v = torch.where(self.periodic, v - torch.floor(v), v)
        return y.index_copy(1, self.transformed, self.lower + v * self.width), logdet.sum(-1)


class FlowEnergy(nn.Module):
    """U_q (B,) kJ/mol of configurations x (B, n_atoms, 3) nm; see the module docstring.

    Build it with :meth:`from_generator`; ``torch.jit.script`` compiles it. Methods:
    ``forward(x)`` (energies), ``log_q_and_wall(x)`` (log q at the nearest in-domain point and
    the wall term in kT). Attributes: ``kT`` (kJ/mol), ``wall`` (kT per scaled unit²), ``n_atoms``.

    Example::

        energy = FlowEnergy.from_generator(generator)          # kT of generator.temperature
        u = energy(x)                                          # (B,) kJ/mol = -kT log q(x) in the domain
    """

    def __init__(self, tensors: dict[str, Tensor], config: dict[str, Any]) -> None:
        super().__init__()
        if config.get("format") != FORMAT:
            raise CMTInputError(f"Not a {FORMAT} payload (format {config.get('format')!r}); re-export the force "
                                "with this cmt_openmm version.")
        self.config = dict(config)
        dtype = _DTYPES[config["dtype"]]
        self.n_atoms = int(config["n_atoms"])
        self.internal = config["coordinates"] == "internal"
        self.measure = _InternalMeasure(tensors, self.n_atoms) if self.internal else _CartesianMeasure()
        for key in ("circular", "center", "scale", "lower", "upper", "log_det", "prior_log_norm"):
            self.register_buffer(key, tensors[key].clone())
        n_bins = int(config["n_bins"])
        linear_bins = int(config.get("linear_bins", n_bins))
        self.layers = nn.ModuleList([_InverseCoupling(tensors, f"layer{i}.", n_bins, linear_bins, dtype)
                                     for i in range(int(config["n_layers"]))])  # in inverse order
        self.kT = float(config["kT"])
        self.wall = float(config["wall"])
        self.net_dtype = dtype

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_generator(cls, generator, temperature: float | None = None, wall: float = 10.0,
                       dtype: torch.dtype | None = None) -> FlowEnergy:
        """The energy of ``generator`` at ``temperature`` (K; default: the generator's).

        ``wall``: kT per scaled unit² beyond the domain; ``dtype``: of the coupling layers
        (default: the generator's flow dtype).
        """
        tensors, config = _collect(generator, temperature, wall, dtype)
        return cls(tensors, config).eval()

    def tensors(self) -> dict[str, Tensor]:
        """Everything needed to rebuild the module (the payload's tensors), on the CPU."""
        out = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        renamed = {}
        for key, value in out.items():
            if key.startswith("measure."):
                renamed["coordinates." + key[len("measure."):]] = value
            elif key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                renamed[f"layer{i}.{rest}"] = value
            else:
                renamed[key] = value
        return renamed

    def to_bytes(self) -> bytes:
        """A safetensors payload (tensors + JSON settings) that :func:`flow_energy_from_bytes` reads."""
        meta = json.dumps(self.config, sort_keys=True, separators=(",", ":"))
        return save_tensors(self.tensors(), metadata={_META_KEY: meta})

    # ------------------------------------------------------------------ evaluation
    def log_q_and_wall(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """log q (B,) at the nearest in-domain point of x (B, n_atoms, 3) nm, and the wall (B,) in kT."""
        z = self.measure(x.to(torch.float64))
        y = torch.where(self.circular, _wrap(z), (z - self.center) / self.scale)
        y_c = torch.minimum(torch.maximum(y, self.lower), self.upper)
        excess = y - y_c
        z_c = torch.where(self.circular, z, self.center + self.scale * y_c)
        h = y_c.to(self.net_dtype)
        logdet = torch.zeros_like(h[:, 0])
        for layer in self.layers:
            h, ld = layer(h)
            logdet = logdet + ld
        y0 = h.to(torch.float64)
        log_prior = -0.5 * torch.where(self.circular, torch.zeros_like(y0), y0 * y0).sum(-1) - self.prior_log_norm
        log_q = log_prior + logdet.to(torch.float64) + self.log_det - self.measure.log_jacobian(z_c)
        return log_q, 0.5 * self.wall * (excess * excess).sum(-1)

    def forward(self, x: Tensor) -> Tensor:
        """U_q (B,) float64 kJ/mol of x (B, n_atoms, 3) nm."""
        log_q, wall = self.log_q_and_wall(x)
        return self.kT * (wall - log_q)


def _collect(generator, temperature, wall: float, dtype) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and settings of a FlowEnergy for ``generator`` (read, never modified)."""
    from ..coordinates import CartesianCoordinates, InternalCoordinates

    coordinates, flow = generator.coordinates, generator.flow
    if temperature is None:
        temperature = getattr(generator, "temperature", None)
        if temperature is None:
            raise CMTInputError("The generator does not know its temperature; pass temperature= (K).")
    if hasattr(temperature, "value_in_unit"):
        from ..units import kelvin

        temperature = kelvin(temperature)
    if not (float(temperature) > 0 and math.isfinite(float(temperature))):
        raise CMTInputError(f"The temperature must be a positive number of kelvin, got {temperature}.")
    if not (float(wall) > 0 and math.isfinite(float(wall))):
        raise CMTInputError(f"wall must be a positive number (kT per scaled unit squared), got {wall}.")
    dtype = flow.dtype if dtype is None else dtype
    names = {v: k for k, v in _DTYPES.items()}
    if dtype not in names:
        raise CMTInputError(f"dtype must be torch.float32 or torch.float64, not {dtype}.")
    cpu = lambda t: t.detach().cpu().clone()  # noqa: E731
    tensors: dict[str, Tensor] = {}
    if isinstance(coordinates, InternalCoordinates):
        kind = "internal"
        for key in _COORDINATE_KEYS:
            value = getattr(coordinates, "_" + key)
            tensors[f"coordinates.{key}"] = cpu(value.double() if value.is_floating_point() else value)
    elif isinstance(coordinates, CartesianCoordinates):
        kind = "cartesian"
    else:
        raise CMTInputError(f"Cannot export a generator on {type(coordinates).__name__} coordinates; "
                            "only InternalCoordinates and CartesianCoordinates are supported.")
    s = flow.scaling
    for key in ("circular", "center", "scale", "lower", "upper", "log_det"):
        tensors[key] = cpu(getattr(s, key))
    tensors["prior_log_norm"] = cpu(flow.prior.log_norm.double())
    layers = list(flow.couplings.layers)
    n_bins = {(int(layer.n_bins), int(layer.linear_bins)) for layer in layers}
    for i, layer in enumerate(reversed(layers)):  # stored in the order the inverse applies them
        for key, value in layer.state_dict().items():
            if key in _LAYER_KEYS or key.startswith("net."):
                tensors[f"layer{i}.{key}"] = cpu(value)
    n_bins, linear_bins = n_bins.pop()
    config = {"format": FORMAT, "coordinates": kind, "n_atoms": int(coordinates.n_atoms), "n_bins": n_bins,
              **({"linear_bins": linear_bins} if linear_bins != n_bins else {}), "n_layers": len(layers),
              "dtype": names[dtype], "kT": thermal_energy(float(temperature)),
              "temperature": float(temperature), "wall": float(wall)}
    return tensors, config


_FROM_BYTES: dict[str, FlowEnergy] = {}  # sha256 of a payload -> its module (read-only, shared)


def flow_energy_from_bytes(payload: bytes) -> FlowEnergy:
    """The :class:`FlowEnergy` of a payload written by :meth:`FlowEnergy.to_bytes` (shared per process)."""
    key = hashlib.sha256(payload).hexdigest()
    module = _FROM_BYTES.get(key)
    if module is None:
        header_size = int.from_bytes(payload[:8], "little") if len(payload) >= 8 else -1
        try:
            header = json.loads(payload[8 : 8 + header_size].decode("utf-8"))
            config = json.loads(header["__metadata__"][_META_KEY])
            tensors = load_tensors(payload)
        except Exception:  # safetensors' and json's errors: a damaged payload either way
            raise CMTInputError("The flow force's stored payload is damaged; re-export the force with "
                                "to_openmm_force().") from None
        module = FlowEnergy(tensors, config).eval()
        _FROM_BYTES[key] = module
    return module
