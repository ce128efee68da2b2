"""A user's own components for Fashion-MNIST: the dataset, read from Debian's `dataset-fashion-mnist`, and a CNN.

Nothing here is part of toolbox: `toolbox.sweep fashion_sweep.py` imports this module through the sweep file's
`import fashion`, and `toolbox.run --import fashion.py` does the same for one run.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolbox.components.datasets import DATASETS
from toolbox.components.models import MODELS
from toolbox.config.registry import ConfigError, Fraction, PositiveInt
from toolbox.data.tensors import TensorData

FILES = {  # split -> (images, labels), gzipped IDX files as Debian ships them
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx_gz(path: Path) -> np.ndarray:
    """The uint8 array of a gzipped IDX file (magic 0x0801 labels, 0x0803 images)."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise ConfigError(
            f"{path}: cannot read it ({exc}); apt-get install dataset-fashion-mnist, or pass --fashion-root"
        ) from None
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_tiny_fashion(directory: Path) -> dict:
    """A few random images per split in Debian's layout, for toolbox's registry-parametrized tests."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("val", 32)):
        images, labels = FILES[split]
        for name, array in ((images, rng.integers(0, 256, (n, 28, 28))), (labels, rng.integers(0, 10, n))):
            header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (Path(directory) / name).write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return {"fashion_root": str(directory)}


@DATASETS.register("FashionMNIST", prefix="fashion", tiny=write_tiny_fashion)
def fashion_mnist(seed: int, /, *, root: str = "/usr/share/datasets/fashion-mnist") -> TensorData:
    """Zalando's Fashion-MNIST: 28x28 grey images of 10 kinds of clothing (60,000 to train, 10,000 to validate).

    Args:
        root: the directory holding the four gzipped IDX files.
    """
    split = {}
    for name, (images, labels) in FILES.items():
        split[f"{name}_x"] = torch.from_numpy(read_idx_gz(Path(root) / images).copy()).unsqueeze(1)
        split[f"{name}_y"] = torch.from_numpy(read_idx_gz(Path(root) / labels).astype(np.int64))
    return TensorData(**split, num_classes=len(CLASSES), scale=1 / 255, mean=0.2860, std=0.3530)


@MODELS.register("FashionNet", prefix="fnet", sample_dims=("channels", "height", "width"))
def fashion_net(
    sample_shape: tuple[int, ...], num_classes: int, /, *, width: PositiveInt = 32, dropout: Fraction = 0.25
) -> nn.Module:
    """Two conv blocks (conv, batch norm, ReLU, 2x2 max-pool), then a hidden layer and the logits.

    Args:
        width: channels of the first block; the second has twice as many.
        dropout: probability of zeroing a hidden unit while training.
    """
    channels, height, width_px = sample_shape

    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(), nn.MaxPool2d(2)]

    features = 2 * width * (height // 4) * (width_px // 4)
    return nn.Sequential(
        *block(channels, width),
        *block(width, 2 * width),
        nn.Flatten(),
        nn.Linear(features, 128),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(128, num_classes),
    )
