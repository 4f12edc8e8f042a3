"""Training (Ho et al. 2020, Algorithm 1), resumable, on one process or many (torchrun).

Algorithm 1, one step per minibatch::

    x_0 ~ q(x_0);  t ~ Uniform({1..T});  eps ~ N(0, I)
    take a gradient step on  ||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t)||^2

with AdamW, a linear learning-rate warm-up, gradient-norm clipping and an exponential moving average
(EMA) of the weights, which is what samples are drawn from; the loss and the draw of t follow the
config's objective (``ddpm.losses.training_loss``, ``ImportanceSampler``). Everything goes into a run
directory (layout in ``ddpm.runs``). Giving ``train`` the same run directory again resumes from the
newest good checkpoint, bit-exactly: the optimizer, the EMA, the data order and every random generator
are restored.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ddpm import distributed
from ddpm.checkpoint import (
    Checkpoint,
    atomic_write_bytes,
    checkpoint_dir,
    crash_point,
    latest_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    save_checkpoint,
)
from ddpm.config import (
    DataConfig,
    RunConfig,
    merge_config,
    resolve_config,
)
from ddpm.data import load_dataset
from ddpm.diffusion import q_sample
from ddpm.errors import ConfigError, DDPMError, DivergedError, RunDirError
from ddpm.losses import ImportanceSampler, training_loss
from ddpm.nets import count_parameters
from ddpm.runs import (
    CONFIG_FILE,
    LOG_FILE,
    PREVIEW_POINTS,
    arch_of,
    build_model,
    build_schedule,
    default_num,
    draw,
    load_run_config,
    load_weights,
    save_run_config,
    save_samples,
)
from ddpm.schedules import NoiseSchedule

Tensor = torch.Tensor

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s")


# --------------------------------------------------------------------------------------------------
# the pieces of a training step
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of update number ``step`` (0-based): base_lr (step + 1) / warmup_steps during the
    warm-up, then base_lr."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay after update number ``step`` (0-based): min(max_decay, (1 + step) / (10 + step)).

    The warm-up keeps the average from being dominated by the random initial weights early on."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) model, for every parameter; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    if ema_params:
        # lerp(a, b, w) = a + w (b - a) = (1 - w) a + w b, with w = 1 - decay
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


class DataOrder:
    """Minibatch indices: a fresh random permutation per epoch (each example once per epoch), from a
    generator of its own. Its state (generator, permutation, position) goes into checkpoints so that a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, num_examples: int, seed: int) -> None:
        if num_examples < 1:
            raise DDPMError("the data set is empty")
        self.num_examples = num_examples
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(num_examples, generator=self.generator)
        self.pos = 0

    def next(self, batch_size: int) -> Tensor:
        parts, need = [], batch_size
        while need > 0:
            if self.pos >= self.num_examples:
                self.perm = torch.randperm(self.num_examples, generator=self.generator)
                self.pos = 0
            take = self.perm[self.pos : self.pos + need]
            self.pos += take.numel()
            need -= take.numel()
            parts.append(take)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"data.perm": self.perm, "data.generator": self.generator.get_state()}, {
            "pos": self.pos
        }

    def restore(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        if tensors["data.perm"].numel() != self.num_examples:
            raise ConfigError(
                f"the data set now has {self.num_examples} examples, the run was trained on "
                f"{tensors['data.perm'].numel()}"
            )
        self.perm = tensors["data.perm"].clone()
        self.generator.set_state(tensors["data.generator"].clone())
        self.pos = int(info["pos"])


def _native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively. Without it oneDNN is bypassed and bf16 convolutions
    fall back to a reference kernel, 10-20x slower than float32 (measured on an AVX2-only EPYC)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: True)() for name in checks)


def _say(msg: str, verbose: bool) -> None:
    if verbose:
        tqdm.write(msg, file=sys.stderr)


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM after writing a checkpoint; ``signum`` says
    which. The CLI exits with 128 + signum: 130 for SIGINT, 143 for SIGTERM (the shell convention)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class _StopOnInterrupt:
    """First SIGINT (Ctrl-C) or SIGTERM: finish the current step, checkpoint, stop. A second one: stop at
    once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


# --------------------------------------------------------------------------------------------------
# run directories
# --------------------------------------------------------------------------------------------------


def _check_same_run(saved: RunConfig, new: RunConfig, run_dir: Path) -> None:
    for section in ("data", "model", "diffusion"):
        a, b = getattr(saved, section), getattr(new, section)
        for f in dataclasses.fields(a):
            old_value, new_value = getattr(a, f.name), getattr(b, f.name)
            if old_value != new_value:
                raise ConfigError(
                    f"{run_dir} was trained with {section}.{f.name}={old_value!r}, not {new_value!r}; "
                    "use a new --run-dir"
                )


def _prepare_log(path: Path, step: int) -> None:
    """Create log.csv with a header, or drop rows past ``step`` (written after the last checkpoint)."""
    if not path.exists():
        atomic_write_bytes(path, (",".join(LOG_COLUMNS) + "\n").encode())
        return
    original = path.read_text()
    # A row cut short by a crash or a full disk (no newline, or too few fields) is dropped, and so
    # are the rows written after the checkpoint training resumes from.
    rows = list(csv.reader(original[: original.rfind("\n") + 1].splitlines()))
    kept = [rows[0]] if rows else [list(LOG_COLUMNS)]
    kept += [r for r in rows[1:] if len(r) == len(kept[0]) and _row_step(r) <= step]
    text = "".join(",".join(r) + "\n" for r in kept)
    if text != original:
        atomic_write_bytes(path, text.encode())


def _row_step(row: list[str]) -> float:
    try:
        return float(row[0])
    except ValueError:
        return math.inf


class _TensorBoard:
    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            warnings.warn(f"TensorBoard logging skipped ({err})", RuntimeWarning, stacklevel=3)
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


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


def train(
    config: RunConfig, run_dir: str | Path, *, progress: bool = True, verbose: bool = True
) -> TrainResult:
    """Train (or resume training) the run in ``run_dir`` until the budget of ``config.train`` is spent.

    ``train.steps`` is the total number of updates of the run (earlier invocations included);
    ``train.minutes`` is wall-clock minutes for this call; whichever comes first stops training. At the
    end a checkpoint is written and samples are drawn as ``[sample]`` says (by default 64 images with
    the full chain of T steps, seed 0: the same picture ``sample_run`` draws). On the first Ctrl-C the current step finishes,
    a checkpoint is written, and KeyboardInterrupt is raised (``Interrupted``; SIGTERM likewise).

    A non-finite loss (or gradient norm) skips its update: weights, optimizer state and EMA are left
    as they were, the step counts, and a warning says so; ``train.max_nonfinite`` in a row stop the run
    with ``DivergedError``, without writing a checkpoint.

    Under ``torchrun`` (WORLD_SIZE > 1 in the environment) this is one rank of data-parallel training
    (see ``ddpm.distributed``): ``train.batch_size`` is the global batch, each rank computes its share,
    and only rank 0 writes files or prints."""
    d = distributed.setup()
    try:
        return _train(config, run_dir, progress=progress, verbose=verbose, d=d)
    finally:
        distributed.teardown(d)


def _train(
    config: RunConfig, run_dir: str | Path, *, progress: bool, verbose: bool, d: distributed.Dist
) -> TrainResult:
    progress, verbose = progress and d.is_main, verbose and d.is_main
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not cfg_path.is_file():
        raise RunDirError(
            f"{run_dir} exists, is not empty and is not a ddpm run directory (no {CONFIG_FILE})"
        )

    dc = config.data
    dataset = load_dataset(
        dc.name,
        split=dc.split,
        root=dc.root,
        image_size=dc.image_size,
        num_points=dc.num_points,
        seed=config.train.seed,
    )
    sample_shape = tuple(int(s) for s in dataset.sample_shape)
    config = resolve_config(config, kind=dataset.kind, sample_shape=sample_shape)
    if cfg_path.is_file():
        _check_same_run(load_run_config(run_dir), config, run_dir)
    tc, dfc = config.train, config.diffusion
    if tc.batch_size % d.world_size:
        raise ConfigError(
            f"batch_size {tc.batch_size} (the global batch) is not divisible by the "
            f"{d.world_size} processes"
        )

    if tc.bf16 and not _native_bf16():
        warnings.warn(
            "this CPU has no native bfloat16 (AVX512-BF16/AMX); bf16 autocast will be much slower than "
            "float32 here",
            RuntimeWarning,
            stacklevel=2,
        )
    torch.manual_seed(tc.seed)  # network initialisation and dropout use the global generator
    model = build_model(
        config.model, kind=dataset.kind, sample_shape=sample_shape, learn_sigma=dfc.learn_sigma
    )
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = build_schedule(dfc)
    order = DataOrder(len(dataset), tc.seed)
    noise_gen = torch.Generator().manual_seed(tc.seed + 1)  # t and eps of Algorithm 1
    timesteps = (
        ImportanceSampler(schedule.num_timesteps) if tc.timestep_sampler == "importance" else None
    )
    data_x = torch.as_tensor(dataset.x, dtype=torch.float32)
    decoder = "gaussian" if dataset.kind == "points" else "discretized"
    num_params = count_parameters(model)

    step, elapsed_before, last_saved = 0, 0.0, None
    skipped, streak = 0, 0  # non-finite losses: in the whole run, in a row
    resumed = latest_checkpoint(run_dir) if cfg_path.is_file() else None
    if resumed is not None:
        step, elapsed_before = _restore(resumed, model, ema, optimizer, order, noise_gen, timesteps)
        skipped = int(resumed.meta.get("nonfinite", {}).get("skipped", 0))
        streak = int(resumed.meta.get("nonfinite", {}).get("streak", 0))
        last_saved = resumed.path
        _say(f"resuming {run_dir} from step {step} ({resumed.path.name})", verbose)
    # Every rank has read the run directory; from here on only rank 0 writes to it.
    distributed.barrier(d)
    ddp_model = distributed.wrap(model, d)  # after the restore: every rank starts from one state
    shard = d.shard(tc.batch_size) if d.enabled else None
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, cfg_path)
        _prepare_log(run_dir / LOG_FILE, step)
    _say(
        f"data: {dc.name} ({len(dataset)} x {'x'.join(map(str, sample_shape))}); model: {config.model.preset} "
        f"({num_params / 1e6:.2f}M parameters); {dfc.schedule} schedule, T={dfc.num_timesteps}",
        verbose,
    )

    def save(at_step: int, loss: float) -> Path:
        tensors, meta = _training_state(model, ema, optimizer, order, noise_gen, timesteps)
        meta.update(
            step=at_step,
            elapsed_s=elapsed_before + (time.monotonic() - t_start),
            loss=loss,
            model={"arch": arch_of(model), "config": model.config, "num_parameters": num_params},
            data={"name": dc.name, "kind": dataset.kind, "sample_shape": list(sample_shape)},
            config=config.to_dict(),
            nonfinite={"skipped": skipped, "streak": streak},
        )
        if not d.is_main:
            return checkpoint_dir(run_dir, at_step)
        return save_checkpoint(run_dir, at_step, tensors, meta, keep=tc.keep_checkpoints)

    def preview(at_step: int, final: bool = False) -> Path | None:
        if not d.is_main:
            return None
        # Previews: a short respaced chain, the same noise every time (a generator of their own, so
        # training's RNG is untouched). The final picture is what `ddpm sample RUN` draws by default.
        sc = config.sample
        num = default_num(sample_shape) if sc.num is None or not final else sc.num
        steps = (sc.steps or schedule.num_timesteps) if final else tc.sample_steps
        out = draw(
            ema,
            schedule,
            sample_shape,
            config,
            num=num,
            steps=steps,
            seed=sc.seed if final else tc.seed,
        )
        reference = data_x[:PREVIEW_POINTS] if dataset.kind == "points" else None
        path = run_dir / "samples" / f"step_{at_step:07d}.png"
        return save_samples(out.x0, path, reference, title=f"step {at_step}")

    start_step = step
    t_start = time.monotonic()
    deadline = t_start + 60 * tc.minutes if tc.minutes is not None else None
    target = tc.steps
    bar = _progress_bar(progress, start_step, target, tc.minutes)
    log = _Log(run_dir if d.is_main else None, tc.batch_size, tc.tensorboard)
    samples_path, stopped_by, lr = None, "steps", tc.lr
    signum, pending_stop = signal.SIGINT, None
    model.train()
    try:
        with _StopOnInterrupt() as stop:

            def stop_flags() -> tuple[bool, bool, bool]:  # (deadline passed, SIGINT, SIGTERM)
                late = deadline is not None and time.monotonic() >= deadline
                sigint = stop.requested and stop.signum == signal.SIGINT
                return late, sigint, stop.requested and not sigint

            while True:
                now = time.monotonic()
                if target is not None and step >= target:
                    stopped_by = "steps"
                    break
                if not d.enabled:  # one process: a signal during step k stops after step k
                    pending_stop, signum = _stop_reason(stop_flags(), signum)
                if pending_stop is not None:
                    stopped_by = pending_stop
                    break
                lr = lr_at(step, tc.lr, tc.warmup_steps)
                x0 = data_x[order.next(tc.batch_size)]  # the global batch; _train_step shards it
                loss, grad_norm = _train_step(
                    ddp_model,
                    optimizer,
                    schedule,
                    x0,
                    noise_gen,
                    lr,
                    config,
                    decoder,
                    timesteps,
                    shard=shard,
                )
                # torchrun: the deadline and signals are decided together with the loss, so that all
                # ranks skip the same updates and stop at the same step (after the next one).
                loss, flags = distributed.mean_and_flags(d, loss, stop_flags())
                if d.enabled:
                    pending_stop, signum = _stop_reason(flags, signum)
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    optimizer.step()
                    crash_point("train.step")
                    ema_update(ema, model, ema_decay_at(step, tc.ema_decay))
                    streak = 0
                    log.add(loss, grad_norm, time.monotonic() - now)
                else:
                    # Skipped: weights, optimizer state and EMA stay; the batch and noise are used up.
                    skipped, streak = skipped + 1, streak + 1
                    if d.is_main:
                        warnings.warn(
                            f"step {step + 1}: non-finite loss {loss} (gradient norm {grad_norm}); "
                            f"update skipped ({streak} in a row, {skipped} in this run; the run "
                            f"stops at {tc.max_nonfinite} in a row)",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                step += 1
                if streak >= tc.max_nonfinite:
                    last = last_saved.name if last_saved is not None else "none yet"
                    raise DivergedError(
                        f"training stopped at step {step}: {streak} non-finite losses in a row "
                        f"(train.max_nonfinite); the last checkpoint ({last}) is intact; "
                        "try a lower --lr or check the data"
                    )

                if step % tc.log_every == 0:
                    log.write(step, lr, elapsed_before + time.monotonic() - t_start)
                if tc.sample_every and step % tc.sample_every == 0:
                    samples_path = preview(step)
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    last_saved = save(step, log.last_loss)
                if bar is not None:
                    by_time = target is None
                    _update_bar(bar, step, loss, time.monotonic() - t_start, by_time)
        log.write(step, lr, elapsed_before + time.monotonic() - t_start)  # the last partial window
        if last_saved is None or step != _step_of(last_saved):
            last_saved = save(step, log.last_loss)
        if step > start_step and stopped_by != "interrupt":  # Ctrl-C: stop quickly
            _say(
                f"drawing {run_dir / 'samples' / f'step_{step:07d}.png'} (the full sampling chain)",
                verbose,
            )
            samples_path = preview(step, final=True)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    last_loss = log.last_loss
    elapsed = time.monotonic() - t_start
    done = step - start_step
    result = TrainResult(
        run_dir,
        step,
        start_step,
        last_loss,
        elapsed,
        done / elapsed if elapsed > 0 else 0.0,
        last_saved,
        samples_path,
        stopped_by,
        skipped,
    )
    if done == 0 and stopped_by == "steps":
        _say(
            f"{run_dir} is already at step {step}; give a larger --steps (total) or --minutes to go on",
            verbose,
        )
    else:
        _say(
            f"step {step} ({done} steps in {elapsed:.0f} s, {result.steps_per_s:.2f} steps/s), loss {last_loss:.4f}; "
            f"checkpoint {last_saved}; samples {samples_path}",
            verbose,
        )
    if stopped_by == "interrupt":
        what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        raise Interrupted(f"{what} at step {step}; checkpoint saved in {last_saved}", signum)
    return result


def _stop_reason(flags: tuple[bool, bool, bool], signum: int) -> tuple[str | None, int]:
    """(why training stops, or None; the signal) from (deadline passed, SIGINT, SIGTERM)."""
    late, sigint, sigterm = flags
    if sigint or sigterm:
        return "interrupt", signal.SIGINT if sigint else signal.SIGTERM
    return ("minutes" if late else None), signum


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def draw_noise(shape, generator: torch.Generator, offset_noise: float = 0.0) -> Tensor:
    """eps ~ N(0, I) of the given shape [B, C, ...]; with offset noise (Guttenberg 2023) plus
    offset_noise * N(0, 1) shared by all pixels of each image and channel, so that the model learns to
    change an image's mean brightness, which i.i.d. eps (averaging out over pixels) barely moves."""
    eps = torch.randn(shape, generator=generator)
    if offset_noise > 0:
        shift = torch.randn(tuple(shape[:2]) + (1,) * (len(shape) - 2), generator=generator)
        eps = eps + offset_noise * shift
    return eps


def _train_step(
    model,
    optimizer,
    schedule: NoiseSchedule,
    x0: Tensor,
    noise_gen,
    lr: float,
    config: RunConfig,
    decoder: str,
    timesteps: ImportanceSampler | None = None,
    shard: slice | None = None,
) -> tuple[float, float]:
    """The gradient of Algorithm 1's loss on the minibatch x0; returns (loss, gradient norm before
    clipping). The caller takes the optimizer step (or skips it for a non-finite loss). With ``shard``
    (torchrun), t and eps are drawn for the whole global batch x0 and only those rows are computed."""
    tc, dfc = config.train, config.diffusion
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = x0.shape[0]
    if timesteps is None:
        t, weight = torch.randint(0, schedule.num_timesteps, (batch,), generator=noise_gen), None
    else:
        t, weight = timesteps.sample(batch, noise_gen)
    eps = draw_noise(x0.shape, noise_gen, tc.offset_noise)
    t_global = t
    if shard is not None:  # every rank draws the global batch's t and eps, then takes its rows
        x0, t, eps = x0[shard], t[shard], eps[shard]
        weight = weight[shard] if weight is not None else None
    x_t = q_sample(schedule, x0, t, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
        out = model(x_t, schedule.timesteps[t])
    losses = training_loss(
        schedule,
        out,
        x0,
        x_t,
        t,
        eps,
        prediction=dfc.prediction,
        variance=dfc.variance,
        objective=dfc.objective,
        vlb_weight=tc.vlb_weight,
        min_snr_gamma=tc.min_snr_gamma,
        decoder=decoder,
    )
    if timesteps is not None:
        seen = losses.detach()
        if shard is not None:
            # Every rank records the whole batch's losses (shards are consecutive rows in rank
            # order), so all ranks keep one history and keep drawing the same t.
            parts = [torch.empty_like(seen) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, seen.contiguous())
            seen = torch.cat(parts)
        if bool(torch.isfinite(seen).all()):  # a NaN in the history would poison p(t)
            timesteps.update(t_global, seen)
        losses = losses * weight
    loss = losses.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    return float(loss.detach()), grad_norm


class _Log:
    """RUN/log.csv and TensorBoard: one row per log window, with the window's mean loss and grad norm."""

    def __init__(self, run_dir: Path | None, batch_size: int, tensorboard: bool) -> None:
        """``run_dir`` None (ranks other than 0): keep the numbers, write nothing."""
        self.batch_size = batch_size
        self.file = open(run_dir / LOG_FILE, "a", newline="") if run_dir else None  # see close()
        self.csv = csv.writer(self.file) if self.file else None
        self.tb = _TensorBoard(Path(run_dir or ".") / "tb", tensorboard and run_dir is not None)
        self.last_loss = math.nan
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.grad_norm_sum, self.n, self.train_s = 0.0, 0.0, 0, 0.0

    def add(self, loss: float, grad_norm: float, seconds: float) -> None:
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.n += 1
        self.train_s += seconds

    def write(self, step: int, lr: float, elapsed_s: float) -> None:
        if self.n == 0:
            return
        loss, grad_norm = self.loss_sum / self.n, self.grad_norm_sum / self.n
        images_per_s = self.n * self.batch_size / self.train_s if self.train_s > 0 else 0.0
        row = [
            step,
            f"{loss:.6g}",
            f"{lr:.6g}",
            f"{grad_norm:.6g}",
            f"{images_per_s:.1f}",
            f"{elapsed_s:.1f}",
        ]
        if self.csv is not None:
            self.csv.writerow(row)
            self.file.flush()
        self.tb.scalars(
            step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "images_per_s": images_per_s}
        )
        self.last_loss = loss
        self._reset()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.tb.close()


def _progress_bar(enabled: bool, start_step: int, target: int | None, minutes: float | None):
    if not enabled:
        return None
    if target is not None:
        return tqdm(
            total=target, initial=start_step, desc="training", unit="step", dynamic_ncols=True
        )
    # A minutes budget: the bar measures seconds, so its ETA is the deadline.
    return tqdm(
        total=round(60 * minutes),
        desc="training",
        unit="s",
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total}s [{elapsed}<{remaining}{postfix}]",
    )


def _update_bar(bar, step: int, loss: float, elapsed: float, by_time: bool) -> None:
    if by_time:
        bar.n = min(bar.total, elapsed)
        rate = (step - bar.initial) / elapsed if elapsed > 0 else 0.0
        bar.set_postfix(step=step, loss=f"{loss:.4f}", it_s=f"{rate:.2f}", refresh=False)
        # An explicit refresh ignores tqdm's mininterval: at most twice a second (a log file holding
        # the output would otherwise get a line per step).
        if elapsed - getattr(bar, "last_drawn", -1.0) >= 0.5:
            bar.refresh()
            bar.last_drawn = elapsed
    else:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


def _training_state(
    model, ema, optimizer, order: DataOrder, noise_gen, timesteps=None
) -> tuple[dict, dict]:
    optim_tensors, optim_structure = optimizer_state_to_flat(optimizer.state_dict())
    order_tensors, order_info = order.state()
    train_state = {f"optim.{k}": v for k, v in optim_tensors.items()}
    train_state.update(order_tensors)
    train_state["rng.torch"] = torch.get_rng_state()
    train_state["rng.noise"] = noise_gen.get_state()
    if timesteps is not None:
        train_state.update({f"importance.{k}": v for k, v in timesteps.state_dict().items()})
    tensors = {"model": model.state_dict(), "ema": ema.state_dict(), "train_state": train_state}
    meta = {"optimizer": optim_structure, "data_order": order_info}
    return tensors, meta


def _restore(
    ckpt: Checkpoint, model, ema, optimizer, order: DataOrder, noise_gen, timesteps=None
) -> tuple[int, float]:
    load_weights(model, ckpt.tensors["model"], "model")
    load_weights(ema, ckpt.tensors["ema"], "EMA")
    state = ckpt.tensors["train_state"]
    optim = {k.removeprefix("optim."): v for k, v in state.items() if k.startswith("optim.")}
    try:
        optimizer.load_state_dict(optimizer_state_from_flat(optim, ckpt.meta["optimizer"]))
        order.restore(state, ckpt.meta["data_order"])
        torch.set_rng_state(state["rng.torch"])
        noise_gen.set_state(state["rng.noise"])
        if timesteps is not None:
            prefix = "importance."
            timesteps.load_state_dict(
                {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            )
    except (KeyError, ValueError, RuntimeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise RunDirError(f"{ckpt.path}: cannot restore the training state ({err})") from None
    return ckpt.step, float(ckpt.meta.get("elapsed_s", 0.0))


def prepare_run(
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    config_file: str | Path | None = None,
    run_dir: str | Path | None = None,
) -> tuple[RunConfig, Path]:
    """The config and run directory of a ``ddpm train`` invocation.

    Later sources win: defaults < the run's saved config.json (when resuming) < the TOML file <
    ``overrides`` ({section: {key: value}}). The budget (steps, minutes) is never inherited from the
    saved run: it belongs to each invocation. The run directory defaults to ``runs/<data name>``."""
    from ddpm.config import load_toml

    overrides = overrides or {}
    toml = load_toml(config_file) if config_file is not None else {}
    if run_dir is None:
        name = overrides.get("data", {}).get("name")
        if name is None and isinstance(toml.get("data"), dict):
            name = toml["data"].get("name")
        run_dir = Path("runs") / str(name or DataConfig().name)
    run_dir = Path(run_dir)
    base = RunConfig()
    if (run_dir / CONFIG_FILE).is_file():
        saved = load_run_config(run_dir)
        base = dataclasses.replace(
            saved, train=dataclasses.replace(saved.train, steps=None, minutes=None)
        )
    config = merge_config(base, toml, str(config_file)) if toml else base
    return merge_config(config, overrides, "the command line"), run_dir
