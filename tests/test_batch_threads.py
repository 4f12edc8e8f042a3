"""Batch threads (``devices.BatchThreads``): a batch computed in row shares, one thread each, gives the
whole batch's results -- network outputs, training gradients, samples -- and does so reproducibly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import fast_config
from ddpm import distributed
from ddpm.cli import main
from ddpm.devices import BatchThreads, resolve_batch_threads, resolve_device, split_batch
from ddpm.errors import ConfigError
from ddpm.nets import build_unet
from ddpm.objective import Objective
from ddpm.runs import load_run, sample_run
from ddpm.schedules import NoiseSchedule
from ddpm.train import _resolve, _setup, loss_and_backward, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("tiny", in_channels=1, image_size=8, base_channels=16)


@pytest.fixture(scope="module")
def threads():
    with BatchThreads(2) as pool:
        yield pool


def test_shares_are_contiguous_near_equal_and_cover_the_batch():
    pool = BatchThreads(3)
    try:
        assert pool.parts(13) == [slice(0, 4), slice(4, 8), slice(8, 13)]
        assert pool.parts(11) == [
            slice(0, 5),
            slice(5, 11),
        ]  # at least MIN_ROWS_PER_THREAD rows each
        assert pool.parts(5) == [slice(0, 5)]
    finally:
        pool.close()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_network_evaluated_in_shares_equals_the_whole_batch(unet, threads, precision):
    x, t = torch.randn(12, 1, 8, 8), torch.randint(0, 100, (12,))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        whole = unet(x, t)
        shared = split_batch(unet, threads)(x, t)
    assert shared.dtype == whole.dtype
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-6)


def test_workers_inherit_the_callers_grad_mode_and_autocast(threads):
    def modes(rows):
        return torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")

    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        inside = threads.map(modes, 8)
    assert inside == [(False, True), (False, True)]
    assert threads.map(modes, 8) == [(True, False), (True, False)]


def test_workers_share_the_callers_threads_and_the_caller_keeps_its_count(threads):
    before = torch.get_num_threads()
    inside = threads.map(lambda rows: torch.get_num_threads(), 8)
    assert inside == [max(1, before // 2)] * 2
    assert torch.get_num_threads() == before


def test_an_error_in_a_share_reaches_the_caller(threads):
    def fails(rows):
        raise ValueError(f"rows {rows.start}")

    with pytest.raises(ValueError, match="rows 0"):
        threads.map(fails, 8)


def test_the_gradient_of_a_batch_in_shares_is_the_whole_batchs(unet, threads):
    objective = Objective(NoiseSchedule.from_name("linear", 100))
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    drawn = objective.draw(x0.shape, torch.Generator().manual_seed(0))
    grads, losses = [], []
    for pool in (BatchThreads(1), threads):
        unet.zero_grad(set_to_none=True)
        per_example, loss = loss_and_backward(objective, unet, x0, drawn, {}, precision="fp32",
                                              threads=pool)  # fmt: skip
        grads.append([p.grad.clone() for p in unet.parameters()])
        losses.append((per_example, loss))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    for shared, whole in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(shared, whole, rtol=1e-4, atol=1e-6)


def test_training_in_shares_is_reproducible_and_matches_the_whole_batch(tmp_path):
    weights = {}
    for name, n in (("a", 2), ("b", 2), ("whole", 1)):
        config = fast_config(steps=4, precision="fp32")
        train(config, tmp_path / name, batch_threads=n, progress=False, verbose=False)
        weights[name] = load_run(tmp_path / name).model.state_dict()
    for k, v in weights["a"].items():
        assert torch.equal(v, weights["b"][k]), k
        # AdamW moves a weight by about lr (here 2e-3 after warm-up) per step whatever its
        # gradient's size, so a wrong share would show as ~1e-3, rounding as ~1e-7
        torch.testing.assert_close(v, weights["whole"][k], rtol=0, atol=1e-5)


def test_auto_uses_batch_threads_for_image_networks_on_a_cpu_only():
    assert resolve_batch_threads("auto", CPU) == min(2, torch.get_num_threads())
    assert resolve_batch_threads("auto", CPU, images=False) == 1  # the points MLP
    assert resolve_batch_threads("auto", torch.device("cuda")) == 1
    assert resolve_batch_threads(3, CPU, images=False) == 3


def test_auto_trains_a_network_with_dropout_on_the_whole_batch(tmp_path):
    config = fast_config(steps=1, precision="bf16")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=0.1))
    config, dataset = _resolve(config, tmp_path / "r", distributed.Dist())
    job = _setup(config, dataset, tmp_path / "r", CPU, distributed.Dist(), False, "auto")
    with job.threads:
        assert job.threads.workers == 1
    job = _setup(config, dataset, tmp_path / "r", CPU, distributed.Dist(), False, 2)
    with job.threads:
        assert job.threads.workers == 2  # asked for: honoured


def test_samples_drawn_in_shares_equal_the_whole_batchs(trained_run, tmp_path):
    arrays = []
    for n in (1, 2):
        result = sample_run(trained_run, num=8, steps=4, batch_threads=n, progress=False,
                            out_dir=tmp_path / str(n))  # fmt: skip
        arrays.append(np.load(result.npz)["x0"])
    np.testing.assert_allclose(arrays[1], arrays[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_batch_threads_value_is_one_line_and_exit_2(value, tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--steps", "1", "--batch-threads",
                 value]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-threads" in err
    assert not (tmp_path / "r").exists()


def test_batch_threads_of_a_python_caller_are_checked_too():
    with pytest.raises(ConfigError, match="batch-threads"):
        resolve_batch_threads(0, resolve_device("cpu"))
