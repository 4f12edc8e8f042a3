"""diffusers checkpoints in and out, checked against diffusers itself on randomly initialised models.

Nothing is downloaded: every model is built here with random weights, in the configuration of a
published one. The max abs differences measured are printed (pytest -s) and stated in the README.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from ddpm.cli import main
from ddpm.config import RunConfig, load_config, recipe_path
from ddpm.diffusion import p_mean_variance, p_sample_step
from ddpm.errors import CheckpointError, ConfigError
from ddpm.interop import (
    diffusers_config_from_unet,
    export_diffusers,
    import_diffusers,
    schedule_from_diffusers,
    scheduler_config_from_run,
    unet_kwargs_from_diffusers,
)
from ddpm.nets import UNet, build_unet, count_parameters
from ddpm.runs import build_schedule, load_run_model

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# google/ddpm-cifar10-32's UNet2DModel: Ho et al.'s CIFAR-10 network as diffusers converted it.
CIFAR10_32 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    mid_block_scale_factor=1,
    time_embedding_type="positional",
)
# The same design, small: 16x16, two levels, attention at 8x8, 8 GroupNorm groups.
SMALL = dict(
    CIFAR10_32,
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
# Float32 rounding of a network with |eps| ~ 1: two implementations of the same sums differ by ~1e-6.
FLOAT32_ROUNDING = 1e-4


def random_unet2d(config: dict, seed: int = 0):
    """A UNet2DModel whose every parameter is random (the norms' scales and biases too, so a
    swapped or missing tensor cannot go unnoticed)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            scale = p.std() if p.numel() > 1 and p.std() > 0 else torch.tensor(1.0)
            p.add_(0.1 * scale * torch.randn(p.shape, generator=g))
    return model


def eps_of(model, x, t) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def inputs(size: int, n: int = 2, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.tensor([3, 900, 500, 0][:n])


# ---------------------------------------------------------------- exactness against diffusers


@pytest.mark.slow
def test_cifar10_32_imports_with_diffusers_eps_and_exports_back(tmp_path):
    ref = random_unet2d(CIFAR10_32)
    assert sum(p.numel() for p in ref.parameters()) == pytest.approx(35.7e6, abs=0.1e6)
    src = tmp_path / "ddpm-cifar10-32"  # the published folder's layout: one flat folder
    ref.save_pretrained(src)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_config(src)

    report = import_diffusers(src, tmp_path / "run")
    assert report.preset == "ho2020" and report.num_parameters == 35_746_307
    net, config, _ = load_run_model(tmp_path / "run")
    x, t = inputs(32)
    expected = eps_of(ref, x, t)
    ours = (eps_of(net, x, t) - expected).abs().max().item()

    exported = export_diffusers(tmp_path / "run", tmp_path / "out")
    assert exported.num_parameters == 35_746_307  # every weight, though the loaded model is frozen
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "out", subfolder="unet").eval()
    again = (eps_of(back, x, t) - expected).abs().max().item()
    print(
        f"\ncifar10-32 (35.7M): max |eps_ddpm - eps_diffusers| = {ours:.3g}, "
        f"after export and reload in diffusers {again:.3g} (max |eps| {expected.abs().max():.3g})"
    )
    assert ours < FLOAT32_ROUNDING
    assert again < FLOAT32_ROUNDING
    assert config.diffusion.schedule == "linear" and config.data.name == "cifar10"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"attention_head_dim": 8},
        {"flip_sin_to_cos": True, "freq_shift": 0, "norm_eps": 1e-5, "downsample_padding": 1},
        {"out_channels": 6},
    ],
    ids=["ho2020-numerics", "4-heads", "diffusers-defaults", "learned-variance"],
)
def test_small_unet2d_gives_the_same_eps_in_ddpm(options):
    ref = random_unet2d({**SMALL, **options})
    kwargs, notes = unet_kwargs_from_diffusers(dict(ref.config))
    from ddpm.interop import state_dict_from_diffusers

    net = UNet(**kwargs).eval()
    net.load_state_dict(state_dict_from_diffusers(dict(ref.state_dict()), net))
    x, t = inputs(16, n=4)
    diff = (eps_of(net, x, t) - eps_of(ref, x, t)).abs().max().item()
    print(f"\nsmall UNet2DModel {options}: max |eps_ddpm - eps_diffusers| = {diff:.3g}")
    assert diff < FLOAT32_ROUNDING and not notes


def test_old_attention_weight_names_import_the_same(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = random_unet2d(SMALL)
    ref.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(path).items():
        for new, old in new_to_old.items():
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, path)
    import_diffusers(tmp_path / "m", tmp_path / "run", data="npz")
    net, _, _ = load_run_model(tmp_path / "run")
    x, t = inputs(16)
    assert (eps_of(net, x, t) - eps_of(ref, x, t)).abs().max() < FLOAT32_ROUNDING


@pytest.mark.parametrize(
    "variance, prediction, t",
    [
        ("fixed_small", "epsilon", 999),
        ("fixed_small", "epsilon", 500),
        ("fixed_small", "epsilon", 1),
        ("fixed_small", "epsilon", 0),
        ("fixed_large", "epsilon", 500),
        ("fixed_small", "v_prediction", 500),
        ("fixed_small", "sample", 20),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_ddpm_step_matches_ddpmscheduler_step(variance, prediction, t, dtype):
    """The same x_t, network output and noise z through DDPMScheduler.step and through ddpm's
    p_mean_variance + p_sample_step (with the schedule imported from the scheduler's config). In
    float64 (the scheduler's alpha_bar cast up) the two are the same formulas to 1e-12; in float32
    diffusers' own alpha_bar rounding (1 - alpha_bar_t / alpha_bar_t-1 at t = 1) is the limit."""
    config = {"num_train_timesteps": 1000, "variance_type": variance, "prediction_type": prediction}
    scheduler = diffusers.DDPMScheduler(**config)
    diffusion, sample, _ = schedule_from_diffusers(dict(scheduler.config))
    schedule = build_schedule(RunConfig.from_dict({"diffusion": diffusion}).diffusion)
    if dtype == torch.float64:
        scheduler.alphas_cumprod = schedule.alpha_bar.clone()
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype)
    out = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype)
    theirs = scheduler.step(out, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)  # same draw
    tt = torch.full((2,), t)
    pmv = p_mean_variance(
        schedule,
        x_t,
        tt,
        out,
        prediction=diffusion["prediction"],
        variance=diffusion["variance"],
        clip_x0=sample["clip_x0"],
    )
    ours = p_sample_step(pmv, tt, z)
    diff = (ours - theirs).abs().max().item()
    print(
        f"\nDDPM step t={t} {variance} {prediction} {dtype}: max |x_prev difference| = {diff:.3g}"
    )
    assert diff < (1e-12 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("name", ["linear", "quadratic", "cosine", "sigmoid", "constant"])
@pytest.mark.parametrize("T", [1000, 100])
def test_exported_scheduler_has_ddpms_betas_and_imports_back(name, T):
    run = RunConfig.from_dict({"diffusion": {"schedule": name, "num_timesteps": T}})
    exported = scheduler_config_from_run(run)
    theirs = diffusers.DDPMScheduler.from_config(exported).betas.double()
    ours = build_schedule(run.diffusion).beta
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-8)
    diffusion, _, _ = schedule_from_diffusers(exported)
    assert diffusion["schedule"] == name and diffusion["num_timesteps"] == T


# ---------------------------------------------------------------- end to end, on the command line


def write_tiny_cifar10(root, n=2):
    """The binary release's six batch files: per record a label byte and 3072 pixel bytes."""
    g = torch.Generator().manual_seed(0)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        records = torch.randint(0, 256, (n, 3073), generator=g, dtype=torch.uint8)
        records[:, 0] %= 10
        (folder / f"{name}.bin").write_bytes(records.numpy().tobytes())
    return root


def test_import_sample_nll_info_export_on_the_command_line(tmp_path, capsys):
    ref = random_unet2d(SMALL)
    # T = 100 with endpoints 1e-3 .. 0.02 * 10: ddpm's "linear" at T = 100 (scaled by 1000 / T).
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2)
    diffusers.DDPMPipeline(unet=ref, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    data = write_tiny_cifar10(tmp_path / "cifar")
    run, out = tmp_path / "run", tmp_path / "exported"

    args = ["--run-dir", str(run), "--data", "cifar10", "--data-root", str(data)]
    assert main(["import", str(tmp_path / "pipe"), *args]) == 0
    printed = capsys.readouterr().out
    assert "linear, T=100, predicts eps" in printed
    assert main(["sample", str(run), "--num", "2", "--steps", "3", "-q"]) == 0
    assert main(["nll", str(run), "--num", "2", "--steps", "4", "-q"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert main(["info", str(run)]) == 0
    assert "cifar10" in capsys.readouterr().out
    # fine-tuning the imported weights: a fresh optimizer from the imported step on
    assert main(["train", "--run-dir", str(run), "--steps", "2", "--batch-size", "2", "-q"]) == 0
    assert main(["train", "--run-dir", str(run), "--steps", "3", "--batch-size", "2", "-q"]) == 0
    assert "(step 3)" in capsys.readouterr().out
    assert main(["export", str(run), str(out)]) == 0

    back = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    x, t = inputs(16)
    assert (eps_of(back, x, t) - eps_of(ref, x, t)).abs().max() > FLOAT32_ROUNDING  # fine-tuned
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert dict(pipe.scheduler.config)["num_train_timesteps"] == 100
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


# ---------------------------------------------------------------- what cannot be mapped


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_bin_is_refused_with_the_command_that_converts_it(tmp_path, capsys):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **SMALL}))
    marker = tmp_path / "pwned"
    (src / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    code = main(["import", str(src), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == CheckpointError.exit_code and len(err.strip().splitlines()) == 1
    assert "from safetensors.torch import save_file" in err and "weights_only=True" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_an_unmappable_config_is_reported_whole_and_nothing_is_written(tmp_path, capsys):
    src = tmp_path / "m"
    src.mkdir()
    config = {**SMALL, "resnet_time_scale_shift": "scale_shift", "time_embedding_type": "fourier"}
    (src / "config.json").write_text(json.dumps(config))
    code = main(["import", str(src), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and len(err.strip().splitlines()) == 1
    assert "resnet_time_scale_shift='scale_shift'" in err and "time_embedding_type='fourier'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"block_out_channels": [32, 64, 64]}, "3 block_out_channels but 2 down_block_types"),
        ({"block_out_channels": [0, 32]}, "block_out_channels must be positive integers"),
        ({"block_out_channels": "wide"}, "block_out_channels must be positive integers"),
        ({"attention_head_dim": 0}, "attention_head_dim must be a positive integer"),
        ({"down_block_types": "DownBlock2D"}, "must be lists"),
    ],
)
def test_a_malformed_config_is_one_line_not_a_traceback(tmp_path, capsys, change, says):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**SMALL, **change}))
    code = main(["import", str(src), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and len(err.strip().splitlines()) == 1 and says in err
    assert not (tmp_path / "run").exists()


def test_not_a_model_folder_and_an_existing_run_dir_are_one_line_errors(tmp_path, capsys):
    assert main(["import", str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 2
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    assert main(["import", str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 4
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


@pytest.mark.parametrize(
    "preset, size, reason",
    [("tiny", 8, "GroupNorm groups that vary"), ("small", 32, "upsample='conv_nearest'")],
)
def test_presets_diffusers_cannot_express_are_refused_with_the_reason(preset, size, reason):
    with torch.device("meta"):
        net = build_unet(preset, in_channels=1, image_size=size)
    with pytest.raises(ConfigError, match=reason):
        diffusers_config_from_unet(net)


@pytest.mark.parametrize("preset", ["cifar10", "ho2020"])
def test_paper_presets_round_trip_through_a_diffusers_config(preset):
    from ddpm.interop import _preset_for

    with torch.device("meta"):
        net = build_unet(preset, in_channels=3, image_size=32)
        config = diffusers_config_from_unet(net)
        kwargs, _ = unet_kwargs_from_diffusers(config)
        back = UNet(**{**kwargs, "dropout": net.config["dropout"]})
    assert count_parameters(back) == count_parameters(net)
    assert _preset_for(back)[0] == preset and not _preset_for(back)[2]


def test_ho2020_recipe_holds_the_papers_settings():
    config = load_config(recipe_path("ho2020"))
    t, d = config.train, config.diffusion
    assert (t.lr, t.batch_size, t.warmup_steps, t.grad_clip, t.ema_decay, t.steps) == (
        2e-4,
        128,
        5000,
        1.0,
        0.9999,
        800_000,
    )
    assert (d.schedule, d.num_timesteps, d.prediction, d.objective) == (
        "linear",
        1000,
        "eps",
        "simple",
    )
    assert config.data.name == "cifar10" and config.model.preset == "ho2020"
    with torch.device("meta"):
        net = build_unet("ho2020", in_channels=3, image_size=32)
    assert (
        count_parameters(net) == pytest.approx(35.7e6, abs=0.1e6) and net.config["dropout"] == 0.1
    )
    with pytest.raises(ConfigError, match="ho2020"):
        recipe_path("nope")


@pytest.mark.parametrize("data", ["bogus", "moons"])
def test_import_refuses_a_data_set_that_is_not_one_of_images_and_writes_nothing(tmp_path, data):
    from ddpm.interop import import_diffusers

    random_unet2d(SMALL).save_pretrained(tmp_path / "unet")
    with pytest.raises(ConfigError, match=f"unknown image data set '{data}'"):
        import_diffusers(tmp_path / "unet", tmp_path / "run", data=data)
    assert not (tmp_path / "run").exists()


def test_an_import_that_fails_while_writing_leaves_no_folder_behind(tmp_path, monkeypatch):
    import ddpm.interop
    from ddpm.interop import import_diffusers

    random_unet2d(SMALL).save_pretrained(tmp_path / "unet")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ddpm.interop, "save_run_config", full_disk)  # after the checkpoint
    with pytest.raises(OSError):
        import_diffusers(tmp_path / "unet", tmp_path / "run", data="cifar10")
    assert not (tmp_path / "run").exists()  # so a retry is not refused
    monkeypatch.undo()
    import_diffusers(tmp_path / "unet", tmp_path / "run", data="cifar10")
