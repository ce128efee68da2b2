"""A sweep's trial dirs: each trial's best checkpoint in best/, swapped in whole, and no dir that Tune's record does not name.

A trial copies its best checkpoint so far into best/ (Tune keeps only its latest ones): staged beside
it, then swapped in by two renames. A failed copy (a full disk) leaves nothing staged; a process
killed between the renames leaves a swap that the next start completes, or rolls back.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pyarrow.fs

from toolbox.distributed.locations import Place
from toolbox.training.checkpoint import META_FILE

BEST_DIR = "best"
STAGED, MOVED_ASIDE = f".{BEST_DIR}.partial", f".{BEST_DIR}.old"
# Tune names a trial's dir <trainable>_<trial id>_<index>_<config>_<date>; the trial id is <experiment>_<5 digits>.
TRIAL_DIR = re.compile(r"_([0-9a-f]+_\d{5})_")

log = logging.getLogger("toolbox")


def keep_as_best(checkpoint: Path, trial: Place) -> None:
    """Copy ``checkpoint`` into the trial's best/, whole or not at all."""
    best, staged, old = trial.local / BEST_DIR, trial.local / STAGED, trial.local / MOVED_ASIDE
    recover_best(trial.local)
    try:
        staged.mkdir()
        # meta.json last: a staged copy holding it is complete.
        for file in sorted(checkpoint.iterdir(), key=lambda f: f.name == META_FILE):
            shutil.copyfile(file, staged / file.name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if best.exists():
        best.rename(old)
    staged.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    if trial.mirror is not None:
        for file in sorted(best.iterdir(), key=lambda f: f.name == META_FILE):
            trial.mirror.push(trial.local, f"{BEST_DIR}/{file.name}")


def _complete(staged: Path) -> bool:
    try:
        json.loads((staged / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def recover_best(trial_dir: Path) -> None:
    """Complete or roll back a best/ swap that a killed process left half done, then remove what the swap left."""
    best, staged, old = trial_dir / BEST_DIR, trial_dir / STAGED, trial_dir / MOVED_ASIDE
    if not best.exists():
        if _complete(staged):
            staged.rename(best)
        elif old.is_dir():
            old.rename(best)
    for leftover in trial_dir.glob(f".{BEST_DIR}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def tidy(exp: Place, restoring: bool) -> None:
    """Before a sweep starts: remove the trial dirs that Tune's saved record does not name (all of them when
    there is no record to restore from; none when it is unreadable), and finish each half-done best/ swap.

    A trial that started after the last snapshot Tune could save (a full disk, a killed driver) is
    not in that record, and Tune starts it again under a new dir name: its old dir would be an orphan."""
    known = _recorded_trial_dirs(exp) if restoring else set()
    trial_dirs = [
        info
        for info in exp.fs.get_file_info(pyarrow.fs.FileSelector(exp.path, allow_not_found=True))
        if info.type == pyarrow.fs.FileType.Directory and TRIAL_DIR.search(info.base_name)
    ]
    for info in trial_dirs:
        if known is None or info.base_name in known:
            continue
        log.info("removing trial dir %s: no trial of the sweep's saved record writes there", info.path)
        exp.fs.delete_dir(info.path)
        shutil.rmtree(exp.local / info.base_name, ignore_errors=True)
    if exp.local.is_dir():
        for trial_dir in exp.local.iterdir():
            if trial_dir.is_dir() and TRIAL_DIR.search(trial_dir.name):
                recover_best(trial_dir)


def _recorded_trial_dirs(exp: Place) -> set[str] | None:
    from toolbox.tuning.snapshots import saved_trials

    try:
        trials = saved_trials(exp.fs, exp.path)
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("no trial list in %s (%s): its trial dirs are kept as they are", exp.path, exc)
        return None
    return {Path(trial.path).name for trial in trials}
