"""Training and sampling speed of ddpm's `small` U-Net against diffusers' UNet2DModel at equal size.

    python benchmarks/train_speed.py [--quick] [--reps N] [--out PATH] [--bf16 auto|on|off]
    python benchmarks/train_speed.py --device cuda --net cifar10 --batch 128 --out PATH   # a GPU

On a GPU (``--device cuda``) with ``--net cifar10``: Ho et al.'s 35.7M CIFAR-10 U-Net in both libraries
(diffusers' UNet2DModel from ``ddpm export``'s config), "fp32" rows with TF32 on, CUDA-synchronised
timing; the batch threads are a CPU matter and do not apply there.

For 1x32x32 and 3x32x32 images at batch 64: training images/s and milliseconds per network
evaluation (forward without grad, as in sampling), each network in fp32 and in bf16 autocast. The
steps timed are the real ones:
- ours = the step of ``ddpm train``: ddpm's Objective (L_simple at random t), backward, gradient
  clipping at 1, AdamW (fused where PyTorch has it) and ``ema_update`` (its default EMA 0.999) on
  ``update_threads`` intra-op threads, less the data loading;
- theirs = the step of diffusers' unconditional training example (train_unconditional.py):
  ``DDPMScheduler.add_noise``, eps-MSE, backward, clipping at 1, AdamW (lr 1e-4, betas (0.95, 0.999),
  weight decay 1e-6), ``EMAModel.step``.
Per image shape, all four (network, precision) pairs run interleaved in one loop after a warm-up, so
that changes in machine load hit all; times are medians and each speedup is the median of the
per-repetition ratios. The headline compares each network in its fastest precision (best against
best). FLOPs of one training step are counted with FlopCounterMode and given as a share of this
machine's torch.mm fp32 and bf16 peaks, measured in the same run. Prints a table (and the CPU's name
and ISA) and writes JSON (default benchmarks/results/train_speed.json).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Before torch loads OpenMP: with the default (spinning) wait, a busy machine stalls every parallel
# region while a descheduled thread is awaited (measured: 5.7 s vs 1.5 s for one forward under load).
# Both networks run under the same setting; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# oneDNN keeps 1024 compiled kernels (primitives) by default; this one process holds twelve
# (network, precision, threading) configurations, each with its convolution shapes forward and
# backward, more than a training or sampling process ever does. Past the capacity oneDNN compiles
# kernels again every step (measured: ours bf16 175 -> 209-237 images/s, theirs 48-69 -> 57-79).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ddpm.devices import (  # noqa: E402
    BatchThreads,
    at_precision,
    cpu_name,
    describe_device,
    intra_op_threads,
    resolve_batch_threads,
    resolve_device,
    split_batch,
    update_threads,
)
from ddpm.interop import diffusers_config_from_unet  # noqa: E402
from ddpm.nets import build_unet, count_parameters  # noqa: E402
from ddpm.objective import Objective  # noqa: E402
from ddpm.runs import sampling_network  # noqa: E402
from ddpm.schedules import NoiseSchedule  # noqa: E402
from ddpm.train import has_dropout, loss_and_backward  # noqa: E402
from ddpm.train_state import adamw, ema_update  # noqa: E402

BATCH = 64
IMAGE_SIZE = 32
NUM_TIMESTEPS = 1000
PEAK_SIZE = 2048


@dataclass(frozen=True)
class Setup:
    """What one run compares: ours (``net``, a UNet preset) on ``device`` at ``batch`` images."""

    device: torch.device = torch.device("cpu")
    batch: int = BATCH
    net: str = "small"

    def sync(self) -> None:
        """Wait for the device (CUDA runs asynchronously: time only finished work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def diffusers_unet(in_channels: int) -> torch.nn.Module:
    """The peer: UNet2DModel, widths (32, 64, 128), one res block per level, attention at 8x8."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


class Unwrap(torch.nn.Module):
    """Calls a diffusers model as net(x_t, t) -> eps_pred, like ours."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t).sample


def bf16_supported() -> bool:
    """Whether oneDNN has native bf16 on this CPU (AVX512-BF16 or AMX); without it bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def matmul_peak(dtype: torch.dtype, size: int, reps: int, setup: Setup = Setup()) -> float:
    """Median GFLOP/s of torch.mm on two size x size matrices."""
    a = torch.randn(size, size).to(setup.device, dtype)
    b = torch.randn(size, size).to(setup.device, dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        setup.sync()
        start = time.perf_counter()
        torch.mm(a, b)
        setup.sync()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


class Bench:
    """One network's training step and no-grad evaluation on fixed data, in one precision."""

    def __init__(self, net: torch.nn.Module, in_channels: int, bf16: bool, seed: int, setup: Setup):
        self.net, self.bf16, self.setup = net.to(setup.device), bf16, setup
        g = torch.Generator().manual_seed(seed)  # on the CPU, as ddpm draws; moved to the device
        x0 = torch.rand(setup.batch, in_channels, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
        self.x0 = x0.to(setup.device)
        self.generator = g

    def _autocast(self):
        return torch.autocast(self.setup.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def update(self) -> None:
        raise NotImplementedError

    def train_step(self) -> None:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optimizer.step()
        self.update()

    def evaluate(self) -> None:
        t = torch.full((self.setup.batch,), NUM_TIMESTEPS // 2, device=self.setup.device)
        with torch.no_grad(), self._autocast():
            self.net(self.x0, t)

    def train_flops(self) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.train_step()
        return counter.get_total_flops()


class Ours(Bench):
    """``ddpm train``'s step: Objective, clipping at 1, AdamW (weight decay 0), EMA 0.999, the batch in
    the shares of ``--batch-threads`` (``train``'s ``loss_and_backward``); evaluation as ``ddpm
    sample`` calls the network (``sampling_network``, ``at_precision``, ``split_batch``)."""

    def __init__(
        self,
        net: torch.nn.Module,
        in_channels: int,
        bf16: bool,
        seed: int,
        setup: Setup,
        batch_threads="auto",
    ):
        super().__init__(net, in_channels, bf16, seed, setup)
        self.optimizer = adamw(net, 1e-4, 0.0)  # fused where available, as ddpm train makes it
        self.update_threads = update_threads(net, setup.device)
        schedule = NoiseSchedule.from_name("linear", NUM_TIMESTEPS)
        self.objective = Objective(schedule).to(setup.device)
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.precision = "bf16" if bf16 else "fp32"
        if has_dropout(net):  # as ddpm train decides
            batch_threads = 1
        workers = resolve_batch_threads(batch_threads, setup.device)
        self.threads = BatchThreads(workers)
        # As ddpm sample calls it: on a CPU in bf16 a channels_last copy (the weights of the moment:
        # only the timing of the evaluation rows uses it).
        sampler_net = sampling_network(net, setup.device, self.precision)
        self.network = split_batch(
            at_precision(sampler_net, setup.device, self.precision), self.threads
        )

    def train_step(self) -> None:
        drawn = self.objective.draw(self.x0.shape, self.generator).to(self.setup.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss_and_backward(self.objective, self.net, self.x0, drawn, {}, precision=self.precision,
                          threads=self.threads)  # fmt: skip
        with intra_op_threads(self.update_threads):  # as ddpm train updates the parameters
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.optimizer.step()
            self.update()

    def evaluate(self) -> None:
        t = torch.full((self.setup.batch,), NUM_TIMESTEPS // 2, device=self.setup.device)
        with torch.no_grad():
            self.network(self.x0, t)

    def update(self) -> None:
        ema_update(self.ema, self.net, 0.999)

    def train_flops(self) -> int:
        # FlopCounterMode sees the calling thread only: count the step on the whole batch.
        threads, self.threads = self.threads, BatchThreads(1)
        try:
            return super().train_flops()
        finally:
            self.threads = threads


class Theirs(Bench):
    """diffusers' example step: add_noise, eps-MSE, clipping at 1, AdamW, EMAModel."""

    def __init__(self, net: torch.nn.Module, in_channels: int, bf16: bool, seed: int, setup: Setup):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        super().__init__(net, in_channels, bf16, seed, setup)
        self.optimizer = torch.optim.AdamW(
            net.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
        self.ema = EMAModel(
            net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4
        )

    def loss(self) -> torch.Tensor:
        noise = torch.randn(self.x0.shape, generator=self.generator).to(self.setup.device)
        t = torch.randint(0, NUM_TIMESTEPS, (self.setup.batch,), generator=self.generator)
        t = t.to(self.setup.device)
        noisy = self.scheduler.add_noise(self.x0, noise, t)
        with self._autocast():
            eps_pred = self.net(noisy, t)
        return torch.nn.functional.mse_loss(eps_pred.float(), noise)

    def update(self) -> None:
        self.ema.step(self.net.parameters())


def interleaved(
    fns: dict[str, callable], warmup: int, reps: int, setup: Setup = Setup()
) -> dict[str, list[float]]:
    """Seconds per call of each fn, alternating between them so drifts in machine load hit both."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            setup.sync()
            start = time.perf_counter()
            fn()
            setup.sync()
            times[name].append(time.perf_counter() - start)
    return times


def speedup(times: dict[str, list[float]], ours: str, theirs: str) -> float:
    """Median over repetitions of theirs/ours (same repetition, adjacent in time)."""
    return statistics.median(t / o for o, t in zip(times[ours], times[theirs], strict=True))


def fastest(times: dict[str, list[float]], net: str) -> str:
    """The key of ``net``'s fastest precision (lowest median time), as the library runs by default
    (not the extra "ours bf16 whole-batch" row)."""
    keys = [k for k in times if k.startswith(net + " ") and len(k.split()) == 2]
    return min(keys, key=lambda k: statistics.median(times[k]))


def peer_unet(setup: Setup, in_channels: int) -> torch.nn.Module:
    """diffusers' network: for ``small`` UNet2DModel at equal size (``diffusers_unet``), for a
    preset it can express (``cifar10``: Ho et al.'s) the same network (``ddpm export``'s config)."""
    if setup.net == "small":
        return Unwrap(diffusers_unet(in_channels))
    from diffusers import UNet2DModel

    config = diffusers_config_from_unet(
        build_unet(setup.net, in_channels=in_channels, image_size=IMAGE_SIZE)
    )
    return Unwrap(UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}))


def run_shape(
    in_channels: int,
    precisions: list[str],
    warmup: int,
    reps: int,
    peaks: dict,
    setup: Setup = Setup(),
) -> dict:
    """Every (network, precision) pair of one image shape, interleaved in one loop."""
    benches, params, flops = {}, {}, {}
    for net_name, make, kind in (
        (
            "ours",
            lambda: build_unet(setup.net, in_channels=in_channels, image_size=IMAGE_SIZE),
            Ours,
        ),
        ("theirs", lambda: peer_unet(setup, in_channels), Theirs),
    ):
        for precision in precisions:
            torch.manual_seed(0)
            net = make()
            params[net_name] = count_parameters(net)
            key = f"{net_name} {precision}"
            benches[key] = kind(net, in_channels, precision == "bf16", seed=1, setup=setup)
            if precision == "fp32":  # the same FLOPs in either precision
                flops[net_name] = benches[key].train_flops()
        if net_name == "ours" and setup.device.type == "cpu":
            # What the batch threads buy: ddpm's step with PyTorch's own threading.
            for precision in precisions:
                torch.manual_seed(0)
                whole = Ours(make(), in_channels, precision == "bf16", 1, setup, batch_threads=1)
                benches[f"ours {precision} whole-batch"] = whole
    ratio = params["ours"] / params["theirs"]
    assert 0.9 <= ratio <= 1.1, f"parameter counts differ by more than 10%: {params}"
    train = interleaved({k: b.train_step for k, b in benches.items()}, warmup, reps, setup)
    sample = interleaved({k: b.evaluate for k, b in benches.items()}, warmup, reps, setup)

    def gflops(key: str) -> float:
        return flops[key.split()[0]] / statistics.median(train[key]) / 1e9

    best = {n: fastest(train, n) for n in ("ours", "theirs")}
    best_eval = {n: fastest(sample, n) for n in ("ours", "theirs")}
    return {
        "shape": f"{in_channels}x{IMAGE_SIZE}x{IMAGE_SIZE}",
        "batch": setup.batch,
        "params": params,
        "train_flops_per_step": flops,
        "train_img_per_s": {k: setup.batch / statistics.median(v) for k, v in train.items()},
        "train_gflop_per_s": {k: gflops(k) for k in train},
        "train_share_of_peak": {
            k: {p: gflops(k) / peaks[p]["gflop_per_s"] for p in peaks} for k in train
        },
        "sample_ms_per_eval": {k: 1e3 * statistics.median(v) for k, v in sample.items()},
        "train_speedup_same_precision": {
            p: speedup(train, f"ours {p}", f"theirs {p}") for p in precisions
        },
        "sample_speedup_same_precision": {
            p: speedup(sample, f"ours {p}", f"theirs {p}") for p in precisions
        },
        "best": {"train": best, "sample": best_eval},
        "train_speedup_best": speedup(train, best["ours"], best["theirs"]),
        "sample_speedup_best": speedup(sample, best_eval["ours"], best_eval["theirs"]),
        "raw_seconds": {"train": train, "sample": sample},
    }


def table(shapes: list[dict], peaks: dict) -> str:
    head = (
        f"{'shape':>8} {'net precision':>22} {'train img/s':>11} {'GFLOP/s':>8} "
        f"{'% fp32 peak':>11} {'% bf16 peak':>11} {'eval ms':>8}"
    )
    lines = [head, "-" * len(head)]
    # An emulated bf16 (no AVX512-BF16/AMX, or oneDNN held below them) has no peak worth the name.
    emulated = peaks["bf16"]["gflop_per_s"] < peaks["fp32"]["gflop_per_s"]
    for c in shapes:
        for k in c["train_img_per_s"]:
            share = c["train_share_of_peak"][k]
            bf16 = f"{'-':>11}" if emulated else f"{100 * share['bf16']:10.0f}%"
            lines.append(
                f"{c['shape']:>8} {k:>22} {c['train_img_per_s'][k]:11.1f} "
                f"{c['train_gflop_per_s'][k]:8.1f} {100 * share['fp32']:10.0f}% "
                f"{bf16} {c['sample_ms_per_eval'][k]:8.1f}"
            )
    lines.append("")
    lines.append("headline, best precision against best (median of per-repetition ratios):")
    for c in shapes:
        b = c["best"]
        same = ", ".join(
            f"{p} {c['train_speedup_same_precision'][p]:.2f}x/{c['sample_speedup_same_precision'][p]:.2f}x"
            for p in c["train_speedup_same_precision"]
        )
        lines.append(
            f"  {c['shape']}: train {c['train_speedup_best']:.2f}x ({b['train']['ours']} vs "
            f"{b['train']['theirs']}), eval {c['sample_speedup_best']:.2f}x "
            f"({b['sample']['ours']} vs {b['sample']['theirs']}); same precision train/eval: {same}"
        )
    lines.append(
        "peaks (torch.mm): "
        + ", ".join(
            f"{k} {v['gflop_per_s']:.1f} GFLOP/s at {v['size']}^2" for k, v in peaks.items()
        )
    )
    return "\n".join(lines)


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_processes(k: int):
    """k processes that each keep one core busy while the block runs: what a shared machine (or a
    second job) does to the timed code."""
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(k)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory, then rename: a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 repetitions")
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="K",
        help="run K single-threaded busy processes beside the timing (a shared machine)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7)")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda[:N]: where both networks run"
    )
    parser.add_argument(
        "--net",
        default="small",
        choices=["small", "cifar10"],
        help="ours: small (against diffusers at equal size) or cifar10 (Ho et al.'s 35.7M network, "
        "the same network in diffusers)",
    )
    parser.add_argument("--batch", type=int, default=BATCH, help=f"images per step ({BATCH})")
    parser.add_argument(
        "--channels",
        default=None,
        help="image channels to run, e.g. 1,3 (default: 1,3 for small, 3)",
    )
    parser.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="bf16-autocast cases: auto = only where the CPU has native bf16",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "train_speed.json",
    )
    args = parser.parse_args(argv)
    try:
        import diffusers
    except ImportError:
        print(
            "diffusers is not installed (pip install diffusers, or make bench); nothing to compare"
        )
        return 2

    reps = args.reps or (2 if args.quick else 7)
    warmup = 1 if args.quick else 2
    setup = Setup(resolve_device(args.device), args.batch, args.net)
    on_gpu = setup.device.type == "cuda"
    if on_gpu:  # "fp32" rows on a GPU use TF32 tensor cores, as both libraries' users would
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    native_bf16 = torch.cuda.is_bf16_supported() if on_gpu else bf16_supported()
    run_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)
    where = describe_device(setup.device) if on_gpu else f"{torch.get_num_threads()} threads, CPU"
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {where} {cpu_name()}, "
        f"native bf16: {native_bf16}; ours: {setup.net}, batch {setup.batch}",
        flush=True,
    )
    # Without native bf16 a 2048^2 bf16 mm takes about a minute; a smaller one shows the rate.
    size = 8192 if on_gpu else PEAK_SIZE
    bf16_size = size if native_bf16 else 512
    peaks = {
        "fp32": {"size": size, "gflop_per_s": matmul_peak(torch.float32, size, 5, setup)},
        "bf16": {
            "size": bf16_size,
            "gflop_per_s": matmul_peak(torch.bfloat16, bf16_size, 3, setup),
        },
    }
    print(
        "peaks (torch.mm): "
        + ", ".join(f"{k} {v['gflop_per_s']:.1f} GFLOP/s" for k, v in peaks.items()),
        flush=True,
    )
    precisions = ["fp32", "bf16"] if run_bf16 else ["fp32"]
    if not run_bf16:
        print(
            "bf16 cases skipped: this CPU has no native bf16, so autocast would emulate it "
            "(--bf16 on to run them anyway)",
            flush=True,
        )
    shapes = []
    channels = args.channels or ("1,3" if setup.net == "small" else "3")
    with busy_processes(args.background_load):
        for in_channels in (int(c) for c in channels.split(",")):
            shape = run_shape(in_channels, precisions, warmup, reps, peaks, setup)
            shapes.append(shape)
            print(
                f"{shape['shape']}: best vs best train {shape['train_speedup_best']:.2f}x, "
                f"eval {shape['sample_speedup_best']:.2f}x",
                flush=True,
            )
    print()
    print(f"GPU: {describe_device(setup.device)}" if on_gpu else f"CPU: {cpu_name()}")
    print(table(shapes, peaks))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/train_speed.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpu": cpu_name(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "onednn_primitive_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
            # Set to emulate an older CPU on this one (e.g. avx2 / AVX2: no AVX-512, no AMX).
            "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "load_average_at_end": os.getloadavg(),
            "background_load": args.background_load,
            "device": describe_device(setup.device),
        },
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "warmup": warmup,
        "reps": reps,
        "peaks": peaks,
        "ours": build_unet(setup.net, in_channels=1, image_size=IMAGE_SIZE).config,
        "net": setup.net,
        "batch": setup.batch,
        "shapes": shapes,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
