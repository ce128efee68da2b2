"""Sweeps end to end, each through `python -m toolbox.sweep` in its own process with a real Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import run_cli, start_cli

TINY = """\
from ray import tune
base = {"dataset": "DummyDataset", "dummy_n_samples": 256, "dummy_val_n_samples": 64, "dummy_input_shape": (16,),
        "ff_hidden_sizes": (16,), "batch_size": 32}
num_samples = 1  # each grid value once
"""


def sweep(*args: str, timeout: float = 240, dashboard: bool = False) -> subprocess.CompletedProcess:
    return run_cli("sweep", *args, timeout=timeout, dashboard=dashboard)


def write(tmp_path: Path, body: str, name: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(TINY + textwrap.dedent(body))
    return path


def trial_starts(exp_dir: Path) -> dict[str, int]:
    """How often each trial's function started (a line per start in its training.log)."""
    return {d.name: (d / "training.log").read_text().count("trial started") for d in exp_dir.glob("run_trial_*")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    storage = tmp_path_factory.mktemp("smoke")
    proc = sweep("sweeps/smoke.py", "--storage", str(storage), "--seed", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "smoke", proc


@pytest.mark.timeout(300)
def test_smoke_sweep_writes_results(smoke):
    exp_dir, proc = smoke
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == 4
    assert {"trial_id", "optimizer", "lr", "scheduler", "val_top_1_accuracy", "epochs", "time_s", "checkpoint"} <= set(rows[0])
    metric = [r["val_top_1_accuracy"] for r in rows]
    assert metric == sorted(metric, reverse=True), "ranked best first"
    assert all(1 <= r["epochs"] <= 3 for r in rows)
    for row in rows:  # momentum only belongs to sgd trials
        assert (row["momentum"] is not None) == (row["optimizer"] == "sgd")
    csv_lines = (exp_dir / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5
    best = json.loads((exp_dir / "best.json").read_text())
    assert best["value"] == rows[0]["val_top_1_accuracy"] and best["trial_id"] == rows[0]["trial_id"]
    assert best["config"]["dataset"] == "DummyDataset" and best["config"]["epochs"] == 3
    assert Path(best["checkpoint"], "state.pt").is_file()
    assert best["command"].startswith("python -m toolbox.run ") and best["command"] in proc.stdout
    for plot in ("val_metric.png", "lr_schedule.png"):
        assert (exp_dir / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    assert "rank  trial" in proc.stdout  # the ranked table
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stderr == "", proc.stderr[-2000:]  # none of Ray's own
    trial_dir = Path(rows[0]["trial_dir"])
    epochs = pq.read_table(trial_dir / "epochs.parquet").to_pylist()
    assert [e["epoch"] for e in epochs] == list(range(1, rows[0]["epochs"] + 1))


@pytest.mark.timeout(300)
def test_seed_reproduces_configs_and_training(smoke, tmp_path):
    exp_dir, _ = smoke
    proc = sweep("sweeps/smoke.py", "--storage", str(tmp_path), "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = lambda r: r["trial_id"].split("_")[-1]  # noqa: E731 - trial index; the id prefix differs per run
    first = sorted(pq.read_table(exp_dir / "results.parquet").to_pylist(), key=key)
    again = sorted(pq.read_table(tmp_path / "smoke" / "results.parquet").to_pylist(), key=key)
    for a, b in zip(first, again, strict=True):
        assert (a["optimizer"], a["lr"], a["scheduler"]) == (b["optimizer"], b["lr"], b["scheduler"])
        # ASHA's cuts depend on which concurrent trial reports first, so compare the epochs both ran.
        epochs_a = pq.read_table(Path(a["trial_dir"]) / "epochs.parquet").to_pylist()
        epochs_b = pq.read_table(Path(b["trial_dir"]) / "epochs.parquet").to_pylist()
        common = min(len(epochs_a), len(epochs_b))
        assert common >= 1
        for x, y in zip(epochs_a[:common], epochs_b[:common]):
            assert (x["train_loss"], x["val_loss"], x["val_top_1_accuracy"]) == (
                y["train_loss"],
                y["val_loss"],
                y["val_top_1_accuracy"],
            )


@pytest.mark.timeout(300)
def test_asha_stops_bad_trials_early(tmp_path):
    # Two good lrs run first (one trial at a time); the hopeless ones after them fall below the rung.
    path = write(
        tmp_path,
        """\
        space = {"lr": tune.grid_search([3e-2, 1e-2, 1e-7, 1e-7, 1e-7, 1e-7])}
        epochs = 4
        max_concurrent = 1
        scheduler_options = {"grace_period": 1, "reduction_factor": 2}
        """,
        "asha",
    )
    proc = sweep(str(path), "--storage", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "asha" / "results.parquet").to_pylist()
    assert len(rows) == 6
    assert rows[0]["lr"] == 3e-2 and rows[0]["status"] == "done" and rows[0]["epochs"] == 4
    hopeless = [r for r in rows if r["lr"] == 1e-7]
    assert all(r["status"] == "stopped" and r["epochs"] < 4 for r in hopeless), hopeless
    assert sum(r["epochs"] for r in rows) < 6 * 4
    assert "stopped early" in proc.stdout


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "space, num_samples",
    [
        ('{"lr": tune.grid_search([1e-3, 2e-3, 3e-3]), "weight_decay": tune.grid_search([0.0, 0.01])}', 1),
    ],
    ids=["grid"],
)
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, space, num_samples):
    path = write(
        tmp_path,
        f"""\
        space = {space}
        num_samples = {num_samples}
        epochs = 3
        trial_scheduler = "fifo"
        max_concurrent = 1
        """,
        "killme",
    )
    exp_dir = tmp_path / "killme"
    # Its own session, so that SIGKILL to the group takes the driver and the Ray it started, like a lost terminal.
    driver = start_cli("sweep", str(path), "--storage", str(tmp_path))
    finished_lines = []
    deadline = time.time() + 180
    for line in driver.stdout:
        if line.startswith("["):
            finished_lines.append(line)
        if len(finished_lines) >= 2 or time.time() > deadline:
            break
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert len(finished_lines) >= 2, "the sweep never finished two trials"
    done_before = {d for d in trial_starts(exp_dir) if pq.read_table(exp_dir / d / "epochs.parquet").num_rows == 3}
    assert len(done_before) >= 2

    proc = sweep(str(path), "--storage", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "continuing sweep" in proc.stdout
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == 6 and all(r["epochs"] == 3 for r in rows)
    starts = trial_starts(exp_dir)
    assert len(starts) == 6
    for d in done_before:  # finished trials never train again: each epoch was logged once
        assert trained_epochs(exp_dir / d) == 3, (exp_dir / d / "training.log").read_text()
    # Tune snapshots its state after each step, so one trial killed between its last epoch and that
    # snapshot may be started again (one at a time here); it finds its final checkpoint and only
    # reports it. Every other finished trial is not started at all.
    assert sum(starts[d] > 1 for d in done_before) <= 1, starts
    # The re-run counts on from the trials that had finished, and a trial's line shows the best of its
    # whole history (a resumed trial's epochs before the kill too), as the table does.
    lines = [line for line in proc.stdout.splitlines() if re.match(r"\[\d+/6\] trial ", line)]
    numbers = [int(re.match(r"\[(\d+)/", line).group(1)) for line in lines]
    assert numbers == list(range(7 - len(numbers), 7)) and numbers[0] > 1, proc.stdout[-3000:]
    assert f"{numbers[0] - 1} of 6 trials had finished before this run" in proc.stdout, proc.stdout[-3000:]
    best = {r["trial_id"]: r["val_top_1_accuracy"] for r in rows}
    for line in lines:
        trial_id, shown = re.search(r"trial (\S+) .* best val_top_1_accuracy (\S+) ", line).groups()
        assert shown == f"{best[trial_id]:.4f}", (line, best[trial_id])


def trained_epochs(trial_dir: Path) -> int:
    return sum(1 for line in (trial_dir / "training.log").read_text().splitlines() if " epoch " in line and "val_loss" in line)


@pytest.mark.timeout(400)
def test_train_in_tune_trials_free_their_workers(tmp_path):
    """ray-project/ray#54305: every trial takes all CPUs; a leaked worker CPU would hang the next trial."""
    path = write(
        tmp_path,
        """\
        space = {"lr": tune.grid_search([3e-2, 1e-7])}
        epochs = 2
        workers_per_trial = 2
        cpus_per_worker = 1
        scheduler_options = {"grace_period": 1, "reduction_factor": 2}
        """,
        "tight",
    )
    proc = sweep(
        str(path), "--storage", str(tmp_path), timeout=360, dashboard=True
    )  # the watchdog; Train-in-Tune needs the dashboard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "tight" / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(r["epochs"] >= 1 for r in rows)
    assert any(r["status"] == "stopped" for r in rows), "ASHA should stop a hopeless trial"
    assert rows[0]["checkpoint"] and "/train/checkpoint_" in rows[0]["checkpoint"]  # the trial's own Train run


@pytest.mark.timeout(300)
def test_pbt_exploits_checkpoints_of_other_trials(tmp_path):
    path = write(
        tmp_path,
        """\
        space = {"optimizer": tune.choice(["adamw", "sgd"]), "lr": tune.loguniform(1e-4, 3e-2)}
        num_samples = 4
        epochs = 4
        trial_scheduler = "pbt"
        # Synchronous PBT: each trial waits at epoch 2 until all have reached it, then the bottom half
        # exploits the top half, however late each trial started.
        cpus_per_worker = 0.5
        scheduler_options = {"perturbation_interval": 2, "quantile_fraction": 0.5, "synch": True}
        """,
        "pbt",
    )
    proc = sweep(str(path), "--storage", str(tmp_path), "--seed", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "pbt" / "results.parquet").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "done" and r["epochs"] == 4 for r in rows), rows
    for r in rows:  # an exploit leaves no epoch out of the table
        assert [e["epoch"] for e in pq.read_table(Path(r["trial_dir"]) / "epochs.parquet").to_pylist()] == [1, 2, 3, 4]
    policies = list((tmp_path / "pbt").glob("pbt_policy_*.txt"))
    assert policies, "no trial exploited another one"
    exploited = [d for d, starts in trial_starts(tmp_path / "pbt").items() if starts > 1]
    assert exploited, "an exploiting trial restarts from the other trial's checkpoint"
    # A larger budget continues the four (PBT's population restored: test_grow); its log keeps the first run's lines.
    first_run = (tmp_path / "pbt" / "pbt_global.txt").read_text()
    proc = sweep(str(path), "--storage", str(tmp_path), "--seed", "1", "--epochs", "6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "pbt" / "results.parquet").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "done" and r["epochs"] == 6 for r in rows), rows
    assert (tmp_path / "pbt" / "pbt_global.txt").read_text().startswith(first_run)


@pytest.mark.timeout(300)
def test_optuna_search_runs_the_sweep(tmp_path):
    proc = sweep("sweeps/smoke.py", "--storage", str(tmp_path), "--search", "optuna", "--num-samples", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "smoke" / "results.parquet").to_pylist()
    assert len(rows) == 3 and all(r["epochs"] >= 1 for r in rows)
    assert all(1e-3 <= r["lr"] <= 3e-2 for r in rows)  # sampled by Optuna within the space


@pytest.mark.timeout(300)
def test_a_regression_sweep_ranks_by_its_error_metrics_own_mode(tmp_path):
    """No `mode` in the file: val_mean_absolute_error is registered mode="min", so the lowest error ranks first."""
    path = tmp_path / "regression.py"
    path.write_text(
        textwrap.dedent(
            """\
            from ray import tune
            base = {"dataset": "Regression", "regression_n_samples": 256, "regression_val_n_samples": 64,
                    "regression_input_shape": (16,), "ff_hidden_sizes": (16,), "batch_size": 32}
            space = {"lr": tune.grid_search([1e-7, 3e-2])}
            metric = "val_mean_absolute_error"
            num_samples, epochs, trial_scheduler = 1, 2, "fifo"
            """
        )
    )
    proc = sweep(str(path), "--storage", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "regression" / "results.parquet").to_pylist()
    errors = [r["val_mean_absolute_error"] for r in rows]
    assert [r["lr"] for r in rows] == [3e-2, 1e-7] and errors == sorted(errors), "the lowest error ranks first"
    best = json.loads((tmp_path / "regression" / "best.json").read_text())
    assert (best["mode"], best["value"], best["config"]["criterion"]) == ("min", min(errors), "mse_loss")


@pytest.mark.timeout(300)
def test_a_hyperband_sweep_whose_trials_all_finished_exits_0(tmp_path):
    """HyperBand pauses trials at its rungs; a trial it paused that then finished was saved as PAUSED, read as interrupted."""
    path = write(
        tmp_path,
        """\
        space = {"lr": tune.grid_search([3e-2, 1e-2, 1e-3, 1e-7, 1e-7, 1e-7])}
        epochs = 4
        trial_scheduler = "hyperband"
        """,
        "hyperband",
    )
    proc = sweep(str(path), "--storage", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "hyperband" / "results.parquet").to_pylist()
    assert len(rows) == 6 and all(r["status"] in ("done", "stopped") for r in rows), rows
    assert "interrupted" not in proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_a_grid_of_a_hundred_thousand_points_starts_at_once_and_its_bad_point_fails_alone(tmp_path):
    """Tune drew every point of a grid before its first trial; each point is drawn as its trial starts, and
    one whose drawn value is refused fails alone, not retried. Ctrl-C once a good trial finished ends it."""
    path = write(
        tmp_path,
        """\
        space = {"weight_decay": tune.grid_search([i * 1e-9 for i in range(100_000)]),
                 "lr": tune.sample_from(lambda spec: -1.0 if spec.config.weight_decay == 0 else 1e-3)}
        epochs = 1
        trial_scheduler = "fifo"
        max_concurrent = 1
        """,
        "huge",
    )
    driver = start_cli("sweep", str(path), "--storage", str(tmp_path))
    lines = []
    for line in driver.stdout:  # the pytest timeout bounds this wait
        lines.append(line)
        if line.startswith("[2/100000] trial "):
            break
    os.kill(driver.pid, signal.SIGINT)
    out = "".join(lines) + driver.communicate(timeout=120)[0]
    assert driver.returncode == 130, out[-3000:]
    assert re.search(r"^\[1/100000\] trial \S+ FAILED after 0 retries", out, re.MULTILINE), out[-3000:]
    rows = pq.read_table(tmp_path / "huge" / "results.parquet").to_pylist()
    bad = [r for r in rows if r["weight_decay"] == 0]
    assert len(bad) == 1 and bad[0]["status"] == "error" and bad[0]["retries"] == 0, bad
    assert "--lr must be > 0, got -1" in bad[0]["error"] and "not retried" in bad[0]["error"], bad[0]["error"]
    assert any(r["status"] == "done" for r in rows), rows


def dominated(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """Whether another (accuracy, params) point is as accurate and as small, and more accurate or smaller."""
    return any(a >= point[0] and p <= point[1] and (a, p) != point for a, p in others)


@pytest.mark.timeout(300)
def test_a_moasha_sweep_stops_only_dominated_trials_and_writes_its_pareto_front(tmp_path):
    """Accuracy against parameter count: the hopeless lr's trials are dominated by the good ones of their size or smaller."""
    path = write(
        tmp_path,
        """\
        space = {"ff_hidden_sizes": tune.grid_search([(4,), (16,), (64,)]), "lr": tune.grid_search([3e-2, 1e-7])}
        metric, mode = ["val_top_1_accuracy", "params"], ["max", "min"]
        trial_scheduler, scheduler_options = "moasha", {"grace_period": 1, "reduction_factor": 2}
        epochs, max_concurrent = 4, 2
        """,
        "moasha",
    )
    proc = sweep(str(path), "--storage", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp_dir = tmp_path / "moasha"
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == 6 and all(r["pareto"] is not None for r in rows), rows
    ranks = [(r["pareto"], -r["val_top_1_accuracy"]) for r in rows]
    assert ranks == sorted(ranks), "by front, then by the primary objective"
    epochs = {r["trial_id"]: pq.read_table(Path(r["trial_dir"]) / "epochs.parquet").to_pylist() for r in rows}
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped and all(r["lr"] == 1e-7 for r in stopped), rows
    for row in stopped:  # at the rung of its last epoch, against every other trial that reached that epoch
        rung = row["epochs"]
        at_rung = {t: next(e for e in table if e["epoch"] == rung) for t, table in epochs.items() if len(table) >= rung}
        point = (at_rung[row["trial_id"]]["val_top_1_accuracy"], at_rung[row["trial_id"]]["params"])
        others = [(e["val_top_1_accuracy"], e["params"]) for t, e in at_rung.items() if t != row["trial_id"]]
        assert rung in (1, 2) and dominated(point, others), (row["trial_id"], rung, point, others)
    points = {r["trial_id"]: (r["val_top_1_accuracy"], r["params"]) for r in rows}
    front = {t for t, p in points.items() if not dominated(p, [q for s, q in points.items() if s != t])}
    best = json.loads((exp_dir / "best.json").read_text())
    assert {m["trial_id"] for m in best["front"]} == front == {r["trial_id"] for r in rows if r["pareto"] == 1}
    assert best["objectives"] == [{"metric": "val_top_1_accuracy", "mode": "max"}, {"metric": "params", "mode": "min"}]
    for member in best["front"]:
        assert member["values"] == dict(zip(("val_top_1_accuracy", "params"), points[member["trial_id"]]))
        assert member["command"].startswith("python -m toolbox.run ")
        assert member["command"].endswith(f"--name moasha-{member['trial_id']}")
    assert best["trial_id"] == rows[0]["trial_id"] and best["value"] == max(p[0] for p in points.values())
    assert (exp_dir / "plots" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert f"Pareto front (val_top_1_accuracy max, params min): {len(front)} of 6 trials" in proc.stdout
