"""Memory layout of a sampling network evaluation on a CPU: NCHW against the channels_last copy that
ddpm samples with in bf16 (``runs.sampling_network``, ``UNet.channels_last_copy``).

    python benchmarks/eval_layout.py [--quick] [--reps N] [--out PATH]

For each U-Net preset and image shape: milliseconds per network evaluation (no grad, t drawn at
random) of the model in NCHW and of its channels_last copy, in fp32 and in bf16 autocast, each called
as ``ddpm sample`` calls it (``at_precision``, the batch in the shares of ``--batch-threads auto``).
The two layouts alternate within each repetition, so that machine load hits both; each speedup is the
median of the per-repetition ratios. Also the largest difference between the two layouts' outputs.
Prints a table (and the CPU's name and ISA) and writes JSON (default
benchmarks/results/eval_layout.json). Random weights: the timing does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ddpm.devices import (  # noqa: E402
    BatchThreads,
    at_precision,
    cpu_name,
    native_bf16,
    resolve_batch_threads,
    split_batch,
)
from ddpm.nets import build_unet  # noqa: E402

# (preset, channels, image size, batch): the data sets each preset is for, at a sampling batch
CASES = [
    ("tiny", 1, 8, 64),
    ("small", 1, 28, 64),
    ("small", 1, 32, 64),
    ("small", 3, 32, 64),
    ("cifar10", 3, 32, 16),
]


def time_case(preset, channels, size, batch, precision, reps, warmup) -> dict:
    torch.manual_seed(0)
    net = build_unet(preset, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        for p in net.parameters():  # conv_out starts at zero: give the outputs something to compare
            p.add_(0.01 * torch.randn_like(p))
    cpu = torch.device("cpu")
    threads = BatchThreads(resolve_batch_threads("auto", cpu))
    layouts = {
        "nchw": split_batch(at_precision(net, cpu, precision), threads),
        "channels_last": split_batch(
            at_precision(net.channels_last_copy(), cpu, precision), threads
        ),
    }
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2))
    times = {k: [] for k in layouts}
    try:
        with torch.no_grad():
            outs = {k: f(x, t) for k, f in layouts.items()}
            for rep in range(warmup + reps):
                for k, f in layouts.items():
                    start = time.perf_counter()
                    f(x, t)
                    if rep >= warmup:
                        times[k].append(time.perf_counter() - start)
    finally:
        threads.close()
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["nchw"], times["channels_last"], strict=True)]
    return {
        "preset": preset,
        "shape": f"{channels}x{size}x{size}",
        "batch": batch,
        "precision": precision,
        "ms": ms,
        "speedup": statistics.median(ratios),
        "max_abs_diff": (outs["nchw"] - outs["channels_last"]).abs().max().item(),
        "output_scale": outs["nchw"].abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 repetitions")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/results/eval_layout.json")
    args = parser.parse_args()
    reps, warmup = (3, 1) if args.quick else (args.reps, 2)
    precisions = ["fp32"] + (["bf16"] if native_bf16() else [])
    print(f"CPU: {cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"{'preset':8s} {'shape':8s} {'batch':>5s} {'prec':4s} {'NCHW ms':>8s} {'CL ms':>8s}"
          f" {'speedup':>7s} {'max diff':>9s}")  # fmt: skip
    rows = []
    for preset, channels, size, batch in CASES:
        for precision in precisions:
            r = time_case(preset, channels, size, batch, precision, reps, warmup)
            rows.append(r)
            print(f"{preset:8s} {r['shape']:8s} {batch:5d} {precision:4s} {r['ms']['nchw']:8.1f} "
                  f"{r['ms']['channels_last']:8.1f} {r['speedup']:6.2f}x {r['max_abs_diff']:9.2e}")  # fmt: skip
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/eval_layout.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "reps": reps,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
