"""A sweep's saved trials: the experiment state holds the unfinished ones, finished_trials/ each finished one once."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs
from ray.train._internal.storage import StorageContext
from ray.tune import PlacementGroupFactory
from ray.tune.experiment import Trial

from toolbox.tuning import snapshots


def entry(trial_id: str, status: str) -> list:
    """A trial's saved form, as Tune's controller writes it."""
    trial = Trial(
        "run_trial",
        stub=True,
        trial_id=trial_id,
        config={"lr": 0.1},
        placement_group_factory=PlacementGroupFactory([{"CPU": 1}]),
        storage=StorageContext(storage_path="/tmp", experiment_dir_name="sweep"),
    )
    trial.create_placement_group_factory()
    trial.set_status(status)
    return list(trial.get_json_state())


def write_state(sweep_dir: Path, trial_data: list, newest_batch: int) -> None:
    state = {"trial_data": trial_data, "runner_data": {}, "stats": {}, snapshots.NEWEST_BATCH: newest_batch}
    (sweep_dir / "experiment_state-2026-12-07_00-00-00.json").write_text(json.dumps(state))


def statuses(sweep_dir: Path) -> dict[str, str]:
    return {t.trial_id: t.status for t in snapshots.saved_trials(pyarrow.fs.LocalFileSystem(), str(sweep_dir))}


def test_each_trial_reads_back_from_the_newer_of_its_batch_and_the_snapshot(tmp_path):
    fs, path = pyarrow.fs.LocalFileSystem(), str(tmp_path)
    snapshots._write_batch(fs, path, 0, [entry("a", "TERMINATED"), entry("b", "ERROR")])
    snapshots._write_batch(fs, path, 1, [entry("c", "TERMINATED")])
    # Written after batch 0: b was resumed and waits to run again. Before batch 1: c still ran (a driver killed in between).
    write_state(tmp_path, [entry("b", "PENDING"), entry("c", "RUNNING"), entry("d", "PAUSED")], newest_batch=0)
    assert statuses(tmp_path) == {"a": "TERMINATED", "b": "PENDING", "c": "TERMINATED", "d": "PAUSED"}


def test_a_batch_cut_short_is_never_read(tmp_path):
    fs, path = pyarrow.fs.LocalFileSystem(), str(tmp_path)
    snapshots._write_batch(fs, path, 0, [entry("a", "TERMINATED")])
    (tmp_path / snapshots.FINISHED_DIR / ".finished-00000001.json.partial").write_text('{"batch": 1, "trial_da')
    write_state(tmp_path, [entry("b", "PAUSED")], newest_batch=0)
    assert statuses(tmp_path) == {"a": "TERMINATED", "b": "PAUSED"}


def test_a_snapshot_from_before_the_batches_reads_as_tune_wrote_it(tmp_path):
    state = {"trial_data": [entry("a", "TERMINATED"), entry("b", "PAUSED")], "runner_data": {}, "stats": {}}
    (tmp_path / "experiment_state-2026-12-07_00-00-00.json").write_text(json.dumps(state))
    assert statuses(tmp_path) == {"a": "TERMINATED", "b": "PAUSED"}
