"""Devices and precision: where training, sampling and evaluation run, and what happens on a device
this machine does not have. Parametrised over the devices present (``conftest.DEVICES``), so on a
machine with CUDA the same tests run there too."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DEVICES
from ddpm import distributed
from ddpm.cli import main
from ddpm.config import RunConfig, TrainConfig, merge_config
from ddpm.devices import resolve_device, resolve_precision
from ddpm.errors import ConfigError
from ddpm.objective import Objective
from ddpm.runs import load_run, sample_run
from ddpm.schedules import NoiseSchedule
from ddpm.train import _gradient, _resolve, _setup, _update, train

ABSENT = ["cuda:99", "banana"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])


@pytest.mark.parametrize("name", ABSENT)
def test_an_absent_or_unknown_device_is_a_config_error(name):
    with pytest.raises(ConfigError, match="device"):
        resolve_device(name)


def test_auto_picks_cuda_when_present_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("command", ["train", "sample", "nll", "eval"])
def test_asking_for_an_absent_device_is_one_line_and_exit_2(command, trained_run, tmp_path, capsys):
    args = {
        "train": ["train", "--run-dir", str(tmp_path / "r"), "--steps", "1"],
        "sample": ["sample", str(trained_run)],
        "nll": ["nll", str(trained_run)],
        "eval": ["eval", str(trained_run)],
    }[command]
    assert main([*args, "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda:99" in err[0] and "not available" in err[0]
    assert not (tmp_path / "r").exists()


def test_fp16_is_refused_off_cuda():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


def test_auto_precision_is_bf16_exactly_where_it_is_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("ddpm.devices.native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr("ddpm.devices.native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"


def test_auto_precision_keeps_the_points_mlp_in_fp32(monkeypatch):
    monkeypatch.setattr("ddpm.devices.native_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu"), images=False) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu"), images=False) == "bf16"


def test_a_run_saved_before_train_precision_keeps_the_precision_it_trained_in():
    assert merge_config(RunConfig(), {"train": {"bf16": False}}).train.precision == "fp32"


def test_a_run_saved_with_the_old_bf16_flag_reads_as_precision_bf16():
    config = merge_config(RunConfig(), {"train": {"bf16": True}}, "an old config.json")
    assert config.train.precision == "bf16"


def test_draws_of_t_and_eps_are_the_same_numbers_on_every_device(device):
    objective = Objective(NoiseSchedule.from_name("linear", 100))
    a = objective.draw((4, 1, 8, 8), torch.Generator().manual_seed(3))
    b = objective.draw((4, 1, 8, 8), torch.Generator().manual_seed(3)).to(device)
    assert b.t.device.type == torch.device(device).type
    assert torch.equal(a.t, b.t.cpu()) and torch.equal(a.eps, b.eps.cpu())


def _job(config, run_dir, device):
    """A training job built the way ``train`` builds it (no lock: nothing else trains here)."""
    config, dataset = _resolve(config, run_dir, distributed.Dist())
    return _setup(config, dataset, run_dir, device, distributed.Dist(), False)


def _tensors_of(state) -> dict[str, torch.Tensor]:
    found = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    found |= {f"ema.{k}": v for k, v in state.ema.state_dict().items()}
    for i, per_param in enumerate(state.optimizer.state.values()):
        found |= {f"optim.{i}.{k}": v for k, v in per_param.items() if k != "step"}
    return found


def test_every_tensor_of_the_train_state_lives_on_the_chosen_device(device, make_config, tmp_path):
    job = _job(make_config(steps=1), tmp_path / "run", resolve_device(device))
    loss, grad_norm = _gradient(job, lr=1e-3)
    assert _update(job, loss, grad_norm, None)
    tensors = _tensors_of(job.state)
    assert len(tensors) > 10
    wrong = {k: v.device for k, v in tensors.items() if v.device.type != torch.device(device).type}
    assert not wrong
    assert job.objective.schedule.alpha_bar.device.type in (torch.device(device).type, "cpu")


@pytest.mark.parametrize("source", DEVICES)
@pytest.mark.parametrize("target", DEVICES)
def test_a_checkpoint_written_on_one_device_samples_and_resumes_on_another(
    source, target, make_config, tmp_path
):
    run = tmp_path / "run"
    train(make_config(steps=2), run, device=source, progress=False, verbose=False)
    loaded = load_run(run, device=target)
    assert next(loaded.model.parameters()).device.type == torch.device(target).type
    result = sample_run(run, num=3, steps=2, device=target, out_dir=tmp_path / "s", progress=False)
    assert result.x0.shape == (3, 1, 8, 8) and torch.isfinite(result.x0).all()
    resumed = train(make_config(steps=3), run, device=target, progress=False, verbose=False)
    assert resumed.start_step == 2 and resumed.step == 3


def test_info_shows_where_the_run_trained(trained_run, capsys):
    assert main(["info", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "trained on: " in out and ("cpu (" in out or "cuda:" in out)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_training_on_cuda_takes_the_steps_the_cpu_takes(make_config, tmp_path):
    """t, eps and the data order come from CPU generators and the weights are initialised on the
    CPU, so the first losses on CUDA match the CPU's up to float rounding (no dropout here)."""
    losses = {}
    for dev in ("cpu", "cuda"):
        config = make_config(steps=3, log_every=1, tensorboard=False)
        train(config, tmp_path / dev, device=dev, progress=False, verbose=False)
        rows = (tmp_path / dev / "log.csv").read_text().splitlines()[1:]
        losses[dev] = [float(r.split(",")[1]) for r in rows]
    assert losses["cpu"] == pytest.approx(losses["cuda"], rel=1e-3)


def test_bf16_autocast_loss_is_within_two_percent_of_fp32(make_config, tmp_path):
    """The same batch, t and eps through the tiny U-Net: bf16 autocast of the network only."""
    results = {}
    for precision in ("fp32", "bf16"):
        config = make_config(steps=1, precision=precision)
        job = _job(config, tmp_path / precision, torch.device("cpu"))
        results[precision], _ = _gradient(job, lr=1e-3)
    assert results["bf16"] == pytest.approx(results["fp32"], rel=0.02)


def test_train_config_accepts_each_precision():
    for precision in ("auto", "fp32", "bf16", "fp16"):
        assert TrainConfig(precision=precision).precision == precision
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="int8")


def test_eval_json_records_the_device(trained_run, tmp_path):
    args = ["--num", "20", "--steps", "4", "--out", str(tmp_path), "--device", "cpu", "-q"]
    assert main(["eval", str(trained_run), *args]) == 0
    report = json.loads(next(tmp_path.glob("eval_*.json")).read_text())
    assert report["protocol"]["device"].startswith("cpu (")
