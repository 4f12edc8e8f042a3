"""Train a DDPM on the built-in 8x8 digits, sample 64 digits, save them as a PNG grid.

    python examples/quickstart.py [STEPS]        # the same as: ddpm train --steps STEPS; ddpm sample

The default 3000 steps take about five minutes on a 2-core laptop CPU; 300 steps already show blobs.
"""

import sys

from ddpm.config import RunConfig, TrainConfig
from ddpm.runs import sample_run
from ddpm.train import train

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
run_dir = "runs/quickstart"

result = train(RunConfig(train=TrainConfig(steps=steps)), run_dir)  # resumes if run_dir exists
samples = sample_run(
    run_dir, num=64, steps=250, seed=0
)  # 250 respaced steps of the 1000-step chain
print(f"trained to step {result.step}; samples in {samples.png}")
