"""Training and sampling speed of ddpm's `small` U-Net against diffusers' UNet2DModel at equal size.

    python benchmarks/train_speed.py [--quick] [--reps N] [--out PATH] [--bf16 auto|on|off]

For 1x32x32 and 3x32x32 images at batch 64, in fp32 and bf16 autocast: training images/s (forward,
eps-MSE loss at random t, backward, AdamW step) and milliseconds per network evaluation (forward
without grad, as in sampling). The two networks run interleaved (ours, theirs, ours, ...) after a
warm-up; times are medians and each speedup is the median of the per-repetition ratios. FLOPs of one
training step are counted with FlopCounterMode and compared with this machine's torch.mm peak,
measured in the same run. Prints a table and writes JSON (default benchmarks/results/train_speed.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: with the default (spinning) wait, a busy machine stalls every parallel
# region while a descheduled thread is awaited (measured: 5.7 s vs 1.5 s for one forward under load).
# Both networks run under the same setting; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ddpm.nets import build_unet, count_parameters  # noqa: E402
from ddpm.objective import Objective  # noqa: E402
from ddpm.schedules import NoiseSchedule  # noqa: E402

BATCH = 64
IMAGE_SIZE = 32
NUM_TIMESTEPS = 1000
PEAK_SIZE = 2048


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


def matmul_peak(dtype: torch.dtype, size: int, reps: int) -> float:
    """Median GFLOP/s of torch.mm on two size x size matrices."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


class Bench:
    """One network's training step and no-grad evaluation on fixed data, in one precision."""

    def __init__(self, net: torch.nn.Module, in_channels: int, bf16: bool, seed: int):
        self.net = net
        self.bf16 = bf16
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.rand(BATCH, in_channels, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
        # ddpm's own training objective (L_simple, eps-prediction) for both networks: the step
        # timed here is the one `ddpm train` takes, less the data loading and the EMA.
        self.objective = Objective(NoiseSchedule.from_name("linear", NUM_TIMESTEPS))
        self.generator = g

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self) -> None:
        drawn = self.objective.draw(self.x0.shape, self.generator)
        with self._autocast():
            losses = self.objective(self.net, self.x0, drawn.t, drawn.eps)
        loss = self.objective.reduce(losses, drawn)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def evaluate(self) -> None:
        t = torch.full((BATCH,), NUM_TIMESTEPS // 2, dtype=torch.long)
        with torch.no_grad(), self._autocast():
            self.net(self.x0, t)

    def train_flops(self) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.train_step()
        return counter.get_total_flops()


def interleaved(fns: dict[str, callable], warmup: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, alternating between them so drifts in machine load hit both."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def speedup(times: dict[str, list[float]]) -> float:
    """Median over repetitions of theirs/ours (same repetition, adjacent in time)."""
    return statistics.median(t / o for o, t in zip(times["ours"], times["theirs"], strict=True))


def run_case(in_channels: int, bf16: bool, warmup: int, reps: int, peak: float) -> dict:
    torch.manual_seed(0)
    nets = {
        "ours": build_unet("small", in_channels=in_channels, image_size=IMAGE_SIZE),
        "theirs": Unwrap(diffusers_unet(in_channels)),
    }
    params = {name: count_parameters(net) for name, net in nets.items()}
    ratio = params["ours"] / params["theirs"]
    assert 0.9 <= ratio <= 1.1, f"parameter counts differ by more than 10%: {params}"
    benches = {name: Bench(net, in_channels, bf16, seed=1) for name, net in nets.items()}
    flops = {name: b.train_flops() for name, b in benches.items()}
    train = interleaved({n: b.train_step for n, b in benches.items()}, warmup, reps)
    sample = interleaved({n: b.evaluate for n, b in benches.items()}, warmup, reps)
    case = {
        "shape": f"{in_channels}x{IMAGE_SIZE}x{IMAGE_SIZE}",
        "precision": "bf16-autocast" if bf16 else "fp32",
        "batch": BATCH,
        "params": params,
        "train_flops_per_step": flops,
        "train_s_per_step": {n: statistics.median(v) for n, v in train.items()},
        "train_img_per_s": {n: BATCH / statistics.median(v) for n, v in train.items()},
        "train_speedup": speedup(train),
        "train_gflop_per_s": {n: flops[n] / statistics.median(v) / 1e9 for n, v in train.items()},
        "sample_ms_per_eval": {n: 1e3 * statistics.median(v) for n, v in sample.items()},
        "sample_speedup": speedup(sample),
        "raw_seconds": {"train": train, "sample": sample},
    }
    case["train_share_of_peak"] = {n: g / peak for n, g in case["train_gflop_per_s"].items()}
    return case


def table(cases: list[dict], peaks: dict) -> str:
    head = (
        f"{'shape':>8} {'precision':>13} {'params ours/theirs':>19} "
        f"{'train img/s ours/theirs':>24} {'speedup':>7} {'GFLOP/s ours/theirs (% peak)':>29} "
        f"{'eval ms ours/theirs':>20} {'speedup':>7}"
    )
    lines = [head, "-" * len(head)]
    for c in cases:
        p, ips, g, share, ms = (
            c["params"],
            c["train_img_per_s"],
            c["train_gflop_per_s"],
            c["train_share_of_peak"],
            c["sample_ms_per_eval"],
        )
        lines.append(
            f"{c['shape']:>8} {c['precision']:>13} "
            f"{p['ours'] / 1e6:8.3f}M/{p['theirs'] / 1e6:.3f}M "
            f"{ips['ours']:11.1f} / {ips['theirs']:9.1f}  {c['train_speedup']:6.2f}x "
            f"{g['ours']:7.1f} ({100 * share['ours']:3.0f}%) / {g['theirs']:6.1f} "
            f"({100 * share['theirs']:3.0f}%)  "
            f"{ms['ours']:8.1f} / {ms['theirs']:8.1f}  {c['sample_speedup']:6.2f}x"
        )
    lines.append(
        "peaks (torch.mm): "
        + ", ".join(
            f"{k} {v['gflop_per_s']:.1f} GFLOP/s at {v['size']}^2" for k, v in peaks.items()
        )
    )
    return "\n".join(lines)


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
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7)")
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
    native_bf16 = bf16_supported()
    run_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16: {native_bf16}",
        flush=True,
    )
    # Without native bf16 a 2048^2 bf16 mm takes about a minute; a smaller one shows the rate.
    bf16_size = PEAK_SIZE if native_bf16 else 512
    peaks = {
        "fp32": {"size": PEAK_SIZE, "gflop_per_s": matmul_peak(torch.float32, PEAK_SIZE, 5)},
        "bf16": {"size": bf16_size, "gflop_per_s": matmul_peak(torch.bfloat16, bf16_size, 3)},
    }
    print(
        "peaks (torch.mm): "
        + ", ".join(f"{k} {v['gflop_per_s']:.1f} GFLOP/s" for k, v in peaks.items()),
        flush=True,
    )
    precisions = [False, True] if run_bf16 else [False]
    if not run_bf16:
        print(
            "bf16 cases skipped: this CPU has no native bf16, so autocast would emulate it "
            "(--bf16 on to run them anyway)",
            flush=True,
        )
    cases = []
    for bf16 in precisions:
        for in_channels in (1, 3):
            peak = peaks["bf16" if bf16 else "fp32"]["gflop_per_s"]
            case = run_case(in_channels, bf16, warmup, reps, peak)
            cases.append(case)
            print(
                f"{case['shape']} {case['precision']}: train {case['train_speedup']:.2f}x, "
                f"eval {case['sample_speedup']:.2f}x",
                flush=True,
            )
    print()
    print(table(cases, peaks))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/train_speed.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_at_end": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "warmup": warmup,
        "reps": reps,
        "peaks": peaks,
        "ours": build_unet("small", in_channels=1, image_size=IMAGE_SIZE).config,
        "cases": cases,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
