"""Fixtures shared by the test modules. Ray and torch are real everywhere; data is tiny."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # toolbox importable without an install
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> tuple[Path, dict]:
    """ROOT with MNIST/raw/ holding four small IDX files (64 train, 32 val images); and the tensors written."""
    from helpers import write_tiny_mnist

    root = tmp_path_factory.mktemp("mnist")
    return root, write_tiny_mnist(root)


def _tmpfs(tmp_path: Path, size: str):
    """A tmpfs of ``size`` under ``tmp_path``: a real filesystem that fills up (mounting needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs."""
    yield from _tmpfs(tmp_path, "4m")


@pytest.fixture
def sweep_disk(tmp_path):
    """A 32 MB tmpfs: room for a small sweep's checkpoints, until a test fills it."""
    yield from _tmpfs(tmp_path, "32m")


@pytest.fixture
def test_only_components(monkeypatch):
    """An optimizer (``test_rmsprop``) and a model (``test_normed``) that exist only in the test, neither with a stacked form."""
    import torch
    from torch import nn

    from toolbox.components.models import MODELS
    from toolbox.components.optimizers import OPTIMIZERS

    for registry in (OPTIMIZERS, MODELS):
        monkeypatch.setattr(registry, "_components", dict(registry._components))

    @OPTIMIZERS.register("test_rmsprop", prefix="test")
    def rmsprop(params, /, *, lr: float = 1e-3):
        """RMSprop."""
        return torch.optim.RMSprop(params, lr=lr)

    @MODELS.register("test_normed", prefix="test")
    def normed(sample_shape, num_classes, /, *, width: int = 8):
        """Linear, batch norm, linear."""
        return nn.Sequential(
            nn.Flatten(), nn.Linear(sample_shape[0], width), nn.BatchNorm1d(width), nn.Linear(width, num_classes)
        )


class RayStarted(BaseException):
    """Raised instead of starting Ray; a BaseException so that main()'s ``except Exception`` cannot swallow it."""


@pytest.fixture
def ray_never_starts(monkeypatch) -> None:
    """Fail the test if toolbox.run tries to start Ray (bad input must be refused before that)."""
    import toolbox.distributed.cluster

    def start(*args, **kwargs):
        raise RayStarted(f"toolbox.distributed.cluster.start{args} was called")

    monkeypatch.setattr(toolbox.distributed.cluster, "start", start)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def import_test_components() -> None:
    """Import each file ``TOOLBOX_TEST_IMPORTS`` lists (separated by os.pathsep) as toolbox's ``--import`` does,
    before collection: the components it registers join the registry-parametrized tests."""
    from toolbox.config import user_code

    user_code.load(user_code.canonical(filter(None, os.environ.get("TOOLBOX_TEST_IMPORTS", "").split(os.pathsep))))


def pytest_configure(config) -> None:
    """The listed test components are registered; Ray's token (token auth is on by default) is made once,
    before any test starts a Ray: two Rays starting together on a fresh machine would otherwise each write one."""
    import_test_components()
    from ray._private.authentication.authentication_token_setup import generate_and_save_token

    if not (Path.home() / ".ray" / "auth_token").exists():
        generate_and_save_token()
