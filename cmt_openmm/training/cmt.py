"""Constrained Mass Transport: one annealing step = buffer, dual, weights, weighted fit.

Per step (docs/method.md, "Fitting the flow"): draw N samples x_n ~ q_i with log q_i(x_n) (the Cartesian-space density
the generator reports, rigid-body frame fixed) and evaluate the raw reduced energies once
each (log p̃ = −u, failed energies → −inf → weight 0, no regularisation in the weights);
solve the dual for (λ, η) (:func:`~cmt_openmm.training.dual.solve_dual`); fit the flow to
q_{i+1} ∝ q_i^{λ/s} p̃^{1/s} by importance-weighted forward KL on that buffer. The density
space matters for the entropy constraint only; it is the one of ``BoltzmannGenerator.log_prob``.
With ``strata`` set, the fit weights keep the dual's shape inside each stratum but give every
stratum at least ``strata_floor`` / K of the mass (:mod:`.strata`), so that a basin the flow has
not yet learned well is not drained step after step.

Fit: ``fit_steps`` Adam steps (default: one pass over the buffer, ceil(N / batch_size) steps,
which the calibration found better than fitting hard) on minibatches drawn ∝ w̄ with
replacement (``resample=True``, loss −mean log q_θ) or uniformly with the weights in the loss
(−Σ N w̄_b log q_θ(x_b) / B). The Adam state carries over between annealing steps. ``step_scale``
multiplies N and the minibatch (auto: measured on the device before the first step,
:func:`~.schedule.pick_step_scale`).

Stops when the dual returns λ = η = 0 (the next distribution is the target itself), after
``steps_after_target`` more steps; the shared loop also stops on max_steps or the budget. The
learning rate shrinks by ``lr_decay_after_target`` per step from the target on, or, with
``lr_decay_from: cooled``, from the first step after the warm-up whose entropy constraint is
inactive (η = 0).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .config import AUTO, register_method
from .distributed import Layout, broadcast_object, on_main
from .dual import solve_dual
from .loop import Trainer
from .schedule import auto_eps_ent, auto_lr_decay, pick_step_scale
from .strata import floor_labels, floored_log_weights, holder_log_weights, stratifier


def fit_to_buffer(
    generator,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    log_weights: np.ndarray | torch.Tensor,
    n_steps: int,
    batch_size: int,
    resample: bool,
    rng: torch.Generator,
    layout: Layout | None = None,
) -> float:
    """Importance-weighted maximum likelihood −Σ w̄ log q_θ(x) on a buffer; mean loss (nats).

    x: (N, n_atoms, 3) nm; log_weights: (N,) normalised log w̄ (−inf = weight 0). With a sharded
    ``layout`` x holds only this rank's rows :meth:`~.distributed.Layout.local_range` of the N:
    every rank draws the same global minibatch (``rng`` is the same stream on every rank), takes the
    loss of its own rows, and the ranks' gradients are summed before each Adam step.
    """
    log_w = torch.as_tensor(np.asarray(log_weights), dtype=torch.float64, device=x.device)
    w = torch.exp(log_w - torch.logsumexp(log_w, 0))
    n = w.shape[0]
    sharded = layout is not None and layout.sharded
    lo, hi = layout.local_range(n) if sharded else (0, n)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    for _ in range(n_steps):
        if resample:
            idx = torch.multinomial(w, batch_size, replacement=True, generator=rng)
            weight = None
        else:
            idx = torch.randint(n, (batch_size,), generator=rng, device=x.device)
            # failed-energy samples (w = 0) stay out of the sum, even if log q were -inf
            idx = idx[w[idx] > 0]
            weight = n * w[idx]
        optimizer.zero_grad(set_to_none=True)
        if sharded:
            mine = (idx >= lo) & (idx < hi)
            idx, weight = idx[mine] - lo, None if weight is None else weight[mine]
        if idx.numel():
            log_q = generator.log_prob(x[idx])
            terms = log_q if weight is None else weight * log_q
            loss = -(terms.mean() if weight is None and not sharded else terms.sum() / batch_size)
            loss.backward()
            loss = loss.detach()
        else:  # this rank holds none of the minibatch: its gradient is 0
            loss = 0.0
        if sharded:
            loss = layout.reduce_gradients(parameters, loss)
        optimizer.step()
        losses.append(float(loss))
    return float(np.mean(losses)) if losses else math.nan


@register_method("cmt")
class CMTTrainer(Trainer):
    """The CMT method in the shared loop (see the module docstring)."""

    def __init__(self, target, generator, energy, config, rng):
        self.settings = config.cmt
        super().__init__(target, generator, energy, config, rng, lr=self.settings.lr)
        c = self.settings
        self.fit_steps = c.fit_steps or math.ceil(c.n_samples / c.batch_size)
        self.reached_at: int | None = None  # steps_done when the dual first gave λ = η = 0
        self.cooled_at: int | None = None  # steps_done when, after the warm-up, the dual first gave η = 0
        self.first_entropy: float | None = None  # H(q_0) estimated on the first buffer (nats)
        self.strata_of = stratifier(c.strata, target.topology, by_turns=c.strata_mass == "holder-turns")
        self.step_scale: int | None = None if c.step_scale == AUTO else int(c.step_scale)  # None: not measured yet

    @property
    def n_samples(self) -> int:
        """Samples per annealing step: ``n_samples`` × the step scale."""
        return self.settings.n_samples * (self.step_scale or 1)

    @property
    def batch_size(self) -> int:
        """Samples per Adam step: ``batch_size`` × the step scale."""
        return self.settings.batch_size * (self.step_scale or 1)

    def step_cost(self) -> int:
        return self.n_samples

    def prepare(self) -> str | None:
        """With ``step_scale: auto``, measure the step at growing scales (rank 0, on this device) and keep
        the one :func:`~.schedule.pick_step_scale` picks; what was chosen, in one line."""
        if self.step_scale is not None:
            return None
        world = self.layout.world
        self.step_scale, timings = broadcast_object(world, on_main(world, lambda: pick_step_scale(self.seconds_at)))
        per_sample = ", ".join(f"{scale}×: {1e6 * t / (scale * self.settings.n_samples):,.0f}"
                               for scale, t in timings.items())
        return (f"step scale {self.step_scale}: {self.n_samples:,} samples per annealing step, minibatches of "
                f"{self.batch_size:,} (µs per sample of a step, by scale: {per_sample})")

    def seconds_at(self, scale: int) -> float | None:
        """Seconds of one step's work at ``scale``, in this process: the draw, its energies, the strata's
        labels, the dual and the fit's weights, and ``fit_steps`` forward and backward passes (the faster
        of two tries after a first that takes compilation and caches; no Adam update, so the weights,
        Adam's state and the run's random stream stay as they were). None where a scale above 1 runs
        out of device memory."""
        c = self.settings
        n, batch = c.n_samples * scale, c.batch_size * scale
        device = self.rng.device
        stream = torch.Generator(device=device).manual_seed(self.config.seed)
        eps_ent = c.eps_ent if c.eps_ent != AUTO else c.eps_ent_warmup or 1.0

        def once() -> float:
            start = time.perf_counter()
            x, log_q = self.generator.sample(n, generator=stream)
            with torch.no_grad():
                log_p = -self.energy(x)
            labels = None if self.strata_of is None else self.strata_of(x.cpu().numpy())
            self.fit_log_weights(solve_dual(log_q, log_p, c.eps_tr, eps_ent), labels, log_q, log_p)
            self.target_stats(log_p, log_q)
            for _ in range(self.fit_steps):
                idx = torch.randint(n, (batch,), generator=stream, device=device)
                (-self.generator.log_prob(x[idx]).mean()).backward()
            self.generator.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        try:
            once()
            return min(once(), once())
        except torch.cuda.OutOfMemoryError:
            if scale == 1:
                raise
            self.generator.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return None

    @property
    def done(self) -> str | None:
        if self.reached_at is not None and self.steps_done - self.reached_at >= self.settings.steps_after_target:
            return "target reached"
        return None

    def entropy_budget(self, entropy: float) -> float:
        """ε_ent of the next annealing step, whose buffer's entropy estimate is ``entropy`` (nats):
        eps_ent_warmup during the warm-up, then eps_ent (auto: :func:`~.schedule.auto_eps_ent`)."""
        c = self.settings
        if c.eps_ent_warmup is not None and self.steps_done < c.warmup_steps:
            return c.eps_ent_warmup
        if c.eps_ent != AUTO:
            return c.eps_ent
        shed = self.first_entropy - entropy
        return auto_eps_ent(self.generator.dim, shed, self.steps_done, self.plan, c.cool_fraction)

    def lr_decay(self) -> float:
        """The factor the learning rate shrinks by before this step (1 before the decay starts)."""
        c = self.settings
        start = self.reached_at if c.lr_decay_from == "target" else self.cooled_at
        if start is None:
            return 1.0
        return auto_lr_decay(start, self.plan, c.lr_final_fraction) if c.lr_decay_after_target == AUTO else c.lr_decay_after_target

    def step(self) -> dict:
        x, log_q, log_p = self.draw_buffer()
        return {**self.anneal(x, log_q, log_p), **self.recheck_energy(x)}

    def draw_buffer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N flow samples x (N, n_atoms, 3) nm with log q_i(x) and log p̃(x) = −u(x) (N,), one evaluation
        each; with several processes, this process's rows of them (:mod:`.distributed`)."""
        x, log_q = self.layout.draw(self.generator.sample, self.n_samples)
        with torch.no_grad():
            log_p = -self.energy(x)
        return x, log_q, log_p

    def fit_log_weights(self, sol, labels: np.ndarray | None, log_q: torch.Tensor,
                        log_p: torch.Tensor) -> np.ndarray:
        """Normalised log-weights (N,) the flow is fitted to: the dual's (q_{i+1}); with strata
        (labels: (N,) the buffer's, else None) each stratum's mass set by ``strata_mass`` and floored
        (holder-turns: Hölder masses per stratum and turn pattern, the floor over the strata)."""
        if labels is None:
            return sol.log_weights
        log_weights, mass = sol.log_weights, self.settings.strata_mass
        if mass != "dual":
            log_weights = holder_log_weights(log_weights, labels, log_q.detach().double().cpu().numpy(),
                                             log_p.detach().double().cpu().numpy(), sol.lam, sol.eta)
        if mass == "holder-turns":
            labels = floor_labels(labels, self.target.topology)
        return floored_log_weights(log_weights, labels, self.settings.strata_floor)

    def gather_buffer(self, x: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor):
        """The whole buffer's log q, log p̃ (N,) and strata labels (N,) or None, from this process's rows."""
        labels = None if self.strata_of is None else self.strata_of(x.detach().cpu().numpy())
        if self.layout.world.size == 1:
            return log_q, log_p, labels
        columns = [log_q.detach().double(), log_p.double()]
        if labels is not None:
            columns.append(torch.as_tensor(labels, dtype=torch.float64, device=log_q.device))
        both = self.layout.gather(torch.stack(columns, 1), self.n_samples)
        labels = None if labels is None else both[:, 2].long().cpu().numpy()
        return both[:, 0], both[:, 1], labels

    def anneal(self, x: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor) -> dict:
        """Dual, weights and weighted fit on one buffer (see :meth:`draw_buffer`); the step's record."""
        c = self.settings
        log_q, log_p, labels = self.gather_buffer(x, log_q, log_p)
        decay = self.lr_decay()
        if decay != 1.0:
            self.set_lr(self.optimizer.param_groups[0]["lr"] * decay)
        entropy = -float(log_q.detach().double().mean())
        if self.first_entropy is None:
            self.first_entropy = entropy
        eps_ent = self.entropy_budget(entropy)
        sol = solve_dual(log_q, log_p, c.eps_tr, eps_ent)
        log_weights = self.fit_log_weights(sol, labels, log_q, log_p)
        loss = fit_to_buffer(
            self.generator, self.optimizer, x, log_weights, self.fit_steps, self.batch_size, c.resample, self.rng,
            self.layout,
        )
        if sol.target_reached and self.reached_at is None:
            self.reached_at = self.steps_done + 1  # counted after this step
        if not sol.entropy_active and self.cooled_at is None and self.steps_done >= c.warmup_steps:
            self.cooled_at = self.steps_done + 1
        return {
            "lam": sol.lam,
            "eta": sol.eta,
            "eps_ent": eps_ent,
            "kl": sol.kl,
            "entropy": sol.entropy,
            "entropy_drop": sol.entropy_drop,
            "ess_step": sol.ess,
            "trust_active": sol.trust_active,
            "entropy_active": sol.entropy_active,
            # mass the strata moved: total variation between the fitted and the dual's weights
            "strata_tv": 0.5 * float(np.sum(np.abs(np.exp(log_weights) - np.exp(sol.log_weights)))),
            **self.target_stats(log_p, log_q),
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "n_samples": self.n_samples,
        }

    _MARKS = ("reached_at", "cooled_at")  # step marks, stored as -1 when not (yet) reached

    def state_dict(self) -> dict:
        marks = {name: getattr(self, name) for name in self._MARKS}
        return {**super().state_dict(), **{k: -1 if v is None else v for k, v in marks.items()},
                "first_entropy": math.nan if self.first_entropy is None else self.first_entropy,
                "step_scale": self.step_scale or 1}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        for name in self._MARKS:  # cooled_at is absent in checkpoints written before lr_decay_from
            value = int(state.get(name, -1))
            setattr(self, name, None if value < 0 else value)
        first = float(state.get("first_entropy", math.nan))
        self.first_entropy = None if math.isnan(first) else first
        self.step_scale = int(state.get("step_scale", 1))
