"""Sampler accuracy against the number of network evaluations, with the exact denoiser (no training).

Data: a 2-D Gaussian mixture with unequal weights and full covariances. The model is its exact
E[eps | x_t] (ddpm.oracle), so every difference from the true distribution is the sampler's own error.
For each sampler and budget of network evaluations (NFE) we draw N samples from the same x_T and report
  - SW:   sliced Wasserstein-1 distance to a large independent sample of the true mixture, averaged
          over several x_T seeds (lower is better; the floor is the same distance for N true points:
          with N = 10^4 it is ~0.02, so differences below that are sampling noise);
  - NLL:  -E log p_data(sample) in nats (the true entropy H is printed; a sampler that spreads too much
          is above it, one that collapses towards the modes below).

    python benchmarks/samplers.py [--num 10000] [--seeds 3] [--out benchmarks/results/samplers.json]
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
    parser.add_argument("--num", type=int, default=10000, help="samples per cell and seed")
    parser.add_argument(
        "--seeds", type=int, default=3, help="independent x_T draws per cell (mean and SE reported)"
    )
    parser.add_argument(
        "--ref", type=int, default=100_000, help="size of the true reference sample"
    )
    parser.add_argument("--grid", default="logsnr", help="timestep grid for < 1000 steps")
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--out", default="benchmarks/results/samplers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation

    schedule = NoiseSchedule.from_name(args.schedule, 1000)
    model = MIXTURE.denoiser(schedule)
    # A large reference: the distance of an N-point sample to it is then dominated by the sample itself.
    reference = MIXTURE.sample(args.ref, torch.Generator().manual_seed(123))
    entropy, _ = MIXTURE.entropy_mc(400_000, torch.Generator().manual_seed(7))
    sw_gen = lambda: torch.Generator().manual_seed(99)  # noqa: E731  same projections for every cell
    floors = [
        sliced_wasserstein(
            MIXTURE.sample(args.num, torch.Generator().manual_seed(1000 + r)),
            reference,
            generator=sw_gen(),
        )
        for r in range(args.seeds)
    ]
    floor = sum(floors) / len(floors)
    print(
        f"true mixture: entropy H = {entropy:.4f} nats; SW of {args.num} true points to the "
        f"{args.ref}-point reference: {floor:.4f} (mean of {args.seeds}; the floor)"
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
            sws, nlls, start = [], [], time.perf_counter()
            for r in range(args.seeds):
                x = sample(
                    model, schedule, (args.num, 2), sampler=name, num_steps=k, grid=args.grid,
                    generator=torch.Generator().manual_seed(r), dtype=torch.float64, **options,
                ).x0  # fmt: skip
                sws.append(sliced_wasserstein(x, reference, generator=sw_gen()))
                nlls.append(float(-MIXTURE.log_prob(x).mean()))
            seconds = (time.perf_counter() - start) / args.seeds
            sw, nll = sum(sws) / len(sws), sum(nlls) / len(nlls)
            se = (sum((v - sw) ** 2 for v in sws) / max(len(sws) - 1, 1) / len(sws)) ** 0.5
            rows.append(
                {"sampler": label, "nfe": k, "sw": sw, "sw_se": se, "sw_per_seed": sws,
                 "nll": nll, "seconds": seconds}
            )  # fmt: skip
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
        "sw_floor_per_seed": floors,
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
