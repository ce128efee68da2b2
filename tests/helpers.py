"""Shared test helpers: tiny data for every registered dataset, the training loop without Ray, checks of weights."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch

from toolbox.components.datasets import DATASETS
from toolbox.config.resolve import resolve
from toolbox.data.tensors import TensorData
from toolbox.training.checkpoint import STATE_FILE, load_state
from toolbox.training.loop import train
from toolbox.training.session import local_session

ROOT = Path(__file__).resolve().parent.parent
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049

# Small DummyDataset and batch sizes: a step costs milliseconds.
TINY_DUMMY = {"dummy_n_samples": 64, "dummy_val_n_samples": 32}


def tiny_config(directory: Path, **given) -> dict:
    """A resolved config, 2 epochs of 4 steps, on the chosen dataset's own tiny test data (written under DIRECTORY)."""
    dataset = given.get("dataset", resolve({})["dataset"])
    data_keys = DATASETS[dataset].meta["tiny"](Path(directory))
    return resolve({"epochs": 2, "batch_size": 16, **data_keys, **given})


def write_idx_images(path: Path, images: torch.Tensor) -> None:
    """An IDX3 file: magic 2051, count, rows, cols (big-endian uint32), then uint8 pixels."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", IMAGES_MAGIC, n, rows, cols) + images.to(torch.uint8).numpy().tobytes())


def write_idx_labels(path: Path, labels: torch.Tensor) -> None:
    """An IDX1 file: magic 2049, count (big-endian uint32), then uint8 labels."""
    path.write_bytes(struct.pack(">II", LABELS_MAGIC, len(labels)) + labels.to(torch.uint8).numpy().tobytes())


MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "val_x": "t10k-images-idx3-ubyte",
    "val_y": "t10k-labels-idx1-ubyte",
}


def write_tiny_mnist(root: Path, n_train: int = 64, n_val: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """The four MNIST IDX files under ROOT/MNIST/raw, written byte by byte here; returns what was written."""
    g = torch.Generator().manual_seed(seed)
    written = {
        "train_x": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train_y": torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
        "val_x": torch.randint(0, 256, (n_val, 28, 28), generator=g, dtype=torch.uint8),
        "val_y": torch.randint(0, 10, (n_val,), generator=g, dtype=torch.uint8),
    }
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for key, name in MNIST_FILES.items():
        (write_idx_images if key.endswith("_x") else write_idx_labels)(raw / name, written[key])
    return written


def collecting_session(rows: list[dict], checkpoints: Path | None = None):
    """A one-process Session (no Ray): reported rows go to ``rows``, checkpoints are copied to CHECKPOINTS/epoch_N."""

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        rows.append(metrics)
        if checkpoint_dir and checkpoints is not None:
            shutil.copytree(checkpoint_dir, checkpoints / f"epoch_{metrics['epoch']}")

    return local_session(report)


def train_locally(config: dict, data: TensorData, checkpoints: Path | None = None, resume_from: Path | None = None) -> list[dict]:
    """toolbox's training loop in this process; returns the reported rows."""
    rows: list[dict] = []
    train(config, data, collecting_session(rows, checkpoints), str(resume_from) if resume_from else None)
    return rows


def latest_state(run_dir: Path) -> dict:
    """The state.pt of the highest-epoch checkpoint under a run dir (weights_only load)."""
    states = list(run_dir.rglob(STATE_FILE))
    assert states, f"no {STATE_FILE} under {run_dir}"
    epoch = lambda p: json.loads((p.parent / "meta.json").read_text())["epoch"]
    return load_state(max(states, key=epoch).parent)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different}"


def python_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m toolbox.run`` subprocesses (toolbox importable from the repo root)."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m toolbox.<module> ...`` to its end, its stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", f"toolbox.{module}", *args],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(module: str, *args: str, under: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -m toolbox.<module> ...`` in a session of its own, stdout and stderr as one text pipe;
    ``under`` is a command it runs under, e.g. ``("timeout", "600")``."""
    return subprocess.Popen(
        [*under, sys.executable, "-m", f"toolbox.{module}", *args],
        cwd=ROOT,
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
