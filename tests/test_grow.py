"""Growing a finished sweep by re-running it with a larger spec: more trials, another space, more epochs.

Each grow is killed mid-way (the driver SIGKILLed) and re-run: nothing is lost and nothing runs twice."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import run_cli
from ray import cloudpickle
from test_reliability import Cli, assert_every_epoch_once, trial_dirs

from toolbox.distributed.dirkind import KIND_FILE, SWEEP
from toolbox.tuning.growth import RECORD, spec_of
from toolbox.tuning.snapshots import NEWEST_BATCH, SEARCHER_FILES
from toolbox.tuning.sweepfile import load

GROW = """\
from ray import tune
base = {"dataset": "DummyDataset", "dummy_n_samples": 3000, "dummy_val_n_samples": 128, "dummy_input_shape": (16,),
        "ff_hidden_sizes": (16,), "batch_size": 8, "scheduler": "cosine_annealing_lr"}
num_samples = 1
epochs = 2
trial_scheduler = "fifo"
max_concurrent = 1
"""


def write(tmp_path: Path, body: str, name: str = "grow") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(GROW + textwrap.dedent(body))
    return path


def sweep(*args: str):
    return run_cli("sweep", *args, timeout=400)


def rows_of(exp_dir: Path) -> dict[str, dict]:
    return {r["trial_id"]: r for r in pq.read_table(exp_dir / "results.parquet").to_pylist()}


def killed_mid_way(args: list[str], after: str) -> None:
    """The command, its driver SIGKILLed once it printed ``after``."""
    cli = Cli("sweep", *args)
    cli.wait_for(after)
    os.kill(cli.proc.pid, signal.SIGKILL)
    cli.finish()


def searcher_counting_every_trial_live(exp_dir: Path) -> None:
    """The sweep dir's newest snapshot made one taken before any trial ended, its searcher counting every trial drawn
    as live, as a driver killed between a trial's end and the upload of the next snapshot can leave it (its searcher,
    told of no end, waited forever). The searcher's own file says the same."""

    drawn = {"_".join(trial.name.split("_")[2:4]) for trial in trial_dirs(exp_dir)}  # run_trial_<prefix>_<number>_...

    def every_trial_live(searcher: bytes) -> bytes:
        state = pickle.loads(searcher)
        state["_live_trials"] = drawn
        return cloudpickle.dumps(state)  # as Tune writes it: the spec inside holds local functions

    path = max(exp_dir.glob("basic-variant-state-*.json"))
    path.write_bytes(every_trial_live(path.read_bytes()))
    snapshot_path = max(exp_dir.glob("experiment_state-*.json"))
    snapshot = json.loads(snapshot_path.read_text())
    snapshot[NEWEST_BATCH] = -1
    files = snapshot[SEARCHER_FILES]
    for name, content in files.items():
        files[name] = base64.b64encode(every_trial_live(base64.b64decode(content))).decode()
    snapshot_path.write_text(json.dumps(snapshot))


def epochs_files(exp_dir: Path) -> dict[str, bytes]:
    return {d.name: (d / "epochs.csv").read_bytes() for d in trial_dirs(exp_dir)}


@pytest.fixture(scope="module")
def grown_to_four(tmp_path_factory) -> dict:
    """A 2-trial sweep grown to 4 trials, the grow's driver killed mid-way and the same command re-run: its args,
    its dir, the first trials' epochs files from before the grow, and the re-run's output."""
    tmp_path = tmp_path_factory.mktemp("more")
    path = write(tmp_path, 'space = {"lr": tune.loguniform(1e-3, 1e-1)}\nnum_samples = 2\n')
    args = [str(path), "--storage", str(tmp_path), "--seed", "1"]
    first = sweep(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    exp_dir = tmp_path / "grow"
    before = epochs_files(exp_dir)

    killed_mid_way([*args, "--num-samples", "4"], after="[3/4]")
    searcher_counting_every_trial_live(exp_dir)
    again = sweep(*args, "--num-samples", "4")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return {"args": args, "exp_dir": exp_dir, "before": before, "again": again}


@pytest.mark.timeout(900)
def test_more_trials_add_new_ones_only_even_when_the_grow_is_killed(grown_to_four):
    args, exp_dir, before = grown_to_four["args"], grown_to_four["exp_dir"], grown_to_four["before"]
    assert "interrupted" not in grown_to_four["again"].stderr

    rows = rows_of(exp_dir)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows.values()), (rows, "runs before the confirm test")
    assert len(trial_dirs(exp_dir)) == 4, "no orphan trial dir"
    assert {k: v for k, v in epochs_files(exp_dir).items() if k in before} == before, "the first trials never ran again"
    for trial in trial_dirs(exp_dir):
        assert_every_epoch_once(trial, 2)
    assert len({r["lr"] for r in rows.values()}) == 4, "the new trials drew new points"
    record = json.loads((exp_dir / RECORD).read_text())
    assert [r["changes"][0].split(":")[0] for r in record["rounds"]] == ["num_samples 2 -> 4"]
    assert record["pending"] is False

    same = sweep(*args, "--num-samples", "4")  # the spec is done: nothing runs, exit 0
    assert same.returncode == 0 and "new trials" not in same.stdout and "growing" not in same.stdout, same.stdout[-2000:]


@pytest.mark.timeout(1200)
def test_confirm_retrains_the_best_over_new_seeds_survives_a_driver_kill_and_outlives_a_grow(grown_to_four):
    """``--confirm K --seeds S`` on the grown sweep: its best configurations re-trained over new seeds, as a sweep
    of their own in its dir (resumable, and kept when the sweep grows again)."""
    args, exp_dir = grown_to_four["args"], grown_to_four["exp_dir"]
    ranked = pq.read_table(exp_dir / "results.parquet").to_pylist()

    confirm = [*args, "--num-samples", "4", "--confirm", "2", "--seeds", "3"]
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
    lrs = {r["trial_id"]: r["lr"] for r in ranked}
    for run in trained:  # each run's config as it trained: its candidate's values, its own seed
        config = json.loads(run["config"]) if isinstance(run["config"], str) else run["config"]
        assert (config["lr"], config["seed"]) == (lrs[run["candidate"]], run["seed"]), (run["candidate"], config)
    best = json.loads((exp_dir / "best.json").read_text())
    assert (
        best["confirmed"]["trial_id"] == table[0]["trial_id"]
        and "for seed in 2 3 4; do python -m toolbox.run" in best["confirmed"]["command"]
    )
    assert (exp_dir / "plots" / "confirm.png").stat().st_size > 0

    more = sweep(*args, "--num-samples", "5")  # a confirmation is not lost when the sweep grows
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert json.loads((exp_dir / "best.json").read_text())["confirmed"] == best["confirmed"]
    assert pq.read_table(exp_dir / "confirm.parquet").to_pylist() == table


@pytest.mark.timeout(900)
def test_more_epochs_continue_the_trials_that_reached_the_budget_and_early_stopped_ones_stay_stopped(tmp_path):
    """ASHA stops the trials whose lr barely moves them at epoch 1; the others reached 2 epochs and continue to 4."""
    body = """\
    space = {"lr": tune.grid_search([0.05, 0.02, 1e-6, 2e-6])}
    trial_scheduler = "asha"
    scheduler_options = {"grace_period": 1, "reduction_factor": 2}
    """
    path = write(tmp_path, body)
    args = [str(path), "--storage", str(tmp_path), "--seed", "1"]
    first = sweep(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    exp_dir = tmp_path / "grow"
    stopped = {t: r for t, r in rows_of(exp_dir).items() if r["status"] == "stopped"}
    reached = {t: r for t, r in rows_of(exp_dir).items() if r["status"] == "done"}
    assert stopped and reached, rows_of(exp_dir)

    killed_mid_way([*args, "--epochs", "4"], after="done after 4 epochs")
    again = sweep(*args, "--epochs", "4")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    rows = rows_of(exp_dir)
    for trial in reached:
        assert (rows[trial]["status"], rows[trial]["epochs"], rows[trial]["budget"]) == ("done", 4, 4), rows[trial]
    for trial, row in stopped.items():
        assert (rows[trial]["status"], rows[trial]["epochs"], rows[trial]["budget"]) == ("stopped", row["epochs"], 2)
    for trial in trial_dirs(exp_dir):
        assert_every_epoch_once(trial, 4 if any(t in trial.name for t in reached) else 1)
    assert "budget" in again.stdout.split("rank", 1)[1].splitlines()[0], "the table shows budgets where they differ"


@pytest.mark.timeout(900)
def test_another_space_runs_only_new_points_marks_the_outside_ones_and_keeps_the_asha_rungs(tmp_path):
    """A grid value added runs once; one removed stays in the results as 'outside'. The new, hopeless
    trial is stopped at epoch 1 because the rung still holds the first run's trials (Tune's restore drops it)."""
    body = """\
    space = {"lr": tune.grid_search([0.05, 0.02])}
    trial_scheduler = "asha"
    scheduler_options = {"grace_period": 1, "reduction_factor": 2}
    """
    path = write(tmp_path, body)
    args = [str(path), "--storage", str(tmp_path), "--seed", "1"]
    first = sweep(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    exp_dir = tmp_path / "grow"
    before = epochs_files(exp_dir)

    path.write_text(path.read_text().replace("[0.05, 0.02]", "[0.05, 1e-6]"))
    killed_mid_way(args, after="1 new trials")
    grown = sweep(*args)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    record = json.loads((exp_dir / RECORD).read_text())
    assert "space['lr']" in record["rounds"][0]["changes"][0] and "only new points run" in record["rounds"][0]["changes"][0]

    rows = list(rows_of(exp_dir).values())
    by_lr = {r["lr"]: r for r in rows}
    assert sorted(by_lr) == [1e-6, 0.02, 0.05], rows
    assert by_lr[0.02]["status"] == "outside" and rows[-1]["lr"] == 0.02, "outside trials rank after the spec's own"
    assert by_lr[0.05]["status"] == "done"
    assert (by_lr[1e-6]["status"], by_lr[1e-6]["epochs"]) == ("stopped", 1), by_lr[1e-6]
    assert {k: v for k, v in epochs_files(exp_dir).items() if k in before} == before
    assert json.loads((exp_dir / "best.json").read_text())["trial_id"] == by_lr[0.05]["trial_id"]


@pytest.mark.timeout(600)
def test_a_grown_optuna_sweep_suggests_its_new_trial_from_a_study_that_holds_the_earlier_results(tmp_path):
    path = write(tmp_path, 'space = {"lr": tune.loguniform(1e-3, 1e-1)}\nnum_samples = 2\nsearch = "optuna"\n')
    args = [str(path), "--storage", str(tmp_path), "--seed", "1"]
    first = sweep(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    grown = sweep(*args, "--num-samples", "3")
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]

    exp_dir = tmp_path / "grow"
    rows = rows_of(exp_dir)
    assert len(rows) == 3
    state = pickle.loads(sorted(exp_dir.glob("searcher-state-*.pkl"))[-1].read_bytes())
    study = state["_ot_study"].trials
    assert [t.state.name for t in study] == ["COMPLETE"] * 3
    first_lrs = sorted(r["lr"] for r in pq.read_table(exp_dir / "results.parquet").to_pylist())
    assert sorted(t.params["lr"] for t in study) == first_lrs
    assert study[2].params["lr"] not in {t.params["lr"] for t in study[:2]}

    beside = sweep(*args, "--num-samples", "1", "--name", "beside", "--grow-from", "grow")
    assert beside.returncode == 0, beside.stdout[-3000:] + beside.stderr[-3000:]
    assert "grown from sweep grow: the searcher starts from its 3 trials inside this space" in beside.stdout
    state = pickle.loads(sorted((tmp_path / "beside").glob("searcher-state-*.pkl"))[-1].read_bytes())
    study = state["_ot_study"].trials
    values = {r["lr"]: r["val_top_1_accuracy"] for r in rows.values()}
    assert [(t.params["lr"], t.values[0]) for t in study[:3]] == [(lr, values[lr]) for lr in (t.params["lr"] for t in study[:3])]
    assert len(study) == 4 and set(values) == {t.params["lr"] for t in study[:3]}


def finished_sweep_dir(tmp_path: Path, path: Path) -> Path:
    """A sweep dir as a finished run of ``path`` leaves it, as far as the checks before Ray read it."""
    exp_dir = tmp_path / path.stem
    exp_dir.mkdir()
    (exp_dir / KIND_FILE).write_text(SWEEP)
    (exp_dir / RECORD).write_text(json.dumps({"spec": spec_of(load(path)), "rounds": [], "budgets": {}}))
    return exp_dir


@pytest.mark.parametrize(
    ("edit", "argv", "said"),
    [
        pytest.param("", ["--metric", "val_loss"], 'metric "val_top_1_accuracy", now "val_loss"', id="metric"),
        pytest.param("", ["--num-samples", "1"], "num_samples 2, now 1: a sweep does not shrink", id="shrink"),
        pytest.param("", ["--ff-hidden-sizes", "8"], "ran with base", id="base"),
        pytest.param('del space["momentum"]\n', [], "momentum left its space", id="key-removed"),
    ],
)
def test_a_change_that_cannot_grow_is_refused_before_ray_with_the_choices_and_nothing_touched(tmp_path, edit, argv, said):
    path = write(tmp_path, 'space = {"lr": tune.loguniform(1e-3, 1e-1), "momentum": tune.uniform(0.8, 0.9)}\nnum_samples = 2\n')
    exp_dir = finished_sweep_dir(tmp_path, path)
    files = {p.name: p.read_bytes() for p in exp_dir.iterdir()}
    path.write_text(path.read_text() + edit)
    proc = sweep(str(path), "--storage", str(tmp_path), *argv)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert said in line and "--restart" in line and "--name NEW --grow-from grow" in line, line
    assert "Ray dashboard" not in proc.stdout
    assert {p.name: p.read_bytes() for p in exp_dir.iterdir()} == files


def test_grow_from_refuses_a_random_search_before_ray(tmp_path):
    path = write(tmp_path, 'space = {"lr": tune.loguniform(1e-3, 1e-1)}\nnum_samples = 2\n')
    finished_sweep_dir(tmp_path, path)
    proc = sweep(str(path), "--storage", str(tmp_path), "--name", "beside", "--grow-from", "grow")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "random search draws independent points" in proc.stderr and "Ray dashboard" not in proc.stdout
    assert not (tmp_path / "beside").exists()


def test_pbt_gets_back_its_population_and_clock_from_the_epochs_of_the_restored_trials():
    """Tune's restore gives PBT no state: a trial resumed at epoch 5 would be perturbed at once, its last
    perturbation read as epoch 0; restored, it waits for epoch 6, and the population holds epoch 4's scores."""
    from ray.train._internal.storage import StorageContext
    from ray.tune import PlacementGroupFactory
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
    from ray.tune.schedulers.pbt import _PBTTrialState

    from toolbox.tuning.growth import _restore_population

    pbt = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=2, synch=True, hyperparam_mutations={"lr": [0.1, 0.2]}
    )
    pbt.set_search_properties("val_top_1_accuracy", "max")
    epochs = {}
    for index, accuracy in enumerate((50.0, 70.0)):
        trial = Trial(
            "run_trial",
            stub=True,
            trial_id=f"t{index}",
            placement_group_factory=PlacementGroupFactory([{"CPU": 1}]),
            storage=StorageContext(storage_path="/tmp", experiment_dir_name="sweep"),
        )
        pbt._trial_state[trial] = _PBTTrialState(trial)
        epochs[trial] = [{"training_iteration": e, "val_top_1_accuracy": accuracy + e} for e in range(1, 5)]
    _restore_population(pbt, epochs)
    first = next(iter(epochs))
    assert [pbt._trial_state[t].last_score for t in epochs] == [54.0, 74.0]
    assert pbt._next_perturbation_sync == 6
    # Not yet at its next perturbation: PBT continues it without asking the controller anything.
    assert pbt.on_trial_result(None, first, {"training_iteration": 5, "val_top_1_accuracy": 56.0}) == TrialScheduler.CONTINUE
