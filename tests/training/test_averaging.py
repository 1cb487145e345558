"""The weight average a run hands out: the EMA rule of training/averaging.py, applied after
every Adam step, is what generator.safetensors holds."""
import torch

from cmt_openmm.generator import GENERATOR_FILE, load_generator
from cmt_openmm.systems import get_target
from cmt_openmm.training import train
from cmt_openmm.training.averaging import ema_decay_at
from cmt_openmm.training.loop import Trainer

CONFIG = {"method": "cmt", "seed": 1, "max_steps": 3, "budget": 100_000, "ema_decay": 0.8,
          "flow": {"n_layers": 2, "hidden": 16, "n_bins": 6}, "energy": {"backend": "openmm"},
          "cmt": {"n_samples": 300, "batch_size": 100, "lr": 5e-3, "fit_steps": 5}}


def test_saved_generator_is_the_ema_of_every_adam_step(tmp_path, monkeypatch):
    iterates = []  # the raw weights after each Adam step, recorded independently of the average
    init = Trainer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        params = dict(self.generator.named_parameters())
        self.optimizer.register_step_post_hook(
            lambda *_: iterates.append({k: v.detach().clone() for k, v in params.items()}))

    monkeypatch.setattr(Trainer, "__init__", recording_init)
    result = train(get_target("toy-double-well"), CONFIG, tmp_path / "run", progress=False)
    assert len(iterates) == 3 * 5

    expected = dict(iterates[0])
    for n, weights in enumerate(iterates[1:], start=1):
        decay = ema_decay_at(n, CONFIG["ema_decay"])
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    saved = dict(load_generator(tmp_path / "run" / GENERATOR_FILE).named_parameters())
    returned = dict(result.generator.named_parameters())
    last = iterates[-1]
    for k, value in expected.items():
        torch.testing.assert_close(saved[k].detach(), value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(returned[k].detach(), value, rtol=1e-5, atol=1e-6)
    # the average is not the last iterate (the test would pass for a run that saved the raw flow otherwise)
    assert max(float((expected[k] - last[k]).abs().max()) for k in expected) > 1e-3

