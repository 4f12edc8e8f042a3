"""Everything a training run must carry from one step to the next, and into a checkpoint.

``TrainState`` holds the model, its EMA, the optimizer (and fp16 gradient scaler), the data order, the
generator of t and eps, the global generators (weight initialisation, dropout), the objective's own
state (the importance sampler's history), the step, the training time so far and the non-finite-loss
counters. ``state_dict()`` turns it into checkpoint tensor groups + JSON metadata, and
``load_state_dict()`` restores it bit-exactly: a run resumed from a checkpoint takes the same steps as
one that never stopped.

Devices: tensors are saved from the CPU (a checkpoint written on a GPU loads on a CPU and back); data
order and the t/eps generator always live on the CPU, so they draw the same numbers on every device;
the CUDA generator (dropout on a GPU) is saved too and restored when the run resumes on CUDA.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddpm.checkpoint import Checkpoint, optimizer_state_from_flat, optimizer_state_to_flat
from ddpm.errors import ConfigError, DDPMError, RunDirError
from ddpm.objective import Objective
from ddpm.runs import load_weights

Tensor = torch.Tensor


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of update number ``step`` (0-based): base_lr (step + 1) / warmup_steps during the
    warm-up, then base_lr."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay after update number ``step`` (0-based): min(max_decay, (1 + step) / (10 + step)).

    The warm-up keeps the average from being dominated by the random initial weights early on."""
    return min(max_decay, (1 + step) / (10 + step))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters, fused (one kernel for all of them) where PyTorch has it for
    their device (CUDA; CPU from torch 2.4), the per-tensor implementation elsewhere. Same update up to
    float rounding: 2.5M parameters on 2 CPU cores took 7.5 ms fused against 15.8 ms (one thread)."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # not supported for this device or dtype here
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) model, for every parameter; buffers are copied."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if ema_params:
        # lerp(a, b, w) = a + w (b - a) = (1 - w) a + w b, with w = 1 - decay
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


class DataOrder:
    """Minibatch indices: a fresh random permutation per epoch (each example once per epoch), from a
    generator of its own. Its state (generator, permutation, position) goes into checkpoints so that a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, num_examples: int, seed: int) -> None:
        if num_examples < 1:
            raise DDPMError("the data set is empty")
        self.num_examples = num_examples
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(num_examples, generator=self.generator)
        self.pos = 0

    def next(self, batch_size: int) -> Tensor:
        parts, need = [], batch_size
        while need > 0:
            if self.pos >= self.num_examples:
                self.perm = torch.randperm(self.num_examples, generator=self.generator)
                self.pos = 0
            take = self.perm[self.pos : self.pos + need]
            self.pos += take.numel()
            need -= take.numel()
            parts.append(take)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"data.perm": self.perm, "data.generator": self.generator.get_state()}, {
            "pos": self.pos
        }

    def restore(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        if tensors["data.perm"].numel() != self.num_examples:
            raise ConfigError(
                f"the data set now has {self.num_examples} examples, the run was trained on "
                f"{tensors['data.perm'].numel()}"
            )
        self.perm = tensors["data.perm"].clone()
        self.generator.set_state(tensors["data.generator"].clone())
        pos = int(info["pos"])
        if not 0 <= pos <= self.num_examples:
            raise ValueError(f"data order position {pos} outside [0, {self.num_examples}]")
        self.pos = pos


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


def _counters(meta: dict[str, Any]) -> tuple[float, int, int]:
    """(training seconds so far, non-finite updates skipped, of them in a row) of a checkpoint's
    meta; ValueError for values no run writes."""
    nonfinite = meta.get("nonfinite", {})
    elapsed = float(meta.get("elapsed_s", 0.0))
    skipped, streak = int(nonfinite.get("skipped", 0)), int(nonfinite.get("streak", 0))
    if not (math.isfinite(elapsed) and elapsed >= 0 and 0 <= streak <= skipped):
        raise ValueError(f"elapsed_s {elapsed}, nonfinite {nonfinite}")
    return elapsed, skipped, streak


class TrainState:
    """The mutable state of a run (see the module docstring); ``step`` counts updates taken or skipped."""

    def __init__(
        self,
        model: torch.nn.Module,
        ema: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        order: DataOrder,
        noise_generator: torch.Generator,
        objective: Objective,
        *,
        scaler=None,
        extra_generators: dict[str, torch.Generator] | None = None,
    ) -> None:
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.order, self.noise_generator, self.objective = order, noise_generator, objective
        self.scaler = scaler
        # Further CPU generators of the run (e.g. random flips), saved and restored by name.
        self.extra_generators = dict(extra_generators or {})
        self.step = 0
        self.elapsed_s = 0.0  # training seconds of earlier invocations
        self.skipped = 0  # non-finite losses (each skipped its update) in the whole run
        self.streak = 0  # ... in a row

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_dict(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """(tensor groups "model", "ema", "train_state"; JSON metadata) for ``save_checkpoint``."""
        optim_tensors, optim_structure = optimizer_state_to_flat(self.optimizer.state_dict())
        order_tensors, order_info = self.order.state()
        train_state = {f"optim.{k}": v for k, v in optim_tensors.items()}
        train_state.update(order_tensors)
        train_state["rng.torch"] = torch.get_rng_state()
        train_state["rng.noise"] = self.noise_generator.get_state()
        for name, gen in self.extra_generators.items():
            train_state[f"rng.{name}"] = gen.get_state()
        if self.device.type == "cuda":
            train_state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        train_state.update({f"importance.{k}": v for k, v in self.objective.state_dict().items()})
        tensors = {
            "model": _cpu(self.model.state_dict()),
            "ema": _cpu(self.ema.state_dict()),
            "train_state": _cpu(train_state),
        }
        meta = {
            "optimizer": optim_structure,
            "data_order": order_info,
            "elapsed_s": self.elapsed_s,
            "nonfinite": {"skipped": self.skipped, "streak": self.streak},
        }
        if self.scaler is not None:
            meta["grad_scaler"] = self.scaler.state_dict()
        return tensors, meta

    def load_state_dict(self, ckpt: Checkpoint) -> None:
        """Restore everything from a checkpoint written by ``state_dict`` (on any device)."""
        load_weights(self.model, ckpt.tensors["model"], "model")
        load_weights(self.ema, ckpt.tensors["ema"], "EMA")
        self.step = ckpt.step
        if "train_state" not in ckpt.tensors:
            # Weights only (``ddpm import``): fine-tuning starts with a fresh optimizer, data order
            # and generators, at the checkpoint's step.
            return
        state = ckpt.tensors["train_state"]
        optim = {k.removeprefix("optim."): v for k, v in state.items() if k.startswith("optim.")}
        try:
            self.optimizer.load_state_dict(optimizer_state_from_flat(optim, ckpt.meta["optimizer"]))
            if not self.optimizer.defaults.get("fused"):  # fused there, not available here
                for group in self.optimizer.param_groups:
                    group["fused"] = None
            self.order.restore(state, ckpt.meta["data_order"])
            torch.set_rng_state(state["rng.torch"])
            self.noise_generator.set_state(state["rng.noise"])
            for name, gen in self.extra_generators.items():
                if f"rng.{name}" in state:  # absent in runs from before the generator existed
                    gen.set_state(state[f"rng.{name}"])
            if "rng.cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng.cuda"], self.device)
            prefix = "importance."
            importance = {
                k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)
            }
            if importance or self.objective.importance is not None:
                self.objective.load_state_dict(importance)
            if self.scaler is not None and "grad_scaler" in ckpt.meta:
                self.scaler.load_state_dict(ckpt.meta["grad_scaler"])
            self.elapsed_s, self.skipped, self.streak = _counters(ckpt.meta)
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise RunDirError(f"{ckpt.path}: cannot restore the training state ({err})") from None
        self.step = ckpt.step
