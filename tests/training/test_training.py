"""The shared training loop: CMT on toy targets, baselines, config, checkpoints and resume."""
import json
import os
import threading

import numpy as np
import pytest
import torch

from cmt_openmm.energy import OpenMMEnergy
from cmt_openmm.errors import CMTInputError
from cmt_openmm.importance import reverse_ess
from cmt_openmm.systems import get_target
from cmt_openmm.training import TrainConfig, load_history, train
from cmt_openmm.generator import GENERATOR_FILE as GENERATOR
from cmt_openmm.training.checkpoints import CHECKPOINT_FILE as CHECKPOINT, CONFIG_FILE as CONFIG, METRICS_FILE as METRICS
from helpers import assert_same_history

TINY_FLOW = {"n_layers": 2, "hidden": 16, "n_bins": 6}


@pytest.fixture(scope="module")
def mixture():
    return get_target("toy-gaussian-mixture")


@pytest.fixture(scope="module")
def double_well():
    return get_target("toy-double-well")


def _tiny_cmt(**cmt):
    return {
        "method": "cmt",
        "seed": 3,
        "max_steps": 4,
        "budget": 100_000,
        "flow": TINY_FLOW,
        "cmt": {"n_samples": 400, "batch_size": 100, "lr": 5e-3, "fit_steps": 4, **cmt},
    }


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"methd": "cmt"},
        {"method": "fab"},
        {"cmt": {"eps_tr": -0.5}},
        {"cmt": {"eps_tr": "big"}},
        {"cmt": {"n_samples": 10.5}},
        {"cmt": {"resample": "yes"}},
        {"cmt": {"typo": 1}},
        {"flow": [8, 128]},
        {"flow": {"mask": "checkerboard"}},
        {"budget": True},
        {"method": "forward_kl"},
        {"temperature_annealing": {"n_temperatures": 1}},
    ],
)
def test_bad_config_refused_with_one_sentence(bad):
    with pytest.raises(CMTInputError) as info:
        TrainConfig.from_dict(bad)
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".") and ". " not in msg


def test_config_round_trip(tmp_path):
    cfg = TrainConfig.from_dict({"method": "temperature_annealing", "budget": "2e5", "seed": 7,
                                 "temperature_annealing": {"t_high": 900, "fit_steps": 5},
                                 "flow": {"mask": "torsions"}})
    assert cfg.budget == 200_000 and cfg.temperature_annealing.t_high == 900.0 and cfg.flow.mask == "torsions"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(path) == cfg


def test_a_setting_added_after_a_run_was_stored_resumes_at_its_default():
    from cmt_openmm.training.config import resume_conflicts

    new = TrainConfig.from_dict({"flow": TINY_FLOW}).to_dict()
    stored = {**new, "flow": {k: v for k, v in new["flow"].items() if k != "linear_bins"}}
    assert resume_conflicts(stored, new) == []
    assert resume_conflicts(stored, {**new, "flow": {**new["flow"], "linear_bins": 3}}) == ["flow"]
    assert resume_conflicts({**stored, "max_minutes": 5}, new) == []  # resumable


def test_flow_linear_bins_reaches_the_generator(double_well):
    result = train(double_well, {**_tiny_cmt(), "max_steps": 1, "flow": {**TINY_FLOW, "linear_bins": 3}},
                   progress=False)
    assert result.generator.settings["linear_bins"] == 3
    last = result.generator.flow.couplings.layers[0].net[-1]  # the toy's coordinates are all Cartesian
    assert last.out_features == len(result.generator.flow.couplings.layers[0].transformed) * (3 * 3 + 1)


# -- CMT ------------------------------------------------------------------------------------
def test_cmt_constraints_hold_on_real_steps(double_well):
    eps_tr, eps_ent = 0.5, 0.2
    result = train(double_well, _tiny_cmt(eps_tr=eps_tr, eps_ent=eps_ent), progress=False)
    history = result.history
    assert len(history) == 4 and result.stop_reason == "max_steps"
    assert any(r["trust_active"] for r in history) and any(r["entropy_active"] for r in history)
    for r in history:
        if r["trust_active"]:
            assert r["kl"] == pytest.approx(eps_tr, abs=1e-6)
        else:
            assert r["lam"] == 0.0 and r["kl"] <= eps_tr + 1e-9
        if r["entropy_active"]:
            assert r["entropy_drop"] == pytest.approx(eps_ent, abs=1e-6)
        else:
            assert r["eta"] == 0.0 and r["entropy_drop"] <= eps_ent + 1e-9
    assert [r["energy_evaluations"] for r in history] == [400, 800, 1200, 1600]


def test_two_phase_entropy_constraint(double_well):
    """eps_ent_warmup bounds the entropy drop of the first warmup_steps steps, eps_ent the rest."""
    config = _tiny_cmt(eps_tr=0.5, eps_ent=5.0)
    config["max_steps"] = 5
    config["cmt"].update(eps_ent_warmup=0.2, warmup_steps=4)
    history = train(double_well, config, progress=False).history
    assert [r["eps_ent"] for r in history] == [0.2] * 4 + [5.0]
    assert all(r["entropy_drop"] <= 0.2 + 1e-6 for r in history[:4])
    assert any(r["entropy_active"] and r["entropy_drop"] == pytest.approx(0.2, abs=1e-6) for r in history[:4])
    no_warmup = train(double_well, _tiny_cmt(eps_tr=0.5, eps_ent=5.0), progress=False).history
    assert max(r["entropy_drop"] for r in no_warmup) > 0.2  # so the warm-up constraint did bind


def test_lr_decay_from_cooled_starts_after_the_warm_up(double_well):
    """lr_decay_from: cooled shrinks the learning rate from the first post-warm-up step with η = 0,
    before the target is reached; the default ("target") leaves it alone until λ = η = 0."""
    cmt = dict(eps_tr=0.5, eps_ent=5.0, eps_ent_warmup=0.2, warmup_steps=2, lr_decay_after_target=0.5)
    config = {**_tiny_cmt(**cmt, lr_decay_from="cooled", steps_after_target=100), "max_steps": 4}
    history = train(double_well, config, progress=False).history
    assert all(r["eta"] == 0.0 and r["lam"] > 0 for r in history)  # η = 0 from the start, target not reached
    # warm-up steps do not count: the first post-warm-up step (3) marks the path cooled
    assert [r["lr"] for r in history] == [5e-3, 5e-3, 5e-3, 2.5e-3]
    default = train(double_well, {**_tiny_cmt(**cmt), "max_steps": 4}, progress=False).history
    assert [r["lr"] for r in default] == [5e-3] * 4


def test_cmt_learns_the_gaussian_mixture(mixture):
    """Reverse ESS ≥ 90 % and every mode's (reweighted) weight within 5 % of exact."""
    config = {
        "method": "cmt",
        "seed": 0,
        "max_steps": 40,
        "budget": 200_000,
        "flow": {"n_layers": 4, "hidden": 96, "n_bins": 16},
        "cmt": {"eps_tr": 0.5, "eps_ent": 1.0, "n_samples": 8000, "batch_size": 1024, "lr": 3e-3,
                "fit_steps": 16, "steps_after_target": 10, "lr_decay_after_target": 0.75},
    }
    result = train(mixture, config, progress=False)
    assert result.stop_reason == "target reached"
    assert result.history[-1]["energy_evaluations"] == 8000 * len(result.history)
    x, log_q = result.generator.sample(20_000, torch.Generator().manual_seed(1))
    with OpenMMEnergy(mixture) as energy:
        log_w = (-energy(x) - log_q).numpy()
    assert reverse_ess(log_w) >= 0.9
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    modes = np.asarray(mixture.mode_of(x.numpy()))
    exact = mixture.mode_weights()
    estimated = np.array([w[modes == k].sum() for k in range(len(exact))])
    np.testing.assert_allclose(estimated, exact, rtol=0.05)
    # The flow itself keeps every mode (no reweighting needed to see them).
    raw = np.array([np.mean(modes == k) for k in range(len(exact))])
    np.testing.assert_allclose(raw, exact, atol=0.05)


def test_budget_stops_before_overrun(double_well):
    result = train(double_well, {**_tiny_cmt(), "budget": 1000}, progress=False)
    assert result.stop_reason == "budget"
    assert len(result.history) == 2 and result.history[-1]["energy_evaluations"] == 800


def test_budget_below_one_step_is_refused(double_well, tmp_path):
    """A fresh run that could not take one step is refused (no 0-step run with a full report)."""
    run = tmp_path / "run"
    with pytest.raises(CMTInputError, match="budget") as info:
        train(double_well, {**_tiny_cmt(), "budget": 300}, run, progress=False)  # one CMT step costs 400
    msg = str(info.value)
    assert "300 energy evaluations" in msg and "(400 evaluations)" in msg and "at least 400" in msg
    assert "\n" not in msg and msg.endswith(".") and ". " not in msg
    assert not (run / CHECKPOINT).exists() and not (run / GENERATOR).exists()
    # a resumed run that has spent its budget just stops (it trained; its report is meaningful)
    train(double_well, {**_tiny_cmt(), "budget": 400}, run, progress=False)
    resumed = train(double_well, {**_tiny_cmt(), "budget": 700}, run, resume=True, progress=False)
    assert resumed.stop_reason == "budget" and len(resumed.history) == 1


# -- run directory, checkpoints, resume -----------------------------------------------------
@pytest.mark.parametrize("method", ["cmt", "cmt-after-target", "cmt-after-cooling", "cmt-averaged",
                                    "temperature_annealing"])
def test_resume_is_exact(double_well, tmp_path, method):
    config = _tiny_cmt()
    if method == "cmt-averaged":  # the weight average continues too (the generators compared are averages)
        config["ema_decay"] = 0.9
        method = "cmt"
    if method == "cmt-after-target":  # reaches λ = η = 0 at once, then decays the learning rate
        config = _tiny_cmt(eps_tr=20.0, eps_ent=20.0, steps_after_target=10, lr_decay_after_target=0.5)
        method = "cmt"
    if method == "cmt-after-cooling":  # cooled at the first step after a 1-step warm-up; split at 2
        config = _tiny_cmt(eps_tr=0.5, eps_ent=5.0, eps_ent_warmup=0.2, warmup_steps=1,
                           lr_decay_after_target=0.5, lr_decay_from="cooled")
        method = "cmt"
    config["method"] = method
    config["energy"] = {"backend": "openmm"}  # "auto" times both backends: under load the two runs could differ
    config["temperature_annealing"] = {"n_temperatures": 3, "reverse_kl_steps": 4, "steps_per_record": 2,
                                       "batch_size": 50, "n_samples": 300, "fit_steps": 3, "lr": 5e-3}
    full = train(double_well, config, tmp_path / "full", progress=False)
    train(double_well, {**config, "max_steps": 2}, tmp_path / "split", progress=False)
    resumed = train(double_well, config, tmp_path / "split", resume=True, progress=False)
    assert len(full.history) == 4
    if config["cmt"].get("steps_after_target"):
        assert full.history[0]["lam"] == full.history[0]["eta"] == 0.0
        assert [r["lr"] for r in full.history] == [5e-3, 2.5e-3, 1.25e-3, 6.25e-4]
    if config["cmt"].get("lr_decay_from") == "cooled":
        assert [r["lr"] for r in full.history] == [5e-3, 5e-3, 2.5e-3, 1.25e-3]
    assert_same_history(resumed.history, full.history)
    a, b = full.generator.state_dict(), resumed.generator.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert load_history(tmp_path / "split") == resumed.history


def test_run_dir_contents_and_refusals(double_well, tmp_path):
    run = tmp_path / "run"
    result = train(double_well, {**_tiny_cmt(), "max_steps": 2}, run, progress=False)
    for name in (CONFIG, CHECKPOINT, METRICS, GENERATOR):
        assert (run / name).exists()
    # stored with shards resolved (auto: one per process), so that a resume keeps the same streams
    assert TrainConfig.from_yaml(run / CONFIG) == TrainConfig.from_dict({**_tiny_cmt(), "max_steps": 2, "shards": 1})
    assert [json.loads(line)["step"] for line in (run / METRICS).read_text().splitlines()] == [1, 2]
    assert result.run_dir == run
    with pytest.raises(CMTInputError, match="already holds a run"):
        train(double_well, _tiny_cmt(), run, progress=False)
    with pytest.raises(CMTInputError, match="eps_tr|cmt"):
        train(double_well, _tiny_cmt(eps_tr=0.3), run, resume=True, progress=False)
    with pytest.raises(CMTInputError, match="no checkpoint"):
        train(double_well, _tiny_cmt(), tmp_path / "empty", resume=True, progress=False)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_never_unpickles_objects(double_well, tmp_path):
    run = tmp_path / "evil"
    run.mkdir()
    torch.save({"format": "cmt_openmm.checkpoint/1", "x": _Payload()}, run / CHECKPOINT)
    with pytest.raises(CMTInputError, match="cannot read checkpoint"):
        train(double_well, _tiny_cmt(), run, resume=True, progress=False)


# -- baselines ------------------------------------------------------------------------------
def test_reverse_kl_reduces_loss_and_counts_evaluations(double_well):
    config = {"method": "reverse_kl", "seed": 1, "max_steps": 4, "flow": TINY_FLOW,
              "reverse_kl": {"batch_size": 64, "lr": 1e-2, "steps_per_record": 10}}
    result = train(double_well, config, progress=False)
    history = result.history
    assert [r["energy_evaluations"] for r in history] == [640 * k for k in range(1, 5)]
    assert history[-1]["loss"] < history[0]["loss"]
    # the recorded ESS tracks the fit: ~1 % untrained, > 50 % after 40 steps, and an independent
    # ESS of the trained generator's own samples against OpenMM energies is far above the untrained one's
    assert history[0]["reverse_ess"] < 0.05 and history[-1]["reverse_ess"] > 0.5
    x, log_q = result.generator.sample(4000, torch.Generator().manual_seed(5))
    with OpenMMEnergy(double_well) as energy:
        trained_ess = reverse_ess((-energy(x) - log_q).numpy())
    assert trained_ess > 0.5 > 10 * history[0]["reverse_ess"]
    assert abs(trained_ess - history[-1]["reverse_ess"]) < 0.3


def test_forward_kl_on_samples(double_well, tmp_path):
    gen = torch.Generator().manual_seed(0)
    blob = double_well.positions[None] + 0.05 * torch.randn(2000, 1, 3, generator=gen, dtype=torch.float64).numpy()
    np.savez(tmp_path / "data.npz", positions=blob)
    config = {"method": "forward_kl", "seed": 1, "max_steps": 3, "flow": TINY_FLOW,
              "forward_kl": {"data": str(tmp_path / "data.npz"), "batch_size": 128, "lr": 1e-2,
                             "steps_per_record": 10, "eval_samples": 100}}
    history = train(double_well, config, progress=False).history
    assert history[-1]["loss"] < history[0]["loss"]
    assert [r["energy_evaluations"] for r in history] == [100, 200, 300]
    np.savez(tmp_path / "wrong.npz", positions=np.zeros((5, 2, 3)))
    config["forward_kl"]["data"] = str(tmp_path / "wrong.npz")
    with pytest.raises(CMTInputError, match="shape"):
        train(double_well, config, progress=False)


def test_forward_kl_refuses_frames_outside_the_flow_support(double_well, tmp_path):
    """Frames the flow cannot produce (log q = −inf: no gradient, an inf loss) are refused at
    construction, naming how many and which coordinates, not silently dropped."""
    rng = np.random.default_rng(0)
    blob = double_well.positions[None] + 0.05 * rng.normal(size=(500, 1, 3))
    blob[:3, 0, 0] = 5.0  # three frames far beyond the toy's box in x (box: ±0.89 nm)
    blob[3, 0, 2] = -4.0  # one beyond it in z
    np.savez(tmp_path / "data.npz", positions=blob)
    config = {"method": "forward_kl", "seed": 1, "max_steps": 1, "flow": TINY_FLOW,
              "forward_kl": {"data": str(tmp_path / "data.npz"), "batch_size": 64, "eval_samples": 10}}
    with pytest.raises(CMTInputError, match="outside the flow's support") as info:
        train(double_well, config, progress=False)
    msg = str(info.value)
    assert "4 of 500 frames" in msg and "x of atom 0 in 3 frames" in msg and "z of atom 0 in 1 frame" in msg
    assert "\n" not in msg and msg.endswith(".") and ". " not in msg
    np.savez(tmp_path / "data.npz", positions=blob[4:])
    assert len(train(double_well, config, progress=False).history) == 1  # the rest trains


def test_temperature_annealing_ladder(double_well):
    config = {"method": "temperature_annealing", "seed": 2, "max_steps": 10, "flow": TINY_FLOW,
              "temperature_annealing": {"t_high": 1200, "n_temperatures": 3, "reverse_kl_steps": 20,
                                        "steps_per_record": 10, "batch_size": 64, "lr": 1e-2,
                                        "n_samples": 500, "fit_steps": 5, "final_steps": 1}}
    result = train(double_well, config, progress=False)
    history = result.history
    assert result.stop_reason == "schedule finished"
    assert [r["phase"] for r in history] == ["reverse_kl"] * 2 + ["fit"] * 3
    temps = [r["temperature"] for r in history]
    assert temps[:2] == [1200.0, 1200.0] and temps[2] == pytest.approx(600.0) and temps[3:] == [300.0, 300.0]
    assert history[1]["loss"] < history[0]["loss"]
    assert [r["energy_evaluations"] for r in history] == [640, 1280, 1780, 2280, 2780]
    # ess_step is the buffer's ESS towards p^(T/T_k): at T_k = T it is the reverse ESS of the same
    # samples against the target, at 600 K it is not (the buffer is weighted to the tempered state)
    for r in history[3:]:
        assert r["ess_step"] == pytest.approx(r["reverse_ess"], rel=1e-9)
    assert abs(history[2]["ess_step"] - history[2]["reverse_ess"]) > 0.05
    with pytest.raises(CMTInputError, match="t_high"):
        train(double_well, {**config, "temperature_annealing": {"t_high": 250}}, progress=False)


def test_progress_counts_towards_the_limit_that_will_stop_the_run(double_well, capsys):
    config = {**_tiny_cmt(), "max_steps": 1000, "budget": 1300}  # 400 evaluations a step: 3 steps
    result = train(double_well, config, progress=True)
    err = capsys.readouterr().err
    assert "at most 3 steps (budget limit)" in err and "eval/s" in err
    assert len(result.history) == 3 and result.stop_reason == "budget"


def test_training_uses_the_configured_threads_and_restores_them(double_well, monkeypatch):
    import torch

    calls = []  # the process's setting, made from the main thread (TorchEnergy's pool threads set their own)
    monkeypatch.setattr(torch, "set_num_threads",
                        lambda n: calls.append(n) if threading.current_thread() is threading.main_thread() else None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    train(double_well, {**_tiny_cmt(), "max_steps": 1, "threads": 2}, progress=False)
    assert calls == [2, 7]


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (3, 3), (64, 4)])
def test_threads_auto_uses_the_free_cores_up_to_a_cap(double_well, monkeypatch, cores, expected):
    import torch

    from cmt_openmm.training.config import MAX_AUTO_THREADS

    assert MAX_AUTO_THREADS == 4
    calls = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch, "set_num_threads",
                        lambda n: calls.append(n) if threading.current_thread() is threading.main_thread() else None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    train(double_well, {**_tiny_cmt(), "max_steps": 1, "threads": "auto"}, progress=False)
    assert calls == [expected, 7]


def test_device_setting_and_checkpoints_that_move_between_devices(double_well, tmp_path):
    import torch

    from cmt_openmm.training.config import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CMTInputError, match="no CUDA device"):
            train(double_well, {**_tiny_cmt(), "device": "cuda"}, progress=False)
    run = tmp_path / "run"
    first = train(double_well, {**_tiny_cmt(), "max_steps": 2, "device": "cpu"}, run_dir=run, progress=False)
    assert next(first.generator.parameters()).device.type == "cpu"
    checkpoint = torch.load(run / CHECKPOINT, weights_only=True)
    tensors = [v for v in checkpoint["generator"].values()]
    tensors += [v for state in checkpoint["optimizer"]["state"].values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors) and checkpoint["rng_device"] == "cpu"
    # a checkpoint written on another device (its random-stream state does not fit) resumes with a
    # derived stream instead of failing
    checkpoint["rng_device"] = "cuda"
    torch.save(checkpoint, run / CHECKPOINT)
    resumed = train(double_well, {**_tiny_cmt(), "max_steps": 3, "device": "auto"}, run_dir=run, resume=True,
                    progress=False)
    assert [r["step"] for r in resumed.history] == [1, 2, 3]


def test_energy_backend_is_chosen_recorded_and_kept_on_resume(double_well, tmp_path):
    run = tmp_path / "run"
    first = train(double_well, {**_tiny_cmt(), "max_steps": 1, "energy": {"backend": "torch"}}, run_dir=run,
                  progress=False)
    assert first.history[-1]["energy_backend"] == "torch"
    # resumed with backend auto: the run keeps the backend it started with
    resumed = train(double_well, {**_tiny_cmt(), "max_steps": 2, "energy": {"backend": "torch"}}, run_dir=run,
                    resume=True, progress=False)
    assert [r["energy_backend"] for r in resumed.history] == ["torch", "torch"]
    openmm = train(double_well, {**_tiny_cmt(), "max_steps": 1, "energy": {"backend": "openmm"}}, progress=False)
    assert openmm.history[-1]["energy_backend"] == "openmm"
    # the same seed gives the same first step on both backends (energies agree to ~1e-14)
    assert openmm.history[0]["lam"] == pytest.approx(first.history[0]["lam"], rel=1e-6)


def test_bfloat16_conditioners_while_training_only(double_well, tmp_path, monkeypatch):
    """flow.train_dtype: bfloat16 conditioners in the buffers and fits, float32 in the generator handed out."""
    from cmt_openmm.flows import SplineCoupling
    from cmt_openmm.training.cmt import CMTTrainer

    seen = []
    draw = CMTTrainer.draw_buffer

    def recording_draw(self):
        seen.append({m.matmul_dtype for m in self.generator.modules() if isinstance(m, SplineCoupling)})
        return draw(self)

    monkeypatch.setattr(CMTTrainer, "draw_buffer", recording_draw)
    config = {**_tiny_cmt(), "max_steps": 2, "energy": {"backend": "openmm"}}
    config["flow"] = {**TINY_FLOW, "train_dtype": "bfloat16"}
    result = train(double_well, config, tmp_path / "run", progress=False)
    assert seen == [{torch.bfloat16}] * 2
    layers = [m for m in result.generator.modules() if isinstance(m, SplineCoupling)]
    assert layers and all(m.matmul_dtype is None for m in layers)
    x, log_q = result.generator.sample(200, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.generator.log_prob(x), log_q, atol=1e-4, rtol=0)


@pytest.mark.parametrize("flags, expected", [({"avx512f", "avx512_bf16"}, torch.bfloat16), ({"amx_bf16"}, torch.bfloat16),
                                             ({"avx512f", "avx2"}, None), (OSError, None)])
def test_train_dtype_auto_picks_bfloat16_where_the_cpu_has_it(monkeypatch, flags, expected):
    from cmt_openmm.training import config as config_module

    def cpu_flags():
        if flags is OSError:
            raise OSError("no /proc/cpuinfo")
        return flags

    monkeypatch.setattr(config_module, "_cpu_flags", cpu_flags)
    flow = TrainConfig.from_dict({"flow": {"train_dtype": "auto"}}).flow
    assert flow.conditioner_dtype("cpu") is expected
    assert TrainConfig.from_dict({"flow": {"train_dtype": "float32"}}).flow.conditioner_dtype("cpu") is None
    assert TrainConfig.from_dict({"flow": {"train_dtype": "bfloat16"}}).flow.conditioner_dtype("cpu") is torch.bfloat16


def test_checkpoints_keep_recent_records_and_resume_after_metrics_lose_their_tail(double_well, tmp_path, monkeypatch):
    """The checkpoint holds the last RECENT_RECORDS records, not the whole history (serialising it
    every step grew with the run); a metrics.jsonl cut short by a crash, with a torn last line, is
    completed from them, and the resumed run is the uninterrupted one."""
    from cmt_openmm.training import checkpoints

    monkeypatch.setattr(checkpoints, "RECENT_RECORDS", 3)
    config = {**_tiny_cmt(), "max_steps": 4}
    straight = train(double_well, {**config, "max_steps": 6}, tmp_path / "straight", progress=False)
    run = tmp_path / "run"
    train(double_well, config, run, progress=False)
    checkpoint = torch.load(run / CHECKPOINT, weights_only=True)
    assert "history" not in checkpoint
    assert [json.loads(line)["step"] for line in checkpoint["recent_history"].splitlines()] == [2, 3, 4]
    lines = (run / METRICS).read_text().splitlines()
    (run / METRICS).write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # steps 3, 4 lost, step 3 torn
    resumed = train(double_well, {**config, "max_steps": 6}, run, resume=True, progress=False)
    assert_same_history(resumed.history, straight.history)
    assert_same_history(load_history(run), straight.history)  # the file is whole again


def test_resume_refuses_a_history_lost_beyond_the_checkpoints_records(double_well, tmp_path, monkeypatch):
    from cmt_openmm.training import checkpoints

    monkeypatch.setattr(checkpoints, "RECENT_RECORDS", 1)
    run = tmp_path / "run"
    train(double_well, {**_tiny_cmt(), "max_steps": 3}, run, progress=False)
    (run / METRICS).write_text((run / METRICS).read_text().splitlines()[0] + "\n")  # steps 2 and 3 lost
    with pytest.raises(CMTInputError, match=r"lacks the records of 1 of the 3 steps in the checkpoint \(from step 2\)"):
        train(double_well, {**_tiny_cmt(), "max_steps": 4}, run, resume=True, progress=False)


def test_checkpoints_holding_the_whole_history_still_resume(double_well, tmp_path):
    run = tmp_path / "run"
    config = {**_tiny_cmt(), "max_steps": 2}
    first = train(double_well, config, run, progress=False)
    checkpoint = torch.load(run / CHECKPOINT, weights_only=True)
    del checkpoint["recent_history"]
    checkpoint["history"] = json.dumps(first.history)  # as checkpoints were written before
    torch.save(checkpoint, run / CHECKPOINT)
    (run / METRICS).unlink()
    resumed = train(double_well, {**config, "max_steps": 3}, run, resume=True, progress=False)
    assert resumed.history[:2] == first.history and len(resumed.history) == 3


def test_training_rechecks_the_torch_energy_and_switches_to_openmm_on_a_fault(tmp_path, monkeypatch):
    """Every energy.recheck_every steps a few of the step's samples go to OpenMM too; a torch energy
    off by 5 kJ/mol (a fault the verification at the reference did not see) is caught at the first
    re-check, and the rest of the run uses OpenMM's energies, which the records say."""
    from cmt_openmm.energy.torch.energy import TorchEnergy

    aldp = get_target("aldp-vacuum")
    energy = TorchEnergy(aldp, verify=False, compile=False)
    term = energy.terms[0]
    original = type(term).__call__
    monkeypatch.setattr(type(term), "__call__", lambda self, geometry, gradient=False: original(
        self, geometry, gradient) + 5.0)
    config = {"method": "cmt", "seed": 0, "max_steps": 3, "budget": 100_000, "flow": TINY_FLOW,
              "energy": {"recheck_every": 2},
              "cmt": {"n_samples": 200, "batch_size": 100, "fit_steps": 1}}
    with pytest.warns(UserWarning, match="come from OpenMM"):
        result = train(aldp, config, tmp_path / "run", progress=False, energy=energy)
    first, second, third = result.history
    assert first["recheck_switched_to_openmm"] and first["recheck_passed"] is False  # step 1 (steps_done 0)
    assert first["recheck_max_abs_energy_error_kT"] == pytest.approx(5.0 / aldp.kT)
    assert "recheck_n" not in second  # not due at step 2
    assert [r["energy_backend"] for r in result.history] == ["openmm"] * 3  # the record is written after the check
    assert "recheck_n" not in third  # due again, but OpenMM's energies need no re-check
