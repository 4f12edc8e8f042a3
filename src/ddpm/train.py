"""Training (Ho et al. 2020, Algorithm 1), resumable, on any device, on one process or many (torchrun).

Algorithm 1, one step per minibatch::

    x_0 ~ q(x_0);  t ~ Uniform({1..T});  eps ~ N(0, I)
    take a gradient step on  ||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t)||^2

Three parts, as in NVlabs/edm: the *objective* (``ddpm.objective.Objective``: what is drawn and the
per-example loss; all the diffusion mathematics), the *state* (``ddpm.train_state.TrainState``: model,
EMA, optimizer, generators, counters; what a checkpoint holds) and this *loop*, which moves batches to
the device, calls the objective, steps AdamW (linear warm-up, gradient-norm clipping), updates the EMA
(what samples are drawn from), logs, previews and checkpoints. The loop holds no diffusion mathematics.

Giving ``train`` the same run directory again resumes from the newest good checkpoint, bit-exactly.
Randomness is device-independent where it can be: the data order, t and eps are drawn by CPU
generators and moved, and the weights are initialised on the CPU, so a run on a GPU sees the same
batches, timesteps and noise as on the CPU (dropout masks come from the device's own generator).
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ddpm import distributed
from ddpm.checkpoint import checkpoint_dir, crash_point, latest_checkpoint, save_checkpoint
from ddpm.config import RunConfig, resolve_config
from ddpm.data.transforms import random_hflip
from ddpm.devices import (
    BatchThreads,
    autocast,
    describe_device,
    grad_scaler,
    intra_op_threads,
    parse_batch_threads,
    resolve_batch_threads,
    resolve_device,
    resolve_precision,
    update_threads,
)
from ddpm.errors import ConfigError, DivergedError
from ddpm.nets import count_parameters
from ddpm.objective import Objective, draw_noise  # noqa: F401  (draw_noise: public here since 0.1)
from ddpm.runs import (
    CONFIG_FILE,
    LOG_FILE,
    PREVIEW_POINTS,
    arch_of,
    build_model,
    build_objective,
    check_run_dir,
    check_same_run,
    data_meta,
    default_num,
    draw,
    load_data,
    load_run_config,
    lock_run_dir,
    model_from_meta,
    prepare_run,
    save_run_config,
    save_samples,
)
from ddpm.train_state import DataOrder, TrainState, adamw, ema_decay_at, ema_update, lr_at
from ddpm.trainlog import (
    Interrupted,
    StopOnInterrupt,
    TrainLog,
    prepare_log,
    progress_bar,
    stop_reason,
    update_bar,
)

__all__ = [
    "DataOrder",
    "TrainResult",
    "loss_and_backward",
    "ema_decay_at",
    "ema_update",
    "lr_at",
    "prepare_run",
    "train",
]


def _say(msg: str, verbose: bool) -> None:
    if verbose:
        tqdm.write(msg, file=sys.stderr)


class TrainResult(NamedTuple):
    """What a call to ``train`` did: steps start_step -> step, in elapsed_s seconds of this call."""

    run_dir: Path
    step: int
    start_step: int
    loss: float  # mean loss over the last logged window (NaN if no step was taken)
    elapsed_s: float
    steps_per_s: float
    checkpoint: Path | None
    samples: Path | None
    stopped_by: str  # "steps", "minutes" or "interrupt"
    skipped: int = 0  # updates skipped for a non-finite loss, in the whole run
    device: str = "cpu"  # where this call trained, e.g. "cuda:0 (NVIDIA H200)"


class _Job(NamedTuple):
    """Everything one ``train`` call works with, built once by ``_setup``."""

    config: RunConfig
    run_dir: Path
    data_x: torch.Tensor  # the whole training set, on the CPU
    data_y: torch.Tensor | None  # its class labels (class-conditional runs), on the CPU
    data_meta: dict  # what checkpoints say about the data (``runs.data_meta``)
    kind: str
    sample_shape: tuple[int, ...]
    state: TrainState
    objective: Objective  # its schedule on the device
    net: torch.nn.Module  # what the loss calls: the model, maybe DDP-wrapped and compiled
    device: torch.device
    precision: str
    d: distributed.Dist
    shard: slice | None
    trained_on: list[str]  # devices of this run so far, for ``ddpm info``
    resumed_from: Path | None
    threads: (
        BatchThreads  # the batch's shares on a CPU's cores (one: the whole batch on the caller)
    )
    update_threads: int  # intra-op threads of clipping, the optimizer step and the EMA update


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    device: str | torch.device = "auto",
    batch_threads: int | str = "auto",
    progress: bool = True,
    verbose: bool = True,
) -> TrainResult:
    """Train (or resume training) the run in ``run_dir`` on ``device`` until the budget of
    ``config.train`` is spent.

    ``train.steps`` is the total number of updates of the run (earlier invocations included);
    ``train.minutes`` is wall-clock minutes for this call; whichever comes first stops training. At the
    end a checkpoint is written and samples are drawn as ``[sample]`` says (by default 64 images with
    the full chain of T steps, seed 0: the same picture ``sample_run`` draws). On the first Ctrl-C the
    current step finishes, a checkpoint is written, and KeyboardInterrupt is raised (``Interrupted``;
    SIGTERM likewise). Only one trainer may hold a run directory (an OS lock; RunDirError otherwise).

    A non-finite loss (or gradient norm) skips its update: weights, optimizer state and EMA are left
    as they were, the step counts, and a warning says so; ``train.max_nonfinite`` in a row stop the run
    with ``DivergedError``, without writing a checkpoint.

    Under ``torchrun`` (WORLD_SIZE > 1 in the environment) this is one rank of data-parallel training
    (see ``ddpm.distributed``; one GPU per LOCAL_RANK with NCCL on CUDA): ``train.batch_size`` is the
    global batch, each rank computes its share, and only rank 0 writes files, prints or locks.

    ``batch_threads`` (``devices.BatchThreads``): on a CPU, each step's batch is split in that many
    shares, each computed (forward and backward) on its own thread with its part of the intra-op
    threads; "auto" makes two shares for an image network, none under torchrun, with --compile or
    for a network with dropout (whose masks would depend on which thread draws first)."""
    device, batch_threads = resolve_device(device), parse_batch_threads(batch_threads)
    d = distributed.setup(device.type)
    if d.enabled and device.type == "cuda":
        device = torch.device(d.device)  # this rank's LOCAL_RANK GPU
    try:
        run_dir = Path(run_dir)
        check_run_dir(run_dir)
        config, dataset = _resolve(config, run_dir, d)  # bad input fails here, before any write
        with lock_run_dir(run_dir) if d.is_main else contextlib.nullcontext():
            job = _setup(config, dataset, run_dir, device, d, verbose and d.is_main, batch_threads)
            with job.threads:
                return _train(job, progress=progress and d.is_main, verbose=verbose and d.is_main)
    finally:
        distributed.teardown(d)


def _train(job: _Job, *, progress: bool, verbose: bool) -> TrainResult:
    state, tc, d = job.state, job.config.train, job.d
    start_step, t_start = state.step, time.monotonic()
    elapsed_before, last_saved = state.elapsed_s, job.resumed_from
    bar = progress_bar(progress, start_step, tc.steps, tc.minutes)
    log = TrainLog(job.run_dir if d.is_main else None, tc.batch_size, tc.tensorboard)
    stopped_by, samples, signum, pending, lr = "steps", None, signal.SIGINT, None, tc.lr
    state.model.train()
    try:
        with StopOnInterrupt(t_start + 60 * tc.minutes if tc.minutes else None) as stop:
            while tc.steps is None or state.step < tc.steps:
                started = time.monotonic()
                if not d.enabled:  # one process: a signal during step k stops after step k
                    pending, signum = stop_reason(stop.flags())
                if pending is not None:
                    break
                lr = lr_at(state.step, tc.lr, tc.warmup_steps)
                loss, grad_norm = _gradient(job, lr)
                # torchrun: the deadline and signals are decided together with the loss, so that all
                # ranks skip the same updates and stop at the same step (after the next one).
                loss, flags = distributed.mean_and_flags(d, loss, stop.flags())
                if d.enabled:
                    pending, signum = stop_reason(flags)
                with intra_op_threads(job.update_threads):
                    updated = _update(job, loss, grad_norm, last_saved)
                if updated:
                    log.add(loss, grad_norm, time.monotonic() - started)
                step = state.step
                if step % tc.log_every == 0:
                    log.write(step, lr, elapsed_before + time.monotonic() - t_start)
                if tc.sample_every and step % tc.sample_every == 0:
                    samples = _preview(job)
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    last_saved = _save(
                        job, log.last_loss, elapsed_before + time.monotonic() - t_start
                    )
                if bar is not None:
                    update_bar(bar, step, loss, time.monotonic() - t_start, tc.steps is None)
            stopped_by = pending or "steps"
        log.write(
            state.step, lr, elapsed_before + time.monotonic() - t_start
        )  # last partial window
        if last_saved is None or state.step != int(last_saved.name.split("_")[-1]):
            last_saved = _save(job, log.last_loss, elapsed_before + time.monotonic() - t_start)
        if state.step > start_step and stopped_by != "interrupt":  # Ctrl-C: stop quickly
            _say(f"drawing {job.run_dir / 'samples'} step {state.step} (the full chain)", verbose)
            samples = _preview(job, final=True)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    elapsed, done = time.monotonic() - t_start, state.step - start_step
    result = TrainResult(job.run_dir, state.step, start_step, log.last_loss, elapsed,
                         done / elapsed if elapsed > 0 else 0.0, last_saved, samples, stopped_by,
                         state.skipped, describe_device(job.device))  # fmt: skip
    _report(result, verbose)
    if stopped_by == "interrupt":
        what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        raise Interrupted(f"{what} at step {state.step}; checkpoint saved in {last_saved}", signum)
    return result


def _gradient(job: _Job, lr: float) -> tuple[float, float]:
    """Draw the global batch and its t and eps (CPU generators), compute this rank's rows on the
    device, backpropagate; returns (loss, gradient norm before clipping). The caller takes the step."""
    state, objective, device = job.state, job.objective, job.device
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    idx = state.order.next(job.config.train.batch_size)
    x0 = job.data_x[idx]
    if job.config.train.hflip:  # the global batch's flips, like its t and eps: every rank the same
        x0 = random_hflip(x0, state.extra_generators["flip"])
    drawn = objective.draw(x0.shape, state.noise_generator)
    labels = None if job.data_y is None else job.data_y[idx]  # the images' own labels
    cond = objective.conditioning(labels, state.extra_generators.get("labels"))
    t_global = drawn.t
    if job.shard is not None:  # every rank draws the global batch's t, eps, drops; takes its rows
        x0, drawn = x0[job.shard], drawn.rows(job.shard)
        cond = {k: v[job.shard] for k, v in cond.items()}
    x0, drawn = x0.to(device, non_blocking=True), drawn.to(device)
    cond = {k: v.to(device) for k, v in cond.items()}
    state.optimizer.zero_grad(set_to_none=True)
    losses, loss = loss_and_backward(objective, job.net, x0, drawn, cond, precision=job.precision,
                            threads=job.threads, scaler=state.scaler)  # fmt: skip
    if objective.importance is not None:
        # Every rank records the whole batch's losses, so all keep one history and draw the same t.
        objective.observe(t_global, distributed.gather_rows(job.d, losses).cpu())
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    max_norm = job.config.train.grad_clip if job.config.train.grad_clip is not None else math.inf
    with intra_op_threads(job.update_threads):
        grad_norm = float(torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm))
    return float(loss), grad_norm


def loss_and_backward(
    objective: Objective,
    net,
    x0: torch.Tensor,
    drawn,
    cond: dict[str, torch.Tensor],
    *,
    precision: str,
    threads: BatchThreads,
    scaler=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective on a batch (under the precision's autocast) and its backward pass, the batch in
    the row shares of ``threads``; returns (per-example losses, the reduced loss), detached. Each
    share differentiates its part of ``objective.reduce`` (a mean over the whole batch), so the
    gradients the shares accumulate sum to the whole batch's."""
    n, device = x0.shape[0], x0.device

    def share(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, precision):
            part = {k: v[rows] for k, v in cond.items()}
            losses = objective(net, x0[rows], drawn.t[rows], drawn.eps[rows], **part)
        loss = objective.reduce(losses, drawn.rows(rows)) * ((rows.stop - rows.start) / n)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return losses.detach(), loss.detach()

    shares = threads.map(share, n)
    return torch.cat([s[0] for s in shares]), sum(s[1] for s in shares)


def _update(job: _Job, loss: float, grad_norm: float, last_saved: Path | None) -> bool:
    """Take the optimizer step and the EMA update, or skip a non-finite one; count the step. Returns
    whether the update was taken. ``train.max_nonfinite`` skips in a row raise DivergedError."""
    state, tc = job.state, job.config.train
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if state.scaler is not None and math.isfinite(loss):
        # fp16: an overflowing gradient is the scaler's business (it skips the step and lowers the
        # scale), not a diverging run.
        state.scaler.step(state.optimizer)
        state.scaler.update()
    elif finite:
        state.optimizer.step()
    if finite:
        crash_point("train.step")
        ema_update(state.ema, state.model, ema_decay_at(state.step, tc.ema_decay))
        state.streak = 0
    elif not (state.scaler is not None and math.isfinite(loss)):
        # Skipped: weights, optimizer state and EMA stay; the batch and noise are used up.
        state.skipped, state.streak = state.skipped + 1, state.streak + 1
        if job.d.is_main:
            warnings.warn(
                f"step {state.step + 1}: non-finite loss {loss} (gradient norm {grad_norm}); update "
                f"skipped ({state.streak} in a row, {state.skipped} in this run; the run stops at "
                f"{tc.max_nonfinite} in a row)",
                RuntimeWarning,
                stacklevel=3,
            )
    state.step += 1
    if state.streak >= tc.max_nonfinite:
        last = last_saved.name if last_saved is not None else "none yet"
        raise DivergedError(
            f"training stopped at step {state.step}: {state.streak} non-finite losses in a row "
            f"(train.max_nonfinite); the last checkpoint ({last}) is intact; try a lower --lr or "
            "check the data"
        )
    return finite


# --------------------------------------------------------------------------------------------------
# building a job, saving, previews
# --------------------------------------------------------------------------------------------------


def _resolve(config: RunConfig, run_dir: Path, d: distributed.Dist):
    """(the config with its data-dependent choices made, the data set), checked against the run
    directory's own config when resuming; nothing is written."""
    dataset = load_data(config)
    config = resolve_config(
        config,
        kind=dataset.kind,
        sample_shape=tuple(dataset.sample_shape),
        num_classes=dataset.num_classes if dataset.y is not None else None,
    )
    if (run_dir / CONFIG_FILE).is_file():
        check_same_run(load_run_config(run_dir), config, run_dir)
    if config.sample.class_label is not None and config.model.cond != "class":
        # else the run trains to the end and only then fails to draw its pictures, every time
        raise ConfigError(
            f"[sample] class_label = {config.sample.class_label} needs a class-conditional run "
            "(--cond class)"
        )
    dfc = config.diffusion
    if dfc.learn_sigma and dfc.objective == "simple":
        # L_simple has no term in the variance output: it would stay at its initialisation. Refused
        # here, not in DiffusionConfig, so that runs saved that way still load and sample.
        raise ConfigError(
            f"loss 'simple' leaves variance '{dfc.variance}' untrained: use loss 'hybrid' (or "
            "'vlb'), or a fixed variance"
        )
    if config.train.batch_size % d.world_size:
        raise ConfigError(
            f"batch_size {config.train.batch_size} (the global batch) is not divisible by the "
            f"{d.world_size} processes"
        )
    return config, dataset


def _setup(
    config: RunConfig,
    dataset,
    run_dir: Path,
    device: torch.device,
    d: distributed.Dist,
    verbose: bool,
    batch_threads: int | str = "auto",
) -> _Job:
    """Build (or restore) the state on the device and prepare the run directory."""
    cfg_path = run_dir / CONFIG_FILE
    sample_shape = tuple(int(s) for s in dataset.sample_shape)
    tc, dfc = config.train, config.diffusion
    precision = resolve_precision(tc.precision, device, images=dataset.kind == "image")
    resumed = latest_checkpoint(run_dir) if cfg_path.is_file() else None
    torch.manual_seed(tc.seed)  # network initialisation (on the CPU: the same on every device)
    if resumed is not None:  # the network the checkpoint holds (an imported one may be no preset)
        model = model_from_meta(resumed.meta).to(device)
    else:
        model = build_model(
            config.model, kind=dataset.kind, sample_shape=sample_shape, learn_sigma=dfc.learn_sigma
        ).to(device)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(tc.seed)  # dropout on the GPU
    objective = build_objective(config, dataset.kind)
    state = TrainState(
        model,
        copy.deepcopy(model).eval().requires_grad_(False),
        adamw(model, tc.lr, tc.weight_decay),
        DataOrder(len(dataset), tc.seed),
        torch.Generator().manual_seed(tc.seed + 1),  # t and eps of Algorithm 1
        objective,
        scaler=grad_scaler(device, precision),
        extra_generators={  # flips; the labels dropped to the null class
            "flip": torch.Generator().manual_seed(tc.seed + 2),
            "labels": torch.Generator().manual_seed(tc.seed + 3),
        },
    )
    trained_on = []
    if resumed is not None:
        state.load_state_dict(resumed)
        trained_on = list(resumed.meta.get("trained_on", []))
        _say(f"resuming {run_dir} from step {state.step} ({resumed.path.name})", verbose)
    here = f"{describe_device(device)}, {precision}"
    trained_on = trained_on if trained_on[-1:] == [here] else [*trained_on, here]
    # Every rank has read the run directory; from here on only rank 0 writes to it.
    distributed.barrier(d)
    net = distributed.wrap(model, d)  # after the restore: every rank starts from one state
    if tc.compile:
        net = torch.compile(net)
    workers = resolve_batch_threads(batch_threads, device, images=dataset.kind == "image")
    if d.enabled or tc.compile or (batch_threads == "auto" and has_dropout(model)):
        workers = 1
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, cfg_path)
        prepare_log(run_dir / LOG_FILE, state.step)
    _say(
        f"data: {config.data.name} ({len(dataset)} x {'x'.join(map(str, sample_shape))}); model: "
        f"{config.model.preset} ({count_parameters(model) / 1e6:.2f}M parameters); {dfc.schedule} "
        f"schedule, T={dfc.num_timesteps}; on {here}"
        + (f", the batch in {workers} shares (--batch-threads)" if workers > 1 else ""),
        verbose,
    )
    data_x = torch.as_tensor(dataset.x, dtype=torch.float32)
    data_y = dataset.y if config.model.cond == "class" else None
    shard = d.shard(tc.batch_size) if d.enabled else None
    return _Job(config, run_dir, data_x, data_y, data_meta(config, dataset), dataset.kind,
                sample_shape, state, objective.to(device), net, device, precision, d, shard,
                trained_on, resumed.path if resumed else None, BatchThreads(workers),
                update_threads(model, device))  # fmt: skip


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether the network has an active dropout layer (whose masks batch threads would reorder)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _save(job: _Job, loss: float, elapsed_s: float) -> Path:
    """Write the checkpoint of the current step (rank 0; other ranks only name it)."""
    state = job.state
    if not job.d.is_main:
        return checkpoint_dir(job.run_dir, state.step)
    state.elapsed_s = elapsed_s
    tensors, meta = state.state_dict()
    meta.update(
        step=state.step,
        loss=loss,
        model={
            "arch": arch_of(state.model),
            "config": state.model.config,
            "num_parameters": count_parameters(state.model),
        },
        data=job.data_meta,
        config=job.config.to_dict(),
        trained_on=job.trained_on,
    )
    return save_checkpoint(
        job.run_dir, state.step, tensors, meta, keep=job.config.train.keep_checkpoints
    )


def _preview(job: _Job, final: bool = False) -> Path | None:
    """A picture of EMA samples (rank 0): a short respaced chain with the same noise every time (a
    generator of its own, so training's RNG is untouched); the final one is what ``ddpm sample RUN``
    draws by default."""
    if not job.d.is_main:
        return None
    sc, tc = job.config.sample, job.config.train
    num = default_num(job.sample_shape) if sc.num is None or not final else sc.num
    steps = (sc.steps or job.config.diffusion.num_timesteps) if final else tc.sample_steps
    out = draw(job.state.ema, job.objective.schedule.to("cpu"), job.sample_shape, job.config,
               num=num, steps=steps, seed=sc.seed if final else tc.seed, device=job.device,
               threads=job.threads)  # fmt: skip
    reference = job.data_x[:PREVIEW_POINTS] if job.kind == "points" else None
    path = job.run_dir / "samples" / f"step_{job.state.step:07d}.png"
    return save_samples(out.x0, path, reference, title=f"step {job.state.step}")


def _report(result: TrainResult, verbose: bool) -> None:
    done = result.step - result.start_step
    if done == 0 and result.stopped_by == "steps":
        _say(
            f"{result.run_dir} is already at step {result.step}; give a larger --steps (total) or "
            "--minutes to go on",
            verbose,
        )
        return
    _say(
        f"step {result.step} ({done} steps in {result.elapsed_s:.0f} s, {result.steps_per_s:.2f} "
        f"steps/s on {result.device}), loss {result.loss:.4f}; checkpoint {result.checkpoint}; "
        f"samples {result.samples}",
        verbose,
    )
