"""The in-memory data set record that every source returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm.errors import DataError


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A whole data set held as tensors.

    ``x`` is float32: images [N, C, H, W] scaled to [-1, 1], or points [N, D] (2-D toy data, scaled to
    roughly unit standard deviation, not clipped). ``y`` is int64 [N] class labels where the data has
    them. ``density`` is the exact density (a ``ddpm.oracle.GaussianMixture``) where it is known.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    name: str
    num_classes: int | None = None
    density: object | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.ndim not in (2, 4):
            raise DataError(
                f"{self.name}: expected float32 x of rank 2 or 4, got {self.x.dtype} "
                f"{tuple(self.x.shape)}"
            )
        if self.y is not None and (self.y.dtype != torch.int64 or self.y.shape != self.x.shape[:1]):
            raise DataError(
                f"{self.name}: expected int64 labels [{self.x.shape[0]}], got {self.y.dtype} "
                f"{tuple(self.y.shape)}"
            )

    @property
    def kind(self) -> str:
        """ "image" for [N, C, H, W] data, "points" for [N, D]."""
        return "image" if self.x.ndim == 4 else "points"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one example: (C, H, W) or (D,)."""
        return tuple(int(s) for s in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])
