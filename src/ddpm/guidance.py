"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a class-conditional model.

The convention, stated once for the package: with guidance scale w,

    out~(x_t, t, c) = out(x_t, t, null) + w (out(x_t, t, c) - out(x_t, t, null)),

so w = 1 is plain conditional sampling, w = 0 unconditional sampling, and w > 1 sharpens towards
class c. (Ho & Salimans write the same with w' = w - 1: (1 + w') eps(c) - w' eps(null).)

The wrapper turns ``model(x_t, t, class_labels)`` into the ``model(x_t, t)`` callable every sampler
takes; nothing in the samplers knows about classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
ConditionalModel = Callable[..., Tensor]  # model(x_t, t, class_labels=labels) -> output


@dataclass(frozen=True, eq=False)
class GuidedModel:
    """``model(x_t, t) -> guided output``; see :func:`classifier_free_guidance`."""

    model: ConditionalModel
    class_labels: Tensor | int
    scale: float
    null_label: int

    def _labels(self, x_t: Tensor) -> Tensor:
        labels = torch.as_tensor(self.class_labels, dtype=torch.long, device=x_t.device)
        if labels.ndim == 0:
            labels = labels.expand(x_t.shape[0])
        if labels.shape != (x_t.shape[0],):
            raise ValueError(
                f"class labels must be one label or one per example [{x_t.shape[0]}], "
                f"got shape {tuple(labels.shape)}"
            )
        return labels

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        labels = self._labels(x_t)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        null = torch.full_like(labels, self.null_label)
        # w = 1 and w = 0 need one branch only: exactly conditional / unconditional sampling (a
        # network's output on a doubled batch need not be bitwise that on the batch alone), at half
        # the cost.
        if self.scale == 1.0:
            return self.model(x_t, t, class_labels=labels)
        if self.scale == 0.0:
            return self.model(x_t, t, class_labels=null)
        # Both branches in one call: one network evaluation on a batch of 2B, not two of B.
        out = self.model(
            torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([labels, null])
        )
        cond, uncond = out.chunk(2, dim=0)
        # A learned variance comes as C more output channels after the prediction (see
        # diffusion.p_mean_variance); guidance applies to the prediction, and the variance is taken
        # from the conditional branch, as GLIDE does (Nichol et al. 2022).
        if out.shape[1] == 2 * x_t.shape[1]:
            pred_c, var_c = cond.chunk(2, dim=1)
            pred_u, _ = uncond.chunk(2, dim=1)
            return torch.cat([pred_u + self.scale * (pred_c - pred_u), var_c], dim=1)
        return uncond + self.scale * (cond - uncond)


def classifier_free_guidance(
    model: ConditionalModel, class_labels: Tensor | int, scale: float, null_label: int
) -> GuidedModel:
    """A callable ``(x_t, t) -> out(x_t, t, null) + scale (out(x_t, t, c) - out(x_t, t, null))``
    for any sampler, where ``model(x_t, t, class_labels=...)`` is class-conditional with label
    ``null_label`` for "no class" and c = ``class_labels`` (one int, or [B] per example).

    scale = 1: conditional; 0: unconditional; > 1: guided. Both branches are computed in one call on
    the doubled batch. The output may be an eps, x0 or v prediction: for fixed (x_t, t) each is an
    affine function of the others (x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), v =
    sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0), and (1 - w) a + w b is an affine combination
    (weights summing to 1), which commutes with affine maps: guiding x0 or v is guiding eps.
    A learned-variance output (2C channels) keeps the conditional branch's variance channels.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise ValueError(f"null_label must be a non-negative integer, got {null_label!r}")
    labels = torch.as_tensor(class_labels)
    if labels.is_floating_point() or labels.ndim > 1:
        raise ValueError(
            f"class labels must be an integer or a 1-D integer tensor, got {labels.dtype} "
            f"of shape {tuple(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() > null_label):
        raise ValueError(
            f"class labels must lie in [0, {null_label}] ({null_label} = null), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return GuidedModel(model, class_labels, float(scale), null_label)


def drop_labels(
    class_labels: Tensor, p: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """Training's half of classifier-free guidance (Ho & Salimans 2022, Algorithm 1): each label
    replaced by ``null_label`` independently with probability p, so that one network learns both
    the conditional and the unconditional model. The uniforms are drawn on the generator's device."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"label drop probability must lie in [0, 1], got {p!r}")
    device = generator.device if generator is not None else class_labels.device
    u = torch.rand(class_labels.shape, generator=generator, device=device).to(class_labels.device)
    return torch.where(u < p, torch.full_like(class_labels, null_label), class_labels)
