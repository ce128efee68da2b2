"""Faults that end a sweep or its Ray from outside: a full disk mid-sweep, a trial killed by Ray's memory
monitor, the local Ray's raylet or GCS killed. Each is said in one line, and the same command finishes the work.
(Apart from test_reliability.py so that the two test processes share the long fault tests.)"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from helpers import run_cli
from test_reliability import (
    EPOCHS,
    RUN,
    Cli,
    assert_every_epoch_once,
    fill,
    first_epoch,
    logged_epochs,
    run,
    sweep,
    trial_dirs,
    write_sweep,
)

from toolbox.training.checkpoint import load_state
from toolbox.training.epochlog import read_rows
from toolbox.tuning.trial_dirs import TRIAL_DIR

FULL_DISK_SWEEP = """\
from ray import tune
base = {"dataset": "DummyDataset", "dummy_n_samples": 256, "dummy_val_n_samples": 64, "dummy_input_shape": (64,),
        "ff_hidden_sizes": (512,), "batch_size": 32}  # checkpoints of about 0.5 MB
space = {"lr": tune.grid_search([1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3])}
num_samples = 1
epochs = 3
trial_scheduler = "fifo"
max_concurrent = 2
"""


def first_best_epoch(trial_dir: Path, metric: str = "val_top_1_accuracy") -> int:
    rows = read_rows(trial_dir)
    return next(int(r["epoch"]) for r in rows if r[metric] == max(r[metric] for r in rows))


@pytest.mark.timeout(600)
def test_a_sweep_on_a_full_disk_ends_with_the_disk_line_and_once_space_is_freed_the_same_command_finishes_it(
    sweep_disk, tmp_path
):
    """The disk fills once the first trial kept its first best: the sweep ends with the run's one line and exit 1,
    nothing it leaves is cut short; the re-run completes it, and every checkpoint the results name loads whole."""
    path = tmp_path / "full.py"
    path.write_text(FULL_DISK_SWEEP)
    args = [str(path), "--storage", str(sweep_disk), "--seed", "1"]
    exp_dir = sweep_disk / "full"
    cli = Cli("sweep", *args)
    deadline = time.time() + 240
    while time.time() < deadline and not list(exp_dir.glob("run_trial_*/best/meta.json")):
        time.sleep(0.1)
    filler = fill(sweep_disk)
    code, out = cli.finish()
    assert code == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(
        "toolbox.sweep: failed: the disk is full (No space left on device): free space, then re-run the same command; "
        f"{exp_dir} keeps "
    ), out[-3000:]
    assert "Traceback" not in out and "EOFError" not in out, out[-3000:]
    assert not [p for p in sweep_disk.rglob("*") if p.name.startswith(".best.") or p.name.endswith(".partial")]
    filler.unlink(missing_ok=True)

    # What a trial started after the last snapshot Tune could save leaves (Tune starts it again under a new
    # name), and a best/ swap killed between its renames (the staged copy whole, best/ not yet in place).
    experiment = TRIAL_DIR.search(trial_dirs(exp_dir)[0].name).group(1).split("_")[0]
    orphan = exp_dir / f"run_trial_{experiment}_00099_99_lr=0.1_2026-01-01_00-00-00"
    orphan.mkdir()
    (orphan / "training.log").write_text("")
    swapped = next(d for d in trial_dirs(exp_dir) if (d / "best").is_dir())
    (swapped / "best").rename(swapped / ".best.partial")

    again = Cli("sweep", *args)
    code, out = again.finish()
    assert code == 0, out[-3000:]
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}, rows
    assert [d.name for d in trial_dirs(exp_dir)] == sorted(Path(r["trial_dir"]).name for r in rows)
    for row in rows:
        trial_dir = Path(row["trial_dir"])
        epoch = load_state(row["checkpoint"])["epoch"]
        assert read_rows(trial_dir)[epoch - 1]["val_top_1_accuracy"] == row["val_top_1_accuracy"], row
        assert load_state(trial_dir / "best")["epoch"] == first_best_epoch(trial_dir), trial_dir
        assert json.loads((trial_dir / "best" / "meta.json").read_text())["epoch"] == first_best_epoch(trial_dir)
    best = json.loads((exp_dir / "best.json").read_text())
    assert best["checkpoint"] == rows[0]["checkpoint"]
    load_state(best["checkpoint"])
    assert not [p for p in sweep_disk.rglob("*") if p.name.startswith(".best.") or p.name.endswith(".partial")]


HOG = """\
import time as _time

import psutil as _psutil
import torch as _torch
from torch import nn as _nn
from ray import tune

from toolbox.components.models import MODELS as _MODELS


class MemoryHog(_nn.Module):
    def __init__(self, width, classes, stop_at):
        super().__init__()
        self.linear, self.stop_at, self.held = _nn.Linear(width, classes), stop_at, []

    def forward(self, x):
        if self.training and self.stop_at and not self.held:  # its first training step
            while _psutil.virtual_memory().percent < 100 * self.stop_at:
                self.held.append(_torch.ones(2**25))  # 128 MiB, written
                _time.sleep(0.01)
        return self.linear(x.flatten(1))


@_MODELS.register("MemoryHog", prefix="hog")
def memory_hog(sample_shape, num_classes, /, *, stop_at: float = 0.0):
    \"\"\"Linear; with stop_at, its first training step holds memory until the host's in use reaches that fraction.\"\"\"
    return MemoryHog(sample_shape[0], num_classes, stop_at)


base = {"dataset": "DummyDataset", "dummy_n_samples": 256, "dummy_val_n_samples": 64, "dummy_input_shape": (16,),
        "batch_size": 32, "arch": "MemoryHog"}
space = {"hog_stop_at": tune.grid_search([0.0, STOP_AT, 0.0])}
num_samples, epochs, trial_scheduler, max_concurrent = 1, 2, "fifo", 1
"""


@pytest.mark.timeout(420)
def test_a_trial_killed_for_memory_fails_alone_and_a_re_run_does_not_repeat_it(tmp_path):
    """Ray's memory monitor, at a threshold above what the host uses now, kills the one trial that holds
    ever more memory; the trial after it runs, the results are written, and a re-run does not start it again."""
    in_use = psutil.virtual_memory().percent / 100
    if in_use > 0.55:
        pytest.skip(f"the host already uses {in_use:.0%} of its memory")
    threshold = in_use + 0.25  # room for this sweep's Ray, driver and trial processes, and for others' to grow
    path = tmp_path / "hog.py"
    stop_at = round(threshold + 0.1, 3)  # the hog stops there, if never killed
    path.write_text(HOG.replace("STOP_AT", repr(stop_at)))
    env = {"RAY_memory_usage_threshold": f"{threshold:.3f}", "RAY_memory_monitor_refresh_ms": "100"}
    exp_dir = tmp_path / "hog"

    for attempt in ("first", "re-run"):
        done = run_cli("sweep", str(path), "--storage", str(tmp_path), env=env)
        assert done.returncode == 1, (attempt, done.stdout[-3000:] + done.stderr[-3000:])
        summary, cause = done.stderr.strip().splitlines()[-2:]
        assert "1 of 3 trials errored" in summary, (attempt, done.stderr[-3000:])
        assert f"(hog_stop_at={stop_at!r}): out of memory: Ray's memory monitor killed the trial's process" in cause
        assert "which held" in cause and "not retried" in cause, cause
        rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
        assert sorted(r["status"] for r in rows) == ["done", "done", "error"], rows
        assert all(r["epochs"] == 2 for r in rows if r["status"] == "done")
        killed = next(r for r in rows if r["status"] == "error")
        assert killed["error"].startswith("out of memory: ") and killed["retries"] == 0, killed
        assert killed["trial_id"] in cause and (exp_dir / "best.json").is_file()
        starts = {d.name: (d / "training.log").read_text().count("trial started") for d in trial_dirs(exp_dir)}
        assert sorted(starts.values()) == [1, 1, 1], (attempt, starts)  # the killed trial was not retried, nor re-run
    assert "continuing sweep" in done.stdout


def kill_ray_core(cli: Cli, name: str) -> None:
    """SIGKILL the raylet or the GCS (``gcs_server``) of the local Ray that the command started."""
    found = [p for p in cli.processes(name) if p.name() == name]
    assert len(found) == 1, [p.name() for p in cli.processes("")]
    found[0].send_signal(signal.SIGKILL)


def assert_lost_ray_said(out: str, command: str, core: str) -> Path:
    """One line names the loss and what is kept, Ray's own messages are not on the console; returns their log."""
    last = out.strip().splitlines()[-1]
    said = f"toolbox.{command}: the local Ray was lost (its {core} was killed by SIGKILL; Ray's messages are in "
    assert last.startswith(said) and "re-run the same command to continue" in last, out[-3000:]
    assert "(raylet)" not in out and "Traceback" not in out and "PC: @" not in out, out[-3000:]
    messages = Path(re.search(r"Ray's messages are in (\S+)\)", last).group(1))
    assert messages.is_file()
    return messages


@pytest.mark.timeout(600)
def test_a_run_that_loses_its_local_raylet_or_gcs_says_so_in_one_line_and_the_same_command_finishes_it(tmp_path):
    """The raylet killed, then the GCS in the same command run again: each ends it with one line and exit 1,
    and the same command continues the run each time, to its end with every epoch once."""
    args = [*RUN, "--storage", str(tmp_path), "--name", "lost"]
    for core in ("raylet", "gcs_server"):
        cli = Cli("run", *args)
        if core == "gcs_server":
            cli.wait_for("resuming from epoch")
        first_epoch(cli)
        kill_ray_core(cli, core)
        code, out = cli.finish(timeout=60)
        assert code == 1, (core, out[-3000:])
        messages = assert_lost_ray_said(out, "run", core)
        assert f"{tmp_path / 'lost'} keeps epochs 1-" in out.strip().splitlines()[-1]
        if core == "raylet":
            assert "Raylet is terminated" in messages.read_text()
        shutil.rmtree(messages.parents[1])  # the lost Ray's session dir, kept for its logs
    again = run(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from epoch" in again.stdout
    assert_every_epoch_once(tmp_path / "lost", EPOCHS)


@pytest.mark.timeout(600)
def test_a_sweep_that_loses_its_gcs_says_so_in_one_line_and_the_same_command_finishes_it(tmp_path):
    """A call into a lost GCS waits a minute deaf to signals; the sweep still ends within seconds."""
    path = write_sweep(tmp_path, 'base["dummy_n_samples"] = 6000\n')
    cli = Cli("sweep", str(path), "--storage", str(tmp_path))
    exp_dir = tmp_path / "faults"
    deadline = time.time() + 240
    while time.time() < deadline and not any(1 in logged_epochs(d) for d in trial_dirs(exp_dir) if (d / "training.log").exists()):
        time.sleep(0.2)
    kill_ray_core(cli, "gcs_server")
    code, out = cli.finish(timeout=60)
    assert code == 1, out[-3000:]
    messages = assert_lost_ray_said(out, "sweep", "gcs_server")
    # Whether the lost GCS held the driver (the watchdog says the line) or not (the table comes first), it says what is kept.
    assert re.search(rf"{re.escape(str(exp_dir))} keeps (every|\d+) finished trials? and every trial's checkpoints;", out), out[
        -3000:
    ]
    shutil.rmtree(messages.parents[1])
    again = sweep(str(path), "--storage", str(tmp_path))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "done" and r["epochs"] == 4 for r in rows), rows
