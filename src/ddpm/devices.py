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
import itertools
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


# --------------------------------------------------------------------------------------------------
# batch threads: data parallelism across a CPU's cores inside one process
# --------------------------------------------------------------------------------------------------

# Up to this many parameters a CPU updates them (clipping, AdamW, EMA) on one intra-op thread.
ONE_THREAD_UPDATE_MAX_PARAMS = 16_000_000


def update_threads(model: torch.nn.Module, device: torch.device) -> int:
    """Intra-op threads for the parameter update of ``model`` (``intra_op_threads``): on a CPU, one
    while it has at most ONE_THREAD_UPDATE_MAX_PARAMS parameters, else the caller's.

    Why: the update is a few elementwise passes per parameter tensor, a few microseconds of work each;
    split across threads every one of them pays a wake-up (OMP_WAIT_POLICY=PASSIVE, which ddpm sets
    because spinning threads stall a loaded machine). Measured on 2 cores (AMX Xeon, torch 2.13;
    clip, fused AdamW and EMA): the 2.5M-parameter ``small`` U-Net 24.5 ms on two threads, 7.5 ms on
    one; the 35.7M ``cifar10`` U-Net 94 and 100 ms, where more threads start to pay for the memory
    traffic."""
    if device.type != "cpu":
        return torch.get_num_threads()
    n = sum(p.numel() for p in model.parameters())
    return 1 if n <= ONE_THREAD_UPDATE_MAX_PARAMS else torch.get_num_threads()


@contextlib.contextmanager
def intra_op_threads(n: int):
    """``torch.set_num_threads(n)`` inside the block; the caller's count is restored after."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Fewer rows than this per thread are not worth a thread (the last, partial batch of a sampling run).
MIN_ROWS_PER_THREAD = 4


class BatchThreads:
    """Runs a function on contiguous row ranges of a batch, each on its own thread with its share of
    the caller's intra-op threads (``torch.get_num_threads() // workers``, at least one), and returns
    the results in row order.

    Why: PyTorch parallelises each operation across the cores (intra-op); the networks ddpm trains on
    a CPU are small, most of their operations too small for that to pay (a barrier per operation,
    uneven shares), and in bf16 the second of two cores bought only 1.3-1.4x. One share of the batch
    per core instead measured 1.4-1.6x on a bf16 training step and 1.1-1.5x on a network evaluation
    of the ``small`` U-Net (2 cores with AMX; ``benchmarks/train_speed.py``), 1.3-1.4x and 1.3x in
    fp32 (``tiny``: 1.2x / 1.1x fp32, 1.4x / 1.3x bf16; ``cifar10``: 1.14x / 1.0x fp32, 1.0x bf16),
    so "auto" uses it for every image network on a CPU (``resolve_batch_threads``). The caller's grad
    mode, inference mode and CPU autocast, which PyTorch keeps per thread, apply in the workers too. Results equal the whole batch's up to float
    rounding. With two workers they are also reproducible: a backward pass accumulates one gradient
    per share, and a sum of two is the same whichever thread finishes first (with more, the order of
    the sum can change from run to run).
    """

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ConfigError(f"batch threads must be >= 1, got {workers}")
        self.workers = workers
        self._pool = None
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ddpm-batch")

    def parts(self, n: int) -> list[slice]:
        """The row ranges of a batch of n: near-equal, contiguous, at least MIN_ROWS_PER_THREAD each."""
        k = max(1, min(self.workers, n // MIN_ROWS_PER_THREAD))
        bounds = [n * i // k for i in range(k + 1)]
        return [slice(a, b) for a, b in itertools.pairwise(bounds)]

    def map(self, fn, n: int) -> list:
        """[fn(rows) for rows in self.parts(n)], the parts computed concurrently."""
        parts = self.parts(n)
        if self._pool is None or len(parts) == 1:
            return [fn(rows) for rows in parts]
        threads = torch.get_num_threads()
        state = (
            max(1, threads // len(parts)),
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
        )
        try:
            futures = [self._pool.submit(_in_worker, fn, rows, state) for rows in parts]
            return [f.result() for f in futures]
        finally:
            # A worker's set_num_threads(1) also sets the process-wide defaults (MKL's, new threads'):
            # give them back to the caller.
            torch.set_num_threads(threads)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> BatchThreads:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _in_worker(fn, rows: slice, state):
    intra_op, grad, inference, autocast_on, dtype = state
    torch.set_num_threads(intra_op)
    with (
        torch.inference_mode(inference),
        torch.set_grad_enabled(grad),
        torch.autocast("cpu", dtype=dtype, enabled=autocast_on),
    ):
        return fn(rows)


def parse_batch_threads(setting: int | str) -> int | str:
    """A --batch-threads value as "auto" or a positive int; ConfigError (one line) otherwise."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        return "auto"
    try:
        workers = int(setting)
        if workers != float(setting) or isinstance(setting, bool):
            raise ValueError
    except (TypeError, ValueError):
        workers = 0
    if workers < 1:
        raise ConfigError(f"--batch-threads must be auto or a positive integer, got {setting!r}")
    return workers


def resolve_batch_threads(setting: int | str, device: torch.device, *, images: bool = True) -> int:
    """The number of batch threads (``BatchThreads``) of a --batch-threads value: a positive integer
    as given on a CPU; "auto" 2 for an image network on a CPU with two or more intra-op threads
    (``torch.get_num_threads()``; on more cores each share gets half of them: measured on 2 cores
    only, and two shares keep runs reproducible), else 1: the points MLP's operations are too small
    for a thread (``ddpm train --data moons``: 15-16k images/s in two shares, 20k on the whole
    batch). Always 1 on a GPU, whose kernels are not split this way."""
    setting = parse_batch_threads(setting)
    if device.type != "cpu":
        return 1
    if setting == "auto":
        return min(2, torch.get_num_threads()) if images else 1
    return setting


def split_batch(network, threads: BatchThreads):
    """``network(x, t, **kwargs)`` computed in row shares on ``threads`` (itself when there is one):
    every argument whose first dimension is the batch's is split with x; the rest go to every share."""
    if threads.workers == 1:
        return network

    def run(x, t, **kwargs):
        n = x.shape[0]

        def share(rows):
            cut = lambda v: v[rows] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v  # noqa: E731
            return network(x[rows], cut(t), **{k: cut(v) for k, v in kwargs.items()})

        return torch.cat(threads.map(share, n))

    return run
