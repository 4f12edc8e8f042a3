"""Conversions shared by the image sources: 8-bit values to [-1, 1], and changing the image size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def bytes_to_unit(a: np.ndarray) -> torch.Tensor:
    """Integer values k in 0..255 to float32 k / 255 * 2 - 1, so 0 -> -1 and 255 -> 1."""
    return torch.from_numpy(np.asarray(a, dtype=np.float32) / 127.5 - 1.0)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] values to the 256-level grid k / 255 * 2 - 1.

    Why: the discretized Gaussian decoder (L_0) assumes 8-bit data; interpolation leaves the grid.
    """
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def fit_to_size(x: torch.Tensor, size: int, *, pad_background: bool) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] to [N, C, size, size].

    If ``pad_background`` (dark-background data such as MNIST) and a square image grows by an even
    number of pixels, at most a quarter of its side, it is padded with -1 (28 -> 32, the usual trick for
    32-px U-Nets). Otherwise the shorter side is resized to ``size`` (bilinear, antialiased), the
    image is center-cropped, and the values are re-quantized to 8 bits.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) == (size, size):
        return x
    grow = size - h
    if pad_background and h == w and grow > 0 and grow % 2 == 0 and grow <= h // 4:
        p = grow // 2
        return F.pad(x, (p, p, p, p), value=-1.0)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return quantize_8bit(x[..., top : top + size, left : left + size]).contiguous()


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images [B, C, H, W] with each one mirrored left-right with probability 1/2.

    One uniform draw per image from ``generator`` (which may live on the CPU while ``x`` does not)
    decides: image b is flipped iff u_b < 1/2. The draw is always B numbers, flipped or not, so the
    generator's state after a batch depends only on how many batches it has seen (exact resumes).
    """
    device = generator.device if generator is not None else x.device
    flip = torch.rand(x.shape[0], generator=generator, device=device) < 0.5
    flip = flip.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(flip, x.flip(-1), x)
