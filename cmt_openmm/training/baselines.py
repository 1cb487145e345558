"""Baselines in CMT's loop: reverse KL, forward KL on given samples, temperature annealing.

Same flow, same energy accounting (every configuration sent to OpenMM counts, including the
monitoring samples of forward KL), same records and checkpoints as CMT
(:mod:`cmt_openmm.training.loop`), so budgets compare one to one.

- Reverse KL: minimise E_q[log q(x) + u_reg(x)] with reparameterised samples; the gradient of
  the lin-log regularised energy comes from OpenMM's forces (``OpenMMEnergy`` autograd).
- Forward KL: maximum likelihood −E_data[log q(x)] on ``positions`` (nm) from an .npz file;
  frames outside the flow's support are refused when the trainer is built.
- Temperature annealing (TA-BG): reverse KL at ``t_high``, then importance-weighted
  forward-KL fits down a geometric temperature ladder to the target temperature — CMT's
  buffer/weights/fit step with the fixed tempered path p̃^{T/T_k}. Energies at T_k are the
  target's reduced energies rescaled, u_k = u · T/T_k (exact for a temperature-independent
  potential), so no extra OpenMM contexts are needed.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..energy.regularize import regularize_energy
from ..errors import CMTInputError
from .cmt import fit_to_buffer
from .config import register_method
from .loop import Trainer


def reverse_kl_steps(t: Trainer, n_steps: int, batch_size: int, scale: float = 1.0) -> dict:
    """``n_steps`` Adam steps of reverse KL E_q[log q + u_reg(x)·scale]; the record fields.

    scale = T/T_k tempers the target (1 at the target temperature); the regularisation
    threshold is ``config.energy.threshold``. Entropy and reverse ESS (raw energies, against
    the target) are over all samples of the window, each weighted against its own flow. With
    several processes each draws its shards of every batch and the gradients are summed.
    """
    layout = t.layout
    losses, log_w, log_qs, checked = [], [], [], {}
    for _ in range(n_steps):
        x, log_q = layout.draw(t.generator.rsample, batch_size)
        u = t.energy(x)
        if not losses:  # the first batch of the window stands for the step
            checked = t.recheck_energy(x)
        terms = log_q + regularize_energy(u * scale, t.config.energy.threshold)
        loss = terms.sum() / batch_size if layout.sharded else terms.mean()
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = layout.reduce_gradients(t.parameters, loss.detach()) if layout.sharded else loss.detach()
        t.optimizer.step()
        losses.append(float(loss))
        log_w.append((-u.detach() - log_q.detach()).double())
        log_qs.append(log_q.detach().double())
    log_w = layout.gather(torch.cat(log_w), batch_size, n_steps)
    log_qs = layout.gather(torch.cat(log_qs), batch_size, n_steps)
    return {
        **checked,
        "entropy": -float(log_qs.mean()),
        **t.target_stats(log_w, torch.zeros_like(log_w)),
        "loss": float(np.mean(losses)),
    }


@register_method("reverse_kl")
class ReverseKLTrainer(Trainer):
    """Reverse KL; one step = ``steps_per_record`` Adam steps of ``batch_size`` samples."""

    def __init__(self, target, generator, energy, config, rng):
        self.settings = config.reverse_kl
        super().__init__(target, generator, energy, config, rng, lr=self.settings.lr)

    def step_cost(self) -> int:
        return self.settings.steps_per_record * self.settings.batch_size

    def step(self) -> dict:
        return reverse_kl_steps(self, self.settings.steps_per_record, self.settings.batch_size)


@register_method("forward_kl")
class ForwardKLTrainer(Trainer):
    """Maximum likelihood on given samples; ``eval_samples`` flow samples per record for the ESS."""

    def __init__(self, target, generator, energy, config, rng):
        self.settings = config.forward_kl
        super().__init__(target, generator, energy, config, rng, lr=self.settings.lr)
        self.data = _load_positions(self.settings.data, target.n_atoms).to(self.rng.device)
        _check_support(generator, self.data, self.settings.data)

    def step_cost(self) -> int:
        return self.settings.eval_samples

    def step(self) -> dict:
        s, layout = self.settings, self.layout
        lo, hi = layout.local_range(s.batch_size)  # this process's part of every minibatch
        losses = []
        for _ in range(s.steps_per_record):
            idx = torch.randint(self.data.shape[0], (s.batch_size,), generator=self.rng, device=self.data.device)
            if layout.sharded:
                loss = -self.generator.log_prob(self.data[idx[lo:hi]]).sum() / s.batch_size
            else:
                loss = -self.generator.log_prob(self.data[idx]).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss = layout.reduce_gradients(self.parameters, loss.detach()) if layout.sharded else loss.detach()
            self.optimizer.step()
            losses.append(float(loss))
        record = {"loss": float(np.mean(losses))}
        if s.eval_samples:
            x, log_q = layout.draw(self.generator.sample, s.eval_samples)
            with torch.no_grad():
                log_p = layout.gather(-self.energy(x), s.eval_samples)
            log_q = layout.gather(log_q.detach(), s.eval_samples)
            record.update(entropy=-float(log_q.mean()), **self.target_stats(log_p, log_q))
        return record


def _load_positions(path: str, n_atoms: int) -> torch.Tensor:
    """(M, n_atoms, 3) float64 nm from an .npz with ``positions`` (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            positions = np.asarray(data["positions"], dtype=np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise CMTInputError(f"cannot read `positions` from forward_kl.data {path} ({exc}); give an .npz with positions in nm.") from None
    if positions.ndim != 3 or positions.shape[1:] != (n_atoms, 3) or positions.shape[0] == 0:
        raise CMTInputError(
            f"forward_kl.data positions have shape {positions.shape}; expected (M, {n_atoms}, 3) in nm."
        )
    if not np.all(np.isfinite(positions)):
        raise CMTInputError(f"forward_kl.data {path} holds non-finite positions; remove those frames.")
    return torch.from_numpy(positions)


def _check_support(generator, data: torch.Tensor, path: str, batch_size: int = 10_000) -> None:
    """Refuse training frames outside the flow's support (log q = −inf: no gradient, an inf loss).

    A frame is outside when one of its flow coordinates y = scaling.to_flow(z) leaves the flow's
    interval [lower, upper] (a bond stretched beyond the flow's range, a mirrored chiral centre,
    a particle outside a toy's box) or its coordinates are not finite (degenerate geometry).
    """
    scaling = generator.flow.scaling
    names = list(getattr(generator.coordinates, "names", None) or [
        f"{'xyz'[i % 3]} of atom {i // 3}" for i in range(generator.dim)])
    counts = torch.zeros(generator.dim, dtype=torch.long)
    bad_frames = 0
    with torch.no_grad():
        for start in range(0, data.shape[0], batch_size):
            x = data[start:start + batch_size].to(scaling.center.device)
            z, log_det = generator.coordinates(x)
            y = scaling.to_flow(z)
            outside = (y < scaling.lower) | (y > scaling.upper) | ~torch.isfinite(y)
            bad = outside.any(-1) | ~torch.isfinite(log_det)
            counts += outside.sum(0).cpu()
            bad_frames += int(bad.sum())
    if bad_frames:
        worst = [i for i in torch.argsort(counts, descending=True, stable=True).tolist() if counts[i] > 0]
        where = ", ".join(f"{names[i]} in {int(counts[i])} frame{'s' if counts[i] > 1 else ''}" for i in worst[:3])
        more = f" and {len(worst) - 3} more coordinates" if len(worst) > 3 else ""
        raise CMTInputError(
            f"{bad_frames} of {data.shape[0]} frames of forward_kl.data {path} lie outside the flow's support "
            f"({where or 'degenerate geometry'}{more}), where log q = −inf would give them no gradient and an "
            f"infinite loss; remove those frames or train on data of the system and reference structure the "
            f"flow is built for."
        )


@register_method("temperature_annealing")
class TemperatureAnnealingTrainer(Trainer):
    """TA-BG: reverse KL at t_high, then weighted fits down a geometric temperature ladder.

    The schedule is a fixed list of steps: ceil(reverse_kl_steps / steps_per_record)
    reverse-KL records at t_high, then ``steps_per_temperature`` annealing steps at each lower
    ladder temperature, and ``final_steps`` more at the target temperature. An annealing step
    at T_k draws ``n_samples`` from the flow (≈ p at T_{k−1}), weights them by
    exp(−u·T/T_k)/q and fits, as a CMT step does with its dual's weights.
    """

    def __init__(self, target, generator, energy, config, rng):
        self.settings = s = config.temperature_annealing
        super().__init__(target, generator, energy, config, rng, lr=s.lr)
        t_target = float(target.temperature)
        if not s.t_high > t_target:
            raise CMTInputError(
                f"temperature_annealing.t_high ({s.t_high} K) must exceed the target temperature ({t_target} K)."
            )
        ladder = [s.t_high * (t_target / s.t_high) ** (k / (s.n_temperatures - 1)) for k in range(s.n_temperatures)]
        ladder[-1] = t_target
        n_rkl = math.ceil(s.reverse_kl_steps / s.steps_per_record)
        sizes = [s.steps_per_record] * n_rkl
        if n_rkl:
            sizes[-1] = s.reverse_kl_steps - s.steps_per_record * (n_rkl - 1)
        self.schedule: list[tuple[str, float, int]] = [("reverse_kl", s.t_high, n) for n in sizes]
        for t_k in ladder[1:]:
            self.schedule += [("fit", t_k, 0)] * s.steps_per_temperature
        self.schedule += [("fit", t_target, 0)] * s.final_steps
        self.t_target = t_target
        self.fit_steps = s.fit_steps or math.ceil(s.n_samples / s.batch_size)

    @property
    def done(self) -> str | None:
        return "schedule finished" if self.steps_done >= len(self.schedule) else None

    def planned_steps(self) -> int:
        return len(self.schedule)

    def step_cost(self) -> int:
        phase, _, n = self.schedule[self.steps_done]
        return n * self.settings.batch_size if phase == "reverse_kl" else self.settings.n_samples

    def step(self) -> dict:
        phase, t_k, n = self.schedule[self.steps_done]
        scale = self.t_target / t_k
        record = {"phase": phase, "temperature": t_k}
        if phase == "reverse_kl":
            return {**record, **reverse_kl_steps(self, n, self.settings.batch_size, scale)}
        s, layout = self.settings, self.layout
        x, log_q_local = layout.draw(self.generator.sample, s.n_samples)
        with torch.no_grad():
            u = layout.gather(self.energy(x), s.n_samples)
        log_q = layout.gather(log_q_local.detach(), s.n_samples)
        log_w = (-u * scale - log_q).double().cpu().numpy()  # −inf where the energy failed
        if not np.any(np.isfinite(log_w)):
            raise CMTInputError("every energy of the buffer failed; check the system and the flow's samples.")
        log_w = log_w - np.logaddexp.reduce(log_w)
        loss = fit_to_buffer(self.generator, self.optimizer, x, log_w, self.fit_steps, s.batch_size, s.resample, self.rng,
                             layout)
        return {
            **record,
            **self.recheck_energy(x),
            "ess_step": float(1.0 / (log_w.size * np.sum(np.exp(2 * log_w)))),
            "entropy": -float(log_q.double().mean()),
            **self.target_stats(-u, log_q),
            "loss": loss,
        }
