"""Class-conditional training (``--cond class``) and classifier-free guidance through the one sampling
path (``ddpm sample`` / ``ddpm eval`` / ``sample_run``). The guidance algorithm itself is checked
against the exact conditional denoiser in test_guidance.py; here, that the trainer feeds each image
its own label, drops labels as configured, resumes bit-exactly, records the classes, and that
sampling with a class means what ``ddpm.guidance`` says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cond_config
from ddpm.checkpoint import latest_checkpoint
from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.devices import at_precision, resolve_precision
from ddpm.evaluate import eval_run, load_classifier, quantize
from ddpm.objective import Objective
from ddpm.runs import load_run, sample_run, sampler_options
from ddpm.samplers import SAMPLERS, sample
from ddpm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def test_a_conditional_run_records_its_classes(cond_run):
    meta = latest_checkpoint(cond_run, groups=()).meta
    assert meta["data"]["num_classes"] == 10
    assert meta["data"]["class_names"] == [str(i) for i in range(10)]  # digits have no names
    assert meta["model"]["config"]["num_classes"] == 10
    saved = json.loads((cond_run / "config.json").read_text())
    assert saved["model"]["cond"] == "class" and saved["model"]["num_classes"] == 10
    assert saved["train"]["cond_drop"] == 0.1


def _captured_labels(monkeypatch, tmp_path, **train_options) -> list[tuple[torch.Tensor, dict]]:
    """(x0, conditioning) of every objective call of a 2-step conditional run."""
    calls = []
    original = Objective.__call__

    def spy(self, net, x0, t, eps, **conditioning):
        calls.append((x0.clone(), {k: v.clone() for k, v in conditioning.items()}))
        return original(self, net, x0, t, eps, **conditioning)

    monkeypatch.setattr(Objective, "__call__", spy)
    train(cond_config(steps=2, **train_options), tmp_path / "r", progress=False, verbose=False)
    return calls


def test_each_image_is_trained_with_its_own_label(monkeypatch, tmp_path):
    digits = load_dataset("digits", split="train")
    calls = _captured_labels(monkeypatch, tmp_path, cond_drop=0.0)
    assert len(calls) == 2
    for x0, cond in calls:
        for image, label in zip(x0, cond["class_labels"], strict=True):
            same = (digits.x == image).flatten(1).all(1)  # the training images equal to this one
            assert int(label) in set(digits.y[same].tolist())


def test_cond_drop_one_trains_every_label_as_the_null_class(monkeypatch, tmp_path):
    calls = _captured_labels(monkeypatch, tmp_path, cond_drop=1.0)
    assert all(bool((cond["class_labels"] == 10).all()) for _, cond in calls)


def test_conditional_training_resumes_bit_exactly(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(cond_config(steps=4, cond_drop=0.5), whole, progress=False, verbose=False)
    train(cond_config(steps=2, cond_drop=0.5), parts, progress=False, verbose=False)
    train(cond_config(steps=4, cond_drop=0.5), parts, progress=False, verbose=False)
    a, b = latest_checkpoint(whole).tensors, latest_checkpoint(parts).tensors
    for group in ("model", "ema"):
        for key, value in a[group].items():
            assert torch.equal(value, b[group][key]), f"{group}.{key}"
    assert torch.equal(a["train_state"]["rng.labels"], b["train_state"]["rng.labels"])


# --------------------------------------------------------------------------------------------------
# sampling with a class
# --------------------------------------------------------------------------------------------------


def _conditional_reference(run_dir, label: int, num: int, steps: int) -> torch.Tensor:
    """Plain conditional sampling, written out by hand: the sampler calls net(x, t, class=label)."""
    run = load_run(run_dir, device="cpu")
    labels = torch.full((num,), label)
    cfg = run.config.sample
    net = at_precision(run.model, run.device, resolve_precision(cfg.precision, run.device))
    return sample(
        lambda x, t: net(x, t, class_labels=labels),
        run.schedule,
        (num, *run.sample_shape),
        sampler=cfg.sampler,
        num_steps=steps,
        grid=cfg.grid,
        generator=torch.Generator().manual_seed(0),
        **sampler_options(run.config, is_image=True),
    ).x0


def test_guidance_scale_one_is_plain_conditional_sampling(cond_run, tmp_path):
    args = ["sample", str(cond_run), "--class", "3", "--guidance", "1", "--num", "4", "--steps"]
    assert main([*args, "3", "--seed", "0", "--out", str(tmp_path), "--device", "cpu", "-q"]) == 0
    (npz,) = tmp_path.glob("*.npz")
    with np.load(npz) as f:
        x0, labels = torch.from_numpy(f["x0"]), f["labels"]
    assert (labels == 3).all()
    assert torch.equal(x0, _conditional_reference(cond_run, 3, 4, 3))


def test_guidance_scale_zero_is_unconditional_sampling(cond_run, tmp_path):
    common = dict(num=4, steps=3, seed=0, progress=False, device="cpu")
    guided = sample_run(cond_run, out_dir=tmp_path / "a", class_label=3, guidance=0.0, **common)
    plain = sample_run(cond_run, out_dir=tmp_path / "b", **common)
    assert torch.equal(guided.x0, plain.x0)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_guidance_works_with_every_sampler(cond_run, tmp_path, sampler):
    common = dict(num=2, steps=3, seed=0, progress=False, device="cpu", sampler=sampler)
    w3 = sample_run(cond_run, out_dir=tmp_path, class_label=3, guidance=3.0, **common).x0
    w1 = sample_run(cond_run, out_dir=tmp_path, class_label=3, guidance=1.0, **common).x0
    assert w3.shape == (2, 1, 8, 8) and torch.isfinite(w3).all()
    assert not torch.equal(w3, w1)  # the unconditional branch was used


def test_class_all_draws_one_named_row_per_class(cond_run, tmp_path, capsys):
    argv = ["sample", str(cond_run), "--class", "all", "--num", "3", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path), "--device", "cpu", "-q"]) == 0
    assert "one row per class" in capsys.readouterr().out
    (npz,) = tmp_path.glob("*classall_w1.npz")
    with np.load(npz) as f:
        assert f["x0"].shape == (30, 1, 8, 8)
        assert f["labels"].tolist() == [c for c in range(10) for _ in range(3)]
    (png,) = tmp_path.glob("*classall_w1.png")
    width, height = Image.open(png).size
    tile = 32 + 2  # 8x8 digits drawn 4x, 2 px apart
    assert height == 2 + 10 * tile  # ten rows
    assert width > 2 + 3 * tile  # three columns and a band of names


def test_eval_scores_the_class_asked_for(cond_run, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    common = dict(num=20, steps=2, seed=0, progress=False, device="cpu", batch_size=20)
    report = eval_run(cond_run, sampler="dpm_solver", class_label=3, guidance=2.0,
                      out_dir=tmp_path, **common)  # fmt: skip
    block, protocol = report.results["classifier"], report.results["protocol"]
    assert protocol["class"] == 3 and protocol["guidance"] == 2.0
    assert block["protocol"]["reference_size"] == 30  # the test split's 30 threes
    # The same samples through ``ddpm sample``, classified by hand.
    x0 = sample_run(cond_run, sampler="dpm_solver", out_dir=tmp_path / "s", class_label=3,
                    guidance=2.0, **common).x0  # fmt: skip
    predicted = load_classifier("digits")(quantize(x0)).argmax(1)
    assert block["class_accuracy"] == pytest.approx(float((predicted == 3).double().mean()))


# --------------------------------------------------------------------------------------------------
# bad input: one line, its exit code, nothing written
# --------------------------------------------------------------------------------------------------


BAD = {
    "class on an unconditional run": (["sample", "PLAIN", "--class", "3"], 2, "not class-cond"),
    "eval with a class on an unconditional run": (
        ["eval", "PLAIN", "--class", "all", "--num", "2"],
        2,
        "not class-conditional",
    ),
    "class out of range": (["sample", "COND", "--class", "10"], 2, "out of range"),
    "negative class": (["sample", "COND", "--class", "-1"], 2, "out of range"),
    "unknown class name": (["sample", "COND", "--class", "seven"], 2, "unknown class 'seven'"),
    "guidance without a class": (["sample", "COND", "--guidance", "3"], 2, "needs --class"),
    "cond class on unlabelled data": (
        ["train", "--cond", "class", "--data", "npz", "--data-root", "NPZ", "--run-dir", "NEW"],
        2,
        "needs class labels",
    ),
    "unknown conditioning": (["train", "--cond", "text", "--run-dir", "NEW"], 2, "model.cond"),
    "cond drop above 1": (["train", "--cond-drop", "2", "--run-dir", "NEW"], 2, "cond_drop"),
}


@pytest.mark.parametrize("name", BAD, ids=list(BAD))
def test_bad_conditional_input_is_one_line_and_writes_nothing(
    name, cond_run, trained_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 8, 8), np.uint8))
    argv, code, message = BAD[name]
    subs = {
        "PLAIN": trained_run,
        "COND": cond_run,
        "NPZ": tmp_path / "x.npz",
        "NEW": tmp_path / "r",
    }
    argv = [str(subs.get(a, a)) for a in argv]
    out = ["--out", str(tmp_path / "out")] if argv[0] in ("sample", "eval") else []
    before = (
        sorted(tmp_path.rglob("*")),
        sorted(cond_run.rglob("*")),
        sorted(trained_run.rglob("*")),
    )
    assert main([*argv, *out]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error: ") and message in err[0], err
    after = sorted(tmp_path.rglob("*")), sorted(cond_run.rglob("*")), sorted(trained_run.rglob("*"))
    assert after == before


# --------------------------------------------------------------------------------------------------
# torchrun: every rank draws the global batch's label drops, then takes its rows
# --------------------------------------------------------------------------------------------------

MOONS_TOML = """\
[data]
name = "moons"
num_points = 256

[model]
cond = "class"
hidden = 32
num_layers = 2

[diffusion]
num_timesteps = 100

[train]
batch_size = 32
warmup_steps = 2
cond_drop = 0.5
sample_every = 0
sample_steps = 4
checkpoint_every = 0
tensorboard = false

[sample]
num = 16
steps = 4
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_drop_the_labels_of_one_process(tmp_path):
    from ddpm.config import load_config, merge_config
    from test_distributed import assert_close_weights, torchrun

    (tmp_path / "moons.toml").write_text(MOONS_TOML)
    config = merge_config(load_config(tmp_path / "moons.toml"), {"train": {"steps": 6}})
    train(config, tmp_path / "one", progress=False, verbose=False)
    args = ["train", "--config", str(tmp_path / "moons.toml"), "--steps", "6"]
    proc = torchrun([*args, "--run-dir", str(tmp_path / "two"), "-q"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_weights(tmp_path / "one", tmp_path / "two")


def test_a_guidance_scale_that_overflows_is_refused_and_writes_no_samples(
    cond_run, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["sample", str(cond_run), "--class", "0", "--guidance", "1e308", "--num", "2"]
    code = main([*argv, "--steps", "2", "-q", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not finite" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
