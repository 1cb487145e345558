"""An exponential moving average (EMA) of the flow's weights: the generator a run hands out.

Late in training the flow's weights jitter around a better flow: each Adam step follows a
minibatch of one noisy buffer, and the importance weights amplify the noise. Averaging the
iterates removes much of that jitter at no cost in energy evaluations (the ala4 runs in
benchmarks/RESULTS.md, "Peptides sized to a wall-clock limit"). Training itself samples and fits the raw flow, so CMT's buffers, dual
and trust region are unchanged; only the saved generator (and :class:`TrainResult`'s) is the
average.

The average is updated after every optimizer step with decay
``min(ema_decay, (1 + n) / (10 + n))`` after n updates: early on it spans about the last
tenth of the run so far (a short run is not averaged with its first, untrained weights),
later the last ~1 / (1 − ema_decay) Adam steps. torch's :class:`~torch.optim.swa_utils.AveragedModel`
holds the copy and its update count; the decay rule is ours.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

WARMUP = 10  # the decay rule's (1 + n) / (WARMUP + n): an average over ~the last 1/WARMUP of the updates


def ema_decay_at(n_averaged: int, decay: float) -> float:
    """The decay of update number ``n_averaged`` + 1 (the warm-up rule of the module docstring).

    >>> [round(ema_decay_at(n, 0.999), 4) for n in (1, 10, 100, 10_000)]
    [0.1818, 0.55, 0.9182, 0.999]
    """
    return min(decay, (1 + n_averaged) / (WARMUP + n_averaged))


class WeightAverage:
    """The EMA of ``model``'s parameters, updated after every step of ``optimizer``.

    ``average.module`` is a copy of ``model`` (same class, buffers kept in sync) holding the
    averaged parameters; ``state_dict``/``load_state_dict`` save and restore it with its count.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, decay: float):
        self.decay = decay
        self.model = model
        self.averaged = AveragedModel(model, multi_avg_fn=self._lerp)
        self._hook = optimizer.register_step_post_hook(lambda *_: self.averaged.update_parameters(self.model))

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (a copy of the model's class)."""
        return self.averaged.module

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        weight = 1.0 - ema_decay_at(int(n_averaged), self.decay)
        for mean, value in zip(averaged, current):
            mean.lerp_(value, weight)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
