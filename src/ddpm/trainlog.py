"""Bookkeeping around the training loop: RUN/log.csv (and TensorBoard scalars), the progress bar,
and stopping on Ctrl-C / SIGTERM.

One row per ``train.log_every`` steps: the window's mean loss and gradient norm, the learning rate,
images per second of the window's training time, and the run's elapsed training seconds.
"""

from __future__ import annotations

import csv
import math
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ddpm.checkpoint import atomic_write_bytes
from ddpm.runs import LOG_FILE

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s")


def prepare_log(path: Path, step: int) -> None:
    """Create log.csv with a header, or drop rows past ``step`` (written after the last checkpoint)."""
    if not path.exists():
        atomic_write_bytes(path, (",".join(LOG_COLUMNS) + "\n").encode())
        return
    original = path.read_text()
    # A row cut short by a crash or a full disk (no newline, or too few fields) is dropped, and so
    # are the rows written after the checkpoint training resumes from.
    rows = list(csv.reader(original[: original.rfind("\n") + 1].splitlines()))
    kept = [rows[0]] if rows else [list(LOG_COLUMNS)]
    kept += [r for r in rows[1:] if len(r) == len(kept[0]) and _row_step(r) <= step]
    text = "".join(",".join(r) + "\n" for r in kept)
    if text != original:
        atomic_write_bytes(path, text.encode())


def _row_step(row: list[str]) -> float:
    try:
        return float(row[0])
    except ValueError:
        return math.inf


class _TensorBoard:
    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            warnings.warn(f"TensorBoard logging skipped ({err})", RuntimeWarning, stacklevel=3)
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TrainLog:
    """RUN/log.csv and TensorBoard: one row per log window, with the window's mean loss and grad norm."""

    def __init__(self, run_dir: Path | None, batch_size: int, tensorboard: bool) -> None:
        """``run_dir`` None (ranks other than 0): keep the numbers, write nothing."""
        self.batch_size = batch_size
        self.file = open(run_dir / LOG_FILE, "a", newline="") if run_dir else None  # see close()
        self.csv = csv.writer(self.file) if self.file else None
        self.tb = _TensorBoard(Path(run_dir or ".") / "tb", tensorboard and run_dir is not None)
        self.last_loss = math.nan
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.grad_norm_sum, self.n, self.train_s = 0.0, 0.0, 0, 0.0

    def add(self, loss: float, grad_norm: float, seconds: float) -> None:
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.n += 1
        self.train_s += seconds

    def write(self, step: int, lr: float, elapsed_s: float) -> None:
        if self.n == 0:
            return
        loss, grad_norm = self.loss_sum / self.n, self.grad_norm_sum / self.n
        images_per_s = self.n * self.batch_size / self.train_s if self.train_s > 0 else 0.0
        row = [
            step,
            f"{loss:.6g}",
            f"{lr:.6g}",
            f"{grad_norm:.6g}",
            f"{images_per_s:.1f}",
            f"{elapsed_s:.1f}",
        ]
        if self.csv is not None:
            self.csv.writerow(row)
            self.file.flush()
        self.tb.scalars(
            step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "images_per_s": images_per_s}
        )
        self.last_loss = loss
        self._reset()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.tb.close()


def progress_bar(enabled: bool, start_step: int, target: int | None, minutes: float | None):
    if not enabled:
        return None
    if target is not None:
        return tqdm(
            total=target, initial=start_step, desc="training", unit="step", dynamic_ncols=True
        )
    # A minutes budget: the bar measures seconds, so its ETA is the deadline.
    return tqdm(
        total=round(60 * minutes),
        desc="training",
        unit="s",
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total}s [{elapsed}<{remaining}{postfix}]",
    )


def update_bar(bar, step: int, loss: float, elapsed: float, by_time: bool) -> None:
    if by_time:
        bar.n = min(bar.total, elapsed)
        rate = (step - bar.initial) / elapsed if elapsed > 0 else 0.0
        bar.set_postfix(step=step, loss=f"{loss:.4f}", it_s=f"{rate:.2f}", refresh=False)
        # An explicit refresh ignores tqdm's mininterval: at most twice a second (a log file holding
        # the output would otherwise get a line per step).
        if elapsed - getattr(bar, "last_drawn", -1.0) >= 0.5:
            bar.refresh()
            bar.last_drawn = elapsed
    else:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM after writing a checkpoint; ``signum`` says
    which. The CLI exits with 128 + signum: 130 for SIGINT, 143 for SIGTERM (the shell convention)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class StopOnInterrupt:
    """First SIGINT (Ctrl-C) or SIGTERM: finish the current step, checkpoint, stop. A second one: stop at
    once. ``flags()`` is (deadline passed, SIGINT, SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, deadline: float | None) -> None:
        self.deadline, self.requested, self.signum = deadline, False, signal.SIGINT
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def flags(self) -> tuple[bool, bool, bool]:
        late = self.deadline is not None and time.monotonic() >= self.deadline
        sigint = self.requested and self.signum == signal.SIGINT
        return late, sigint, self.requested and not sigint

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def stop_reason(flags: tuple[bool, bool, bool]) -> tuple[str | None, int]:
    """(why training stops, or None; the signal) from (deadline passed, SIGINT, SIGTERM)."""
    late, sigint, sigterm = flags
    if sigint or sigterm:
        return "interrupt", signal.SIGINT if sigint else signal.SIGTERM
    return ("minutes" if late else None), signal.SIGINT
