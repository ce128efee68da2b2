"""Checkpoint files: one ``state.pt`` per checkpoint directory, loaded with ``weights_only=True``.

A checkpoint is whole or refused: a truncated, foreign or code-carrying file is a one-line error,
and a run dir's damaged latest checkpoint is skipped for the one before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from toolbox.config.registry import ConfigError

STATE_FILE = "state.pt"
META_FILE = "meta.json"  # epoch and val loss, to pick a checkpoint without unpickling tensors
REQUIRED = ("model", "optimizer", "scheduler", "epoch", "global_step", "rng", "config")

log = logging.getLogger("toolbox")


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    directory = Path(directory)
    torch.save(state, directory / STATE_FILE)
    meta = {"epoch": state["epoch"], "global_step": state["global_step"], "val_loss": state["val_loss"]}
    (directory / META_FILE).write_text(json.dumps(meta))


def checkpoint_files(directory: str | Path) -> dict[str, bytes]:
    """A checkpoint dir's files, to travel between processes that may sit on two nodes."""
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--resume: no {STATE_FILE} in {directory}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated, foreign or malicious file surfaces as many error types
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise ConfigError(f"--resume: {path} is not a readable checkpoint ({reason})") from None
    missing = [key for key in REQUIRED if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(f"--resume: {path} is not a toolbox checkpoint (it has no {', '.join(missing)})")
    for key in ("model", "config"):
        if not isinstance(state[key], dict):
            raise ConfigError(
                f"--resume: {path} is not a toolbox checkpoint (its {key} is a {type(state[key]).__name__}, not a dict)"
            )
    return state


def _epoch(directory: Path) -> int:
    try:
        return int(json.loads((directory / META_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def checkpoints_newest_first(path: Path) -> list[Path]:
    """The checkpoint dirs under a run or trial dir, highest epoch (then newest file) first."""
    found = [(_epoch(state.parent), state.stat().st_mtime, state.parent) for state in path.rglob(STATE_FILE)]
    return [directory for *_, directory in sorted(found, reverse=True)]


def load_latest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint dir as is; a run or trial dir: its latest whole checkpoint, skipping damaged ones (and saying so)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"--resume: {path} does not exist")
    if (path / STATE_FILE).is_file():
        return path, load_state(path)
    candidates = checkpoints_newest_first(path)
    if not candidates:
        raise ConfigError(f"--resume: no checkpoint ({STATE_FILE}) under {path}")
    found = first_whole(candidates)
    if found is None:
        raise ConfigError(f"--resume: every checkpoint under {path} is damaged ({len(candidates)} tried)")
    return found


def first_whole(candidates: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The first of ``candidates`` that loads whole, and its state; each damaged one before it is skipped, saying so."""
    for directory in candidates:
        try:
            return directory, load_state(directory)
        except ConfigError as exc:
            log.warning("skipping damaged checkpoint %s: %s", directory, str(exc).removeprefix("--resume: "))
    return None


def find_checkpoint(path: str | Path) -> Path:
    return load_latest(path)[0]
