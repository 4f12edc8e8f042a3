"""Training: Algorithm 1's loop, its schedules (LR warm-up, EMA), budgets, and exact resume."""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch

import ddpm.train
from ddpm import devices, distributed
from ddpm.checkpoint import latest_checkpoint, list_checkpoints
from ddpm.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from ddpm.devices import intra_op_threads, update_threads
from ddpm.errors import ConfigError, RunDirError
from ddpm.losses import training_loss
from ddpm.runs import describe_run, sample_run
from ddpm.schedules import NoiseSchedule
from ddpm.train import (
    DataOrder,
    _resolve,
    _setup,
    ema_decay_at,
    ema_update,
    lr_at,
    prepare_run,
    train,
)
from ddpm.train_state import adamw


def _log_rows(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_stays_constant():
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 3e-4, 0) == 3e-4


def test_ema_decay_warms_up_to_its_maximum():
    assert ema_decay_at(0, 0.999) == pytest.approx(1 / 10)
    assert ema_decay_at(10, 0.999) == pytest.approx(11 / 20)
    assert ema_decay_at(10**6, 0.999) == 0.999


def test_ema_update_is_a_convex_combination_and_copies_buffers():
    model = torch.nn.BatchNorm1d(3)
    ema = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        ema.weight.copy_(torch.tensor([3.0, 2.0, 1.0]))
        model.running_mean.copy_(torch.tensor([7.0, 8.0, 9.0]))
    ema_update(ema, model, decay=0.75)
    # 0.75 ema + 0.25 model
    assert torch.allclose(ema.weight, torch.tensor([2.5, 2.0, 1.5]))
    assert torch.equal(ema.running_mean, model.running_mean)


def _linear_pair():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    return a, copy.deepcopy(a)


def test_adamw_takes_the_per_tensor_adamw_step():
    a, b = _linear_pair()
    ours, plain = (
        adamw(a, 1e-2, 0.01),
        torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01),
    )
    if torch.__version__ >= "2.4":  # fused AdamW on a CPU exists from torch 2.4
        assert ours.defaults["fused"] is True
    for _ in range(5):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        plain.step()
    for p, q, start in zip(
        a.parameters(), b.parameters(), _linear_pair()[0].parameters(), strict=True
    ):
        assert not torch.allclose(p, start)  # five steps of 1e-2 moved every parameter
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


class NoFused(torch.optim.AdamW):
    """AdamW as a PyTorch without a fused kernel for the device has it."""

    def __init__(self, params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point ...")
        super().__init__(params, **kwargs)


def test_adamw_falls_back_to_the_per_tensor_one_where_fused_is_missing(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    optimizer = adamw(_linear_pair()[0], 1e-3, 0.0)
    assert isinstance(optimizer, NoFused) and not optimizer.defaults["fused"]


def test_a_run_saved_with_fused_adamw_resumes_where_there_is_none(
    monkeypatch, tmp_path, make_config
):
    config, run = make_config(steps=2), tmp_path / "run"
    train(config, run, progress=False, verbose=False)
    assert latest_checkpoint(run).meta["optimizer"]["param_groups"][0]["fused"] is True
    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    config, dataset = _resolve(make_config(steps=3), run, distributed.Dist())
    job = _setup(config, dataset, run, torch.device("cpu"), distributed.Dist(), False, 1)
    assert [g["fused"] for g in job.state.optimizer.param_groups] == [None]


def test_a_small_network_is_updated_on_one_thread_of_a_cpu_only(monkeypatch):
    model = _linear_pair()[0]
    with intra_op_threads(2):
        assert update_threads(model, torch.device("cpu")) == 1
        assert update_threads(model, torch.device("cuda")) == 2  # only the type is read
        monkeypatch.setattr(devices, "ONE_THREAD_UPDATE_MAX_PARAMS", 100)  # model: 212 parameters
        assert update_threads(model, torch.device("cpu")) == 2


def test_intra_op_threads_gives_the_callers_count_back_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(KeyError), intra_op_threads(1):
        assert torch.get_num_threads() == 1
        raise KeyError
    assert torch.get_num_threads() == before


def test_training_updates_the_parameters_on_one_thread_and_keeps_two_for_the_rest(
    monkeypatch, tmp_path, make_config
):
    seen = []

    def recording_ema_update(ema, model, decay):
        seen.append(torch.get_num_threads())
        ema_update(ema, model, decay)

    monkeypatch.setattr(ddpm.train, "ema_update", recording_ema_update)
    with intra_op_threads(2):
        train(make_config(steps=3), tmp_path / "run", progress=False, verbose=False)
        assert torch.get_num_threads() == 2
    assert seen == [1, 1, 1]


def test_data_order_visits_every_example_once_per_epoch():
    order = DataOrder(10, seed=0)
    seen = torch.cat([order.next(4) for _ in range(5)])  # two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:20].tolist()) == list(range(10))


def test_hybrid_loss_trains_the_mean_only_through_l_simple():
    s = NoiseSchedule.from_name("linear", 100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    from ddpm.diffusion import q_sample

    x_t = q_sample(s, x0, t, eps)
    out = torch.randn(4, 2, 8, 8, generator=g, requires_grad=True)
    loss = training_loss(s, out, x0, x_t, t, eps, variance="learned_range").sum()
    (grad,) = torch.autograd.grad(loss, out)
    # d/d(mean half) is that of the mean squared error alone (the VLB's stop-gradient)
    expected = 2 * (out[:, :1] - eps).detach() / 64
    assert torch.allclose(grad[:, :1], expected, atol=1e-6)
    assert grad[:, 1:].abs().sum() > 0  # the variance half learns from L_vlb
    plain = training_loss(s, out, x0, x_t, t, eps, variance="learned_range", vlb_weight=0.0)
    assert torch.allclose(plain, ((out[:, :1] - eps) ** 2).mean(dim=(1, 2, 3)))


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------


def test_training_resumes_and_continues_its_step_count(tmp_path, make_config):
    run = tmp_path / "run"
    first = train(make_config(steps=50, checkpoint_every=25), run, progress=False, verbose=False)
    assert (first.start_step, first.step) == (0, 50)
    assert math.isfinite(first.loss)
    assert [s for s, _ in list_checkpoints(run)] == [25, 50]

    second = train(make_config(steps=80), run, progress=False, verbose=False)
    assert (second.start_step, second.step) == (50, 80)
    assert latest_checkpoint(run).step == 80
    steps = [int(r["step"]) for r in _log_rows(run)]
    assert steps == [5 * i for i in range(1, 17)]
    assert all(math.isfinite(float(r["loss"])) for r in _log_rows(run))
    assert (run / "samples" / "step_0000080.png").is_file()
    assert (run / "config.json").is_file()


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, make_config):
    config = make_config(steps=20)
    straight = train(config, tmp_path / "a", progress=False, verbose=False)
    train(make_config(steps=10), tmp_path / "b", progress=False, verbose=False)
    resumed = train(config, tmp_path / "b", progress=False, verbose=False)
    assert straight.step == resumed.step == 20
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    for group in ("model", "ema"):
        for key, value in a.tensors[group].items():
            assert torch.equal(value, b.tensors[group][key]), f"{group}.{key}"


def test_minutes_budget_stops_on_the_clock(tmp_path, make_config):
    result = train(make_config(minutes=0.01), tmp_path / "run", progress=False, verbose=False)
    assert result.stopped_by == "minutes"
    assert result.step >= 1
    assert latest_checkpoint(tmp_path / "run").step == result.step


def test_a_finished_run_is_not_trained_further(trained_run, tmp_path, make_config):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    result = train(make_config(steps=30), run, progress=False, verbose=False)
    assert (result.start_step, result.step) == (30, 30)


def test_resume_with_a_different_network_is_refused(trained_run, tmp_path, make_config):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    config = make_config(steps=40)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, base_channels=32))
    with pytest.raises(ConfigError, match="model.base_channels"):
        train(config, run, progress=False, verbose=False)


def test_a_non_empty_directory_that_is_not_a_run_is_refused(tmp_path, make_config):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not a ddpm run directory"):
        train(make_config(steps=1), tmp_path, progress=False, verbose=False)


def test_two_dimensional_data_train_an_mlp_and_plot_a_scatter(tmp_path):
    config = RunConfig(
        data=DataConfig(name="moons", num_points=500),
        model=ModelConfig(hidden=32, num_layers=2),
        train=TrainConfig(
            steps=5, batch_size=64, sample_steps=4, tensorboard=False, sample_every=0
        ),
        sample=SampleConfig(steps=4),
    )
    result = train(config, tmp_path / "moons", progress=False, verbose=False)
    assert result.step == 5
    assert result.samples.is_file()
    assert latest_checkpoint(tmp_path / "moons").meta["model"]["arch"] == "mlp"


def test_learned_variance_trains_with_the_hybrid_loss(tmp_path, make_config):
    config = make_config(steps=3)
    config = dataclasses.replace(
        config, diffusion=dataclasses.replace(config.diffusion, variance="learned_range")
    )
    result = train(config, tmp_path / "run", progress=False, verbose=False)
    assert math.isfinite(result.loss)


def test_bf16_without_native_support_trains_but_warns(tmp_path, make_config, monkeypatch):
    monkeypatch.setattr("ddpm.devices.native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        result = train(
            make_config(steps=1, batch_size=4, precision="bf16"),
            tmp_path / "run",
            progress=False,
            verbose=False,
        )
    assert math.isfinite(result.loss)


# --------------------------------------------------------------------------------------------------
# using a run
# --------------------------------------------------------------------------------------------------


def test_samples_from_a_run_have_the_data_shape_and_repeat_for_a_seed(trained_run, tmp_path):
    a = sample_run(trained_run, num=6, steps=4, seed=3, out_dir=tmp_path / "a", progress=False)
    b = sample_run(trained_run, num=6, steps=4, seed=3, out_dir=tmp_path / "b", progress=False)
    c = sample_run(trained_run, num=6, steps=4, seed=4, out_dir=tmp_path / "c", progress=False)
    assert a.x0.shape == (6, 1, 8, 8)
    with np.load(a.npz) as fa, np.load(b.npz) as fb, np.load(c.npz) as fc:
        assert fa["images"].shape == (6, 8, 8, 1) and fa["images"].dtype == np.uint8
        assert np.array_equal(fa["x0"], fb["x0"])
        assert not np.array_equal(fa["x0"], fc["x0"])


def test_trajectory_picture_is_written_on_request(trained_run, tmp_path):
    result = sample_run(
        trained_run, num=4, steps=4, trajectory=True, out_dir=tmp_path, progress=False
    )
    assert result.trajectory_png.is_file()


def test_describe_run_reports_step_and_checkpoints(trained_run):
    text = describe_run(trained_run)
    assert "step:       30" in text
    assert "step_0000030" in text


def test_describe_run_shows_a_checkpoint_whose_training_time_is_unreadable(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    meta = run / "checkpoints" / "step_0000030" / "meta.json"
    meta.write_text(meta.read_text().replace('"elapsed_s":', '"elapsed_s": "soon", "was":'))
    assert "step:       30 (unreadable time 'soon' of training)" in describe_run(run)


def test_resume_with_importance_sampled_timesteps_is_exact(tmp_path, make_config):
    # The sampler's loss history is training state: without it in the checkpoint, the resumed run
    # would draw other timesteps once every t has its 10 losses (after ~16 steps of 64 at T = 100).
    def config(steps):
        c = make_config(steps=steps, batch_size=64, timestep_sampler="importance")
        return dataclasses.replace(c, diffusion=dataclasses.replace(c.diffusion, loss="vlb"))

    train(config(40), tmp_path / "a", progress=False, verbose=False)
    train(config(25), tmp_path / "b", progress=False, verbose=False)
    train(config(40), tmp_path / "b", progress=False, verbose=False)
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.tensors["train_state"]["importance.counts"].min() == 10  # warmed up: p(t) was used
    for group in ("model", "ema"):
        for key, value in a.tensors[group].items():
            assert torch.equal(value, b.tensors[group][key]), f"{group}.{key}"


def test_offset_noise_is_refused_for_point_data(tmp_path):
    config = RunConfig(
        data=DataConfig(name="moons", num_points=200), train=TrainConfig(steps=1, offset_noise=0.1)
    )
    with pytest.raises(ConfigError, match="offset_noise"):
        train(config, tmp_path / "moons", progress=False, verbose=False)


# --------------------------------------------------------------------------------------------------
# random horizontal flips, recipes
# --------------------------------------------------------------------------------------------------


def test_hflip_training_resumes_bit_exactly(make_config, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(make_config(steps=4, hflip=True), whole, progress=False, verbose=False)
    train(make_config(steps=2, hflip=True), parts, progress=False, verbose=False)
    train(make_config(steps=4, hflip=True), parts, progress=False, verbose=False)
    a, b = latest_checkpoint(whole).tensors, latest_checkpoint(parts).tensors
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["train_state"]["rng.flip"], b["train_state"]["rng.flip"])


def test_hflip_changes_the_batches_and_nothing_else(make_config, tmp_path):
    plain = train(make_config(steps=3), tmp_path / "a", progress=False, verbose=False)
    flipped = train(make_config(steps=3, hflip=True), tmp_path / "b", progress=False, verbose=False)
    assert plain.loss != flipped.loss


def test_hflip_is_refused_for_point_data(make_points_config, tmp_path):
    with pytest.raises(ConfigError, match="hflip"):
        train(
            make_points_config(steps=1, hflip=True), tmp_path / "p", progress=False, verbose=False
        )


def test_a_recipe_lies_under_the_config_file_and_the_command_line(fast_toml, tmp_path):
    config, _ = prepare_run(
        {"train": {"batch_size": 16}}, config_file=fast_toml, run_dir=tmp_path, recipe="ho2020"
    )
    assert config.data.name == "cifar10" and config.train.hflip and config.train.ema_decay == 0.9999
    assert config.model.preset == "tiny"  # the TOML file wins over the recipe
    assert config.train.batch_size == 16  # the command line wins over both
