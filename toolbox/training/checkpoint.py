"""Checkpoint files: one ``state.pt`` per Ray checkpoint directory, loaded with ``weights_only=True``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from toolbox.config.registry import ConfigError

STATE_FILE = "state.pt"
META_FILE = "meta.json"  # epoch and val loss, to pick a checkpoint without unpickling tensors


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    directory = Path(directory)
    torch.save(state, directory / STATE_FILE)
    meta = {"epoch": state["epoch"], "global_step": state["global_step"], "val_loss": state["val_loss"]}
    (directory / META_FILE).write_text(json.dumps(meta))


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--resume: no {STATE_FILE} in {directory}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file surfaces as many error types
        raise ConfigError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as is; a run or trial dir: its latest checkpoint (highest epoch, then newest)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"--resume: {path} does not exist")
    if (path / STATE_FILE).is_file():
        return path
    candidates = []
    for state in path.rglob(STATE_FILE):
        try:
            epoch = json.loads((state.parent / META_FILE).read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            epoch = -1
        candidates.append((epoch, state.stat().st_mtime, state.parent))
    if not candidates:
        raise ConfigError(f"--resume: no checkpoint ({STATE_FILE}) under {path}")
    return max(candidates)[2]
