"""What a sweep trial keeps in its own dir across PBT exploits, retries and kills (the files alone, no Ray)."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
import torch

from toolbox.distributed.locations import Place
from toolbox.training.checkpoint import META_FILE, STATE_FILE, load_state, save_state
from toolbox.training.epochlog import EpochLog, read_rows
from toolbox.tuning.results import _best_checkpoint
from toolbox.tuning.sweepfile import Sweep
from toolbox.tuning.trial import _own_latest
from toolbox.tuning.trial_dirs import BEST_DIR, MOVED_ASIDE, STAGED, keep_as_best, recover_best, tidy


def row(epoch: int, val_loss: float) -> dict:
    return {"epoch": epoch, "lr": 0.1, "train_loss": val_loss, "val_loss": val_loss, "epoch_s": 1.0, "samples_per_s": 1.0}


def checkpoint(directory: Path, epoch: int, values: int = 2) -> Path:
    directory.mkdir(parents=True)
    state = {
        "model": {"w": torch.full((values,), float(epoch))},
        "optimizer": {},
        "scheduler": {},
        "epoch": epoch,
        "global_step": epoch * 10,
        "val_loss": 1.0 / epoch,
        "rng": {"torch": torch.get_rng_state()},
        "config": {},
    }
    save_state(directory, state)
    return directory


def test_an_exploiting_trial_table_has_every_epoch_once_up_to_the_epoch_it_continues_from(tmp_path):
    """Its own rows up to that epoch stay, those it never reached come from the checkpoint's trajectory."""
    log = EpochLog(tmp_path, epochs=6)
    for epoch in (1, 2):
        log.append(row(epoch, 2.0))
    source = [row(epoch, 1.0) for epoch in (1, 2, 3, 4)]
    log.restart(4, "continuing from epoch 4 of another trial (exploited)", source)
    log.append(row(5, 0.5))
    assert [(r["epoch"], r["val_loss"]) for r in read_rows(tmp_path)] == [(1, 2.0), (2, 2.0), (3, 1.0), (4, 1.0), (5, 0.5)]
    assert "epoch 3/6" not in (tmp_path / "training.log").read_text()  # the log keeps this trial's own lines

    log.restart(2, "continuing from epoch 2 of a trial behind (exploited)", source[:2])
    assert [(r["epoch"], r["val_loss"]) for r in read_rows(tmp_path)] == [(1, 2.0), (2, 2.0)]
    assert [r["epoch"] for r in read_rows(tmp_path)] == [r["epoch"] for r in EpochLog(tmp_path).rows]


def test_a_retried_trial_continues_its_current_trajectory_not_the_highest_epoch_in_its_dir(tmp_path, caplog):
    """Before an exploit of a trial that was behind, this trial reached epoch 5; it then continued from epoch 2."""
    checkpoint(tmp_path / "checkpoint_000000", 1)
    checkpoint(tmp_path / "checkpoint_000004", 5)  # its earlier trajectory
    checkpoint(tmp_path / "checkpoint_000007", 3)  # after the exploit: the one to continue from
    checkpoint(tmp_path / BEST_DIR, 5)
    damaged = checkpoint(tmp_path / "checkpoint_000008", 4)
    (damaged / "state.pt").write_bytes(b"cut short")
    assert _own_latest(tmp_path) == str(tmp_path / "checkpoint_000007")
    assert f"skipping damaged checkpoint {damaged}" in caplog.text
    assert _own_latest(tmp_path / "checkpoint_000000") is None  # no checkpoint dirs below


def test_best_is_kept_whole_after_a_process_was_killed_in_the_middle_of_replacing_it(tmp_path):
    """A kill between the swap's renames left a previous best beside best/: every later copy must still land."""
    trial = Place(pyarrow.fs.LocalFileSystem(), str(tmp_path), str(tmp_path), tmp_path, False)
    keep_as_best(checkpoint(tmp_path / "checkpoint_000000", 1), trial)
    checkpoint(tmp_path / f".{BEST_DIR}.old", 1)  # what the killed process had moved aside
    checkpoint(tmp_path / f".{BEST_DIR}.partial", 1)
    keep_as_best(checkpoint(tmp_path / "checkpoint_000001", 2), trial)
    assert torch.load(tmp_path / BEST_DIR / "state.pt", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_DIR, "checkpoint_000000", "checkpoint_000001"]


def best_epoch(trial_dir: Path) -> int:
    return load_state(trial_dir / BEST_DIR)["epoch"]


def test_a_best_copy_that_meets_a_full_disk_leaves_the_previous_best_and_nothing_staged(small_disk, tmp_path):
    trial = Place(pyarrow.fs.LocalFileSystem(), str(small_disk), str(small_disk), small_disk, False)
    keep_as_best(checkpoint(tmp_path / "checkpoint_000000", 1), trial)
    too_big = checkpoint(tmp_path / "checkpoint_000001", 2, values=2_000_000)  # 8 MB on a 4 MB disk
    with pytest.raises(OSError) as failed:
        keep_as_best(too_big, trial)
    assert failed.value.errno == errno.ENOSPC
    assert best_epoch(small_disk) == 1
    assert sorted(p.name for p in small_disk.iterdir()) == [BEST_DIR]


def test_a_best_swap_killed_between_its_renames_is_completed_or_rolled_back(tmp_path):
    """Between the renames best/ is missing: a complete staged copy (meta.json is copied last) is swapped in;
    a staged copy cut short gives way to the previous best, moved aside."""
    checkpoint(tmp_path / "done" / STAGED, 2)
    checkpoint(tmp_path / "done" / MOVED_ASIDE, 1)
    recover_best(tmp_path / "done")
    assert best_epoch(tmp_path / "done") == 2 and sorted(p.name for p in (tmp_path / "done").iterdir()) == [BEST_DIR]

    (checkpoint(tmp_path / "cut" / STAGED, 2) / META_FILE).unlink()
    checkpoint(tmp_path / "cut" / MOVED_ASIDE, 1)
    recover_best(tmp_path / "cut")
    assert best_epoch(tmp_path / "cut") == 1 and sorted(p.name for p in (tmp_path / "cut").iterdir()) == [BEST_DIR]


def test_the_results_name_only_a_whole_checkpoint_of_the_best_epoch(tmp_path):
    """Not a copy staged in a hidden dir, nor a dir whose state.pt never landed; of two equal epochs, the first."""
    sweep = Sweep(name="s", space={}, metric="val_loss", mode="min")
    history = [row(1, 0.5), row(2, 0.2), row(3, 0.2)]
    checkpoint(tmp_path / "checkpoint_000000", 1)
    checkpoint(tmp_path / STAGED, 2)
    (checkpoint(tmp_path / "checkpoint_000001", 2) / STATE_FILE).unlink()
    checkpoint(tmp_path / "checkpoint_000002", 3)
    checkpoint(tmp_path / "checkpoint_000003", 2)
    result = SimpleNamespace(path=str(tmp_path), filesystem=pyarrow.fs.LocalFileSystem())
    assert _best_checkpoint(result, history, sweep) == str(tmp_path / "checkpoint_000003")
    (tmp_path / "checkpoint_000003" / STATE_FILE).unlink()
    assert _best_checkpoint(result, history, sweep) == str(tmp_path / "checkpoint_000002")


def test_a_sweep_starting_afresh_removes_the_trial_dirs_no_record_names(tmp_path):
    exp = Place(pyarrow.fs.LocalFileSystem(), str(tmp_path), str(tmp_path / "s"), tmp_path / "s", False)
    orphan = tmp_path / "s" / "run_trial_1f3fd_00003_3_lr=0.0040_2026-12-07_04-26-19"
    (orphan / "training.log").parent.mkdir(parents=True)
    (orphan / "training.log").write_text("")
    (tmp_path / "s" / "plots").mkdir()
    tidy(exp, restoring=False)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["plots"]
