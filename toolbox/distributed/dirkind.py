"""A run dir, a sweep dir and an LR range test's dir each say what they are, so that no command writes into,
deletes or resumes from another's (all default to ./ray_results, and a sweep is named after its file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.fs

from toolbox.config.registry import ConfigError
from toolbox.distributed.locations import LOCK_FILE, Place

KIND_FILE = ".toolbox-kind"
RUN, SWEEP, LR_FIND = "run", "sweep", "lr_find"
WRITERS = {RUN: "toolbox.run", SWEEP: "toolbox.sweep", LR_FIND: "toolbox.lr_find"}
# What dirs written before KIND_FILE existed hold at their top level.
SWEEP_SIGNS = ("experiment_state-", "tuner.pkl", "results.parquet", "best.json", "run_trial_")
RUN_SIGNS = ("config.json", "resources.json", "epochs.csv", "epochs.parquet", "training.log", "checkpoint_")
# What a start that failed before training leaves: no kind.
NEUTRAL = {LOCK_FILE, KIND_FILE, "ray_session.json", "summary.json"}


def _names(exp: Place) -> set[str]:
    try:
        entries = exp.fs.get_file_info(pyarrow.fs.FileSelector(exp.path, allow_not_found=True))
    except OSError as exc:
        raise ConfigError(f"{exp.path}: cannot list it ({' '.join(str(exc).split())[:300]})") from None
    return {info.base_name for info in entries}


def kind_of(exp: Place) -> str | None:
    """RUN, SWEEP, LR_FIND, or None for a dir that is absent, empty or holds no kind's files."""
    names = _names(exp)
    if KIND_FILE in names:
        with exp.fs.open_input_stream(f"{exp.path}/{KIND_FILE}") as marker:
            said = marker.read().decode(errors="replace").strip()
        if said in WRITERS:
            return said
    if any(name.startswith(SWEEP_SIGNS) for name in names):
        return SWEEP
    if any(name.startswith(RUN_SIGNS) for name in names):
        return RUN
    return None


def holds_nothing(exp: Place) -> bool:
    """Absent, or only what a start that failed before training leaves."""
    return not (_names(exp) - NEUTRAL)


def refuse_unless(exp: Place, kind: str, flag: str = "--name") -> None:
    """Refuse a dir that holds another kind's files (one line, nothing touched)."""
    found = kind_of(exp)
    if found is not None and found != kind:
        raise ConfigError(
            f"{exp.path} holds a {found} (written by {WRITERS[found]}), not a {kind}: give this {kind} another {flag} or --storage"
        )


def mark(exp: Place, kind: str) -> None:
    """Say what the dir is, before anything else is written in it."""
    exp.fs.create_dir(exp.path, recursive=True)
    with exp.fs.open_output_stream(f"{exp.path}/{KIND_FILE}") as marker:
        marker.write(kind.encode())
    if exp.remote:
        exp.local.mkdir(parents=True, exist_ok=True)


def empty(exp: Place) -> None:
    """Delete what the sweep dir holds (and its local staging copy), but the lock."""
    for info in exp.fs.get_file_info(pyarrow.fs.FileSelector(exp.path, allow_not_found=True)):
        if info.base_name == LOCK_FILE:
            continue
        exp.fs.delete_dir(info.path) if info.type == pyarrow.fs.FileType.Directory else exp.fs.delete_file(info.path)
    if exp.remote and exp.local.exists():
        for entry in exp.local.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def sweep_holding(path: Path) -> Path | None:
    """The local sweep dir that ``path`` (a checkpoint of one of its trials, say) lies in, if any."""
    from toolbox.distributed.storage import atomic_local_files

    fs = atomic_local_files()
    for parent in Path(path).resolve().parents:
        if kind_of(Place(fs, str(parent.parent), str(parent), parent, remote=False)) == SWEEP:
            return parent
    return None
