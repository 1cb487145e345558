"""Buffer reuse in benchmarks/cmt_settings_study.py: the union's importance weights for q_{i+1}."""
import numpy as np
import pytest
import torch
from helpers import load_script

from cmt_openmm.energy import make_energy
from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.importance import reverse_ess
from cmt_openmm.systems import get_target
from cmt_openmm.training.cmt import CMTTrainer
from cmt_openmm.training.config import TrainConfig
from cmt_openmm.training.dual import solve_dual

study = load_script("benchmarks/cmt_settings_study.py")


def _gauss(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma * np.sqrt(2 * np.pi))


def test_without_old_buffers_the_weights_are_the_duals():
    rng = np.random.default_rng(0)
    x = rng.normal(size=3000)
    log_q = _gauss(x, 0.0, 1.0)
    log_p = -0.5 * (x - 2.0) ** 2 / 0.5**2
    log_p[:5] = -np.inf  # failed energies keep weight 0
    sol = solve_dual(log_q, log_p, eps_tr=0.3, eps_ent=0.1)
    assert sol.trust_active and sol.entropy_active
    out = study.reuse_log_weights(sol.lam, sol.eta, log_p, log_q, log_q)
    np.testing.assert_allclose(out, sol.log_weights, atol=1e-10)


@pytest.mark.parametrize("drop_source", [False, True])
def test_union_weights_target_the_next_distribution(drop_source):
    """q_source = N(−0.5, 1.5) (an old buffer), q_i = N(0.5, 1.2) (fresh), p̃ ∝ N(2, 0.7):
    q_{i+1} ∝ q_i^{λ/s} p̃^{1/s} is the Gaussian of precision (λ τ_i + τ_p) / s."""
    rng = np.random.default_rng(1)
    lam, eta = 1.5, 0.5
    s = 1 + lam + eta
    x_old, x_new = rng.normal(-0.5, 1.5, 40_000), rng.normal(0.5, 1.2, 20_000)
    x = np.concatenate([x_new, x_old])
    log_p = _gauss(x, 2.0, 0.7) + 3.0  # unnormalised
    log_now = _gauss(x, 0.5, 1.2)
    log_src = np.concatenate([log_now[:20_000], _gauss(x_old, -0.5, 1.5)])
    tau = (lam / 1.2**2 + 1 / 0.7**2) / s
    mean = (lam * 0.5 / 1.2**2 + 2.0 / 0.7**2) / (s * tau)
    if drop_source:  # negative control: old samples treated as if drawn from q_i
        log_src = log_now
    w = np.exp(study.reuse_log_weights(lam, eta, log_p, log_now, log_src))
    assert w.sum() == pytest.approx(1.0)
    est_mean = np.sum(w * x)
    est_var = np.sum(w * (x - est_mean) ** 2)
    ok = abs(est_mean - mean) < 0.02 and abs(est_var * tau - 1) < 0.03
    assert ok != drop_source, (est_mean, mean, est_var * tau)
    # the old buffer carries weight in proportion to its effective size, not zero
    assert 0.2 < w[20_000:].sum() < 0.9
    assert reverse_ess(np.log(w)) > 0.3


def test_study_trainer_without_reuse_is_the_librarys_step():
    """The study trainer fits after the library's anneal (fit_steps 0 there): same flow after a step."""
    target = get_target("toy-double-well")
    config = TrainConfig.from_dict({"method": "cmt", "seed": 3, "flow": {"n_layers": 2, "hidden": 16, "n_bins": 6},
                                    "cmt": {"n_samples": 400, "batch_size": 100, "lr": 5e-3, "fit_steps": 4}})
    params = []
    for cls in (CMTTrainer, study.StudyCMTTrainer):
        generator = BoltzmannGenerator.build(target, n_layers=2, hidden=16, n_bins=6, seed=3)
        energy = make_energy(target, "openmm")
        try:
            trainer = cls(target, generator, energy, config, torch.Generator().manual_seed(3))
            for _ in range(2):
                record = trainer.anneal(*trainer.draw_buffer())
                trainer.steps_done += 1
        finally:
            energy.close()
        params.append(torch.cat([p.detach().flatten() for p in generator.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=0)
    assert record["n_fit_buffer"] == 400 and record["old_weight_fraction"] == 0.0 and trainer.times["t_fit"] > 0


def test_study_trainer_with_reuse_fits_the_union():
    target = get_target("toy-double-well")
    config = TrainConfig.from_dict({"method": "cmt", "seed": 3, "flow": {"n_layers": 2, "hidden": 16, "n_bins": 6},
                                    "cmt": {"n_samples": 300, "batch_size": 100, "lr": 5e-3, "fit_steps": 2}})
    study.StudyCMTTrainer.study = {"reuse": 2}
    try:
        generator = BoltzmannGenerator.build(target, n_layers=2, hidden=16, n_bins=6, seed=3)
        energy = make_energy(target, "openmm")
        try:
            trainer = study.StudyCMTTrainer(target, generator, energy, config, torch.Generator().manual_seed(3))
            sizes = []
            for _ in range(4):
                record = trainer.anneal(*trainer.draw_buffer())
                trainer.steps_done += 1
                sizes.append(record["n_fit_buffer"])
        finally:
            energy.close()
    finally:
        study.StudyCMTTrainer.study = {}
    assert sizes == [300, 600, 900, 900]
    assert 0.0 < record["old_weight_fraction"] < 1.0 and record["t_logq"] > 0
    assert 1.0 <= record["ess_fit_kish"] <= 900 and np.isfinite(record["prev_logq_shift_std"])


def test_study_trainer_is_a_registered_method_that_train_builds(tmp_path):
    """``method: cmt_study`` reads the cmt settings; train() builds the study's trainer (its records time the fit)."""
    from cmt_openmm.training import TRAINERS, train

    assert TRAINERS[study.METHOD] is study.StudyCMTTrainer
    config = {"method": study.METHOD, "seed": 3, "max_steps": 2, "flow": {"n_layers": 2, "hidden": 16, "n_bins": 6},
              "cmt": {"n_samples": 200, "batch_size": 100, "fit_steps": 2}, "energy": {"backend": "openmm"}}
    result = train(get_target("aldp-vacuum"), config, tmp_path / "run", progress=False)  # its diagnostics need φ
    assert result.stop_reason == "max_steps" and len(result.history) == 2
    assert all(r["method"] == "cmt_study" and r["t_fit"] > 0 and r["n_fit_buffer"] == 200 for r in result.history)
