"""Train ddpm alone with benchmarks/quality.py's configuration (the `small` U-Net, batch 64, linear
schedule unless --schedule, T = 1000) for a fixed number of minutes, in one precision: half of an
equal-time comparison, or a model for benchmarks/sampler_quality.py.

    OMP_NUM_THREADS=1 python benchmarks/train_alone.py --precision auto --run-dir runs/mnist_auto &
    OMP_NUM_THREADS=1 python benchmarks/train_alone.py --precision fp32 --run-dir runs/mnist_fp32
    ddpm eval runs/mnist_auto --num 1000 --seed 0     # and --seed 1, and the same for runs/mnist_fp32
    OMP_NUM_THREADS=1 python benchmarks/train_alone.py --schedule cosine --run-dir runs/mnist_cos  # README, cosine grid
    python benchmarks/train_alone.py --minutes 2 --batch-size 128 --run-dir runs/mnist  # on a GPU (gpu_session.sh)

Run the two side by side (one thread each) so that machine load hits both; then compare them with
``ddpm eval`` (which samples in fp32). The README's "Precision" paragraph was made this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in quality.py: no spinning under load

import torch  # noqa: E402

from ddpm.devices import PRECISIONS  # noqa: E402
from ddpm.schedules import BETA_SCHEDULES  # noqa: E402
from ddpm.train import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import our_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--steps", type=int, help="stop after this many steps (if sooner)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: quality.py's)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", default="linear", choices=sorted(BETA_SCHEDULES))
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    config = our_config(args.data, args.minutes, args.seed, args.precision)
    budget = {"steps": args.steps} | ({"batch_size": args.batch_size} if args.batch_size else {})
    config = dataclasses.replace(
        config,
        diffusion=dataclasses.replace(config.diffusion, schedule=args.schedule),
        train=dataclasses.replace(config.train, **budget),
    )
    result = train(config, args.run_dir, progress=False, verbose=False)
    print(
        f"{args.precision}: {result.step} steps in {result.elapsed_s:.0f} s, loss {result.loss:.4f}"
    )


if __name__ == "__main__":
    main()
