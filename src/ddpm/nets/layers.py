"""Pieces shared by the networks: the timestep embedding, normalisation and initialisation helpers."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    max_period: float = 10000.0,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps ``t`` [B] (int or float), shape [B, dim].

    With ``half = dim // 2`` and frequencies ``w_i = max_period ** (-i / half)``, i = 0..half-1
    (the Transformer's, as in Ho et al. 2020 and improved-diffusion)::

        emb(t) = [cos(t * w_0), ..., cos(t * w_{half-1}), sin(t * w_0), ..., sin(t * w_{half-1})]

    An odd ``dim`` gets one trailing zero column.

    Ho et al.'s released code (and diffusers' conversions of it, ``flip_sin_to_cos=False,
    freq_shift=1``) puts the sines first and uses ``w_i = max_period ** (-i / (half - 1))``: in
    general ``w_i = max_period ** (-i / (half - freq_shift))``, sines first unless ``flip_sin_to_cos``.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {tuple(t.shape)}")
    half = dim // 2
    # float32 even for int64 t: the phases t * w_i stay exact enough for t up to ~1e5.
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - freq_shift)
    )
    phases = t.to(torch.float32)[:, None] * freqs[None, :]
    parts = [torch.cos(phases), torch.sin(phases)]
    emb = torch.cat(parts if flip_sin_to_cos else parts[::-1], dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def num_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm's group count: 32 as in Ho et al., fewer so that a group has >= 4 channels.

    Why the minimum: with one channel per group, the norm after ``h + emb_proj(emb)`` subtracts the
    per-channel time embedding again, and the block cannot see t (nor any channel's mean).
    """
    limit = max(1, min(max_groups, channels // min_group_size))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def group_norm(channels: int, groups: int | None = None, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm over ``channels``: ``groups`` groups, or ``num_groups(channels)`` when None."""
    return nn.GroupNorm(num_groups(channels) if groups is None else groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, as Ho et al. do for every layer that ends a residual branch.

    Each residual block then starts as the identity and the network's first output is 0.
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
