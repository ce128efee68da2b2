"""``DatasetSplits``: a dataset as map-style ``torch.utils.data.Dataset`` splits, read through a ``DataLoader``.

Each sample is ``(inputs, target)`` after the dataset's own per-sample transforms (normalization
included). The order of samples is the tensor path's (``phases.epoch_order``: per seed, epoch and
rank), handed to the DataLoader as its batches, so a resumed run reads what the uninterrupted one
would; its worker processes are seeded per run, epoch and rank too. It does not travel through
Ray's object store: each training process builds it by calling the dataset component itself.
``tensor_splits`` reads a ``TensorData``'s tensors this way, one sample at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from toolbox.config.registry import ConfigError
from toolbox.data.tensors import DataSpec, Target, TensorData

BUILD_IN_EACH_PROCESS = {"build": True}  # what stands for a DatasetSplits where TensorData shares its tensors


@dataclass
class DatasetSplits:
    train: Dataset  # map-style: len() and [index] -> (inputs tensor, target)
    val: Dataset
    target: Target
    loader_workers: int = 0  # DataLoader worker processes (set from the config's loader_workers)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where batches are moved to

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            dataset = getattr(self, split)
            if len(dataset) == 0:
                raise ConfigError(f"the {split} split has no samples")
            inputs, target = self._first(split, 1)[0]
            if split == "train":
                self.sample_shape = tuple(getattr(inputs, "shape", ()))
            if not isinstance(inputs, torch.Tensor) or tuple(inputs.shape) != self.sample_shape:
                raise ConfigError(f"{split} samples must be tensors of one shape, got {getattr(inputs, 'shape', type(inputs))}")
            target = torch.as_tensor(target)
            if (self.target.kind == "real") != target.is_floating_point() or (
                self.target.kind == "real" and tuple(target.shape) != self.target.shape
            ):
                raise ConfigError(f"the {split} split's first target {target.tolist()} is not one of the data's {self.target}")

    def _first(self, split: str, count: int) -> list:
        """The split's first samples, read without moving torch's generator (a random transform may draw from it)."""
        with torch.random.fork_rng(devices=[]):
            return [getattr(self, split)[i] for i in range(count)]

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.sample_shape, self.target.num_outputs, self.target)

    def size(self, split: str) -> int:
        return len(getattr(self, split))

    def first_inputs(self, count: int) -> torch.Tensor:
        return torch.stack([inputs for inputs, _ in self._first("train", count)])

    def to(self, device: torch.device) -> DatasetSplits:
        moved = copy.copy(self)
        moved.device = torch.device(device)
        return moved

    def to_shared(self) -> dict:
        return BUILD_IN_EACH_PROCESS

    def batches(self, split: str, order: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """(inputs, targets) on the device, ``batch_size`` samples at a time in ``order``, read by the DataLoader's workers.

        ``seed`` seeds the workers' random draws (a per-sample random transform draws the same on a resumed run)."""
        loader = DataLoader(
            getattr(self, split),
            batch_sampler=[order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)],
            num_workers=self.loader_workers,
            generator=torch.Generator().manual_seed(seed),
            pin_memory=self.device.type == "cuda",
        )
        for inputs, targets in loader:
            if self.target.kind == "real":
                targets = targets.float()
            yield inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)


class TensorSamples(Dataset):
    """One split of a ``TensorData`` as a map-style dataset: each sample normalized on its own."""

    def __init__(self, data: TensorData, split: str):
        self.data, self.split = data, split

    def __len__(self) -> int:
        return self.data.size(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = getattr(self.data, f"{self.split}_x"), getattr(self.data, f"{self.split}_y")
        return self.data.normalize(x[index]), y[index]


def tensor_splits(data: TensorData, loader_workers: int = 0) -> DatasetSplits:
    """``data``'s train and val splits read sample by sample through a DataLoader, computing what its batches do."""
    return DatasetSplits(TensorSamples(data, "train"), TensorSamples(data, "val"), data.target, loader_workers)
