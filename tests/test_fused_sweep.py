"""``fuse = K`` sweeps end to end: each member stays a Tune trial, gives the unfused trial's numbers,
is stopped by ASHA and median stopping on its own and exploited by PBT; trials that
cannot fuse run unfused, said once."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import run_cli

GRID = """\
from ray import tune
base = {"dummy_n_samples": 256, "dummy_val_n_samples": 64, "ff_hidden_sizes": (32,), "ff_dropout": 0.1, "batch_size": 32}
space = {"lr": tune.grid_search([1e-3, 1e-2]), "scheduler": tune.grid_search(["none", "cosine_annealing_lr"])}
num_samples = 1
epochs = 2
trial_scheduler = "fifo"
"""


def sweep(path: Path, *args: str) -> subprocess.CompletedProcess:
    done = run_cli("sweep", str(path), *args, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def epochs_by_trial(exp_dir: Path) -> dict[str, list[dict]]:
    """Each trial's epoch table, by its index in the space (the trial id's prefix differs per run)."""
    index = re.compile(r"^run_trial_[0-9a-f]+_(\d{5})_")  # the id's prefix may be all digits too
    return {index.search(d.name).group(1): pq.read_table(d / "epochs.parquet").to_pylist() for d in exp_dir.glob("run_trial_*")}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return path


@pytest.mark.timeout(600)
def test_fused_trials_give_the_unfused_trials_numbers(tmp_path):
    path = write(tmp_path, "grid", GRID)
    fused = sweep(path, "--storage", str(tmp_path), "--name", "fused", "--fuse", "2", "--seed", "4")  # two stacks
    sweep(path, "--storage", str(tmp_path), "--name", "unfused", "--seed", "4")
    assert "cannot fuse" not in fused.stdout
    a, b = epochs_by_trial(tmp_path / "fused"), epochs_by_trial(tmp_path / "unfused")
    assert len(a) == len(b) == 4
    for trial, rows in a.items():
        assert [r["epoch"] for r in rows] == [r["epoch"] for r in b[trial]] == [1, 2]
        for x, y in zip(rows, b[trial]):
            for key in ("lr", "train_loss", "val_loss", "val_top_1_accuracy"):
                assert x[key] == pytest.approx(y[key], rel=1e-5), (trial, x["epoch"], key)
    results = pq.read_table(tmp_path / "fused" / "results.parquet").to_pylist()
    assert len(results) == 4 and all(r["status"] == "done" for r in results)


EARLY_STOPPING = {  # HyperBand pauses trials: its sweeps run unfused (test_sweepfile)
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "median_stopping": {"grace_period": 1, "min_samples_required": 2},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scheduler", EARLY_STOPPING)
def test_early_stopping_stops_fused_members_on_their_own(scheduler, tmp_path):
    path = write(
        tmp_path,
        scheduler,
        GRID.replace("[1e-3, 1e-2]", "[3e-2, 1e-2, 1e-7, 1e-7]")
        .replace(
            'trial_scheduler = "fifo"', f"trial_scheduler = {scheduler!r}\nscheduler_options = {EARLY_STOPPING[scheduler]!r}"
        )
        .replace("epochs = 2", "epochs = 3"),
    )
    sweep(path, "--storage", str(tmp_path), "--fuse", "4")
    rows = pq.read_table(tmp_path / scheduler / "results.parquet").to_pylist()
    assert len(rows) == 8
    assert any(r["status"] == "stopped" and r["epochs"] < 3 for r in rows), rows
    assert any(r["status"] == "done" and r["epochs"] == 3 for r in rows), rows
    for trial, epochs in epochs_by_trial(tmp_path / scheduler).items():
        assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1)), trial


@pytest.mark.timeout(600)
def test_pbt_exploits_fused_members(tmp_path):
    path = write(
        tmp_path,
        "pbt",
        """\
        from ray import tune
        base = {"dummy_n_samples": 256, "dummy_val_n_samples": 64, "ff_hidden_sizes": (32,), "batch_size": 32}
        space = {"lr": tune.loguniform(1e-4, 3e-2)}
        num_samples = 4
        epochs = 6
        trial_scheduler = "pbt"
        scheduler_options = {"perturbation_interval": 1, "quantile_fraction": 0.5}
        """.replace("        ", "").replace("epochs = 6", "epochs = 4"),
    )
    sweep(path, "--storage", str(tmp_path), "--fuse", "4", "--seed", "1")
    rows = pq.read_table(tmp_path / "pbt" / "results.parquet").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "done" and r["epochs"] == 4 for r in rows), rows
    assert list((tmp_path / "pbt").glob("pbt_policy_*.txt")), "no trial exploited another one"
    logs = [(d / "training.log").read_text() for d in (tmp_path / "pbt").glob("run_trial_*")]
    assert any("(exploited)" in log for log in logs), "an exploiting member joins again from the other trial's checkpoint"


@pytest.mark.timeout(300)
def test_trials_that_cannot_fuse_run_unfused_and_the_sweep_says_why(tmp_path):
    path = write(tmp_path, "mixed", GRID.replace("num_samples = 1", 'num_samples = 1\nbase["precision"] = "bf16-mixed"'))
    done = sweep(path, "--storage", str(tmp_path), "--fuse", "2")
    lines = [line for line in done.stdout.splitlines() if "cannot fuse" in line]
    assert len(lines) == 1 and "precision 'bf16-mixed'" in lines[0] and "each trial runs in its own process" in lines[0]
    assert len(pq.read_table(tmp_path / "mixed" / "results.parquet").to_pylist()) == 4
