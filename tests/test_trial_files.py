"""What a sweep trial keeps in its own dir across PBT exploits, retries and kills (the files alone, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs
import torch

from toolbox.distributed.locations import Place
from toolbox.training.checkpoint import save_state
from toolbox.training.epochlog import EpochLog, read_rows
from toolbox.tuning.trial import BEST_DIR, _keep_as_best, _own_latest


def row(epoch: int, val_loss: float) -> dict:
    return {"epoch": epoch, "lr": 0.1, "train_loss": val_loss, "val_loss": val_loss, "epoch_s": 1.0, "samples_per_s": 1.0}


def checkpoint(directory: Path, epoch: int) -> Path:
    directory.mkdir(parents=True)
    state = {
        "model": {"w": torch.full((2,), float(epoch))},
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
    _keep_as_best(checkpoint(tmp_path / "checkpoint_000000", 1), trial)
    checkpoint(tmp_path / f".{BEST_DIR}.old", 1)  # what the killed process had moved aside
    checkpoint(tmp_path / f".{BEST_DIR}.partial", 1)
    _keep_as_best(checkpoint(tmp_path / "checkpoint_000001", 2), trial)
    assert torch.load(tmp_path / BEST_DIR / "state.pt", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_DIR, "checkpoint_000000", "checkpoint_000001"]
