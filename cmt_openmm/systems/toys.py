"""Toy OpenMM targets whose Boltzmann distributions are known exactly (by quadrature).

Each toy is a single particle moved by a `CustomExternalForce`, so it runs through the same
OpenMM code paths as a molecule, while its density factorises into 1-D and 2-D pieces that
composite Gauss-Legendre quadrature integrates to ~1e-10 (mode weights across boundaries that
are not along an axis: ~1e-8). That gives exact normalising constants, marginals and mode
weights for MCMC-exactness and training tests. Hand-written because no package pairs an
OpenMM System with its exact distribution.

Energies are in kJ/mol and are designed in units of kT at the ``temperature`` passed to the
builder (the design temperature): at that temperature the shapes are the documented ones
(barrier height, mode weights, widths). `ToyTarget.with_temperature` keeps the force field
(the energy in kJ/mol) and recomputes every exact quantity at the new temperature, so
weights and widths change as physics says they should.

Example:
    >>> import cmt_openmm
    >>> target = cmt_openmm.get_target("toy-double-well")   # double_well_3d(300.0)
    >>> target.mode_weights()                  # exact, at the design temperature
    array([0.75, 0.25])
    >>> hot = target.with_temperature(600.0)   # same System, exact quantities at 600 K
    >>> hot.mode_weights().round(3)            # the barrier and tilt count half as much
    array([0.627, 0.373])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import openmm
import openmm.app as app
from scipy.optimize import brentq
from scipy.special import logsumexp

from ..errors import CMTInputError
from ..target import Target
from ..units import kT, kelvin

_TAIL = 1e-11        # allowed mass beyond each side of each box dimension (6 sides: < 1e-10 in all)
_N_SUB = {1: 200, 2: 64}  # quadrature subintervals per box dimension, by factor dimension (1-D, 2-D)
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


@dataclass(frozen=True)
class ToyFactor:
    """One independent piece of a toy's energy.

    ``dims``: flattened coordinates (3 * particle + axis) it depends on (1 or 2 of them);
    ``energy``: picklable callable, points (..., len(dims)) in nm -> U in kJ/mol;
    ``search``: (lower, upper) per dim in nm where most of the mass lies at the design
    temperature (widened automatically when the mass reaches its edges);
    ``breaks``: per dim, points where a mode boundary crosses that axis (quadrature nodes align).
    """

    dims: tuple[int, ...]
    energy: Callable[[np.ndarray], np.ndarray]
    search: tuple[tuple[float, float], ...]
    breaks: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class ToyModes:
    """Mode labels: ``label`` maps points (..., len(dims)) of factor ``factor`` to ints in [0, n)."""

    factor: int
    n: int
    label: Callable[[np.ndarray], np.ndarray]


class ToyTarget(Target):
    """A `Target` with its exact distribution, computed by quadrature at ``temperature``.

    Attributes beyond `Target`: ``box`` ((3 n_atoms, 2) nm, mass outside < 1e-9),
    ``log_normalizer`` (log of the integral of exp(-u) over the box, u = U/kT, in log nm^d),
    ``mass_outside_box`` (estimated probability mass outside the box).

    Example (the exact density is OpenMM's energy normalised, log p = -u - log Z):
        >>> import cmt_openmm, numpy as np
        >>> toy = cmt_openmm.get_target("toy-gaussian-mixture")
        >>> x = np.array([[[0.6, 0.0, 0.0]], [[-0.3, 0.52, 0.0]]])   # (B, n_atoms, 3) nm: two mode centres
        >>> toy.mode_of(x)
        array([0, 1])
        >>> u = np.array([toy.reduced_potential(xi) for xi in x])
        >>> bool(np.allclose(toy.log_prob(x), -u - toy.log_normalizer))
        True
        >>> edges = np.linspace(*toy.box[0], 301)            # bins of the x coordinate
        >>> round(float(toy.marginal(0, edges).sum()), 6)
        1.0
    """

    def __init__(
        self,
        system: openmm.System,
        topology: app.Topology,
        positions: Any,
        temperature: Any,
        factors: Sequence[ToyFactor],
        modes: ToyModes,
        name: str = "toy",
    ) -> None:
        super().__init__(system, topology, positions, temperature, name=name)
        self.factors = tuple(factors)
        self.modes = modes
        covered = sorted(d for f in self.factors for d in f.dims)
        if covered != list(range(3 * self.n_atoms)) or not 0 <= modes.factor < len(self.factors):
            raise CMTInputError(
                f"the toy factors must cover each of the {3 * self.n_atoms} coordinates exactly once "
                "and the modes must name one of them."
            )
        quads, box, outside = [], np.zeros((3 * self.n_atoms, 2)), 0.0
        for k, factor in enumerate(self.factors):
            searched = _search(factor, self.kT)
            quad = _Quadrature(factor, searched.trimmed_box(), self.kT, modes if k == modes.factor else None)
            box[list(factor.dims)] = quad.box
            outside += -math.expm1(quad.log_z - searched.log_z)
            quads.append(quad)
        self._quads = quads
        self.box = box
        self.mass_outside_box = max(outside, 0.0)
        self.log_normalizer = float(sum(q.log_z for q in quads))

    def with_temperature(self, temperature: Any) -> ToyTarget:
        """The same System (energies in kJ/mol) with exact quantities recomputed at ``temperature``."""
        return ToyTarget(
            self.system, self.topology, self.positions, temperature, self.factors, self.modes, name=self.name
        )

    def log_prob(self, x: Any) -> Any:
        """Exact normalised log density (B,) in log nm^-(3 n_atoms) of x (B, n_atoms, 3) nm; -inf outside the box.

        Returns float64 of the input's kind (numpy array or torch tensor, without gradient).
        """
        flat, back = self._flat(x)
        inside = np.all((flat >= self.box[:, 0]) & (flat <= self.box[:, 1]), axis=1)
        log_p = np.full(flat.shape[0], -np.inf)
        pts = flat[inside]
        log_p[inside] = sum(-f.energy(pts[:, list(f.dims)]) / self.kT for f in self.factors) - self.log_normalizer
        return back(log_p)

    def marginal(self, axis: int, edges: Any) -> np.ndarray:
        """Exact probabilities (len(edges) - 1,) of the bins ``edges`` (nm) of flattened coordinate ``axis``.

        ``axis`` is 3 * particle + (0, 1, 2 for x, y, z); mass outside the box counts as 0.
        """
        edges = np.asarray(edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0) or not np.all(np.isfinite(edges)):
            raise CMTInputError("edges must be a finite, strictly increasing 1-D array of at least 2 values in nm.")
        if not 0 <= axis < 3 * self.n_atoms:
            raise CMTInputError(f"axis must be in [0, {3 * self.n_atoms}), got {axis}.")
        k = next(i for i, f in enumerate(self.factors) if axis in f.dims)
        quad = self._quads[k]
        a = self.factors[k].dims.index(axis)
        lo, hi = np.clip(edges[:-1], *quad.box[a]), np.clip(edges[1:], *quad.box[a])
        h = (quad.box[a, 1] - quad.box[a, 0]) / _N_SUB[len(quad.factor.dims)]
        n_sub = np.where(hi > lo, np.ceil((hi - lo) / h).astype(int), 0)
        probs = np.zeros(edges.size - 1)
        for j in np.flatnonzero(n_sub):
            nodes, weights = _gl_nodes(np.linspace(lo[j], hi[j], n_sub[j] + 1))
            probs[j] = np.sum(weights * np.exp(quad.log_marginal(a, nodes)))
        return probs

    def mode_weights(self) -> np.ndarray:
        """Exact probability (n_modes,) of each mode, as labelled by `mode_of`."""
        return self._quads[self.modes.factor].mode_masses.copy()

    def mode_of(self, x: Any) -> Any:
        """Mode label (B,) int of configurations x (B, n_atoms, 3) nm (numpy in, numpy out; torch in, torch out)."""
        flat, back = self._flat(x)
        dims = list(self.factors[self.modes.factor].dims)
        return back(self.modes.label(flat[:, dims]).astype(np.int64))

    def _flat(self, x: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
        """x (B, n_atoms, 3) as float64 numpy (B, 3 n_atoms), and a function giving answers in x's kind."""
        device = x.device if hasattr(x, "detach") else None  # numpy 2 arrays have .device too
        if device is not None:  # a torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise CMTInputError(f"configurations have shape {x.shape}, expected (B, {self.n_atoms}, 3) in nm.")

        def back(answer: np.ndarray) -> Any:
            if device is None:
                return answer
            import torch

            return torch.as_tensor(answer, device=device)

        return x.reshape(x.shape[0], -1), back


class _Quadrature:
    """Tensor-product composite Gauss-Legendre quadrature of one factor over a box, at one kT.

    Keeps only 1-D summaries (nodes, log weights, per-dim node masses, mode masses), so a
    `ToyTarget` stays small enough to pickle into worker processes.
    """

    def __init__(self, factor: ToyFactor, box: np.ndarray, kT: float, modes: ToyModes | None = None) -> None:
        self.factor, self.box, self.kT = factor, np.asarray(box, dtype=np.float64), kT
        self.nodes, self.log_w = [], []
        for a, (lo, hi) in enumerate(self.box):
            breaks = [b for b in (factor.breaks[a] if factor.breaks else ()) if lo < b < hi]
            nodes, weights = _gl_nodes(np.union1d(np.linspace(lo, hi, _N_SUB[len(factor.dims)] + 1), breaks))
            self.nodes.append(nodes)
            self.log_w.append(np.log(weights))
        points = np.stack(np.meshgrid(*self.nodes, indexing="ij"), axis=-1)
        log_mass = -factor.energy(points) / kT + sum(np.meshgrid(*self.log_w, indexing="ij"))
        self.log_z = float(logsumexp(log_mass))
        mass = np.exp(log_mass - self.log_z)
        self.dim_masses = [mass.sum(axis=tuple(b for b in range(mass.ndim) if b != a)) for a in range(mass.ndim)]
        self.mode_masses = None
        if modes is not None:
            self.mode_masses = np.bincount(modes.label(points).ravel(), weights=mass.ravel(), minlength=modes.n)

    def log_marginal(self, a: int, t: np.ndarray) -> np.ndarray:
        """Normalised log marginal density of the factor's dim ``a`` at points t (n,) nm."""
        if len(self.factor.dims) == 1:
            return -self.factor.energy(t[:, None]) / self.kT - self.log_z
        other = self.nodes[1 - a]
        pts = np.empty((t.size, other.size, 2))
        pts[..., a], pts[..., 1 - a] = t[:, None], other[None, :]
        return logsumexp(-self.factor.energy(pts) / self.kT + self.log_w[1 - a], axis=1) - self.log_z

    def trimmed_box(self) -> np.ndarray:
        """Box rounded outward to 0.01 nm leaving at most ~`_TAIL` mass beyond each side of each dim."""
        box = self.box.copy()
        for a, (nodes, mass) in enumerate(zip(self.nodes, self.dim_masses)):
            lo = nodes[max(np.searchsorted(np.cumsum(mass), _TAIL) - 1, 0)]
            hi = nodes[::-1][max(np.searchsorted(np.cumsum(mass[::-1]), _TAIL) - 1, 0)]
            box[a] = [max(math.floor(lo * 100) / 100, box[a, 0]), min(math.ceil(hi * 100) / 100, box[a, 1])]
        return box


def _search(factor: ToyFactor, kT: float) -> _Quadrature:
    """Quadrature over ``factor.search``, widened until the mass near its edges is negligible (< 1e-15 per side)."""
    box = np.array(factor.search, dtype=np.float64)
    for _ in range(40):
        quad = _Quadrature(factor, box, kT)
        grown = False
        for a in range(len(factor.dims)):
            mass, width = quad.dim_masses[a], box[a, 1] - box[a, 0]
            edge = max(1, mass.size // 20)
            if mass[:edge].sum() > 1e-15:
                box[a, 0] -= 0.5 * width
                grown = True
            if mass[-edge:].sum() > 1e-15:
                box[a, 1] += 0.5 * width
                grown = True
        if not grown:
            return quad
    raise CMTInputError(f"toy factor {factor.dims} does not confine the particle at kT={kT:g} kJ/mol: fix its energy.")


def _gl_nodes(boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-point Gauss-Legendre nodes and weights on each interval between consecutive ``boundaries``."""
    half = 0.5 * np.diff(boundaries)[:, None]
    mid = 0.5 * (boundaries[1:] + boundaries[:-1])[:, None]
    return (mid + half * _GL_X).ravel(), (half * _GL_W).ravel()


# ---------------------------------------------------------------- builders -------------------------------------------

_MASS_DALTON = 1.008  # a hydrogen-like particle: light, so MD explores the toy quickly


def _one_particle_system(expression: str) -> tuple[openmm.System, app.Topology]:
    system = openmm.System()
    system.addParticle(_MASS_DALTON)
    force = openmm.CustomExternalForce(expression)
    force.addParticle(0, [])
    system.addForce(force)
    topology = app.Topology()
    residue = topology.addResidue("TOY", topology.addChain())
    topology.addAtom("P0", app.element.hydrogen, residue)
    return system, topology


def _harmonic(p: np.ndarray, kT0: float, sigma: float) -> np.ndarray:
    return kT0 * 0.5 * (p[..., 0] / sigma) ** 2


def _quartic_double_well(p: np.ndarray, kT0: float, barrier: float, tilt: float, half: float) -> np.ndarray:
    s = p[..., 0] / half
    return kT0 * (barrier * (s**2 - 1.0) ** 2 + tilt * s)


def _below(p: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(p[..., 0] < threshold, 0, 1)


def _barrier_top(barrier: float, tilt: float) -> float:
    """Local maximum s* of h (s^2 - 1)^2 + c s between the wells (|c| < 1.54 h)."""
    edge = 1.0 / math.sqrt(3.0)
    return brentq(lambda s: 4.0 * barrier * s * (s * s - 1.0) + tilt, -edge, edge)


def _left_weight(barrier: float, tilt: float) -> float:
    top = _barrier_top(barrier, tilt)
    nodes, weights = _gl_nodes(np.union1d(np.linspace(-3.0, 3.0, 601), [top]))
    log_f = -(barrier * (nodes**2 - 1.0) ** 2 + tilt * nodes) + np.log(weights)
    return float(np.exp(logsumexp(log_f[nodes < top]) - logsumexp(log_f)))


def double_well_3d(temperature: Any = 300.0, *, barrier: float = 5.0, major_weight: float = 0.75) -> ToyTarget:
    """One particle in a tilted quartic double well along x, harmonic in y and z.

    U / kT0 = h ((x/a)^2 - 1)^2 + c x/a + (y^2 + z^2) / (2 s^2), with kT0 = R * ``temperature``,
    a = 0.5 nm (wells near x = -0.5 and +0.5 nm), s = 0.1 nm, h = ``barrier`` (in kT0) and the
    tilt c solved so that the left well (mode 0, x below the barrier top) holds ``major_weight``
    of the probability at ``temperature``; mode 1 is the right well.
    """
    if not (barrier > 0 and 0.5 <= major_weight < 1.0):
        raise CMTInputError("double_well_3d needs barrier > 0 (in kT) and 0.5 <= major_weight < 1.")
    kT0 = kT(kelvin(temperature))
    half, sigma = 0.5, 0.1
    try:
        tilt = brentq(lambda c: _left_weight(barrier, c) - major_weight, 0.0, 1.5 * barrier, xtol=1e-14)
    except ValueError:
        raise CMTInputError(
            f"a barrier of {barrier} kT cannot hold a major_weight of {major_weight}: lower it or raise the barrier."
        ) from None
    top = _barrier_top(barrier, tilt) * half
    expression = (
        f"{kT0!r}*({barrier!r}*((x/{half!r})^2-1)^2 + {tilt!r}*x/{half!r} + 0.5*((y/{sigma!r})^2 + (z/{sigma!r})^2))"
    )
    system, topology = _one_particle_system(expression)
    search_yz = ((-8 * sigma, 8 * sigma),)
    factors = [
        ToyFactor((0,), partial(_quartic_double_well, kT0=kT0, barrier=barrier, tilt=tilt, half=half),
                  ((-3 * half, 3 * half),), breaks=((top,),)),
        ToyFactor((1,), partial(_harmonic, kT0=kT0, sigma=sigma), search_yz),
        ToyFactor((2,), partial(_harmonic, kT0=kT0, sigma=sigma), search_yz),
    ]
    modes = ToyModes(factor=0, n=2, label=partial(_below, threshold=top))
    return ToyTarget(system, topology, [[-half, 0.0, 0.0]], temperature, factors, modes, name="toy-double-well")


_MIX_MEANS = ((0.6, 0.0), (-0.3, 0.5196152422706632), (-0.3, -0.5196152422706632))  # nm, triangle of radius 0.6
_MIX_SIGMAS = (0.10, 0.08, 0.12)  # nm


def _mixture_log_terms(p: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """log(w_k N_k(x, y)) for each component, stacked on the last axis."""
    terms = []
    for w, (mx, my), s in zip(weights, _MIX_MEANS, _MIX_SIGMAS):
        d2 = (p[..., 0] - mx) ** 2 + (p[..., 1] - my) ** 2
        terms.append(math.log(w / (2.0 * math.pi * s * s)) - d2 / (2.0 * s * s))
    return np.stack(terms, axis=-1)


def _mixture_energy(p: np.ndarray, kT0: float, weights: tuple[float, ...]) -> np.ndarray:
    return -kT0 * logsumexp(_mixture_log_terms(p, weights), axis=-1)


def _mixture_label(p: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    return np.argmax(_mixture_log_terms(p, weights), axis=-1)


def gaussian_mixture(temperature: Any = 300.0, *, weights: Sequence[float] = (0.5, 0.3, 0.2)) -> ToyTarget:
    """One particle whose (x, y) follow a 3-component isotropic Gaussian mixture, z harmonic.

    U / kT0 = -log sum_k w_k N((x, y); m_k, s_k^2 I) + z^2 / (2 * 0.1 nm^2), kT0 = R * ``temperature``;
    means on a triangle of radius 0.6 nm (m_0 = (0.6, 0) nm, then 120 and 240 degrees),
    s = (0.10, 0.08, 0.12) nm, so modes are > 4 s apart and their weights are ``weights`` at
    ``temperature``. Mode k = the component with the largest w_k N_k at x (written stably in the
    OpenMM expression with a log-sum-exp, so far-away points have finite energy and force).
    """
    w = tuple(float(v) for v in weights)
    if len(w) != 3 or min(w) <= 0 or abs(sum(w) - 1.0) > 1e-9:
        raise CMTInputError("gaussian_mixture needs 3 positive weights that sum to 1.")
    kT0 = kT(kelvin(temperature))
    defs, sum_terms = [], []
    for k, (wk, (mx, my), s) in enumerate(zip(w, _MIX_MEANS, _MIX_SIGMAS)):
        defs.append(f"e{k}=-((x-({mx!r}))^2+(y-({my!r}))^2)/{2 * s * s!r}")
        sum_terms.append(f"{wk / (2 * math.pi * s * s)!r}*exp(e{k}-m)")
    expression = (
        f"{kT0!r}*(-m - log({' + '.join(sum_terms)}) + 0.5*(z/0.1)^2); m=max(e0, max(e1, e2)); " + "; ".join(defs)
    )
    system, topology = _one_particle_system(expression)
    factors = [
        ToyFactor((0, 1), partial(_mixture_energy, kT0=kT0, weights=w), ((-1.5, 1.5), (-1.5, 1.5))),
        ToyFactor((2,), partial(_harmonic, kT0=kT0, sigma=0.1), ((-0.8, 0.8),)),
    ]
    modes = ToyModes(factor=0, n=3, label=partial(_mixture_label, weights=w))
    start = [[*_MIX_MEANS[int(np.argmax(w))], 0.0]]
    return ToyTarget(system, topology, start, temperature, factors, modes, name="toy-gaussian-mixture")
