"""``--confirm K --seeds S``: a finished sweep's best configurations re-trained over new seeds, as a sweep of
their own in its dir (resumable, and kept when the sweep grows)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from test_grow import finished_sweep_dir, killed_mid_way, sweep, write
from test_reliability import assert_every_epoch_once


@pytest.mark.timeout(1200)
def test_confirm_retrains_the_best_over_new_seeds_survives_a_driver_kill_and_outlives_a_grow(tmp_path):
    path = write(tmp_path, 'space = {"lr": tune.loguniform(1e-3, 1e-1)}\nnum_samples = 2\n')
    args = [str(path), "--storage", str(tmp_path), "--seed", "1"]
    first = sweep(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    grown = sweep(*args, "--num-samples", "3")  # a grown sweep can be confirmed
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    exp_dir = tmp_path / "grow"
    ranked = pq.read_table(exp_dir / "results.parquet").to_pylist()

    confirm = [*args, "--num-samples", "3", "--confirm", "2", "--seeds", "3"]
    killed_mid_way(confirm, after="[2/6]")
    again = sweep(*confirm)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    verdict = next(line for line in again.stdout.splitlines() if "the sweep's winner" in line)
    assert f"trial {ranked[0]['trial_id']} ranked 1st on one seed" in verdict and "on the mean of 3" in verdict, verdict

    table = pq.read_table(exp_dir / "confirm.parquet").to_pylist()
    assert {r["trial_id"] for r in table} == {ranked[0]["trial_id"], ranked[1]["trial_id"]}
    runs = {d.name: d for d in (exp_dir / "confirm").glob("run_trial_*")}
    assert len(runs) == 6, "each configuration x seed once, the killed ones resumed"
    for row in table:
        assert row["seeds"] == [2, 3, 4], "seeds the search never trained on"
        assert len(row["values"]) == 3 and abs(row["mean"] - sum(row["values"]) / 3) < 1e-9
        assert row["ci95_low"] <= row["mean"] <= row["ci95_high"]
    for run_dir in runs.values():
        assert_every_epoch_once(run_dir, 2)
    trained = pq.read_table(exp_dir / "confirm" / "results.parquet").to_pylist()
    assert sorted((r["candidate"], r["seed"]) for r in trained) == sorted(
        (t, s) for t in {r["trial_id"] for r in table} for s in (2, 3, 4)
    )
    best = json.loads((exp_dir / "best.json").read_text())
    assert (
        best["confirmed"]["trial_id"] == table[0]["trial_id"]
        and "for seed in 2 3 4; do python -m toolbox.run" in best["confirmed"]["command"]
    )
    assert (exp_dir / "plots" / "confirm.png").stat().st_size > 0

    more = sweep(*args, "--num-samples", "4")  # a confirmation is not lost when the sweep grows
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert json.loads((exp_dir / "best.json").read_text())["confirmed"] == best["confirmed"]
    assert pq.read_table(exp_dir / "confirm.parquet").to_pylist() == table


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        pytest.param(["--confirm", "2"], "holds no results yet: run the sweep first", id="no-results"),
        pytest.param(["--confirm", "2", "--seeds", "1"], "give --confirm >= 1 and --seeds >= 2", id="one-seed"),
        pytest.param(["--seeds", "3"], "--seeds: give it with --confirm K", id="seeds-alone"),
        pytest.param(
            ["--confirm", "2", "--num-samples", "3"], "num_samples changed since it ran; re-run it without --confirm", id="grown"
        ),
    ],
)
def test_a_confirmation_that_cannot_run_is_refused_before_ray(tmp_path, argv, said):
    path = write(tmp_path, 'space = {"lr": tune.loguniform(1e-3, 1e-1)}\nnum_samples = 2\n')
    exp_dir = finished_sweep_dir(tmp_path, path)
    proc = sweep(str(path), "--storage", str(tmp_path), *argv)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert said in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (exp_dir / "confirm").exists() and "Ray dashboard" not in proc.stdout
