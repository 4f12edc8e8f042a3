"""Classifier-free guidance and editing on a labelled 2-D Gaussian mixture, whose exact conditional
denoiser plays a perfectly trained class-conditional network -- no training needed.

python examples/conditional_editing.py
"""

import torch

from ddpm import (
    GaussianMixture,
    NoiseSchedule,
    classifier_free_guidance,
    ddim_reconstruct,
    inpaint,
    sample,
)

data = GaussianMixture.isotropic(
    [0.3, 0.7], [[-1.0, 0.0], [1.0, 0.5]], std=0.6
)  # class = component
schedule = NoiseSchedule.from_name("cosine", 1000)
model = data.denoiser(schedule)  # model(x_t, t, class_labels): label 2 (= null_label) is "no class"


def share_of_class_0(x: torch.Tensor) -> float:
    """Mean posterior probability of class 0 under the true mixture (Bayes' rule)."""
    return float(torch.softmax(data.component_log_prob(x), dim=1)[:, 0].mean())


# w = 0: unconditional, w = 1: conditional, w > 1: guided towards class 0.
for w in (0.0, 1.0, 3.0):
    guided = classifier_free_guidance(model, 0, w, data.null_label)
    x = sample(guided, schedule, (4000, 2), sampler="dpm_solver", num_steps=20,
               generator=torch.Generator().manual_seed(0), dtype=torch.float64).x0  # fmt: skip
    print(f"w = {w}: mean p(class 0 | x) = {share_of_class_0(x):.3f}")

# Inpainting: know the first coordinate, fill in the second (RePaint on a 100-step chain).
short = NoiseSchedule.from_name("cosine", 100)
x0 = torch.tensor([[1.5, 0.0]], dtype=torch.float64).expand(2000, 2)
mask = torch.tensor([1.0, 0.0], dtype=torch.float64)
filled = inpaint(data.denoiser(short), short, x0, mask, jump_length=10, resample=5,
                 generator=torch.Generator().manual_seed(1)).x0  # fmt: skip
# The truth: p(class | x_0 = 1.5) by Bayes' rule, then each class's own N(mu_k1, 0.36).
post = torch.softmax(data.weights.log() - (1.5 - data.means[:, 0]) ** 2 / (2 * 0.36), dim=0)
mean = post @ data.means[:, 1]
std = (post @ (0.36 + data.means[:, 1] ** 2) - mean**2).sqrt()
print(f"x_1 given x_0 = 1.5: mean {filled[:, 1].mean():.3f}, std {filled[:, 1].std():.3f} "
      f"(exact {mean:.3f}, {std:.3f})")  # fmt: skip

# DDIM inversion and reconstruction.
x = data.sample(500, torch.Generator().manual_seed(2))
print(
    f"DDIM reconstruction RMS error, 1000 steps: {ddim_reconstruct(model, schedule, x).error.mean():.2e}"
)
