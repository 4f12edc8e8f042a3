"""Where the network runs and in which precision: ``--device`` and ``--precision``.

Devices: "auto" (CUDA when present, else the CPU), "cpu", "cuda", "cuda:N", "mps". Asking for one
this machine does not have is a ``ConfigError`` (one line, exit 2), never a silent fall back.

Precisions (autocast of the network only; schedules, the posterior and the bound stay float64/float32):
  fp32  no autocast (on CUDA, matmuls may use TF32: ``torch.backends.cuda.matmul.allow_tf32``)
  bf16  bfloat16 autocast: GPUs that support it, CPUs with native bf16 (AVX512-BF16 or AMX; without
        them oneDNN falls back to reference kernels 10-20x slower than fp32, so ddpm warns)
  fp16  float16 autocast with a gradient scaler: CUDA only
  auto  bf16 where it is native (CUDA with bf16, CPUs with AVX512-BF16/AMX, where
        benchmarks/train_speed.py measured it faster), fp32 elsewhere
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from pathlib import Path

import torch

from ddpm.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch.device of a --device value; ConfigError if it is unknown or absent here."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; known: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} is not available: this torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {name!r} is not available: this machine has {count} CUDA device(s), "
                f"cuda:0 .. cuda:{count - 1}"
            )
        return device
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"device {name!r} is not available: no Apple MPS device here")
        return device
    raise ConfigError(f"unsupported device {name!r}; known: auto, cpu, cuda, cuda:N, mps")


def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device, *, images: bool = True) -> str:
    """The concrete precision ("fp32", "bf16" or "fp16") of a --precision value on a device.

    "auto" is bf16 for image networks where the device computes it natively, fp32 otherwise -- and
    fp32 for the 2-D points MLP (``images=False``), whose few small matmuls bf16 does not speed up
    but whose low-noise steps need the digits."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    if name == "auto" and not images:
        return "fp32"
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"precision fp16 needs a CUDA device (float16 autocast is a GPU path here); on {device.type} "
            "use bf16 or fp32"
        )
    if name == "bf16" and device.type == "cpu" and not native_bf16():
        warnings.warn(
            "this CPU has no native bfloat16 (AVX512-BF16/AMX); bf16 autocast will be much slower than "
            "fp32 here",
            RuntimeWarning,
            stacklevel=2,
        )
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a concrete precision on a device (a no-op for fp32)."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def at_precision(model, device: torch.device, precision: str):
    """``model`` called under the autocast of a concrete precision with its output in float32, so that
    whatever calls it (a sampler's updates, guidance's mixing) computes in full precision; the model
    itself for fp32."""
    if _DTYPES[precision] is None:
        return model

    def run(x, t, **kwargs):
        with autocast(device, precision):
            return model(x, t, **kwargs).float()

    return run


def grad_scaler(device: torch.device, precision: str):
    """A gradient scaler for fp16 on CUDA (float16 gradients underflow without one), else None."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def default_sample_batch(device: torch.device, kind: str) -> int:
    """How many samples to draw at once when the user does not say: bounded memory whatever --num."""
    if kind == "points":
        return 10_000
    return 1000 if device.type == "cuda" else 250


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux) and its vector/matrix ISA, e.g.
    "Intel(R) Xeon(R) Processor (AVX512, AVX512-BF16, AMX; native bf16)"."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    features = [torch.backends.cpu.get_cpu_capability()]
    cpu = torch.cpu
    for label, check in (
        ("AVX512-BF16", "_is_avx512_bf16_supported"),
        ("AMX", "_is_amx_tile_supported"),
    ):
        if getattr(cpu, check, lambda: False)():
            features.append(label)
    return f"{name} ({', '.join(features)}{'; native bf16' if native_bf16() else ''})"


def describe_device(device: torch.device) -> str:
    """A human-readable name: "cuda:0 (NVIDIA H200)" or "cpu (<model>, <ISA>)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({cpu_name()})"
    return str(device)
