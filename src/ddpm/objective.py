"""The training objective as one object: what Algorithm 1 draws and the per-example loss it returns.

    objective = Objective(schedule, prediction="eps", variance="fixed_small", loss="simple", ...)
    draw = objective.draw(x0.shape, generator)           # t, eps and importance weights, global batch
    losses = objective(net, x0, draw.t, draw.eps)        # [B], the network called inside
    loss = objective.reduce(losses, draw)                # the scalar to differentiate

As in NVlabs/edm's ``loss.py``, the objective owns every piece of diffusion mathematics a training
step needs (q_sample, the target, Min-SNR weights, the bound terms of L_hybrid / L_vlb, offset noise,
the timestep sampler), so the training loop only moves batches, calls it and steps the optimizer.
Adding an objective touches this module (and ``losses.py`` for its formula), never the loop.

Randomness: ``draw`` takes a generator and draws on *its* device (the trainer's is on the CPU) and
returns tensors there; the caller moves them to the batch's device. t and eps are then the same
numbers on any device, and a resumed run (whose generator state is restored) draws them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ddpm.diffusion import PREDICTIONS, VARIANCES, q_sample
from ddpm.guidance import drop_labels
from ddpm.losses import OBJECTIVES, ImportanceSampler, training_loss
from ddpm.schedules import NoiseSchedule

Tensor = torch.Tensor
Network = Callable[..., Tensor]
TIMESTEP_SAMPLERS = ("uniform", "importance")
DECODERS = ("discretized", "gaussian")


class Draw(NamedTuple):
    """The random part of one training step for a batch of B examples: t [B] (0-based indices into
    the schedule), eps [B, ...] and the per-example loss weight [B] (1 unless importance-sampled)."""

    t: Tensor
    eps: Tensor
    weight: Tensor

    def to(self, device: torch.device | str) -> Draw:
        return Draw(*(x.to(device) for x in self))

    def rows(self, rows: slice) -> Draw:
        """The draw of a contiguous shard of the batch (torchrun: each rank's rows)."""
        return Draw(self.t[rows], self.eps[rows], self.weight[rows])


def draw_noise(shape, generator: torch.Generator | None, offset_noise: float = 0.0) -> Tensor:
    """eps ~ N(0, I) of the given shape [B, C, ...] on the generator's device; with offset noise
    (Guttenberg 2023) plus offset_noise * N(0, 1) shared by all pixels of each image and channel, so
    that the model learns to change an image's mean brightness, which i.i.d. eps (averaging out over
    pixels) barely moves."""
    device = generator.device if generator is not None else None
    eps = torch.randn(tuple(shape), generator=generator, device=device)
    if offset_noise > 0:
        shift_shape = tuple(shape[:2]) + (1,) * (len(shape) - 2)
        shift = torch.randn(shift_shape, generator=generator, device=device)
        eps = eps + offset_noise * shift
    return eps


@dataclass(frozen=True, eq=False)
class Objective:
    """A training objective: which target the network regresses, which loss, how t is drawn.

    ``loss``: "simple" (L_simple, eq. 14, on the prediction's target), "hybrid" (L_simple + vlb_weight
    T L_t, Nichol & Dhariwal eq. 16; learned variances) or "vlb" (T L_t alone); None picks hybrid for a
    learned variance, simple otherwise (see ``losses.training_loss``). ``timestep_sampler`` "uniform"
    is Algorithm 1's t ~ U{1..T}; "importance" draws t ~ p(t) from the recent losses and weights each
    example by 1 / (T p(t)) (its state is ``state_dict()``). ``decoder`` is L_0's: "discretized" for
    8-bit images (eq. 13), "gaussian" for continuous data. A class-conditional objective has
    ``null_label`` (the network's "no class" label) and drops each label to it with probability
    ``cond_drop`` (see :meth:`conditioning`)."""

    schedule: NoiseSchedule
    prediction: str = "eps"
    variance: str = "fixed_small"
    loss: str | None = None
    vlb_weight: float = 0.001
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    decoder: str = "discretized"
    timestep_sampler: str = "uniform"
    importance: ImportanceSampler | None = field(default=None, repr=False)
    null_label: int | None = None
    cond_drop: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            ("prediction", self.prediction, PREDICTIONS),
            ("variance", self.variance, VARIANCES),
            ("decoder", self.decoder, DECODERS),
            ("timestep sampler", self.timestep_sampler, TIMESTEP_SAMPLERS),
        )
        for name, value, known in checks:
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        if self.loss is not None and self.loss not in OBJECTIVES:
            raise ValueError(f"unknown loss {self.loss!r}; known: {', '.join(OBJECTIVES)}")
        if self.timestep_sampler == "importance" and self.importance is None:
            # frozen: the sampler's history is the one mutable part, created once here
            object.__setattr__(self, "importance", ImportanceSampler(self.schedule.num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def to(self, device: torch.device | str) -> Objective:
        """The same objective with the schedule's coefficients on ``device`` (the importance history,
        a small float64 table, stays on the CPU and is shared)."""
        device = torch.device(device)
        if (
            device.type == "mps"
        ):  # no float64 on MPS: the schedule stays on the CPU, extract() moves
            return self
        return dataclasses.replace(self, schedule=self.schedule.to(device))

    def draw(self, shape, generator: torch.Generator | None = None) -> Draw:
        """t, eps and weights for a batch of the given shape [B, ...], on the generator's device."""
        batch = int(shape[0])
        device = generator.device if generator is not None else None
        if self.importance is None:
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)
            weight = torch.ones(batch, device=device)
        else:
            t, weight = self.importance.sample(batch, generator)
        eps = draw_noise(shape, generator, self.offset_noise)
        return Draw(t, eps, weight.to(eps.device))

    def conditioning(
        self, labels: Tensor | None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The network's keyword arguments for a batch's class labels [B]: {} for an unconditional
        objective, else ``class_labels`` with each label replaced by the null class with probability
        ``cond_drop``, uniforms drawn from ``generator`` (classifier-free guidance's training half,
        Ho & Salimans 2022, Algorithm 1)."""
        if self.null_label is None:
            return {}
        if labels is None:
            raise ValueError("a class-conditional objective needs the batch's class labels")
        return {"class_labels": drop_labels(labels, self.cond_drop, self.null_label, generator)}

    def __call__(self, net: Network, x0: Tensor, t: Tensor, eps: Tensor, **conditioning) -> Tensor:
        """The per-example loss [B] (float32) at x_t = q_sample(x0, t, eps), the network called as
        ``net(x_t, original timesteps, **conditioning)``. Under autocast only the network runs in
        low precision: the loss is computed in float32."""
        x_t = q_sample(self.schedule, x0, t, eps)
        out = net(x_t, self.schedule.timesteps.to(t.device)[t], **conditioning)
        with torch.autocast(x0.device.type, enabled=False):
            return training_loss(
                self.schedule,
                out.float(),
                x0.float(),
                x_t.float(),
                t,
                eps.float(),
                prediction=self.prediction,
                variance=self.variance,
                objective=self.loss,
                vlb_weight=self.vlb_weight,
                min_snr_gamma=self.min_snr_gamma,
                decoder=self.decoder,
            )

    def reduce(self, losses: Tensor, draw: Draw) -> Tensor:
        """The scalar to differentiate: the weighted mean of the per-example losses."""
        return (losses * draw.weight.to(losses.device)).mean()

    def observe(self, t: Tensor, losses: Tensor) -> None:
        """Record the (unweighted) losses seen at t for the importance sampler; a batch holding a
        non-finite loss is ignored (a NaN in the history would poison p(t))."""
        if self.importance is not None and bool(torch.isfinite(losses).all()):
            self.importance.update(t, losses.detach())

    def state_dict(self) -> dict[str, Tensor]:
        """The objective's mutable state (the importance sampler's history), for checkpoints."""
        return {} if self.importance is None else self.importance.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.importance is not None:
            self.importance.load_state_dict(state)
