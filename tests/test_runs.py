"""What can be done with a run directory: one sampling path for previews, ``ddpm sample`` and
``ddpm eval``; any number of samples in bounded memory; one trainer per run directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm.runs
from ddpm.cli import main
from ddpm.errors import RunDirError
from ddpm.evaluate import eval_run
from ddpm.runs import load_run_config, lock_run_dir, sample_run, save_run_config
from ddpm.train import train


@pytest.fixture
def spy_sampler(monkeypatch):
    """Every call of the sampler behind the one sampling path, with its keyword arguments."""
    calls = []
    real = ddpm.runs.sample

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ddpm.runs, "sample", spy)
    return calls


@pytest.fixture
def run_with_sample_options(trained_run, tmp_path) -> Path:
    """A copy of the trained run whose [sample] says DPM-Solver++ order 3, no clipping, dynamic
    thresholding at 0.9, DDIM eta 0.5."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = load_run_config(run)
    sample = {"sampler": "dpm_solver", "order": 3, "clip_x0": False, "dynamic_threshold": 0.9}
    config = ddpm.runs.merge_config(config, {"sample": {**sample, "eta": 0.5}})
    save_run_config(config, run / "config.json")
    return run


def test_sample_and_eval_both_honour_the_runs_sample_section(
    run_with_sample_options, spy_sampler, tmp_path
):
    sample_run(run_with_sample_options, num=4, steps=5, out_dir=tmp_path / "s", progress=False)
    eval_run(run_with_sample_options, num=20, steps=5, out_dir=tmp_path / "e", progress=False)
    assert len(spy_sampler) == 2
    # the sampler: the run's for ddpm sample, the evaluation protocol's own default for ddpm eval
    assert [kwargs["sampler"] for kwargs in spy_sampler] == ["dpm_solver", "sde_dpm_solver"]
    for kwargs in spy_sampler:
        assert kwargs["order"] == 3
        assert kwargs["clip_x0"] is False
        assert kwargs["dynamic_threshold"] == 0.9


def test_eval_records_the_sampler_options_it_used(run_with_sample_options, tmp_path):
    report = eval_run(run_with_sample_options, num=20, steps=5, out_dir=tmp_path, progress=False)
    options = report.results["protocol"]["sampler_options"]
    assert options["order"] == 3 and options["clip_x0"] is False
    assert json.loads(report.json_path.read_text())["protocol"]["sampler_options"] == options


def test_eval_options_override_the_run(run_with_sample_options, spy_sampler, tmp_path):
    eval_run(
        run_with_sample_options, num=20, steps=5, out_dir=tmp_path, progress=False,
        sampler="ddim",
    )  # fmt: skip
    assert spy_sampler[0]["sampler"] == "ddim" and spy_sampler[0]["eta"] == 0.5
    assert "order" not in spy_sampler[0]  # the run's order 3 is DPM-Solver++'s, not DDIM's


def test_training_previews_use_the_same_path(make_config, spy_sampler, tmp_path):
    train(make_config(steps=2), tmp_path / "run", progress=False, verbose=False)
    assert len(spy_sampler) == 1  # the final picture
    assert spy_sampler[0]["clip_x0"] is True and spy_sampler[0]["sampler"] == "sde_dpm_solver"


# --------------------------------------------------------------------------------------------------
# any number of samples, bounded memory
# --------------------------------------------------------------------------------------------------


def test_samples_are_drawn_in_batches_and_streamed_into_one_npz(trained_run, spy_sampler, tmp_path):
    result = sample_run(
        trained_run, num=10, steps=3, batch_size=4, out_dir=tmp_path, progress=False
    )
    assert [len(call) > 0 for call in spy_sampler] == [True] * 3  # batches of 4, 4, 2
    with np.load(result.npz, allow_pickle=False) as f:
        assert f["x0"].shape == (10, 1, 8, 8) and f["x0"].dtype == np.float32
        assert f["images"].shape == (10, 8, 8, 1) and f["images"].dtype == np.uint8
        np.testing.assert_array_equal(f["x0"], result.x0.numpy())  # the PNG shows all 10
    assert (result.num, result.shown) == (10, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([result.npz.name, result.png.name])


def test_sampling_is_deterministic_for_a_seed_and_batch_size(trained_run, tmp_path):
    a = sample_run(
        trained_run, num=6, steps=3, batch_size=4, out_dir=tmp_path / "a", progress=False
    )
    b = sample_run(
        trained_run, num=6, steps=3, batch_size=4, out_dir=tmp_path / "b", progress=False
    )
    with np.load(a.npz) as fa, np.load(b.npz) as fb:
        np.testing.assert_array_equal(fa["x0"], fb["x0"])


def test_a_request_that_cannot_fit_the_disk_is_one_line_and_writes_nothing(
    trained_run, tmp_path, capsys
):
    out = tmp_path / "out"
    code = main(["sample", str(trained_run), "--num", "100000000000", "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "do not fit" in err[0] and "--num" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_an_interrupted_write_leaves_no_npz(trained_run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ddpm.runs.shutil, "copyfileobj", broken)
    with pytest.raises(OSError):
        sample_run(trained_run, num=3, steps=2, out_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".*"))


# --------------------------------------------------------------------------------------------------
# one trainer per run directory
# --------------------------------------------------------------------------------------------------


def test_a_second_trainer_of_a_run_is_refused_naming_the_holder(make_config, tmp_path, capsys):
    run = tmp_path / "run"
    with lock_run_dir(run):
        code = main(["train", "--run-dir", str(run), "--steps", "1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1
    assert f"PID {os.getpid()}" in err[0] and "another process" in err[0]
    assert not (run / "config.json").exists()


def test_sampling_a_run_being_trained_is_allowed(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with lock_run_dir(run):
        result = sample_run(run, num=2, steps=2, out_dir=tmp_path / "s", progress=False)
    assert result.x0.shape[0] == 2


def test_the_lock_of_a_killed_trainer_is_released_by_the_kernel(make_config, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from ddpm.runs import lock_run_dir\n"
         "with lock_run_dir(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
         str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"PID {holder.pid}"):
            train(make_config(steps=1), run, progress=False, verbose=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    result = train(make_config(steps=1), run, progress=False, verbose=False)
    assert result.step == 1


def test_a_new_run_samples_with_sde_dpm_solver_on_50_points_capped_at_a_shorter_chain(
    make_config, spy_sampler, tmp_path
):
    import dataclasses

    from ddpm.config import DiffusionConfig, SampleConfig

    config = dataclasses.replace(
        make_config(steps=2),
        diffusion=DiffusionConfig(num_timesteps=30),
        sample=SampleConfig(num=4),
    )
    train(config, tmp_path / "run", progress=False, verbose=False)
    out = sample_run(tmp_path / "run", progress=False)
    assert out.npz.name.endswith("_sde_dpm_solver30.npz")  # min(50, T = 30) points
    assert spy_sampler[-1]["sampler"] == "sde_dpm_solver"
    assert SampleConfig().steps == 50


@pytest.fixture
def autocast_spy(monkeypatch):
    """For every network call during sampling: (autocast on, its dtype, the network output's dtype)."""
    from ddpm.nets import UNet

    calls, real = [], UNet.forward

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        enabled = torch.is_autocast_enabled("cpu")
        calls.append((enabled, torch.get_autocast_dtype("cpu") if enabled else None, out.dtype))
        return out

    monkeypatch.setattr(UNet, "forward", forward)
    return calls


def _with_sample(run: Path, tmp_path: Path, **sample) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = ddpm.runs.merge_config(load_run_config(copy), {"sample": sample})
    save_run_config(config, copy / "config.json")
    return copy


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampling_runs_the_network_in_the_runs_sample_precision_and_the_sampler_in_fp32(
    trained_run, tmp_path, autocast_spy, monkeypatch, precision
):
    seen = []  # what the sampler's model callable returns to the sampler
    real = ddpm.runs.sample

    def sample(model, *args, **kwargs):
        seen.append(model(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ddpm.runs, "sample", sample)
    run = _with_sample(trained_run, tmp_path, precision=precision)
    sample_run(run, num=3, steps=4, out_dir=tmp_path / "s", progress=False)
    inside = (True, torch.bfloat16) if precision == "bf16" else (False, None)
    assert len(autocast_spy) == 5 and all(call[:2] == inside for call in autocast_spy)
    assert autocast_spy[0][2] == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert seen == [torch.float32]


def test_bf16_sampling_draws_what_fp32_draws_to_bf16_accuracy(trained_run, tmp_path):
    outs = {}
    for precision in ("fp32", "bf16"):
        run = _with_sample(trained_run, tmp_path / precision, precision=precision, sampler="ddim")
        out = sample_run(run, num=16, steps=10, out_dir=tmp_path / precision, progress=False)
        outs[precision] = out.x0.numpy()
    diff = np.abs(outs["bf16"] - outs["fp32"])
    assert 0 < diff.mean() < 0.01 and diff.max() < 0.15  # bf16 keeps ~3 digits: 0.002 / 0.05 here


def test_a_run_saved_before_sample_precision_keeps_sampling_in_fp32(trained_run, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(trained_run, copy)
    data = json.loads((copy / "config.json").read_text())
    del data["sample"]["precision"]
    (copy / "config.json").write_text(json.dumps(data))
    assert load_run_config(copy).sample.precision == "fp32"
    assert load_run_config(trained_run).sample.precision == "auto"  # new runs


def test_ddpm_sample_and_eval_take_the_sampling_precision(trained_run, tmp_path, autocast_spy):
    args = ["--num", "3", "--steps", "2", "--precision", "bf16", "-q"]
    assert main(["sample", str(trained_run), *args, "--out", str(tmp_path / "s")]) == 0
    assert autocast_spy and all(call[1] == torch.bfloat16 for call in autocast_spy)
    report = eval_run(trained_run, num=20, steps=2, precision="fp32", out_dir=tmp_path / "e",
                      progress=False)  # fmt: skip
    assert report.results["protocol"]["precision"] == "fp32"


@pytest.mark.parametrize(
    ("sampler", "option", "takers"),
    [
        ("unipc", {"eta": 0.5}, "ddim sampler;"),
        ("ancestral", {"order": 3}, "unipc, ipndm samplers;"),
    ],
)
def test_an_option_the_chosen_sampler_does_not_take_is_refused(
    trained_run, tmp_path, sampler, option, takers
):
    from ddpm.errors import ConfigError

    for draw in (sample_run, eval_run):
        with pytest.raises(ConfigError, match=f"{next(iter(option))} is an option of .*{takers}"):
            draw(trained_run, num=4, steps=2, sampler=sampler, out_dir=tmp_path, **option)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_an_order_left_unset_is_the_samplers_own_default():
    from ddpm.config import SampleConfig

    assert SampleConfig(sampler="ipndm").sampler_options() == {"order": 3}
    assert SampleConfig(sampler="dpm_solver").sampler_options() == {"order": 2}
    assert SampleConfig(sampler="ipndm", order=4).sampler_options() == {"order": 4}
    assert SampleConfig(sampler="ddim").sampler_options() == {"eta": 0.0}


def test_info_says_how_the_run_samples_by_default(trained_run, tmp_path):
    from ddpm.runs import describe_run

    assert "sampling:   sde_dpm_solver, order 2 on 4 logsnr points, precision auto" in describe_run(
        trained_run
    )
    old = tmp_path / "old"  # a run saved before 2026-12-01: ancestral on the full chain, fp32
    shutil.copytree(trained_run, old)
    data = json.loads((old / "config.json").read_text())
    data["sample"] |= {"sampler": "ancestral", "steps": None}
    del data["sample"]["precision"]
    (old / "config.json").write_text(json.dumps(data))
    assert "sampling:   ancestral on the full chain, precision fp32" in describe_run(old)


@pytest.mark.parametrize("name", ["samples.npz", "a_file"])
def test_an_out_path_that_names_a_file_is_refused_and_nothing_is_written(
    trained_run, tmp_path, name
):
    from ddpm.errors import ConfigError

    out = tmp_path / name
    if name == "a_file":
        out.write_text("keep me")
    with pytest.raises(ConfigError, match="folder"):
        sample_run(trained_run, num=2, steps=2, out_dir=out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([name] if name == "a_file" else [])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_cpu_samples_with_the_channels_last_copy_in_bf16_only(
    trained_run, tmp_path, monkeypatch, precision
):
    from ddpm.nets import UNet

    copies, real = [], UNet.channels_last_copy
    monkeypatch.setattr(UNet, "channels_last_copy", lambda self: copies.append(1) or real(self))
    run = _with_sample(trained_run, tmp_path, precision=precision)
    sample_run(run, num=3, steps=4, out_dir=tmp_path / "s", progress=False)
    assert len(copies) == (1 if precision == "bf16" else 0)


def test_sampling_network_leaves_other_devices_and_networks_as_they_are():
    from ddpm.nets import MLP, build_unet
    from ddpm.runs import sampling_network

    net = build_unet("tiny", in_channels=1, image_size=8)
    mlp = MLP()
    assert sampling_network(net, torch.device("cpu"), "fp32") is net
    assert sampling_network(net, torch.device("meta"), "bf16") is net
    assert sampling_network(mlp, torch.device("cpu"), "bf16") is mlp
    clone = sampling_network(net, torch.device("cpu"), "bf16")
    assert clone is not net and clone.conv_out.weight.is_contiguous(
        memory_format=torch.channels_last
    )
