"""Exact MCMC moves that use a Boltzmann generator as an independence proposal.

:class:`FlowIndependenceMove` is an openmmtools ``MCMCMove``: independence Metropolis–Hastings
with the generator q as proposal, accepting x -> x' with probability

    min(1, exp(-u(x') + u(x) + log q(x) - log q(x'))),

u the reduced potential of the thermodynamic state the move is applied at (so the move is
exact at every temperature of a replica-exchange ladder). openmmtools' ``MetropolizedMove``
assumes a symmetric proposal and has no Hastings term, hence this hand-written move.
The same move works on the ``Context`` of a plain ``openmm.app.Simulation``
(:meth:`FlowIndependenceMove.apply_to_simulation`, :class:`~cmt_openmm.sampling.reporters.FlowMoveReporter`).

Why it is exact:
- the generator density is a density over the 3N-6 internal (frame) coordinates; a proposal is
  placed in the rigid-body frame of the current configuration, so the move changes only those
  coordinates and the Hastings ratio above is the right one for any rigid-motion-invariant u;
- a proposal with flipped chirality, a failed energy (OpenMM exception, NaN, inf) or a
  non-finite log q is rejected (counted as proposed, never dropped), which restricts the
  chain to the reference chirality and keeps detailed balance;
- after an accepted move the velocities are redrawn from Maxwell–Boltzmann at the state's
  temperature: a Gibbs step on v that keeps the joint Boltzmann distribution, and the only
  safe choice with constraints, where the old velocities need not be tangent to the
  constraints at the new positions. A rejected move keeps the velocities.
- proposals are drawn in batches of ``batch_size`` (one flow call per batch) and consumed
  one by one; they are independent of the chain, so batching changes nothing.

The generator must cover the target (q > 0 wherever the Boltzmann density is): where it does
not, the chain stays exact but cannot leave such a state by a flow move.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import numpy as np
import openmm
import torch
from openmm import unit
from openmmtools import mcmc

from ..errors import CMTInputError
from ..generator import load_generator, register_target
from ..units import MOLAR_GAS_CONSTANT

_DEFAULT_CLASS = "cmt_openmm.generator.BoltzmannGenerator"


def _file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 (hex) of a file's bytes (BoltzmannGenerator's content hash), None if unreadable."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class _Proposals:
    """Batches of generator samples consumed one at a time: (x_std, log_q, chirality_flipped)."""

    def __init__(self, generator: Any, batch_size: int):
        self.generator = generator
        self.batch_size = batch_size
        self._x = np.empty((0,))
        self._log_q = np.empty((0,))
        self._flipped = np.empty((0,), dtype=bool)
        self._next = 0
        device = next(iter(generator.parameters()), torch.empty(0)).device \
            if isinstance(generator, torch.nn.Module) else torch.device("cpu")
        self._torch_rng = torch.Generator(device=device)

    def pop(self, rng: np.random.Generator) -> tuple[np.ndarray, float, bool]:
        if self._next >= len(self._log_q):
            self._torch_rng.manual_seed(int(rng.integers(2**63)))
            with torch.no_grad():
                x, log_q = self.generator.sample(self.batch_size, generator=self._torch_rng)
                flipped = self.generator.chirality_flipped(x)
            self._x = x.detach().cpu().numpy().astype(np.float64)
            self._log_q = log_q.detach().cpu().numpy().astype(np.float64)
            self._flipped = np.asarray(flipped.detach().cpu().numpy(), dtype=bool)
            self._next = 0
        i = self._next
        self._next += 1
        return self._x[i], float(self._log_q[i]), bool(self._flipped[i])


class FlowIndependenceMove(mcmc.MCMCMove):
    """Independence Metropolis–Hastings move with a Boltzmann generator as proposal.

    Parameters
    ----------
    generator : BoltzmannGenerator or str
        The generator, or the path of one saved with ``BoltzmannGenerator.save`` (loaded once
        per process). Any object with ``sample(n, generator)``, ``log_prob(x)``,
        ``chirality_flipped(x)``, ``coordinates.frame(x)``, ``coordinates.n_atoms``,
        ``save(path)``, ``content_hash()`` and a ``load(path)`` classmethod works.
    n_steps : int
        Proposals attempted per :meth:`apply`.
    batch_size : int
        Proposals drawn per flow call.
    seed : int or None
        Seed of the move's random stream (proposals, acceptance, velocities). Every copy
        (``copy.deepcopy``, serialisation, e.g. one per state of a ``MultiStateSampler`` and
        each write to its storage) gets a new stream spawned from this one (numpy
        ``SeedSequence.spawn``), so that replicas never share proposals; runs are
        reproducible from the seed, and a run resumed from storage continues with a fresh
        stream rather than the interrupted one.
    generator_path : str or None
        Where ``generator`` (an object) is saved, when it is; needed to serialise the move. A
        generator loaded with ``BoltzmannGenerator.load`` and not changed since knows its file.
    target : Target or None
        The target the generator was trained for; only needed when that is not a built-in
        target (see :func:`register_target`), to load the generator from its file.

    Serialisation (openmmtools ``utils.serialize``, pickling, storage of a
    ``MultiStateSampler``, and ``copy.deepcopy`` of a ``SequenceMove`` holding this move) is
    a YAML-safe dict with the generator's file path and content hash, never the weights; the
    generator is loaded once per process and its hash checked. A generator that has never
    been saved must be saved first (:meth:`save_generator`, or ``generator_path=``):
    serialisation is refused with a one-sentence error otherwise. ``copy.deepcopy`` of the
    move itself shares the in-memory generator and works either way.

    Examples
    --------
    An untrained flow on a toy (a few per cent of its proposals are accepted; a trained one does
    better), alone and between the Langevin steps of an openmmtools ``SequenceMove``:

    >>> import cmt_openmm, os, tempfile
    >>> import openmm.unit as unit
    >>> from openmmtools import mcmc, states
    >>> toy = cmt_openmm.get_target("toy-double-well")
    >>> bg = cmt_openmm.BoltzmannGenerator.build(toy, n_layers=2, hidden=8, bound=3.0)
    >>> path = bg.save(os.path.join(tempfile.mkdtemp(), "toy.safetensors"))
    >>> move = cmt_openmm.FlowIndependenceMove(path, n_steps=200, seed=0)   # serialises as (path, hash)
    >>> thermodynamic_state = states.ThermodynamicState(toy.system, 300 * unit.kelvin)
    >>> sampler_state = states.SamplerState(toy.positions * unit.nanometer)
    >>> move.apply(thermodynamic_state, sampler_state)
    >>> stats = move.statistics
    >>> stats["n_proposed"], stats["n_accepted"] > 0, stats["n_energy_failed"]
    (200, True, 0)
    >>> sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=100), move])
    >>> sequence.apply(thermodynamic_state, sampler_state)
    >>> move.n_proposed                    # the sequence holds this move: its counts go on
    400
    """

    def __init__(self, generator: Any, n_steps: int = 1, batch_size: int = 64,
                 seed: int | None = None, generator_path: str | os.PathLike | None = None,
                 target: Any = None):
        super().__init__()
        if target is not None:
            register_target(target)
        if int(n_steps) < 1 or int(batch_size) < 1:
            raise CMTInputError(f"n_steps ({n_steps}) and batch_size ({batch_size}) must be "
                                "positive integers; pass values >= 1.")
        self.n_steps = int(n_steps)
        self.batch_size = int(batch_size)
        self.seed = None if seed is None else int(seed)
        self._path: str | None = None
        self._hash: str | None = None
        if isinstance(generator, (str, os.PathLike)):
            self._generator = load_generator(generator)
            self._register(generator, self._generator)
        else:
            self._generator = generator
            source = getattr(generator, "source_path", None)
            if generator_path is None and source is not None and generator.content_hash() == generator.source_hash:
                generator_path = source  # loaded from a file it still equals: serialise by reference to it
            if generator_path is not None:
                self._register(generator_path, generator)
                if _file_sha256(generator_path) != self._hash and load_generator(
                        generator_path, class_path=self._class).content_hash() != self._hash:
                    raise CMTInputError(f"The generator saved at {generator_path} differs from "
                                        "the generator passed; save it again or pass its path.")
        self._start_stream(np.random.SeedSequence(self.seed))
        self.statistics = {}

    # ---------------------------------------------------------------- bookkeeping
    def _register(self, path: str | os.PathLike, generator: Any) -> None:
        self._path = os.path.realpath(os.fspath(path))
        self._hash = generator.content_hash()
        self._class = _class_path(generator)

    @property
    def generator(self) -> Any:
        """The generator proposals come from (shared; do not modify while moves use it)."""
        return self._generator

    @property
    def generator_path(self) -> str | None:
        """The file the generator is saved in, or None when it was never saved."""
        return self._path

    def save_generator(self, path: str | os.PathLike) -> None:
        """Save the generator to ``path`` (safetensors) so that the move can be serialised."""
        self._generator.save(path)
        self._register(path, self._generator)

    @property
    def statistics(self) -> dict[str, int]:
        """Counts: proposals, acceptances, chirality rejections, failed energies, and proposals whose
        log q is not finite (outside the flow's support; rejected without an energy evaluation)."""
        return dict(n_proposed=self.n_proposed, n_accepted=self.n_accepted,
                    n_chirality_rejected=self.n_chirality_rejected,
                    n_energy_failed=self.n_energy_failed, n_log_q_failed=self.n_log_q_failed)

    @statistics.setter
    def statistics(self, value: dict[str, int]) -> None:
        self.n_proposed = int(value.get("n_proposed", 0))
        self.n_accepted = int(value.get("n_accepted", 0))
        self.n_chirality_rejected = int(value.get("n_chirality_rejected", 0))
        self.n_energy_failed = int(value.get("n_energy_failed", 0))
        self.n_log_q_failed = int(value.get("n_log_q_failed", 0))

    def reset_statistics(self) -> None:
        """Set all counts to zero."""
        self.statistics = {}

    # ---------------------------------------------------------------- serialisation
    def __getstate__(self, **kwargs) -> dict:
        if self._path is None:
            raise CMTInputError("This FlowIndependenceMove cannot be serialised because its "
                                "generator was never saved; call move.save_generator(path) "
                                "first (or pass generator_path=).")
        child = self._seed_seq.spawn(1)[0]
        return dict(
            generator=dict(path=self._path, content_hash=self._hash, class_path=self._class),
            n_steps=self.n_steps, batch_size=self.batch_size, seed=self.seed,
            random_state=dict(entropy=int(child.entropy),
                              spawn_key=[int(k) for k in child.spawn_key]),
            **self.statistics)

    def __setstate__(self, state: dict) -> None:
        g = state["generator"]
        class_path = g.get("class_path", _DEFAULT_CLASS)
        generator = load_generator(g["path"], g["content_hash"], class_path)
        self.n_steps, self.batch_size, self.seed = state["n_steps"], state["batch_size"], state["seed"]
        self._generator, self._path, self._hash, self._class = \
            generator, g["path"], g["content_hash"], class_path
        rs = state["random_state"]
        self._start_stream(np.random.SeedSequence(rs["entropy"], spawn_key=tuple(rs["spawn_key"])))
        self.statistics = state

    def __deepcopy__(self, memo: dict) -> "FlowIndependenceMove":
        """Copy settings and statistics and share the generator (saved or not)."""
        new = type(self).__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items()
                             if k not in ("_proposals", "_rng", "_seed_seq", "_checked_system")})
        new._start_stream(self._seed_seq.spawn(1)[0])
        memo[id(self)] = new
        return new

    def _start_stream(self, seed_seq: np.random.SeedSequence) -> None:
        """A fresh random stream and an empty proposal buffer. Under MPI (openmmtools runs one
        copy of each move per rank) every rank but 0 derives its own stream from its rank."""
        rank = _mpi_rank()
        if rank:
            seed_seq = np.random.SeedSequence(seed_seq.entropy, spawn_key=(*seed_seq.spawn_key, 2**32 + rank))
        self._seed_seq = seed_seq
        self._checked_system = None
        self._rng = np.random.Generator(np.random.PCG64(seed_seq))
        self._proposals = _Proposals(self._generator, self.batch_size)
        self._cached_x, self._cached_log_q, self._cached_frame = None, 0.0, None

    # ---------------------------------------------------------------- the move
    def apply(self, thermodynamic_state, sampler_state, context_cache=None) -> None:
        """Attempt ``n_steps`` flow proposals on ``sampler_state`` (modified in place).

        u is ``thermodynamic_state.reduced_potential(context)`` with a Context from
        ``context_cache`` (openmmtools' global cache when None). After an acceptance the
        velocities are redrawn at the state's temperature and the sampler state (positions,
        velocities, energies) is updated from the Context.
        """
        context, _ = self._get_context_cache(context_cache).get_context(thermodynamic_state)
        sampler_state.apply_to_context(context, ignore_velocities=True)
        x = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer), dtype=np.float64)

        # u(x') = u(x) + (U(x') - U(x)) / kT: the state's other terms (pV, chemical potentials)
        # do not change under a move that keeps box and composition, and this skips the
        # per-call unit arithmetic of reduced_potential.
        kT = thermodynamic_state.kT.value_in_unit(unit.kilojoule_per_mole)
        u_x = thermodynamic_state.reduced_potential(context)
        offset = u_x - _potential_energy(context) / kT

        def reduced_potential(positions: np.ndarray) -> float:
            context.setPositions(positions)
            return _potential_energy(context) / kT + offset

        self._check_system(context.getSystem())
        x_new, accepted = self._run(x, u_x, reduced_potential, self.n_steps)
        if accepted:
            context.setPositions(x_new)
            context.setVelocitiesToTemperature(thermodynamic_state.temperature,
                                               int(self._rng.integers(1, 2**31 - 1)))
            sampler_state.update_from_context(context)

    def apply_to_simulation(self, simulation: openmm.app.Simulation, n_steps: int | None = None,
                            temperature=None) -> dict[str, int]:
        """Attempt flow proposals on the Context of a running ``openmm.app.Simulation``.

        u = U / kT with T the integrator's ``getTemperature()``; ``temperature`` (K or
        Quantity) is needed only for an integrator without one (e.g. Verlet) and must agree
        with it otherwise. Call it between ``simulation.step()`` calls. Returns this call's
        ``{"n_proposed", "n_accepted"}``.
        """
        kT = MOLAR_GAS_CONSTANT * _temperature_of(simulation.integrator, temperature)
        self._check_system(simulation.system)
        context = simulation.context
        groups = simulation.integrator.getIntegrationForceGroups()  # the forces the dynamics feel
        state = context.getState(getPositions=True, getEnergy=True, groups=groups)
        x = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), np.float64)

        def reduced_potential(positions: np.ndarray) -> float:
            context.setPositions(positions)
            return _potential_energy(context, groups) / kT

        u_x = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kT
        before = (self.n_proposed, self.n_accepted)
        x_new = x
        try:
            x_new, accepted = self._run(x, u_x, reduced_potential,
                                        self.n_steps if n_steps is None else int(n_steps))
        finally:  # the Context holds the last proposal: put the chain's state back
            context.setPositions(x_new)
        if accepted:
            context.setVelocitiesToTemperature(kT / MOLAR_GAS_CONSTANT,
                                               int(self._rng.integers(1, 2**31 - 1)))
        return dict(n_proposed=self.n_proposed - before[0], n_accepted=self.n_accepted - before[1])

    def _run(self, x: np.ndarray, u_x: float, reduced_potential: Callable[[np.ndarray], float],
             n_steps: int) -> tuple[np.ndarray, bool]:
        """The Metropolis–Hastings chain from x (n, 3) nm with reduced potential u_x: returns
        the final positions and whether any proposal was accepted."""
        if not np.isfinite(x).all():
            raise CMTInputError("The positions flow moves start from contain NaN or inf (the simulation "
                                "has blown up); restart it from a finite state before applying flow moves.")
        u_x = _finite_or_inf(u_x)
        log_q_x, frame = self._current(x)
        accepted = False
        for _ in range(n_steps):
            x_std, log_q_new, flipped = self._proposals.pop(self._rng)
            self.n_proposed += 1
            if flipped:
                self.n_chirality_rejected += 1
                continue
            if frame is None:
                frame = self._frame(x)
            proposal = x_std @ frame[0].T + frame[1]
            if not (np.isfinite(log_q_new) and np.isfinite(proposal).all()):
                self.n_log_q_failed += 1
                continue
            try:
                u_new = _finite_or_inf(reduced_potential(proposal))
            except Exception:  # OpenMM raises for some failed evaluations
                u_new = np.inf
            if not np.isfinite(u_new):
                self.n_energy_failed += 1
                continue
            if np.log(self._rng.random()) < self._log_acceptance(u_x, u_new, log_q_x, log_q_new):
                x, u_x, log_q_x, accepted = proposal, u_new, log_q_new, True
                self.n_accepted += 1
        self._cached_x, self._cached_log_q, self._cached_frame = x.copy(), log_q_x, frame
        return x, accepted

    @staticmethod
    def _log_acceptance(u_x: float, u_new: float, log_q_x: float, log_q_new: float) -> float:
        """log of the Metropolis–Hastings ratio p(x') q(x) / (p(x) q(x'))."""
        return -u_new + u_x + log_q_x - log_q_new

    def _check_system(self, system: openmm.System) -> None:
        """Refuse a System with another number of particles than the generator's atoms, or whose
        distance constraints are not the generator's (checked once per System, atoms first).

        A generator trained with constraints samples the constraint manifold, a set of measure
        zero for an unconstrained System (and vice versa): the pairing cannot be exact.
        """
        if self._checked_system is system:
            return
        n_atoms = self._generator.coordinates.n_atoms
        if system.getNumParticles() != n_atoms:
            raise CMTInputError(f"The System has {system.getNumParticles()} particles but the generator was built for "
                                f"{n_atoms}; use a generator trained for this system.")
        ours = {(i, j): length for i, j, length in getattr(self._generator.coordinates, "constraints", ())}
        theirs = {}
        for k in range(system.getNumConstraints()):
            i, j, length = system.getConstraintParameters(k)
            theirs[(min(i, j), max(i, j))] = length.value_in_unit(unit.nanometer)
        if set(ours) != set(theirs) or any(abs(ours[b] - theirs[b]) > 1e-6 * theirs[b] for b in theirs):
            raise CMTInputError(f"The generator was trained with {len(ours)} distance constraints but the System has "
                                f"{len(theirs)} (or other ones); flow moves are exact only when both constrain the "
                                "same bonds to the same lengths, so use a generator trained on this System.")
        self._checked_system = system

    def _current(self, x: np.ndarray) -> tuple[float, tuple[np.ndarray, np.ndarray] | None]:
        """log q(x) from the generator's inverse pass and x's rigid-body frame (None: not yet
        computed), both cached while x is unchanged: a flow move keeps the frame."""
        if self._cached_x is not None and np.array_equal(self._cached_x, x):
            return self._cached_log_q, self._cached_frame
        with torch.no_grad():
            log_q = float(self._generator.log_prob(torch.as_tensor(x[None])).reshape(-1)[0])
        return (log_q if np.isfinite(log_q) else -np.inf), None

    def _frame(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rotation (3, 3) and translation (3,) with x == x_std @ R.T + t."""
        with torch.no_grad():
            rotation, shift = self._generator.coordinates.frame(torch.as_tensor(x[None]))
        return (rotation[0].detach().cpu().numpy().astype(np.float64),
                shift[0].detach().cpu().numpy().astype(np.float64))

    def __str__(self) -> str:
        return (f"FlowIndependenceMove(generator={self._path or '<unsaved>'}, "
                f"n_steps={self.n_steps}, batch_size={self.batch_size})")


def _potential_energy(context: openmm.Context, groups: int | set[int] = -1) -> float:
    """Potential energy in kJ/mol of the Context's current positions (force ``groups``: all by default)."""
    state = context.getState(getEnergy=True, groups=groups)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def _mpi_rank() -> int:
    """This process's MPI rank under openmmtools' mpiplus (0 without MPI)."""
    try:
        import mpiplus
    except ImportError:
        return 0
    comm = mpiplus.get_mpicomm()
    return 0 if comm is None else int(comm.rank)


def _finite_or_inf(u: float) -> float:
    return float(u) if np.isfinite(u) else np.inf


def _temperature_of(integrator: openmm.Integrator, temperature) -> float:
    """Temperature in K: the integrator's, or the argument for an integrator without one."""
    own = integrator.getTemperature() if hasattr(integrator, "getTemperature") else None
    own = own.value_in_unit(unit.kelvin) if isinstance(own, unit.Quantity) else own
    if isinstance(temperature, unit.Quantity):
        temperature = temperature.value_in_unit(unit.kelvin)
    if temperature is None:
        if own is None:
            raise CMTInputError(f"{type(integrator).__name__} has no temperature; pass "
                                "temperature= (K) to apply flow moves.")
        temperature = own
    elif own is not None and abs(float(temperature) - own) > 1e-6 * own:
        raise CMTInputError(f"The temperature {temperature} K differs from the integrator's "
                            f"{own} K; flow moves must sample the same temperature as the dynamics.")
    if not float(temperature) > 0:
        raise CMTInputError(f"The temperature must be positive, got {temperature} K.")
    return float(temperature)
