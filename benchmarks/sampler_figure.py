"""A picture of what the samplers draw from one trained run: one row per sampler and budget of network
evaluations, every row from the same x_T (the same seed), and the T-step ancestral chain on top.

Deterministic samplers (DDIM, DPM-Solver++, UniPC, Heun) map one x_T to one image, so their rows can
be compared tile by tile with each other; stochastic ones (ancestral, SDE-DPM-Solver++) draw fresh noise
on the way and keep only the rough layout of x_T. The numbers behind the picture are
``benchmarks/sampler_quality.py``'s (same samplers, grids and labels).

    python benchmarks/sampler_figure.py RUN --budgets 10,20,50 --out docs/samplers_mnist.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sampler_quality.SAMPLERS

from ddpm.devices import PRECISIONS, autocast, resolve_precision  # noqa: E402
from ddpm.runs import build_schedule, load_run_model  # noqa: E402
from ddpm.samplers import network_evaluations, sample, steps_for_evaluations  # noqa: E402
from ddpm.viz import save_labelled_rows  # noqa: E402
from sampler_quality import select_samplers  # noqa: E402

DEFAULT_SAMPLERS = "ancestral,ddim,dpm_solver++ 2M,unipc-2,sde_dpm_solver++ 2M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained run directory (images)")
    parser.add_argument("--num", type=int, default=8, help="images per row")
    parser.add_argument("--budgets", default="10,20,50", help="network evaluations")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help="comma-separated labels of "
                        "benchmarks/sampler_quality.py's table")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the x_T seed of every row")
    parser.add_argument("--no-chain", action="store_true", help="leave out the T-step chain row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--out", default="samplers.png", help="PNG path")
    args = parser.parse_args()
    chosen = select_samplers(args.samplers)
    budgets = [int(b) for b in args.budgets.split(",")]

    model, config, ckpt = load_run_model(args.run)
    model = model.to(args.device)
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)

    def network(x, t):
        with autocast(device, precision):
            return model(x, t).float()

    schedule = build_schedule(config.diffusion)
    shape = (args.num, *ckpt.meta["data"]["sample_shape"])
    rows = [] if args.no_chain else [("ancestral", {}, "linspace", schedule.num_timesteps)]
    rows += [(entry, k) for entry in chosen for k in budgets]
    images, captions, start = [], [], time.monotonic()
    for entry in rows:
        if len(entry) == 2:
            (label, name, options, grid), k = entry
            steps = steps_for_evaluations(name, k)
        else:
            name, options, grid, steps = entry
            label = f"ancestral {grid}"
        x = sample(
            network, schedule, shape, sampler=name, num_steps=steps, grid=grid,
            generator=torch.Generator().manual_seed(args.seed), device=args.device,
            prediction=config.diffusion.prediction, variance=config.diffusion.variance,
            clip_x0=True, **options,
        ).x0  # fmt: skip
        images.append(x.float().cpu())
        captions.append(f"{label}, {network_evaluations(name, steps)} NFE")
        print(f"{captions[-1]}: {time.monotonic() - start:.0f} s", flush=True)
    path = save_labelled_rows(torch.cat(images), captions, args.out)
    print(f"wrote {path} (run {args.run}, step {ckpt.step}, seed {args.seed})")


if __name__ == "__main__":
    main()
