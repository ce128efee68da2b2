"""``TensorData``: a dataset decoded once into tensors, batched by index (no per-sample Python transforms).

Inputs may stay uint8 and are normalized per batch: cheap, and it keeps the shared copy small.
A dataset declares its shape (``sample_shape``) and its ``Target`` (class indices with a class count,
or real values of a shape per sample): models, criteria and metrics are built and checked from them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from toolbox.config.registry import ConfigError

TENSORS = ("train_x", "train_y", "val_x", "val_y")


@dataclass(frozen=True)
class Target:
    """What a dataset's targets are: class indices (``Target.classes(10)``) or real values (``Target.real((3,))``)."""

    kind: Literal["classes", "real"]
    num_classes: int = 0  # classes only
    shape: tuple[int, ...] = ()  # real values only: one sample's target shape

    @classmethod
    def classes(cls, num_classes: int) -> Target:
        return cls("classes", num_classes=num_classes)

    @classmethod
    def real(cls, shape: tuple[int, ...] = (1,)) -> Target:
        return cls("real", shape=tuple(shape))

    @property
    def num_outputs(self) -> int:
        """The model outputs per sample: a logit per class, or one per real value."""
        return self.num_classes if self.kind == "classes" else math.prod(self.shape)

    def __str__(self) -> str:
        if self.kind == "classes":
            return f"class labels ({self.num_classes} classes)"
        return f"real-valued targets (shape {list(self.shape)})"


class DataSpec(NamedTuple):
    """What a model is built for (one sample's shape, the outputs per sample), and what its targets are."""

    sample_shape: tuple[int, ...]
    num_outputs: int
    target: Target | None = None  # None: class labels, one class per output

    @property
    def targets(self) -> Target:
        return self.target or Target.classes(self.num_outputs)


@dataclass
class TensorData:
    train_x: torch.Tensor  # [N, *sample_shape]
    train_y: torch.Tensor  # [N] int64 class indices, or [N, *target.shape] real values (float32)
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int | None = None  # class labels: their count (or give ``target``)
    scale: float = 1.0  # x * scale, then (x - mean) / std, applied per batch
    mean: float = 0.0
    std: float = 1.0
    target: Target | None = None  # None: Target.classes(num_classes)

    def __post_init__(self) -> None:
        if self.target is None:
            if self.num_classes is None:
                raise ConfigError("a dataset gives its class count (num_classes) or its target (Target.real(shape))")
            self.target = Target.classes(self.num_classes)
        elif self.target.kind == "classes":
            self.num_classes = self.target.num_classes
        else:
            self.train_y, self.val_y = self.train_y.float(), self.val_y.float()
        for split in ("train", "val"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if len(x) == 0:
                raise ConfigError(f"the {split} split has no samples")
            if len(x) != len(y):
                raise ConfigError(f"the {split} split has {len(x)} samples but {len(y)} labels")
            if x.shape[1:] != self.train_x.shape[1:]:
                raise ConfigError(f"val samples have shape {list(x.shape[1:])}, train samples {list(self.train_x.shape[1:])}")
            if self.target.kind == "real":
                if tuple(y.shape[1:]) != self.target.shape:
                    raise ConfigError(f"the {split} targets have shape {list(y.shape[1:])}, the data's target {self.target}")
                continue
            if y.is_floating_point():
                raise ConfigError(f"the {split} labels are {y.dtype}: class labels are integers (or give Target.real(shape))")
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise ConfigError(
                    f"the {split} labels run from {low} to {high}, outside the {self.num_classes} classes 0..{self.num_classes - 1}"
                )
        if not self.std > 0:
            raise ConfigError(f"the data's std must be > 0, got {self.std}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.sample_shape, self.target.num_outputs, self.target)

    def size(self, split: str) -> int:
        return len(getattr(self, f"{split}_y"))

    def first_inputs(self, count: int) -> torch.Tensor:
        return self.normalize(self.train_x[:count])

    def batches(
        self, split: str, order: torch.Tensor, batch_size: int, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``batch``es of ``batch_size`` samples in ``order`` (``seed`` is for data read by worker processes: none here)."""
        order = order.to(self.train_x.device)
        for i in range(0, len(order), batch_size):
            yield self.batch(split, order[i : i + batch_size])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x * scale - mean) / std`` in float32, as a multiply into a new tensor and an in-place add.
        ``x`` is never written; with nothing to scale, float32 ``x`` itself is returned."""
        if self.scale == 1.0 and self.mean == 0.0 and self.std == 1.0:
            return x.float()
        return torch.mul(x.float(), self.scale / self.std).add_(-self.mean / self.std)

    def batch(self, split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized inputs and the targets of ``split`` ("train" or "val") at ``index``.

        ``index_select``, not ``x[index]``: advanced indexing of uint8 rows is many times slower on CPU."""
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        return self.normalize(x.index_select(0, index)), y.index_select(0, index)

    def to_shared(self) -> dict:
        """Numpy arrays for ``ray.put``: every worker and trial on a node then reads one zero-copy copy."""
        out = {k: getattr(self, k).numpy() for k in TENSORS}
        return out | {"target": self.target, "scale": self.scale, "mean": self.mean, "std": self.std}

    @classmethod
    def from_shared(cls, shared: dict) -> TensorData:
        with warnings.catch_warnings():  # the object store's arrays are read-only; we never write them
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(shared[k]) for k in TENSORS}
        return cls(**tensors, **{k: v for k, v in shared.items() if k not in TENSORS})

    def to(self, device: torch.device) -> TensorData:
        """A copy on ``device``. On a GPU the inputs are normalized once there: fewer kernels per step."""
        moved = {k: getattr(self, k).to(device) for k in TENSORS}
        if torch.device(device).type != "cuda":
            return TensorData(**moved, target=self.target, scale=self.scale, mean=self.mean, std=self.std)
        for key in ("train_x", "val_x"):
            moved[key] = self.normalize(moved[key])
        return TensorData(**moved, target=self.target)
