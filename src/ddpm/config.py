"""Run configuration: typed frozen dataclasses, read from TOML, merged with CLI overrides, saved as JSON.

A ``RunConfig`` has five sections, each a dataclass whose defaults make a working run::

    [data]       what to train on                 [model]   the network (preset + overrides)
    [diffusion]  schedule, T, parameterization    [train]   optimizer, budget, logging
    [sample]     defaults for ``ddpm sample``

Values are validated when a section is built, so a bad value fails with a one-line ``ConfigError``
naming the key, whether it came from TOML, the command line or Python. ``resolve_config`` fills the
choices that depend on the data (the model preset, the image size) and the default budget; the
resolved config is what a run directory's ``config.json`` holds.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm.devices import PRECISIONS
from ddpm.diffusion import PREDICTIONS, VARIANCES
from ddpm.errors import ConfigError
from ddpm.samplers import GRIDS, SAMPLERS
from ddpm.schedules import BETA_SCHEDULES

# The default budget when neither steps nor minutes is given: enough for recognisable 8x8 digits with
# the tiny U-Net, about five minutes on a 2-core CPU (see the README for the measurement).
DEFAULT_STEPS = 2000
# AdamW learning rate by model preset: what trained best in short CPU runs for the small networks
# (tiny: 2e-3 and 1e-3 gave the same digits at 1000 steps, 2e-3 a slightly lower loss at 2000), and
# Ho et al.'s 2e-4 for their CIFAR-10 model.
DEFAULT_LR = {"tiny": 2e-3, "small": 5e-4, "cifar10": 2e-4, "mlp": 1e-3}
FALLBACK_LR = 2e-4

SPLITS = ("train", "test", "all")
LOSSES = ("simple", "hybrid", "vlb")
TIMESTEP_SAMPLERS = ("uniform", "importance")
# [sample] steps of a new run (capped at T). Runs saved before 2026-12-01 have steps = null, the full
# chain, with the ancestral sampler: they sample as they always did.
DEFAULT_SAMPLE_STEPS = 50


# Upper bounds on sizes that allocate memory in proportion: far above any real use, they turn a typo
# (an extra digit, 1e17) into one line before any work instead of an allocation of the whole machine.
MAX_BATCH = 2**20
MAX_TIMESTEPS = 100_000
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


def _positive_int(
    name: str, value, *, allow_none: bool = False, allow_zero: bool = False, high: int | None = None
) -> None:
    if value is None and allow_none:
        return
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{name} must be {kind} integer, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be at most {high}, got {value!r}")


def _positive_float(
    name: str, value, *, allow_none: bool = False, allow_zero: bool = False
) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{name} must be {kind} number, got {value!r}")


def _one_of(name: str, value, known) -> None:
    if value not in known:
        raise ConfigError(f"unknown {name} {value!r}; known: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class DataConfig:
    """The data set: a name from ``ddpm.data.DATASETS`` and its options."""

    name: str = "digits"
    root: str | None = None  # folder / npz / download cache location
    image_size: int | None = None  # None: the data set's native size
    split: str = "train"
    num_points: int = 10000  # 2-D toy data only

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"data.name must be a non-empty string, got {self.name!r}")
        _positive_int("data.image_size", self.image_size, allow_none=True, high=MAX_IMAGE_SIZE)
        _one_of("data.split", self.split, SPLITS)
        _positive_int("data.num_points", self.num_points)


@dataclass(frozen=True)
class ModelConfig:
    """The network: a preset (``None``: "tiny" for images <= 16 px, "small" for larger, "mlp" for 2-D
    points) plus optional overrides of its fields; ``None`` keeps the preset's value."""

    preset: str | None = None
    # U-Net overrides
    base_channels: int | None = None
    channel_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attention_resolutions: tuple[int, ...] | None = None
    num_heads: int | None = None
    dropout: float | None = None
    # MLP overrides
    hidden: int | None = None
    num_layers: int | None = None
    time_embed_dim: int | None = None
    # Conditioning: None (unconditional) or "class" (a class embedding plus a null class for
    # classifier-free guidance); num_classes is then taken from the data set's labels.
    cond: str | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.cond is not None:
            _one_of("model.cond", self.cond, CONDITIONINGS)
        _positive_int("model.num_classes", self.num_classes, allow_none=True)
        for name in ("base_channels", "num_res_blocks", "num_heads", "hidden", "time_embed_dim"):
            _positive_int(f"model.{name}", getattr(self, name), allow_none=True)
        _positive_int("model.num_layers", self.num_layers, allow_none=True, allow_zero=True)
        for name in ("channel_mult", "attention_resolutions"):
            values = getattr(self, name)
            if values is not None:
                if name == "channel_mult" and not values:
                    raise ConfigError("model.channel_mult must name at least one level")
                for value in values:
                    _positive_int(f"model.{name} entries", value)
        if self.dropout is not None and not (
            isinstance(self.dropout, float | int) and 0 <= self.dropout < 1
        ):
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout!r}")

    def overrides(self) -> dict[str, Any]:
        """The fields that were set, other than the preset and the conditioning."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("preset", "cond", "num_classes") and value is not None:
                out[f.name] = value
        return out


MLP_FIELDS = ("hidden", "num_layers", "time_embed_dim")
CONDITIONINGS = ("class",)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and what the network predicts (see ``ddpm.schedules``, ``ddpm.diffusion``)."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    prediction: str = "eps"
    variance: str = "fixed_small"
    # simple: L_simple (eq. 14); hybrid: L_simple + lambda L_vlb (learned variances; Nichol & Dhariwal
    # eq. 16); vlb: the bound alone. None: hybrid for learned variances, simple otherwise.
    loss: str | None = None
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        _one_of("schedule", self.schedule, BETA_SCHEDULES)
        _positive_int("diffusion.num_timesteps", self.num_timesteps, high=MAX_TIMESTEPS)
        _one_of("prediction", self.prediction, PREDICTIONS)
        _one_of("variance", self.variance, VARIANCES)
        if self.loss is not None:
            _one_of("loss", self.loss, LOSSES)
        if self.loss == "hybrid" and not self.learn_sigma:
            raise ConfigError(
                "loss 'hybrid' trains a learned variance: use variance 'learned_range' (or loss "
                "'simple' / 'vlb')"
            )
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ConfigError(
                "zero_terminal_snr needs prediction 'v' (or 'x0'): at SNR 0 the noise is the whole "
                "of x_T, so eps-prediction says nothing about x_0 (Lin et al. 2024)"
            )

    @property
    def objective(self) -> str:
        """The loss actually used (``loss`` with its default filled in)."""
        if self.loss is not None:
            return self.loss
        return "hybrid" if self.learn_sigma else "simple"

    @property
    def learn_sigma(self) -> bool:
        return self.variance in ("learned", "learned_range")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, budget and bookkeeping. The budget is ``steps`` (the total number of optimizer
    steps of the run, counting earlier invocations) and/or ``minutes`` (wall-clock minutes of this
    invocation); training stops at whichever comes first."""

    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 64
    lr: float | None = None  # None: by model preset, DEFAULT_LR
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    # EMA decay, warmed up as min(ema_decay, (1 + step) / (10 + step)). 0.9999 (Ho et al.) averages over
    # ~10k steps, longer than a CPU run; 0.999 averages over the last ~1k.
    ema_decay: float = 0.999
    vlb_weight: float = (
        0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (learned variances only)
    )
    # uniform: t ~ U{1..T} (Algorithm 1); importance: p(t) ~ sqrt(E[L_t^2]) over the last 10 losses
    # of each t, the loss weighted by 1 / (T p(t)) (Nichol & Dhariwal sec. 3.3; meant for loss 'vlb').
    timestep_sampler: str = "uniform"
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5
    offset_noise: float = 0.0  # eps += offset * N(0, 1) per image and channel (images only)
    # model.cond = "class": probability that a label is replaced by the null class (Ho & Salimans
    # 2022), so that one network learns the conditional and the unconditional model
    cond_drop: float = 0.1
    hflip: bool = False  # random horizontal flips of training images (Ho et al. on CIFAR-10)
    # autocast of the network: fp32, bf16, fp16 (CUDA) or auto (bf16 where native; see ddpm.devices).
    # auto is the default: on MNIST at 25 CPU-minutes bf16 took 1.7x the steps and reached FID 13 where
    # fp32 reached 33 (README, "Precision").
    precision: str = "auto"
    compile: bool = False  # torch.compile the network for training
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500  # 0: only at the end
    sample_steps: int = 100  # length of the respaced chain used for the preview grids
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    tensorboard: bool = True
    max_nonfinite: int = 10  # non-finite losses in a row (each skips its update) that stop the run

    def __post_init__(self) -> None:
        _positive_int("steps", self.steps, allow_none=True)
        _positive_float("minutes", self.minutes, allow_none=True)
        _positive_int("batch_size", self.batch_size, high=MAX_BATCH)
        _positive_float("lr", self.lr, allow_none=True)
        _positive_int("warmup_steps", self.warmup_steps, allow_zero=True)
        _positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _positive_float("grad_clip", self.grad_clip, allow_none=True)
        if not (isinstance(self.ema_decay, int | float) and 0 <= self.ema_decay < 1):
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        _positive_float("vlb_weight", self.vlb_weight, allow_zero=True)
        _one_of("timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        _one_of("precision", self.precision, PRECISIONS)
        _positive_float("min_snr_gamma", self.min_snr_gamma, allow_none=True)
        _positive_float("offset_noise", self.offset_noise, allow_zero=True)
        if not (isinstance(self.cond_drop, int | float) and 0 <= self.cond_drop <= 1):
            raise ConfigError(f"cond_drop must lie in [0, 1], got {self.cond_drop!r}")
        _positive_int("seed", self.seed, allow_zero=True, high=MAX_SEED)
        _positive_int("log_every", self.log_every)
        _positive_int("sample_every", self.sample_every, allow_zero=True)
        _positive_int("sample_steps", self.sample_steps)
        _positive_int("checkpoint_every", self.checkpoint_every, allow_zero=True)
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        _positive_int("max_nonfinite", self.max_nonfinite)


@dataclass(frozen=True)
class SampleConfig:
    """Defaults for ``ddpm sample`` (and the picture at the end of training): how many (None: 64 images
    or 2000 points), how many steps (None: the full chain of T steps; more than T: T),
    which sampler on which grid (None: the sampler's default, ``ddpm.samplers.DEFAULT_GRIDS``).

    The default sampler is SDE-DPM-Solver++ 2M on 50 log-SNR points: on a trained MNIST model it
    matches the 1000-step chain's FID from 20 points on while the ODE solvers stay 2.5x worse at any
    step count, and on the exact mixtures it is the best sampler at 50 evaluations (README, "Sampler
    accuracy")."""

    num: int | None = None
    steps: int | None = DEFAULT_SAMPLE_STEPS
    sampler: str = "sde_dpm_solver"
    grid: str | None = None
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 ancestral-like
    # DPM-Solver++ (ODE and SDE) and UniPC: 1, 2 or 3; iPNDM 1-4. None: the sampler's own default
    # (its signature's: 2, iPNDM 3).
    order: int | None = None
    seed: int = 0
    use_ema: bool = True
    clip_x0: bool = True  # images: clamp the x_0 prediction to [-1, 1]
    dynamic_threshold: float | None = None  # images: Imagen's dynamic thresholding percentile
    # Class-conditional runs: the class to draw (None: unconditional, the null class) and the
    # guidance scale w (None: 1, plain conditional); see ddpm.guidance for the convention.
    class_label: int | None = None
    guidance: float | None = None
    # autocast of the network while sampling (the sampler's own arithmetic stays fp32): auto = bf16
    # for images where the device computes it natively (ddpm.devices.resolve_precision). Runs saved
    # before this key sampled in fp32 and keep it (runs.load_run_config).
    precision: str = "auto"

    def __post_init__(self) -> None:
        _positive_int("sample.num", self.num, allow_none=True)
        _positive_int("sample.steps", self.steps, allow_none=True)
        _one_of("sampler", self.sampler, SAMPLERS)
        if self.grid is not None:
            _one_of("grid", self.grid, GRIDS)
        _positive_float("eta", self.eta, allow_zero=True)
        if self.eta > 1:  # sigma beyond the ancestral step's: more noise than the step removes
            raise ConfigError(
                f"eta must lie in [0, 1] (0: DDIM, 1: ancestral-like), got {self.eta!r}"
            )
        if self.order is not None and self.order not in (
            (1, 2, 3, 4) if self.sampler == "ipndm" else (1, 2, 3)
        ):
            raise ConfigError(f"order must be 1, 2 or 3 (ipndm: also 4), got {self.order!r}")
        _positive_int("sample.seed", self.seed, allow_zero=True, high=MAX_SEED)
        if self.dynamic_threshold is not None and not (
            isinstance(self.dynamic_threshold, float | int) and 0 < self.dynamic_threshold <= 1
        ):
            raise ConfigError(
                f"dynamic_threshold is a percentile in (0, 1], got {self.dynamic_threshold!r}"
            )
        _positive_int("sample.class_label", self.class_label, allow_none=True, allow_zero=True)
        if self.guidance is not None and not (
            isinstance(self.guidance, int | float) and math.isfinite(self.guidance)
        ):
            raise ConfigError(f"guidance must be a finite number, got {self.guidance!r}")
        _one_of("sample.precision", self.precision, PRECISIONS)

    def sampler_options(self) -> dict[str, Any]:
        """The options of this section that the chosen sampler takes (``sampler_takes``); one left at
        None is the sampler's own default."""
        parameters = inspect.signature(SAMPLERS[self.sampler]).parameters
        return {
            name: parameters[name].default if getattr(self, name) is None else getattr(self, name)
            for name in SAMPLER_OPTIONS
            if name in parameters
        }


# [sample] keys that only some samplers take.
SAMPLER_OPTIONS = ("eta", "order")


def sampler_takes(sampler: str, option: str) -> bool:
    """Whether the sampler takes the option, read from its signature (eta: DDIM; order:
    DPM-Solver++, its SDE form and UniPC): a new sampler needs no line here."""
    return option in inspect.signature(SAMPLERS[sampler]).parameters


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, in five sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A JSON-able nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from a nested dict, rejecting unknown sections and keys."""
        return merge_config(cls(), d, where)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


# --------------------------------------------------------------------------------------------------
# dict -> dataclass, with type checks
# --------------------------------------------------------------------------------------------------


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def _convert(value, hint, key: str):
    """value checked (and minimally coerced: int -> float, list -> tuple) against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be empty")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list of {_type_name(item)}, got {value!r}")
        return tuple(_convert(v, item, key) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


def _replace_section(section, values: dict[str, Any], prefix: str, where: str):
    cls = type(section)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key '{prefix}.{key}' in {where}; known: {', '.join(known)}")
        changes[key] = _convert(value, hints[key], f"{prefix}.{key}")
    return dataclasses.replace(section, **changes)


def merge_config(
    config: RunConfig, overrides: dict[str, Any], where: str = "overrides"
) -> RunConfig:
    """config with the nested overrides {section: {key: value}} applied (validated, typed).

    Unknown sections or keys raise ``ConfigError`` naming them; ``where`` says where they came from."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a table of sections, got {type(overrides).__name__}")
    sections = {}
    for name, values in overrides.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"unknown key '{name}' in {where}; known sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"'{name}' in {where} must be a table ([{name}]), got {values!r}")
        if name == "train" and "bf16" in values:  # runs and files from before train.precision
            values = dict(values)
            # they trained in fp32 unless the flag was on: a resumed run keeps its precision
            values.setdefault("precision", "bf16" if values.pop("bf16") is True else "fp32")
        sections[name] = _replace_section(getattr(config, name), values, name, where)
    return dataclasses.replace(config, **sections)


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The nested dict of a TOML file (not yet checked against the config's keys)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading TOML needs Python >= 3.11 or the 'tomli' package") from None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except UnicodeDecodeError:  # TOML is UTF-8; an editor may have saved UTF-16 or Latin-1
        raise ConfigError(f"{path}: invalid TOML: the file is not UTF-8 text") from None


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def recipe_path(name: str) -> Path:
    """The shipped TOML of a named training recipe (``ddpm/recipes/<name>.toml``)."""
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    if name not in known:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(known) or 'none'}")
    return RECIPES_DIR / f"{name}.toml"


def load_config(path: str | os.PathLike, base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from a TOML (``.toml``) or JSON file, applied on top of ``base`` (default: defaults)."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON: {err}") from None
    else:
        data = load_toml(path)
    return merge_config(base or RunConfig(), data, str(path))


def save_config(config: RunConfig, path: str | os.PathLike) -> Path:
    """Write the config as indented JSON, atomically."""
    from ddpm.checkpoint import atomic_write_bytes

    text = json.dumps(config.to_dict(), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------------------------------
# choices that depend on the data
# --------------------------------------------------------------------------------------------------


def default_preset(kind: str, sample_shape: tuple[int, ...]) -> str:
    """ "mlp" for points, "tiny" for images of at most 16 px, "small" otherwise."""
    if kind == "points":
        return "mlp"
    return "tiny" if max(sample_shape[1:]) <= 16 else "small"


def resolve_config(
    config: RunConfig,
    *,
    kind: str,
    sample_shape: tuple[int, ...],
    num_classes: int | None = None,
) -> RunConfig:
    """The config with its data-dependent choices made: the model preset, the image size, the learning
    rate (``DEFAULT_LR`` of the preset), the default budget (``DEFAULT_STEPS``) when neither steps
    nor minutes is set, and for ``model.cond = "class"`` the number of classes, ``num_classes`` of
    the data set's labels (None: the data have none)."""
    model, data, train = config.model, config.data, config.train
    model = _resolve_classes(model, data.name, num_classes)
    if model.preset is None:
        model = dataclasses.replace(model, preset=default_preset(kind, tuple(sample_shape)))
    if kind == "image" and data.image_size is None:
        data = dataclasses.replace(data, image_size=int(sample_shape[-1]))
    if train.steps is None and train.minutes is None:
        train = dataclasses.replace(train, steps=DEFAULT_STEPS)
    if train.lr is None:
        train = dataclasses.replace(train, lr=DEFAULT_LR.get(model.preset, FALLBACK_LR))
    if model.preset == "mlp" and kind != "points":
        raise ConfigError(f"model 'mlp' is for 2-D point data; data set '{data.name}' holds images")
    if model.preset != "mlp" and kind == "points":
        raise ConfigError(
            f"data set '{data.name}' holds 2-D points; use model 'mlp', not '{model.preset}'"
        )
    if train.offset_noise > 0 and kind == "points":
        raise ConfigError("offset_noise shifts whole images; it does not apply to 2-D point data")
    if train.hflip and kind == "points":
        raise ConfigError("hflip mirrors images; it does not apply to 2-D point data")
    return dataclasses.replace(config, model=model, data=data, train=train)


def _resolve_classes(model: ModelConfig, data_name: str, num_classes: int | None) -> ModelConfig:
    if model.cond is None:
        if model.num_classes is not None:
            raise ConfigError("model.num_classes needs model.cond = 'class' (--cond class)")
        return model
    if num_classes is None:
        raise ConfigError(
            f"--cond class needs class labels, and data set '{data_name}' has none (a folder "
            "needs one subfolder per class; an npz a 'y' array)"
        )
    if model.num_classes is not None and model.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes is {model.num_classes}, but data set '{data_name}' has "
            f"{num_classes} classes"
        )
    return dataclasses.replace(model, num_classes=num_classes)
