"""Sampler accuracy against the number of network evaluations, with the exact denoiser (no training).

Data: a 2-D Gaussian mixture with unequal weights and full covariances. The model is its exact
E[eps | x_t] (ddpm.oracle), so every difference from the true distribution is the sampler's own error.
For each sampler and budget of network evaluations (NFE) we draw N samples from the same x_T and report
  - SW:   sliced Wasserstein-1 distance to an independent sample of the true mixture (lower is better;
          the floor is the distance between two true samples of size N, printed as "true");
  - NLL:  -E log p_data(sample) in nats (the true entropy H is printed; a sampler that spreads too much
          is above it, one that collapses towards the modes below).

    python benchmarks/samplers.py [--num 20000] [--out benchmarks/results/samplers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ddpm.metrics import sliced_wasserstein
from ddpm.oracle import GaussianMixture
from ddpm.samplers import sample
from ddpm.schedules import NoiseSchedule

MIXTURE = GaussianMixture(
    [0.2, 0.5, 0.3],
    [[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.15, 0.0], [0.0, 0.4]], [[0.05, 0.0], [0.0, 0.05]]],
)
SAMPLERS = [
    ("ancestral", "ancestral", {}),
    ("ddim", "ddim", {"eta": 0.0}),
    ("dpm_solver++ 2M", "dpm_solver", {"order": 2}),
    ("dpm_solver++ 3M", "dpm_solver", {"order": 3}),
]
BUDGETS = [5, 10, 20, 50, 100, 1000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=20000, help="samples per cell")
    parser.add_argument("--grid", default="logsnr", help="timestep grid for < 1000 steps")
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--out", default="benchmarks/results/samplers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation

    schedule = NoiseSchedule.from_name(args.schedule, 1000)
    model = MIXTURE.denoiser(schedule)
    reference = MIXTURE.sample(args.num, torch.Generator().manual_seed(123))
    other = MIXTURE.sample(args.num, torch.Generator().manual_seed(321))
    entropy, _ = MIXTURE.entropy_mc(400_000, torch.Generator().manual_seed(7))
    sw_gen = lambda: torch.Generator().manual_seed(99)  # noqa: E731  same projections for every cell
    floor = sliced_wasserstein(other, reference, generator=sw_gen())
    print(
        f"true mixture: entropy H = {entropy:.4f} nats; SW between two true samples of {args.num}: {floor:.4f}"
    )

    rows = []
    header = f"{'sampler':<18}" + "".join(f"{'NFE ' + str(k):>16}" for k in BUDGETS)
    print(
        f"\nSW to the true distribution (NLL in nats), grid={args.grid}, schedule={args.schedule}"
    )
    print(header)
    for label, name, options in SAMPLERS:
        cells = []
        for k in BUDGETS:
            start = time.perf_counter()
            x = sample(
                model, schedule, (args.num, 2), sampler=name, num_steps=k, grid=args.grid,
                generator=torch.Generator().manual_seed(0), dtype=torch.float64, **options,
            ).x0  # fmt: skip
            seconds = time.perf_counter() - start
            sw = sliced_wasserstein(x, reference, generator=sw_gen())
            nll = float(-MIXTURE.log_prob(x).mean())
            rows.append({"sampler": label, "nfe": k, "sw": sw, "nll": nll, "seconds": seconds})
            cells.append(f"{sw:.4f} ({nll:.3f})")
        print(f"{label:<18}" + "".join(f"{c:>16}" for c in cells))

    best = {r["sampler"]: r for r in rows if r["nfe"] == 1000}["ancestral"]
    print(f"\nreference: 1000-step ancestral SW {best['sw']:.4f}; true-vs-true floor {floor:.4f}")
    for r in rows:
        if r["nfe"] == 20 and r["sampler"].startswith("dpm"):
            print(
                f"{r['sampler']} at 20 NFE: SW ratio to 1000-step ancestral = {r['sw'] / best['sw']:.3f}"
            )

    result = {
        "benchmark": "samplers",
        "command": "python benchmarks/samplers.py",
        "args": vars(args),
        "entropy_nats": entropy,
        "sw_floor": floor,
        "rows": rows,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
