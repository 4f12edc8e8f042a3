"""A residual MLP denoiser for low-dimensional toy data (2-D mixtures, spirals, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.errors import ConfigError
from ddpm.nets.layers import class_embedding, labels_or_null, timestep_embedding


class MLP(nn.Module):
    """eps (or x0, v) prediction from (x_t [B, dim], t [B]); output [B, dim], or [B, 2*dim] with
    ``learn_sigma``.

    ``h = W_in x_t + e(t)``, then ``num_layers`` residual layers ``h <- h + W_i SiLU(h)``, then
    ``W_out SiLU(h)``; ``e(t)`` is the sinusoidal embedding of t through a two-layer SiLU MLP.

    ``num_classes``: class-conditional (None: unconditional); a learned embedding of
    ``num_classes + 1`` entries, the last (``null_label``) the "null" class, is added to ``e(t)``,
    as in :class:`~ddpm.nets.UNet`.
    """

    def __init__(
        self,
        *,
        dim: int = 2,
        hidden: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 64,
        learn_sigma: bool = False,
        num_classes: int | None = None,
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
        # Built last, so that every other weight draws the same random numbers as an unconditional net.
        self.num_classes, self.class_embed = class_embedding(num_classes, hidden)
        if num_classes is not None:
            self.config["num_classes"] = num_classes  # absent when unconditional: old configs load

    @property
    def null_label(self) -> int | None:
        """The label of the "null" class (``num_classes``), or None for an unconditional net."""
        return self.num_classes

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"MLP expects input [B, {self.dim}], got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ConfigError(f"timesteps must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.time_embed_dim))
        if self.class_embed is not None:
            emb = emb + self.class_embed(labels_or_null(class_labels, self.num_classes, x))
        elif class_labels is not None:
            raise ConfigError(
                "class labels given to an unconditional MLP (built without num_classes)"
            )
        h = self.in_proj(x) + emb
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return self.out_proj(F.silu(h))
