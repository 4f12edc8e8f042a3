"""Data-parallel training under ``torchrun``: the process group, who writes, and the batch split.

``torchrun --nproc_per_node=N -m ddpm train ...`` starts N processes with WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in their environment. ``setup()`` reads them and joins the process group
with the backend of the training device (NCCL for CUDA, one GPU per LOCAL_RANK; gloo for the CPU); without WORLD_SIZE > 1 it does nothing and training runs in one process as usual.

The split that makes N processes compute the one-process step: every rank draws the *global* batch
(data indices, t, eps) from identically seeded generators and keeps the rows
``rank * B / N : (rank + 1) * B / N`` (``shard``). Each rank's loss is the mean over its rows, and
DistributedDataParallel averages the gradients over ranks, so the update is that of the mean over
all B rows: the same as one process with batch B, up to the order of the float reductions (and up
to dropout, whose masks are drawn per rank). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ddpm.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True if setup() created the process group (and teardown ends it)
    device: str = "cpu"  # where the tensors that are all-reduced live

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, batch_size: int) -> slice:
        """The rows of a global batch this rank computes (all of them when not distributed)."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"{name} in the environment must be an integer, got {value!r}") from None


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 outside torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """RANK from the environment (0 outside torchrun): lets the CLI print only on rank 0."""
    return _env_int("RANK", 0)


def backend_for(device: str) -> str:
    """NCCL for tensors on CUDA devices, gloo for tensors in CPU memory."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def setup(device: str = "cpu") -> Dist:
    """Join the process group torchrun describes in the environment, or return the one-process Dist.

    ``device``: where training runs ("cpu", or "cuda" for this rank's LOCAL_RANK GPU)."""
    world_size = env_world_size()
    if world_size <= 1:
        return Dist()
    import torch.distributed as dist

    env_rank()  # a malformed RANK gets our one-line error, not the process group's
    local_rank = _env_int("LOCAL_RANK", 0)
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns, device)


def teardown(d: Dist) -> None:
    """Destroy the process group setup() created. With gloo, a group DistributedDataParallel used
    stays alive in C++ after this (PyTorch 2.13: its threads still run), so a process that ends
    should leave without interpreter finalization, as ``ddpm.cli.run`` does for torchrun ranks."""
    if d.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel (which averages gradients over ranks), or itself."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if torch.device(d.device).type == "cuda":
        return DistributedDataParallel(model, device_ids=[d.local_rank])
    return DistributedDataParallel(model)


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def mean_and_flags(
    d: Dist, value: float, flags: tuple[bool, ...]
) -> tuple[float, tuple[bool, ...]]:
    """(mean of ``value`` over ranks, for each flag whether any rank raised it): one all-reduce per
    step, so that every rank sees the same loss (and skips the same non-finite updates) and stops at
    the same step (a Ctrl-C, SIGTERM or deadline seen by one rank stops all)."""
    if not d.enabled:
        return value, flags
    import torch.distributed as dist

    buf = torch.tensor(
        [value / d.world_size, *map(float, flags)], dtype=torch.float64, device=d.device
    )
    dist.all_reduce(buf)
    return float(buf[0]), tuple(bool(f > 0) for f in buf[1:].tolist())


def gather_rows(d: Dist, rows: torch.Tensor) -> torch.Tensor:
    """The global batch's values from every rank's shard ([B/N] each, concatenated in rank order:
    shards are consecutive rows), or ``rows`` itself when not distributed."""
    if not d.enabled:
        return rows
    import torch.distributed as dist

    parts = [torch.empty_like(rows) for _ in range(d.world_size)]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)
