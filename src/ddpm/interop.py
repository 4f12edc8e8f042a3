"""Models from elsewhere: diffusers checkpoints into ddpm run directories, and back out.

``import_diffusers(src, run_dir)``  a diffusers UNet2DModel folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``; the pipeline's ``scheduler_config.json`` if present)
    becomes a run directory that ``ddpm sample / nll / eval / info`` read: the weights go into ddpm's
    own ``UNet`` (so diffusers is not needed to use them), the scheduler into ``[diffusion]``.
``export_diffusers(run_dir, out)``  the reverse: a DDPMPipeline folder (``model_index.json``,
    ``unet/``, ``scheduler/``) that ``UNet2DModel.from_pretrained(out, subfolder="unet")`` and
    ``DDPMPipeline.from_pretrained(out)`` load.

diffusers itself is never imported: its configs are JSON and its weights safetensors. A pickled
``.bin`` is refused with the command that converts it, never unpickled. Both architectures are Ho et
al.'s U-Net, so the weights map one to one (``RESNET_KEYS``, ``ATTENTION_KEYS``, ``TOP_KEYS`` and
``block_pairs``); what a configuration holds that the other side cannot express is reported, all of it
in one line, and nothing is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ddpm.checkpoint import atomic_write_bytes, save_checkpoint
from ddpm.config import (
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    resolve_config,
)
from ddpm.data import DATASETS
from ddpm.data.toy import TOY_SETS
from ddpm.errors import CheckpointError, ConfigError, RunDirError
from ddpm.nets import UNET_PRESETS, UNet, build_unet, count_parameters
from ddpm.nets.layers import num_groups
from ddpm.runs import CONFIG_FILE, load_run_model, save_run_config
from ddpm.schedules import BETA_SCHEDULES, NoiseSchedule, rescale_zero_terminal_snr

Tensor = torch.Tensor

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PICKLE_FILE = "diffusion_pytorch_model.bin"
UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
MODEL_INDEX = "model_index.json"
# Written into exported configs; the oldest diffusers the export was made for (tests use a newer one).
DIFFUSERS_VERSION = "0.30.0"

# --------------------------------------------------------------------------------------------------
# the key mapping: ddpm name <- diffusers name
# --------------------------------------------------------------------------------------------------

# Inside a residual block (ddpm ResBlock <- diffusers ResnetBlock2D).
RESNET_KEYS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "emb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",  # 1x1 conv, only where the width changes
}
# Inside an attention block (ddpm AttentionBlock <- diffusers Attention). ddpm's 1x1 convs ``qkv``
# [3C, C, 1, 1] and ``proj_out`` [C, C, 1, 1] hold diffusers' Linear layers [C, C]: qkv is to_q, to_k
# and to_v stacked head by head (see _fuse_qkv).
ATTENTION_KEYS = {"norm": "group_norm", "proj_out": "to_out.0"}
QKV_KEYS = ("to_q", "to_k", "to_v")
# Names of the attention weights in diffusers files written before 0.15 (Ho et al.'s conversions).
LEGACY_ATTENTION_KEYS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Outside the blocks.
TOP_KEYS = {
    "conv_in": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}


def block_pairs(
    num_levels: int, layers_per_block: int, attention_levels: set[int]
) -> Iterator[tuple[str, str, str]]:
    """(ddpm prefix, diffusers prefix, kind) of every block, kind "resnet", "attention" or "conv".

    Both networks walk the levels in the same order: per level ``layers_per_block`` residual blocks
    (each followed by attention at attention levels) and a strided conv; the middle; then per level,
    from the lowest resolution, one residual block more, and an upsampling conv."""
    k = 0
    for level in range(num_levels):
        for j in range(layers_per_block):
            yield f"down.{k}.0", f"down_blocks.{level}.resnets.{j}", "resnet"
            if level in attention_levels:
                yield f"down.{k}.1", f"down_blocks.{level}.attentions.{j}", "attention"
            k += 1
        if level != num_levels - 1:
            yield f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "conv"
            k += 1
    yield "middle.0", "mid_block.resnets.0", "resnet"
    yield "middle.1", "mid_block.attentions.0", "attention"
    yield "middle.2", "mid_block.resnets.1", "resnet"
    for u, level in enumerate(reversed(range(num_levels))):
        attention = level in attention_levels
        for j in range(layers_per_block + 1):
            yield f"up.{u * (layers_per_block + 1) + j}.0", f"up_blocks.{u}.resnets.{j}", "resnet"
            if attention:
                yield (
                    f"up.{u * (layers_per_block + 1) + j}.1",
                    f"up_blocks.{u}.attentions.{j}",
                    "attention",
                )
        if level:
            last = u * (layers_per_block + 1) + layers_per_block
            yield (
                f"up.{last}.{2 if attention else 1}.conv",
                f"up_blocks.{u}.upsamplers.0.conv",
                "conv",
            )


def key_map(net_config: dict[str, Any]) -> dict[str, str | tuple[str, str, str]]:
    """ddpm state-dict key -> diffusers key (a triple (q, k, v) for a fused qkv), for every tensor
    of a ddpm UNet with this config (keys of absent layers, e.g. an identity skip, included)."""
    levels = len(net_config["channel_mult"])
    size = net_config["image_size"]
    attention = {lv for lv in range(levels) if size // 2**lv in net_config["attention_resolutions"]}
    mapping: dict[str, Any] = {}
    for ours, theirs in TOP_KEYS.items():
        for p in ("weight", "bias"):
            mapping[f"{ours}.{p}"] = f"{theirs}.{p}"
    for ours, theirs, kind in block_pairs(levels, _layers(net_config), attention):
        for p in ("weight", "bias"):
            if kind == "conv":
                mapping[f"{ours}.{p}"] = f"{theirs}.{p}"
            elif kind == "resnet":
                for a, b in RESNET_KEYS.items():
                    mapping[f"{ours}.{a}.{p}"] = f"{theirs}.{b}.{p}"
            else:
                for a, b in ATTENTION_KEYS.items():
                    mapping[f"{ours}.{a}.{p}"] = f"{theirs}.{b}.{p}"
                mapping[f"{ours}.qkv.{p}"] = tuple(f"{theirs}.{q}.{p}" for q in QKV_KEYS)
    return mapping


def _layers(net_config: dict[str, Any]) -> int:
    n = net_config["num_res_blocks"]
    return n if isinstance(n, int) else n[0]


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    # ddpm splits the fused projection head by head, [q_h, k_h, v_h] for h = 0..heads-1
    # (AttentionBlock.forward); diffusers splits each of q, k, v into heads.
    c = q.shape[0]
    stacked = torch.stack([x.reshape(heads, c // heads, *x.shape[1:]) for x in (q, k, v)], dim=1)
    return stacked.reshape(3 * c, *q.shape[1:])


def _split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    c = qkv.shape[0] // 3
    parts = qkv.reshape(heads, 3, c // heads, *qkv.shape[1:])
    return tuple(parts[:, i].reshape(c, *qkv.shape[1:]) for i in range(3))


def _unlegacy(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old attention names (query, key, value, proj_attn) renamed as diffusers >= 0.15 does."""
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) >= 3 and "attentions" in parts and parts[-2] in LEGACY_ATTENTION_KEYS:
            key = ".".join([*parts[:-2], LEGACY_ATTENTION_KEYS[parts[-2]], parts[-1]])
        out[key] = value
    return out


def state_dict_from_diffusers(
    tensors: dict[str, Tensor], net: UNet, where: str = "the weights"
) -> dict[str, Tensor]:
    """The state dict of ``net`` (a ddpm UNet) from a UNet2DModel's tensors, float32.

    CheckpointError (one line) if a tensor is missing, has the wrong shape, or is left over."""
    tensors = _unlegacy(tensors)
    heads = net.config["num_heads"]
    mapping = key_map(net.config)
    out, missing, used = {}, [], set()
    for key, target in net.state_dict().items():
        source = mapping[key]
        names = source if isinstance(source, tuple) else (source,)
        if any(n not in tensors for n in names):
            missing.append(next(n for n in names if n not in tensors))
            continue
        used.update(names)
        parts = [tensors[n].to(torch.float32) for n in names]
        value = _fuse_qkv(*parts, heads) if isinstance(source, tuple) else parts[0]
        if value.numel() != target.numel():
            raise CheckpointError(
                f"{where}: {names[0]} has shape {tuple(parts[0].shape)}, which does not fit "
                f"ddpm's {key} {tuple(target.shape)}"
            )
        out[key] = value.reshape(target.shape)  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
    extra = sorted(set(tensors) - used)
    if missing or extra:
        what = []
        if missing:
            what.append(f"{len(missing)} missing (first: {missing[0]})")
        if extra:
            what.append(f"{len(extra)} that ddpm's U-Net has no place for (first: {extra[0]})")
        raise CheckpointError(f"{where} do not match config.json: tensors {'; '.join(what)}")
    return out


def state_dict_to_diffusers(net: UNet) -> dict[str, Tensor]:
    """A UNet2DModel's tensors (current names) from a ddpm UNet."""
    heads = net.config["num_heads"]
    mapping = key_map(net.config)
    out = {}
    for key, value in net.state_dict().items():
        source = mapping[key]
        value = value.detach().to("cpu", torch.float32)
        if isinstance(source, tuple):
            for name, part in zip(source, _split_qkv(value, heads), strict=True):
                out[name] = part.reshape(part.shape[0], -1) if part.ndim > 1 else part
        elif key.endswith("proj_out.weight"):
            out[source] = value.reshape(value.shape[0], -1)
        else:
            out[source] = value
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# config.json <-> UNet arguments
# --------------------------------------------------------------------------------------------------

# UNet2DModel's defaults (diffusers 0.30-0.42) for keys a config.json leaves out.
DIFFUSERS_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Values ddpm's U-Net has no other choice for: key -> the accepted values.
_FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}
# Keys of old converted configs (Ho et al.'s names) that diffusers ignores too.
_IGNORED_KEYS = {"attn_resolutions", "resamp_with_conv", "num_res_blocks", "resnet_num_groups"}


def unet_kwargs_from_diffusers(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """ddpm ``UNet`` keyword arguments equivalent to a UNet2DModel ``config.json``, and notes.

    ConfigError listing every setting ddpm's U-Net cannot express."""
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ConfigError(f"config.json describes a {cls}; ddpm imports UNet2DModel only")
    notes = _unknown_key_notes(config)
    settings = {**DIFFUSERS_UNET_DEFAULTS, **config}  # what UNet2DModel would build
    _check_layout_values(settings)
    problems = _fixed_setting_problems(settings)
    boc, attention_levels, block_problems = _block_layout(settings)
    size, size_problems = _square_sample_size(settings["sample_size"])
    num_heads, head_problems = _num_heads(settings["attention_head_dim"], boc, attention_levels)
    problems += block_problems + size_problems + head_problems
    problems += _norm_problems(settings) + _time_embedding_problems(settings, base=boc[0])
    problems += _resampling_problems(settings) + _output_problems(settings)
    if problems:
        raise ConfigError("ddpm's U-Net cannot express this UNet2DModel: " + "; ".join(problems))
    kwargs = {
        "in_channels": settings["in_channels"],
        "image_size": size,
        "base_channels": boc[0],
        "channel_mult": [c // boc[0] for c in boc],
        "num_res_blocks": int(settings["layers_per_block"]),
        "attention_resolutions": [size // 2**lv for lv in sorted(attention_levels)],
        "num_heads": num_heads,
        "dropout": float(settings["dropout"]),
        "learn_sigma": settings["out_channels"] == 2 * settings["in_channels"],
        "norm_groups": settings["norm_num_groups"],
        "norm_eps": float(settings["norm_eps"]),
        "flip_sin_to_cos": bool(settings["flip_sin_to_cos"]),
        "freq_shift": settings["freq_shift"],
        "downsample_padding": settings["downsample_padding"],
    }
    return kwargs, notes


def _unknown_key_notes(config: dict[str, Any]) -> list[str]:
    """A note per key that neither UNet2DModel nor ddpm reads (keys starting "_" are metadata)."""
    known = set(DIFFUSERS_UNET_DEFAULTS)
    return [
        f"ignored unknown config key {k!r}"
        for k in sorted(config)
        if not k.startswith("_") and k not in known and k not in _IGNORED_KEYS
    ]


def _fixed_setting_problems(settings: dict[str, Any]) -> list[str]:
    """The settings (of ``_FIXED``) for which ddpm's U-Net has no other choice, set otherwise."""
    return [
        f"{key}={settings[key]!r} (ddpm: {accepted[0]!r})"
        for key, accepted in _FIXED.items()
        if settings[key] not in accepted
    ]


def _positive_ints(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    )


def _check_layout_values(settings: dict[str, Any]) -> None:
    """The values the rest of the mapping indexes and divides by, checked first: a config.json that
    is malformed (rather than merely beyond ddpm's U-Net) gets one line, not an IndexError."""
    boc, down, up = (
        settings[k] for k in ("block_out_channels", "down_block_types", "up_block_types")
    )
    if not boc or not _positive_ints(boc):
        raise ConfigError(f"config.json: block_out_channels must be positive integers, got {boc!r}")
    if not isinstance(down, list | tuple) or not isinstance(up, list | tuple):
        raise ConfigError("config.json: down_block_types and up_block_types must be lists")
    if len(down) != len(boc) or len(up) != len(boc):
        raise ConfigError(
            f"config.json: {len(boc)} block_out_channels but {len(down)} down_block_types and "
            f"{len(up)} up_block_types (UNet2DModel needs one of each per level; diffusers' defaults "
            "have four)"
        )
    head_dim = settings["attention_head_dim"]
    if head_dim is not None and not _positive_ints([head_dim]):
        raise ConfigError(
            f"config.json: attention_head_dim must be a positive integer, got {head_dim!r}"
        )


def _block_layout(settings: dict[str, Any]) -> tuple[list[int], set[int], list[str]]:
    """block_out_channels, the levels with attention (0 = full resolution), and what ddpm's U-Net
    cannot express of the channels and the block types."""
    boc = [int(c) for c in settings["block_out_channels"]]
    down, up = list(settings["down_block_types"]), list(settings["up_block_types"])
    n = len(boc)
    base = boc[0]
    problems = []
    if any(c % base for c in boc):
        problems.append(f"block_out_channels={boc} (each must be a multiple of the first)")
    bad = [b for b in down if b not in ("DownBlock2D", "AttnDownBlock2D")]
    bad += [b for b in up if b not in ("UpBlock2D", "AttnUpBlock2D")]
    if bad:
        problems.append(f"block type {bad[0]!r} (ddpm: DownBlock2D/AttnDownBlock2D/UpBlock2D/...)")
    attn_down = {i for i, b in enumerate(down) if b == "AttnDownBlock2D"}
    attn_up = {n - 1 - i for i, b in enumerate(up) if b == "AttnUpBlock2D"}
    if attn_down != attn_up:
        problems.append("attention at different levels on the way down and up")
    return boc, attn_down, problems


def _square_sample_size(sample_size: Any) -> tuple[Any, list[str]]:
    """The side of square images (an int, or a list of equal ints), or the problem with it."""
    size = sample_size
    if isinstance(size, list | tuple):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        return size, [f"sample_size={sample_size!r} (ddpm: one int, square images)"]
    return size, []


def _num_heads(
    head_dim: int | None, boc: list[int], attention_levels: set[int]
) -> tuple[int | None, list[str]]:
    """ddpm's one num_heads for diffusers' attention_head_dim (None: one head) at every attention
    level and in the middle, or None and the problem when the head counts differ."""
    widths = [boc[i] for i in sorted(attention_levels)] + [boc[-1]]
    if head_dim is None:
        heads = {1}
    else:
        heads = {c // head_dim for c in widths}
        if any(c % head_dim for c in widths):
            heads.add(-1)
    if len(heads) != 1:
        return None, [
            f"attention_head_dim={head_dim} gives different head counts at widths {widths} "
            "(ddpm: one num_heads)"
        ]
    return heads.pop(), []


def _norm_problems(settings: dict[str, Any]) -> list[str]:
    """ddpm's U-Net has one GroupNorm group count, attention's norms included."""
    groups, attn_groups = settings["norm_num_groups"], settings["attn_norm_num_groups"]
    if attn_groups not in (None, groups):
        return [f"attn_norm_num_groups={attn_groups} differs from norm_num_groups={groups}"]
    return []


def _time_embedding_problems(settings: dict[str, Any], base: int) -> list[str]:
    """ddpm's time embedding is 4 x the first level's width wide, as Ho et al.'s."""
    emb_dim = settings["time_embedding_dim"]
    if emb_dim not in (None, 4 * base):
        return [f"time_embedding_dim={emb_dim} (ddpm: 4 x block_out_channels[0])"]
    return []


def _resampling_problems(settings: dict[str, Any]) -> list[str]:
    if settings["downsample_padding"] not in (0, 1):
        return [f"downsample_padding={settings['downsample_padding']} (ddpm: 0 or 1)"]
    return []


def _output_problems(settings: dict[str, Any]) -> list[str]:
    """ddpm's output has the input's channels, or twice them (eps and the learned variance)."""
    c_in, c_out = settings["in_channels"], settings["out_channels"]
    if c_out not in (c_in, 2 * c_in):
        return [f"out_channels={c_out} (ddpm: in_channels, or twice for a learned variance)"]
    return []


def diffusers_config_from_unet(net: UNet) -> dict[str, Any]:
    """The UNet2DModel ``config.json`` of a ddpm UNet; ConfigError listing what it cannot express."""
    c = net.config
    problems = []
    if c.get("num_classes") is not None:
        problems.append("a class embedding (num_classes)")
    if c["upsample"] != "nearest_conv":
        problems.append(f"upsample={c['upsample']!r} (UNet2DModel: nearest then conv)")
    blocks = c["num_res_blocks"]
    if not isinstance(blocks, int) and len(set(blocks)) != 1:
        problems.append(f"num_res_blocks={blocks} (UNet2DModel: the same count at every level)")
    # UNet2DModel has one GroupNorm group count; ddpm's default picks one per width.
    counts = {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    if len(counts) != 1:
        problems.append(f"GroupNorm groups that vary with the width ({sorted(counts)})")
    base, mult, size = c["base_channels"], c["channel_mult"], c["image_size"]
    boc = [base * m for m in mult]
    attention = [lv for lv in range(len(mult)) if size // 2**lv in c["attention_resolutions"]]
    widths = [boc[lv] for lv in attention] + [boc[-1]]
    heads = c["num_heads"]
    head_dims = {w // heads for w in widths}
    if heads > 1 and (len(head_dims) != 1 or any(w % heads for w in widths)):
        problems.append(f"num_heads={heads} giving different head sizes at widths {widths}")
    if problems:
        raise ConfigError("UNet2DModel cannot express this ddpm U-Net: " + "; ".join(problems))
    n = len(mult)
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": size,
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": c.get("freq_shift", 0),
        "flip_sin_to_cos": c.get("flip_sin_to_cos", True),
        "down_block_types": [
            "AttnDownBlock2D" if lv in attention else "DownBlock2D" for lv in range(n)
        ],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [
            "AttnUpBlock2D" if lv in attention else "UpBlock2D" for lv in reversed(range(n))
        ],
        "block_out_channels": boc,
        "layers_per_block": blocks if isinstance(blocks, int) else blocks[0],
        "mid_block_scale_factor": 1,
        "downsample_padding": c.get("downsample_padding", 1),
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": c["dropout"],
        "act_fn": "silu",
        # None: one head per attention block (head size = the block's width), as Ho et al.
        "attention_head_dim": None if heads == 1 else head_dims.pop(),
        "norm_num_groups": counts.pop(),
        "attn_norm_num_groups": None,
        "norm_eps": c.get("norm_eps", 1e-5),
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None,
    }


# --------------------------------------------------------------------------------------------------
# scheduler_config.json <-> [diffusion] and [sample]
# --------------------------------------------------------------------------------------------------

PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers' "learned" is the variance itself, ddpm's the log-variance: not the same model.
VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}
# ddpm schedule -> diffusers beta_schedule (the same formula; endpoints scaled by 1000 / T).
EXPORT_SCHEDULES = {
    "linear": "linear",
    "quadratic": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}


def diffusers_betas(config: dict[str, Any]) -> Tensor:
    """beta_1..beta_T as DDPMScheduler computes them from its config, in float64 (ConfigError if
    the schedule is unknown)."""
    T = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    name = config.get("beta_schedule", "linear")
    f64 = torch.float64
    if config.get("trained_betas") is not None:
        beta = torch.tensor(config["trained_betas"], dtype=f64)
    elif name == "linear":
        beta = torch.linspace(start, end, T, dtype=f64)
    elif name == "scaled_linear":
        beta = torch.linspace(start**0.5, end**0.5, T, dtype=f64) ** 2
    elif name == "squaredcos_cap_v2":
        beta = BETA_SCHEDULES["cosine"](T)  # the same alpha_bar, s = 0.008, capped at 0.999
    elif name == "sigmoid":
        beta = torch.sigmoid(torch.linspace(-6, 6, T, dtype=f64)) * (end - start) + start
    else:
        raise ConfigError(f"scheduler beta_schedule {name!r} has no ddpm equivalent")
    if config.get("rescale_betas_zero_snr", False):
        beta = rescale_zero_terminal_snr(beta)
    return beta


def schedule_from_diffusers(
    config: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """([diffusion] values, [sample] values, notes) of a scheduler_config.json (a DDPMScheduler's,
    or another scheduler's training-time keys). ConfigError for what ddpm cannot express."""
    notes = []
    cls = config.get("_class_name", "DDPMScheduler")
    if cls != "DDPMScheduler":
        notes.append(f"{cls}: only its training-time settings (betas, T, prediction) are used")
    T = int(config.get("num_train_timesteps", 1000))
    beta = diffusers_betas(config)
    zero_snr = bool(config.get("rescale_betas_zero_snr", False))
    schedule = None
    for name in BETA_SCHEDULES:
        try:
            ours = NoiseSchedule.from_name(name, T, zero_terminal_snr=zero_snr).beta
        except ValueError:
            continue
        if ours.shape == beta.shape and torch.allclose(ours, beta, rtol=1e-6, atol=1e-12):
            schedule = name
            break
    if schedule is None:
        raise ConfigError(
            f"the scheduler's betas ({config.get('beta_schedule', 'trained_betas')}, "
            f"{float(beta[0]):.4g} .. {float(beta[-1]):.4g}, T={T}) match no ddpm schedule "
            f"({', '.join(BETA_SCHEDULES)}, endpoints scaled by 1000/T)"
        )
    prediction = config.get("prediction_type", "epsilon")
    variance = config.get("variance_type") or "fixed_small"
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"scheduler prediction_type {prediction!r} has no ddpm equivalent")
    if variance not in VARIANCE_TYPES:
        raise ConfigError(
            f"scheduler variance_type {variance!r} has no ddpm equivalent (ddpm's 'learned' "
            "predicts the log-variance, diffusers' the variance)"
        )
    diffusion = {
        "schedule": schedule,
        "num_timesteps": T,
        "prediction": PREDICTION_TYPES[prediction],
        "variance": VARIANCE_TYPES[variance],
        "zero_terminal_snr": zero_snr,
    }
    sample: dict[str, Any] = {"clip_x0": bool(config.get("clip_sample", True))}
    if sample["clip_x0"] and float(config.get("clip_sample_range", 1.0)) != 1.0:
        notes.append(
            f"clip_sample_range {config['clip_sample_range']} not kept: ddpm clips to [-1, 1]"
        )
    if config.get("thresholding", False):
        sample["dynamic_threshold"] = float(config.get("dynamic_thresholding_ratio", 0.995))
        notes.append("dynamic thresholding kept without diffusers' sample_max_value cap")
    spacing = (config.get("timestep_spacing", "leading"), config.get("steps_offset", 0))
    if spacing != ("leading", 0):
        notes.append(
            f"timestep_spacing {spacing[0]!r}, steps_offset {spacing[1]} not kept: they choose "
            "diffusers' short-chain grid; ddpm picks its own (--grid)"
        )
    return diffusion, sample, notes


def scheduler_config_from_run(config: RunConfig) -> dict[str, Any]:
    """A DDPMScheduler ``scheduler_config.json`` for a run's [diffusion] and [sample] settings."""
    d, s = config.diffusion, config.sample
    T = d.num_timesteps
    if d.variance == "learned":
        raise ConfigError(
            "variance 'learned' has no DDPMScheduler equivalent (it takes the variance, not its log)"
        )
    out: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": T,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "trained_betas": None,
        "variance_type": d.variance,
        "clip_sample": s.clip_x0,
        "clip_sample_range": 1.0,
        "prediction_type": {v: k for k, v in PREDICTION_TYPES.items()}[d.prediction],
        "thresholding": s.dynamic_threshold is not None,
        "dynamic_thresholding_ratio": s.dynamic_threshold or 0.995,
        # diffusers caps the threshold s at sample_max_value; ddpm does not.
        "sample_max_value": 1e9 if s.dynamic_threshold is not None else 1.0,
        "rescale_betas_zero_snr": d.zero_terminal_snr,
    }
    ours = NoiseSchedule.from_name(d.schedule, T).beta
    if d.schedule in EXPORT_SCHEDULES:
        scale = 1000.0 / T
        out.update(beta_schedule=EXPORT_SCHEDULES[d.schedule], beta_start=1e-4 * scale)
        out["beta_end"] = 0.02 * scale
    plain = {**out, "rescale_betas_zero_snr": False}
    if d.schedule not in EXPORT_SCHEDULES or not torch.allclose(
        diffusers_betas(plain), ours, rtol=1e-6, atol=1e-12
    ):
        out["trained_betas"] = ours.tolist()
    return out


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a {what}")
    return data


def pickle_refusal(path: Path) -> CheckpointError:
    """The error for a pickled weight file, with the command that converts it (run by the user,
    who decides to trust the file; weights_only restricts what the pickle may build)."""
    target = path.with_name(WEIGHTS_FILE)
    command = (
        'python -c "import torch; from safetensors.torch import save_file; '
        f"save_file(torch.load('{path}', map_location='cpu', weights_only=True), '{target}')\""
    )
    return CheckpointError(
        f"{path.parent} holds {path.name}, a pickle, which ddpm does not load (unpickling can run "
        f"code); if you trust it, convert it to safetensors with: {command}"
    )


def find_diffusers_model(src: str | Path) -> tuple[Path, Path | None]:
    """(UNet folder, scheduler_config.json or None) of a diffusers model or pipeline folder."""
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"{src}: no such folder (a diffusers model folder with {UNET_CONFIG})")
    unet_dir = src
    if not (src / UNET_CONFIG).is_file() and (src / "unet" / UNET_CONFIG).is_file():
        unet_dir = src / "unet"
    if not (unet_dir / UNET_CONFIG).is_file():
        raise ConfigError(
            f"{src} is not a diffusers model folder (no {UNET_CONFIG}, nor unet/{UNET_CONFIG})"
        )
    candidates = [
        unet_dir / SCHEDULER_CONFIG,
        src / SCHEDULER_CONFIG,
        src / "scheduler" / SCHEDULER_CONFIG,
        unet_dir.parent / "scheduler" / SCHEDULER_CONFIG,
    ]
    return unet_dir, next((p for p in candidates if p.is_file()), None)


def read_diffusers_weights(unet_dir: Path) -> tuple[dict[str, Tensor], str]:
    """The tensors of ``diffusion_pytorch_model.safetensors`` and its sha256; never a pickle."""
    from safetensors.torch import load

    path = unet_dir / WEIGHTS_FILE
    if not path.is_file():
        if (unet_dir / PICKLE_FILE).is_file():
            raise pickle_refusal(unet_dir / PICKLE_FILE)
        raise CheckpointError(f"{unet_dir} has no {WEIGHTS_FILE}")
    data = path.read_bytes()
    try:
        tensors = load(data)
    except Exception as err:  # safetensors' own error types; never fall back to pickle
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None
    return tensors, hashlib.sha256(data).hexdigest()


def _check_new_dir(path: Path, what: str, error: type[Exception]) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise error(f"{path} already exists and is not an empty folder; choose a new {what}")


@contextlib.contextmanager
def _complete_or_absent(path: Path):
    """Whatever the block writes under the new (or empty) folder ``path`` is removed if it fails,
    so that a retry after a full disk does not find a half-made folder in its way."""
    existed = path.exists()
    try:
        yield
    except BaseException:
        if existed:
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------
# the two commands
# --------------------------------------------------------------------------------------------------


class ImportReport(NamedTuple):
    """What ``import_diffusers`` wrote and how it read the source."""

    run_dir: Path
    checkpoint: Path
    num_parameters: int
    preset: str
    config: RunConfig
    notes: tuple[str, ...]


class ExportReport(NamedTuple):
    """What ``export_diffusers`` wrote."""

    out_dir: Path
    unet_dir: Path
    scheduler_config: Path
    num_parameters: int


def _preset_for(net: UNet) -> tuple[str, dict[str, Any], list[str]]:
    """(preset, [model] overrides, differences): the preset whose build with the overridable keys
    of ``ModelConfig`` reproduces ``net``'s config, so that ``ddpm train`` rebuilds the same network
    (the one needing the fewest overrides). With none, the closest preset and what it cannot
    reproduce."""
    target = net.config
    overridable = ("base_channels", "channel_mult", "num_res_blocks")
    overridable += ("attention_resolutions", "num_heads", "dropout")
    shape = {
        "in_channels": target["in_channels"],
        "image_size": target["image_size"],
        "learn_sigma": target["learn_sigma"],
    }
    best = None
    for name in UNET_PRESETS:
        with torch.device("meta"):
            plain = build_unet(name, **shape).config
            overrides = {k: target[k] for k in overridable if plain[k] != target[k]}
            built = build_unet(name, **shape, **overrides).config
        for groups in _equivalent_groups(net):
            candidate = {**target, "norm_groups": groups}
            diff = sorted(k for k in candidate if built.get(k) != candidate[k])
            score = (len(diff), len(overrides))
            if best is None or score < best[0]:
                best = (score, (name, overrides, diff))
    return best[1]


def _equivalent_groups(net: UNet) -> list[int | None]:
    """The norm_groups values that build ``net``'s GroupNorms: its own, and None when ddpm's
    default rule gives the same count at every width."""
    groups = net.config["norm_groups"]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    same = all(num_groups(m.num_channels) == m.num_groups for m in norms)
    return [groups, None] if same and groups is not None else [groups]


def _imported_schedule(
    scheduler_path: Path | None, unet_config: dict, kwargs: dict, notes: list[str]
) -> tuple[dict, dict]:
    """[diffusion] and [sample] values of the scheduler config (DDPMScheduler's defaults without
    one), refused unless its variance fits the UNet's output channels; notes appended."""
    if scheduler_path is not None:
        diffusion, sample, more = schedule_from_diffusers(
            _read_json(scheduler_path, "scheduler config")
        )
        notes += more
    else:
        diffusion, sample = {}, {}
        notes.append(f"no {SCHEDULER_CONFIG}: DDPMScheduler's defaults assumed (linear, T=1000)")
    learned = diffusion.get("variance") == "learned_range"
    if learned != kwargs["learn_sigma"]:
        raise ConfigError(
            f"the UNet has {unet_config.get('out_channels')} output channels but the scheduler's "
            f"variance is {diffusion.get('variance', 'fixed_small')}: they do not fit together"
        )
    return diffusion, sample


def _imported_config(
    net: UNet, shape: tuple, data: str, data_root: str | None, diffusion: dict, sample: dict,
    notes: list[str],
) -> tuple[str, RunConfig]:  # fmt: skip
    """(closest preset, the run's config) of an imported network; a note when no preset with
    overrides rebuilds it."""
    preset, overrides, differences = _preset_for(net)
    if differences:
        notes.append(
            f"[model] cannot rebuild this network (closest preset {preset!r} differs in "
            f"{', '.join(differences)}): sampling, nll, eval and export read the checkpoint's own "
            "description; fine-tuning with ddpm train needs a trainer that does too"
        )
    config = RunConfig(
        data=DataConfig(name=data, root=data_root, image_size=shape[-1]),
        model=ModelConfig(
            preset=preset,
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in overrides.items()
                if k != "num_res_blocks" or isinstance(v, int)
            },
        ),
        diffusion=DiffusionConfig(**diffusion),
        sample=SampleConfig(**sample),
    )
    return preset, resolve_config(config, kind="image", sample_shape=shape)


def import_diffusers(
    src: str | Path,
    run_dir: str | Path,
    *,
    data: str | None = None,
    data_root: str | None = None,
) -> ImportReport:
    """Turn a diffusers UNet2DModel folder into a ddpm run directory (see the module docstring).

    The weights become the run's step-0 checkpoint, as both its raw and EMA weights (the published
    google/ddpm-* weights are EMA weights). ``data`` / ``data_root`` name the data set that ``ddpm
    nll`` / ``eval`` / ``train`` use (default: cifar10 for 3x32x32 models, else a folder to set).
    Raises ConfigError / CheckpointError / RunDirError (one line) and writes nothing on failure."""
    run_dir = Path(run_dir)
    _check_new_dir(run_dir, "--run-dir", RunDirError)
    if data is not None and (data not in DATASETS or data in TOY_SETS):
        images = [name for name in DATASETS if name not in TOY_SETS]
        raise ConfigError(f"unknown image data set {data!r} for --data; known: {', '.join(images)}")
    unet_dir, scheduler_path = find_diffusers_model(src)
    unet_config = _read_json(unet_dir / UNET_CONFIG, "UNet2DModel config")
    kwargs, notes = unet_kwargs_from_diffusers(unet_config)
    diffusion, sample = _imported_schedule(scheduler_path, unet_config, kwargs, notes)
    tensors, sha256 = read_diffusers_weights(unet_dir)
    if any(t.dtype != torch.float32 for t in tensors.values()):
        notes.append("weights converted to float32")
    net = UNet(**kwargs)
    state = state_dict_from_diffusers(tensors, net, f"{unet_dir / WEIGHTS_FILE}")
    net.load_state_dict(state, strict=True)

    shape = (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    if data is None:
        data = "cifar10" if shape == (3, 32, 32) else "folder"
        notes.append(f"data set {data!r} assumed: set --data / --data-root for nll, eval, train")
    preset, config = _imported_config(net, shape, data, data_root, diffusion, sample, notes)
    num_parameters = count_parameters(net)
    meta = {
        "elapsed_s": 0.0,
        "model": {"arch": "unet", "config": net.config, "num_parameters": num_parameters},
        "data": {"name": data, "kind": "image", "sample_shape": list(shape)},
        "config": config.to_dict(),
        "imported": {
            "from": "diffusers UNet2DModel",
            "path": str(Path(src).resolve()),
            "weights_sha256": sha256,
            "scheduler_config": str(scheduler_path) if scheduler_path else None,
            "notes": notes,
        },
    }
    weights = net.state_dict()
    with _complete_or_absent(run_dir):
        checkpoint = save_checkpoint(run_dir, 0, {"model": weights, "ema": weights}, meta)
        # last: a run directory is complete or absent
        save_run_config(config, run_dir / CONFIG_FILE)
    return ImportReport(run_dir, checkpoint, num_parameters, preset, config, tuple(notes))


def export_diffusers(
    run_dir: str | Path, out_dir: str | Path, *, use_ema: bool = True
) -> ExportReport:
    """Write a run's network (EMA weights unless ``use_ema`` is False) and schedule as a diffusers
    DDPMPipeline folder: ``model_index.json``, ``unet/config.json`` +
    ``unet/diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json``."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    _check_new_dir(out_dir, "output folder", ConfigError)
    model, config, _ckpt = load_run_model(run_dir, use_ema=use_ema)
    if not isinstance(model, UNet):
        raise ConfigError(
            f"{run_dir} holds a {type(model).__name__}; only U-Nets export to diffusers"
        )
    unet_config = diffusers_config_from_unet(model)
    scheduler = scheduler_config_from_run(config)
    tensors = state_dict_to_diffusers(model)
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    unet_dir = out_dir / "unet"
    with _complete_or_absent(out_dir):
        atomic_write_bytes(unet_dir / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
        atomic_write_bytes(unet_dir / UNET_CONFIG, _json_bytes(unet_config))
        sched_path = atomic_write_bytes(
            out_dir / "scheduler" / SCHEDULER_CONFIG, _json_bytes(scheduler)
        )
        atomic_write_bytes(out_dir / MODEL_INDEX, _json_bytes(index))
    # all of them: the loaded model is frozen, and count_parameters counts trainable ones
    return ExportReport(out_dir, unet_dir, sched_path, sum(p.numel() for p in model.parameters()))


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()
