"""The U-Net of Ho et al. (2020), as in their released code and improved-diffusion."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.errors import ConfigError
from ddpm.nets.layers import (
    class_embedding,
    group_norm,
    labels_or_null,
    timestep_embedding,
    zero_module,
)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; + projected time embedding; GroupNorm, SiLU, dropout, conv; + skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float,
        norm: Callable[[int], nn.Module] = group_norm,
    ):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # emb arrives already through SiLU (done once in UNet.forward, the same math as per block).
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions with a residual connection (fused QKV, plain matmuls)."""

    def __init__(
        self, channels: int, num_heads: int, norm: Callable[[int], nn.Module] = group_norm
    ):
        super().__init__()
        if channels % num_heads:
            raise ConfigError(
                f"{channels} channels cannot be split into {num_heads} attention heads"
            )
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, 3 * d, h * w)
        q, k, v = qkv.split(d, dim=1)  # each [B*heads, d, N]
        # Plain matmul-softmax: on the CPU it beats scaled_dot_product_attention's backward at these
        # sizes (few hundred tokens), and the [N, N] weights are small.
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * d**-0.5, dim=-1)  # [B*h, N, N]
        out = torch.bmm(v, weights.transpose(1, 2))  # [B*heads, d, N]
        return x + self.proj_out(out.reshape(b, c, h, w))


class Downsample(nn.Module):
    """3x3 convolution with stride 2 (Ho et al.'s resamp_with_conv).

    ``padding`` 1: one row/column of zeros on every side. 0: one only at the bottom and right, which
    is what TensorFlow's "SAME" does at stride 2 on even sizes, so Ho et al.'s released weights (and
    diffusers' ``downsample_padding=0``) see the pixels they were trained on.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.pad_bottom_right = padding == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 and a 3x3 convolution, in that order (Ho et al.) or conv first.

    ``conv_first`` applies the same convolution at the low resolution: 1/4 of the FLOPs for the same
    parameters; the nearest-neighbour copies are then blended by the next block's 3x3 convolutions.
    """

    def __init__(self, channels: int, conv_first: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_first = conv_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_first:
            return F.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


UPSAMPLE_MODES = ("nearest_conv", "conv_nearest")
DOWNSAMPLE_PADDINGS = (0, 1)


class UNet(nn.Module):
    """Ho et al. (2020)'s U-Net: eps (or x0, v) prediction from (x_t [B, C, H, W], t [B]).

    ``channel_mult[i] * base_channels`` channels at level i (resolution ``image_size / 2**i``);
    ``num_res_blocks`` residual blocks per level on the way down (one more on the way up, which also
    take the skip connections), or a sequence giving the count per level; self-attention after
    every residual block at the resolutions in ``attention_resolutions``, and in the middle.
    Output: ``out_channels``, by default ``in_channels`` (twice that with ``learn_sigma``).
    ``upsample``: "nearest_conv" as Ho et al., or "conv_nearest" (see Upsample). Inputs must be
    ``image_size`` square, the size the attention resolutions refer to.

    Numerical details, whose defaults are ddpm's own (improved-diffusion's) and which Ho et al.'s
    released model sets otherwise (preset "ho2020"; diffusers' UNet2DModel takes the same names):
    ``norm_groups`` GroupNorm groups everywhere (None: ``layers.num_groups`` of each width),
    ``norm_eps`` its epsilon, ``flip_sin_to_cos`` / ``freq_shift`` the timestep sinusoids (see
    ``layers.timestep_embedding``), ``downsample_padding`` 1 or 0 (see Downsample).

    ``num_classes``: a class-conditional net (None: unconditional). A learned embedding of
    ``num_classes + 1`` entries is added to the time embedding; the last entry, index ``num_classes``
    (``null_label``), is the "null" class of classifier-free guidance (Ho & Salimans 2022), which
    ``forward`` uses when no labels are given.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int | Sequence[int] = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.0,
        learn_sigma: bool = False,
        out_channels: int | None = None,
        upsample: str = "nearest_conv",
        norm_groups: int | None = None,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0,
        downsample_padding: int = 1,
        num_classes: int | None = None,
    ):
        super().__init__()
        res_blocks = _res_blocks_per_level(channel_mult, num_res_blocks)
        _check_resampling(image_size, len(channel_mult), upsample, downsample_padding)
        if out_channels is None:
            out_channels = 2 * in_channels if learn_sigma else in_channels
        _check_norm_groups(norm_groups, base_channels, channel_mult)
        self.config = {
            "in_channels": in_channels,
            "image_size": image_size,
            "base_channels": base_channels,
            "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks if isinstance(num_res_blocks, int) else res_blocks,
            "attention_resolutions": list(attention_resolutions),
            "num_heads": num_heads,
            "dropout": float(dropout),
            "learn_sigma": bool(learn_sigma),
            "out_channels": out_channels,
            "upsample": upsample,
            "norm_groups": norm_groups,
            "norm_eps": float(norm_eps),
            "flip_sin_to_cos": bool(flip_sin_to_cos),
            "freq_shift": freq_shift,
            "downsample_padding": downsample_padding,
        }
        self.flip_sin_to_cos, self.freq_shift = bool(flip_sin_to_cos), freq_shift
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels, self.base_channels = out_channels, base_channels

        # Modules are created in forward order: the same seed then gives the same weights.
        emb_channels = 4 * base_channels
        self.time_embed = _time_embedding_mlp(base_channels, emb_channels)
        norm = functools.partial(group_norm, groups=norm_groups, eps=norm_eps)
        blocks = _BlockMaker(emb_channels, dropout, norm, num_heads, attention_resolutions)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, skip_channels = _down_path(
            blocks, base_channels, channel_mult, res_blocks, image_size, downsample_padding
        )
        self.middle = _middle(blocks, skip_channels[-1])
        self.up = _up_path(
            blocks,
            base_channels,
            channel_mult,
            res_blocks,
            skip_channels,
            resolution=image_size // 2 ** (len(channel_mult) - 1),
            conv_first=upsample == "conv_nearest",
        )
        width = base_channels * channel_mult[0]  # where the up path ends
        self.norm_out = norm(width)
        self.conv_out = zero_module(nn.Conv2d(width, out_channels, 3, padding=1))
        # Built last, so that every other weight draws the same random numbers as an unconditional net.
        self.num_classes, self.class_embed = class_embedding(num_classes, emb_channels)
        if num_classes is not None:
            self.config["num_classes"] = num_classes  # absent when unconditional: old configs load

    def channels_last_copy(self) -> UNet:
        """A frozen copy for inference whose weights and activations are channels_last (NHWC).

        On a CPU under bf16 autocast oneDNN's convolutions take NHWC as it is, where NCHW costs a
        layout conversion of every input and output; the small GroupNorm maps go through NCHW
        (``layers.GroupNorm``). One network evaluation in bf16 as ddpm samples (benchmarks/eval_layout.py,
        results/eval_layout.json, 2026-12-02): `small` 1.18x faster at 32x32, 1.10x at 28x28,
        `cifar10` 1.33x, `tiny` 1.07x; in fp32 0.95-1.10x, so ddpm uses it for bf16 only
        (``runs.sampling_network``). Outputs equal the original's up to float rounding."""
        # Channels_last weights make every convolution's output NHWC, the first one's too (even from
        # a one-channel input, whose NCHW and NHWC strides coincide); the output goes back to NCHW.
        return copy.deepcopy(self).requires_grad_(False).to(memory_format=torch.channels_last)

    @property
    def null_label(self) -> int | None:
        """The label of the "null" class (``num_classes``), or None for an unconditional net."""
        return self.num_classes

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"UNet expects input [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if x.shape[2:] != (self.image_size, self.image_size):
            raise ConfigError(
                f"UNet was built for {self.image_size}x{self.image_size} images, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        if t.shape != (x.shape[0],):
            raise ConfigError(f"timesteps must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        sinusoids = timestep_embedding(
            t, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        emb = self.time_embed(sinusoids)
        if self.class_embed is not None:
            emb = emb + self.class_embed(labels_or_null(class_labels, self.num_classes, x))
        elif class_labels is not None:
            raise ConfigError(
                "class labels given to an unconditional UNet (built without num_classes)"
            )
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


# --------------------------------------------------------------------------------------------------
# UNet's construction, one step each
# --------------------------------------------------------------------------------------------------


def _res_blocks_per_level(
    channel_mult: Sequence[int], num_res_blocks: int | Sequence[int]
) -> list[int]:
    """The residual-block count of each level (on the way down); ConfigError if there is none."""
    num_levels = len(channel_mult)
    if num_levels < 1:
        raise ConfigError("channel_mult must name at least one level")
    if isinstance(num_res_blocks, int):
        res_blocks = [num_res_blocks] * num_levels
    else:
        res_blocks = [int(n) for n in num_res_blocks]
    if len(res_blocks) != num_levels or min(res_blocks) < 1:
        raise ConfigError(
            f"num_res_blocks must be a positive int or {num_levels} of them, got {num_res_blocks}"
        )
    return res_blocks


def _check_resampling(
    image_size: int, num_levels: int, upsample: str, downsample_padding: int
) -> None:
    """ConfigError unless ``image_size`` halves exactly at each level and the resamplers exist."""
    factor = 2 ** (num_levels - 1)
    if image_size < factor or image_size % factor:
        raise ConfigError(
            f"image size {image_size} is not divisible by {factor}, "
            f"which this UNet's {num_levels} resolution levels need"
        )
    if upsample not in UPSAMPLE_MODES:
        raise ConfigError(f"unknown upsample {upsample!r}; known: {', '.join(UPSAMPLE_MODES)}")
    if downsample_padding not in DOWNSAMPLE_PADDINGS:
        raise ConfigError(f"downsample_padding must be 0 or 1, got {downsample_padding!r}")


def _check_norm_groups(
    norm_groups: int | None, base_channels: int, channel_mult: Sequence[int]
) -> None:
    """ConfigError unless ``norm_groups`` (None: chosen per width) divides every width normalised."""
    widths = {base_channels * m for m in channel_mult}
    widths |= {a + b for a in widths for b in widths}  # the up path's concatenations
    if norm_groups is not None and any(c % norm_groups for c in widths):
        raise ConfigError(
            f"norm_groups {norm_groups} does not divide every width of this U-Net "
            f"({', '.join(map(str, sorted(widths)))})"
        )


def _time_embedding_mlp(base_channels: int, emb_channels: int) -> nn.Sequential:
    """Ho et al.: sinusoids of dimension base_channels, then a 2-layer MLP to emb_channels."""
    return nn.Sequential(
        nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
    )


@dataclasses.dataclass(frozen=True)
class _BlockMaker:
    """Builds UNet's blocks, which share the time-embedding width, dropout, norm and head count."""

    emb_channels: int
    dropout: float
    norm: Callable[[int], nn.Module]
    num_heads: int
    attention_resolutions: Sequence[int]

    def res_block(self, ch_in: int, ch_out: int) -> ResBlock:
        return ResBlock(ch_in, ch_out, self.emb_channels, self.dropout, self.norm)

    def attention(self, channels: int) -> AttentionBlock:
        return AttentionBlock(channels, self.num_heads, self.norm)

    def level_block(self, ch_in: int, ch_out: int, resolution: int) -> nn.ModuleList:
        """A residual block, followed by attention at the attention resolutions."""
        layers = nn.ModuleList([self.res_block(ch_in, ch_out)])
        if resolution in self.attention_resolutions:
            layers.append(self.attention(ch_out))
        return layers


def _down_path(
    blocks: _BlockMaker,
    base_channels: int,
    channel_mult: Sequence[int],
    res_blocks: Sequence[int],
    image_size: int,
    downsample_padding: int,
) -> tuple[nn.ModuleList, list[int]]:
    """The way down (each level's blocks, then a Downsample but at the last level), and the
    width of every skip connection it leaves: conv_in's first, then one per entry of the path."""
    down = nn.ModuleList()
    skip_channels = [base_channels]
    ch, resolution = base_channels, image_size
    for level, mult in enumerate(channel_mult):
        for _ in range(res_blocks[level]):
            down.append(blocks.level_block(ch, mult * base_channels, resolution))
            ch = mult * base_channels
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            down.append(nn.ModuleList([Downsample(ch, downsample_padding)]))
            skip_channels.append(ch)
            resolution //= 2
    return down, skip_channels


def _middle(blocks: _BlockMaker, channels: int) -> nn.ModuleList:
    """Residual block, self-attention, residual block at the lowest resolution."""
    return nn.ModuleList(
        [
            blocks.res_block(channels, channels),
            blocks.attention(channels),
            blocks.res_block(channels, channels),
        ]
    )


def _up_path(
    blocks: _BlockMaker,
    base_channels: int,
    channel_mult: Sequence[int],
    res_blocks: Sequence[int],
    skip_channels: Sequence[int],
    *,
    resolution: int,
    conv_first: bool,
) -> nn.ModuleList:
    """The way up from ``resolution``: one block more per level than down, each taking a skip
    connection (the last one first), then an Upsample but at full resolution."""
    skips = list(skip_channels)
    ch = skips[-1]  # the middle's width
    up = nn.ModuleList()
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(res_blocks[level] + 1):
            layers = blocks.level_block(ch + skips.pop(), mult * base_channels, resolution)
            ch = mult * base_channels
            if level and i == res_blocks[level]:
                layers.append(Upsample(ch, conv_first=conv_first))
                resolution *= 2
            up.append(layers)
    return up


# Architectures by name. Attention is given by level (0 = full resolution) so that one preset serves
# every image size; build_unet turns the levels into the resolutions UNet takes.
UNET_PRESETS: dict[str, dict] = {
    # 8x8 digits: two levels (8, 4), 0.70M parameters.
    "tiny": {
        "base_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_levels": [1],
        "num_heads": 1,
        "dropout": 0.0,
    },
    # 28/32 px MNIST-class data: 2.52M parameters, 0.92x diffusers' (32, 64, 128) UNet2DModel, at
    # 0.59x its FLOPs per step: 90% of the parameters sit at the lowest resolution, where a 3x3
    # conv's parameter costs 1/16 of one at full resolution, and the up-sampling conv runs before the
    # nearest-neighbour copy (benchmarks/train_speed.py).
    "small": {
        "base_channels": 16,
        "channel_mult": [1, 3, 6],
        "num_res_blocks": [1, 1, 3],
        "attention_levels": [2],
        "num_heads": 1,
        "dropout": 0.0,
        "upsample": "conv_nearest",
    },
    # Ho et al. (2020)'s CIFAR-10 model: 35.7M parameters at 3x32x32.
    "cifar10": {
        "base_channels": 128,
        "channel_mult": [1, 2, 2, 2],
        "num_res_blocks": 2,
        "attention_levels": [1],
        "num_heads": 1,
        "dropout": 0.1,
    },
    # The same network with the numerics of Ho et al.'s released TensorFlow code, as diffusers'
    # google/ddpm-cifar10-32 has them: GroupNorm(32, eps 1e-6), sines before cosines with
    # frequencies 10000^(-i / (half - 1)), and TensorFlow's "SAME" padding when downsampling. Its
    # weights load into this preset unchanged (ddpm.interop).
    "ho2020": {
        "base_channels": 128,
        "channel_mult": [1, 2, 2, 2],
        "num_res_blocks": 2,
        "attention_levels": [1],
        "num_heads": 1,
        "dropout": 0.1,
        "norm_groups": 32,
        "norm_eps": 1e-6,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
    },
}


def build_unet(
    preset: str, *, in_channels: int, image_size: int, learn_sigma: bool = False, **overrides
) -> UNet:
    """The UNet named ``preset`` (see UNET_PRESETS) for ``in_channels`` x ``image_size``^2 images.

    ``overrides`` replace preset entries or pass any other UNet argument; ``attention_resolutions``
    there replaces the preset's ``attention_levels``.
    """
    if preset not in UNET_PRESETS:
        raise ConfigError(
            f"unknown UNet preset {preset!r}; known: {', '.join(sorted(UNET_PRESETS))}"
        )
    kwargs = {**UNET_PRESETS[preset], **overrides}
    levels = kwargs.pop("attention_levels", [])
    kwargs.setdefault("attention_resolutions", [image_size // 2**level for level in levels])
    return UNet(in_channels=in_channels, image_size=image_size, learn_sigma=learn_sigma, **kwargs)
