"""Sample a 2-D Gaussian mixture with the exact denoiser and compare samplers -- no training needed.

python examples/oracle_sampling.py
"""

import torch

from ddpm import GaussianMixture, NoiseSchedule, sample, variational_bound
from ddpm.metrics import sliced_wasserstein

data = GaussianMixture.isotropic([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], std=0.4)
schedule = NoiseSchedule.from_name("cosine", 1000)
model = data.denoiser(schedule)  # exact E[eps | x_t]: behaves like a perfectly trained network
truth = data.sample(4000, torch.Generator().manual_seed(1))

for sampler, steps in [("ancestral", 1000), ("ddim", 50), ("dpm_solver", 20), ("unipc", 20)]:
    x = sample(model, schedule, (4000, 2), sampler=sampler, num_steps=steps, grid="logsnr",
               generator=torch.Generator().manual_seed(0), dtype=torch.float64).x0  # fmt: skip
    print(
        f"{sampler:>10} {steps:>4} steps: sliced Wasserstein to the data {sliced_wasserstein(x, truth):.4f}"
    )

bound = variational_bound(model, schedule, truth[:500], decoder="gaussian", num_eval_steps=100)
entropy, _ = data.entropy_mc()
print(
    f"variational bound {bound.total_bpd.mean():.3f} bits/dim >= entropy {entropy / 2 / 0.6931:.3f} bits/dim"
)
