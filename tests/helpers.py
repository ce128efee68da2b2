"""Shared test helpers: tiny data for every registered dataset, the training loop without Ray, checks of weights."""

from __future__ import annotations

import json
import os
import re
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


def cli(module: str, args: tuple[str, ...], dashboard: bool) -> list[str]:
    """``python -m toolbox.<module> ARGS``; without ``dashboard``, a command that starts a Ray starts it without its
    dashboard, whose processes would take CPU from the tests beside it (the tests of the dashboard ask for it)."""
    starts_ray = module in ("run", "sweep", "lr_find")
    return [sys.executable, "-m", f"toolbox.{module}", *args, *(() if dashboard or not starts_ray else ("--no-dashboard",))]


def run_cli(
    module: str, *args: str, timeout: float = 300, dashboard: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m toolbox.<module> ...`` to its end, its stdout and stderr captured as text; ``env``: variables to add."""
    return subprocess.run(
        cli(module, args, dashboard),
        cwd=ROOT,
        env=python_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(
    module: str, *args: str, under: tuple[str, ...] = (), dashboard: bool = False, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python -m toolbox.<module> ...`` in a session of its own, stdout and stderr as one text pipe;
    ``under`` is a command it runs under, e.g. ``("timeout", "600")``."""
    return subprocess.Popen(
        [*under, *cli(module, args, dashboard)],
        cwd=ROOT,
        env=python_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


REGISTRY_TESTS = ("tests/test_components.py", "tests/test_fused.py")
OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|SKIPPED|FAILED|ERROR|XFAIL|XPASS)\b", re.MULTILINE)


def assert_registry_tests_pass(module: Path) -> None:
    """The registry-parametrized tests, run on the components ``module`` registers (imported as ``--import`` does):
    each component gets tests collected, and at least one passes; none fails."""
    names = re.findall(r"\.register\(\s*\"([^\"]+)\"", module.read_text())
    assert names, f"{module} registers no component"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "0", "-v", "-p", "no:cacheprovider", *REGISTRY_TESTS, "-k", " or ".join(names)],
        cwd=ROOT,
        env={**os.environ, "TOOLBOX_TEST_IMPORTS": str(module)},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    outcomes = OUTCOME.findall(done.stdout)
    for name in names:
        # A parametrized test's id holds the component's name between [, - and ].
        own = [(test, outcome) for test, outcome in outcomes if re.search(rf"[\[-]{re.escape(name)}[\]-]", test)]
        assert own, f"no registry test was collected for {name}: {done.stdout[-3000:]}"
        assert any(outcome == "PASSED" for _, outcome in own), f"no registry test passed for {name}: {own}"


class ShiftedSamples(torch.utils.data.Dataset):
    """Tensors as a map-style Dataset with a per-sample transform: each sample shifted by a random amount
    drawn from torch's generator (in a DataLoader worker, the one the loader seeds)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, jitter: float):
        self.x, self.y, self.jitter = x, y, jitter

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index].float() + self.jitter * torch.randn(()), self.y[index]


def register_map_style_dataset(monkeypatch) -> dict:
    """Register ``test_map_style`` for this test only (DummyDataset's tensors of 16 values as DatasetSplits); its config keys."""
    from toolbox.components.datasets import DATASETS, dummy_dataset
    from toolbox.data.splits import DatasetSplits

    monkeypatch.setattr(DATASETS, "_components", dict(DATASETS._components))

    @DATASETS.register("test_map_style", prefix="test")
    def map_style(seed: int, /, *, jitter: float = 0.0) -> DatasetSplits:
        """DummyDataset's tiny tensors, read sample by sample.

        Args:
            jitter: standard deviation of a random shift of each training sample's values.
        """
        tensors = dummy_dataset(seed, n_samples=64, val_n_samples=32, input_shape=(16,))
        train, val = ShiftedSamples(tensors.train_x, tensors.train_y, jitter), ShiftedSamples(tensors.val_x, tensors.val_y, 0.0)
        return DatasetSplits(train, val, tensors.target)

    return {"dataset": "test_map_style"}
