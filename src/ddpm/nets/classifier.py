"""A small CNN classifier whose penultimate layer serves as feature extractor for sample-quality metrics.

For 8x8 digits and 28x28 (Fashion-)MNIST: two stages of two 3x3 convolutions and a 2x2 max-pool, one
more convolution, global average pooling, then a ``feature_dim`` fully connected layer (the features,
after ReLU) and the class logits. Width 16 gives 45k parameters (a 0.18 MB float32 file).
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class Classifier(nn.Module):
    """``net(x) -> logits [B, num_classes]`` for images x [B, C, H, W] in [-1, 1];
    ``net.features(x) -> [B, feature_dim]``. ``net.config`` rebuilds the architecture."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        feature_dim: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "feature_dim": feature_dim,
            "dropout": dropout,
        }
        w = width

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(in_channels, w),
            *conv(w, w),
            nn.MaxPool2d(2),
            *conv(w, 2 * w),
            *conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *conv(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """The penultimate activations [B, feature_dim] (what FID/KID/precision-recall compare)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
