"""A residual MLP denoiser for low-dimensional toy data (2-D mixtures, spirals, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.errors import ConfigError
from ddpm.nets.layers import timestep_embedding


class MLP(nn.Module):
    """eps (or x0, v) prediction from (x_t [B, dim], t [B]); output [B, dim], or [B, 2*dim] with
    ``learn_sigma``.

    ``h = W_in x_t + e(t)``, then ``num_layers`` residual layers ``h <- h + W_i SiLU(h)``, then
    ``W_out SiLU(h)``; ``e(t)`` is the sinusoidal embedding of t through a two-layer SiLU MLP.
    """

    def __init__(
        self,
        *,
        dim: int = 2,
        hidden: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 64,
        learn_sigma: bool = False,
    ):
        super().__init__()
        if dim < 1 or hidden < 1 or num_layers < 0 or time_embed_dim < 1:
            raise ConfigError(
                f"MLP needs dim, hidden, time_embed_dim >= 1 and num_layers >= 0, got dim={dim}, "
                f"hidden={hidden}, num_layers={num_layers}, time_embed_dim={time_embed_dim}"
            )
        self.config = {
            "dim": dim,
            "hidden": hidden,
            "num_layers": num_layers,
            "time_embed_dim": time_embed_dim,
            "learn_sigma": bool(learn_sigma),
        }
        self.dim = dim
        self.time_embed_dim = time_embed_dim
        self.out_dim = 2 * dim if learn_sigma else dim
        self.time_embed = nn.Sequential(
            nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.in_proj = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        self.out_proj = nn.Linear(hidden, self.out_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"MLP expects input [B, {self.dim}], got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ConfigError(f"timesteps must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        h = self.in_proj(x) + self.time_embed(timestep_embedding(t, self.time_embed_dim))
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return self.out_proj(F.silu(h))
