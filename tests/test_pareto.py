"""Pareto fronts, MO-ASHA's decisions at its rungs and Optuna's multi-objective search, without Ray running."""

from __future__ import annotations

import math

import pytest
from ray.train._internal.storage import StorageContext
from ray.tune import PlacementGroupFactory
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from toolbox.config.registry import ConfigError
from toolbox.tuning.moasha import MultiObjectiveASHA
from toolbox.tuning.pareto import crowding_distances, dominates, pareto_fronts, pareto_order

ACCURACY_AND_PARAMS = ("max", "min")


def test_dominance_honours_each_objectives_mode():
    assert dominates((90, 100), (80, 200), ACCURACY_AND_PARAMS)
    assert not dominates((90, 200), (80, 100), ACCURACY_AND_PARAMS), "better on one, worse on the other"
    assert not dominates((90, 100), (90, 100), ACCURACY_AND_PARAMS), "equal is not better"
    assert dominates((80, 200), (90, 100), ("min", "max"))


def test_non_dominated_sorting_of_handmade_points():
    points = [
        (90, 1000),  # 0: the most accurate
        (80, 100),  # 1: the smallest
        (85, 500),  # 2: between them
        (84, 600),  # 3: dominated by 2 and 5
        (70, 1000),  # 4: dominated by every other, and by 3 alone once the first front is taken out
        (85, 500),  # 5: the same point as 2: neither dominates the other
    ]
    assert pareto_fronts(points, ACCURACY_AND_PARAMS) == [1, 1, 1, 2, 3, 1]
    # The other way round, 4 dominates every other; then 3 dominates 2 and 5.
    assert pareto_fronts(points, ("min", "max")) == [2, 2, 3, 2, 1, 3]
    assert pareto_fronts([], ACCURACY_AND_PARAMS) == []


def test_order_is_by_front_then_the_lonelier_first():
    front = [(0.0, 10.0), (1.0, 9.0), (5.0, 5.0), (10.0, 0.0)]  # maximize both: all non-dominated
    assert crowding_distances(front)[0] == crowding_distances(front)[3] == math.inf
    assert crowding_distances(front)[2] > crowding_distances(front)[1], "(1, 9) is crowded by (0, 10)"
    points = [*front, (0.0, 0.0)]
    assert pareto_order(points, ("max", "max")) == [0, 3, 2, 1, 4]


def trial(trial_id: str) -> Trial:
    return Trial(
        "run_trial",
        stub=True,
        trial_id=trial_id,
        placement_group_factory=PlacementGroupFactory([{"CPU": 1}]),
        storage=StorageContext(storage_path="/tmp", experiment_dir_name="sweep"),
    )


def report(scheduler: MultiObjectiveASHA, trial_id: str, epoch: int, accuracy: float, params: int) -> str:
    result = {"training_iteration": epoch, "val_top_1_accuracy": accuracy, "params": params}
    return scheduler.on_trial_result(None, trial(trial_id), result)


def moasha(grace_period: int = 1, reduction_factor: float = 2) -> MultiObjectiveASHA:
    objectives = [("val_top_1_accuracy", "max"), ("params", "min")]
    return MultiObjectiveASHA(objectives, "training_iteration", 4, grace_period, reduction_factor)


def test_moasha_stops_a_trial_dominated_at_its_rung_and_continues_a_non_dominated_one():
    scheduler = moasha()
    assert list(scheduler.rungs) == [4, 2, 1]
    assert report(scheduler, "big", 1, 80.0, 1000) == TrialScheduler.CONTINUE, "the first at a rung goes on"
    # The rung keeps one of two, and big comes first in its order; but nothing dominates small: it goes on.
    assert report(scheduler, "small", 1, 60.0, 100) == TrialScheduler.CONTINUE
    assert report(scheduler, "worse", 1, 70.0, 2000) == TrialScheduler.STOP, "less accurate and larger than big"
    assert report(scheduler, "big", 2, 85.0, 1000) == TrialScheduler.CONTINUE, "between rungs, and the first at rung 2"
    assert report(scheduler, "small", 2, 61.0, 100) == TrialScheduler.CONTINUE
    assert report(scheduler, "big", 4, 86.0, 1000) == TrialScheduler.STOP, "the last epoch"


def test_moasha_keeps_the_top_of_a_rung_even_where_dominated():
    """With reduction_factor 2, a rung of three keeps two: b, dominated by a alone, is second and goes on."""
    scheduler = moasha()
    for trial_id, accuracy, params in (("a", 90.0, 100), ("b", 80.0, 200), ("c", 70.0, 300)):
        report(scheduler, trial_id, 1, accuracy, params)
    assert scheduler.keeps(scheduler.rungs[1], "b") and not scheduler.keeps(scheduler.rungs[1], "c")


def test_moasha_skips_a_result_without_every_objective():
    scheduler = moasha()
    result = {"training_iteration": 1, "val_top_1_accuracy": 50.0}
    assert scheduler.on_trial_result(None, trial("t"), result) == TrialScheduler.CONTINUE
    assert not scheduler.rungs[1]


def test_moasha_rebuilds_its_rungs_from_replayed_epochs():
    """growth feeds a restored trial's epochs, then its completion, into a fresh scheduler: its rungs hold them once."""
    scheduler = moasha()
    for epoch, accuracy in ((1, 80.0), (2, 85.0)):
        report(scheduler, "big", epoch, accuracy, 1000)
    scheduler.on_trial_complete(None, trial("big"), {"training_iteration": 2, "val_top_1_accuracy": 85.0, "params": 1000})
    assert scheduler.rungs[1] == {"big": [80.0, 1000]} and scheduler.rungs[2] == {"big": [85.0, 1000]}
    assert report(scheduler, "worse", 2, 70.0, 2000) == TrialScheduler.STOP


MEDIAN_SWEEP = """\
from ray import tune
base = {"dataset": "DummyDataset", "dummy_input_shape": (8,)}
space = {"lr": tune.loguniform(1e-4, 1e-2)}
metric, mode, trial_scheduler = ["val_top_1_accuracy", "params"], ["max", "min"], "median_stopping"
"""


@pytest.mark.parametrize(("objective", "large_trial"), [("params", TrialScheduler.STOP), ("", TrialScheduler.CONTINUE)])
def test_median_stopping_compares_the_objective_it_is_given_even_after_tune_passes_it_the_primary(
    tmp_path, objective, large_trial
):
    from toolbox.tuning.sweepfile import load
    from toolbox.tuning.trial_schedulers import trial_scheduler

    path = tmp_path / "mo_median.py"
    path.write_text(MEDIAN_SWEEP + f"scheduler_options = {{'objective': {objective!r}, 'min_samples_required': 2}}\n")
    sweep = load(path)
    scheduler = trial_scheduler(sweep)
    assert scheduler.set_search_properties(sweep.metric, sweep.mode), "Tune refuses a scheduler that says False"
    for finished, accuracy, params in ((trial("small"), 60.0, 100), (trial("mid"), 70.0, 200)):
        for epoch in (1, 2):
            result = {"training_iteration": epoch, "val_top_1_accuracy": accuracy, "params": params}
            scheduler.on_trial_complete(None, finished, result)
    # The most accurate trial, and the largest: the median of params stops it, that of accuracy does not.
    assert report(scheduler, "large", 1, 95.0, 1000) == large_trial

    path.write_text(MEDIAN_SWEEP + "scheduler_options = {'objective': 'epoch_s'}\n")
    with pytest.raises(ConfigError, match="'epoch_s' is not one of the sweep's metrics: val_top_1_accuracy, params"):
        load(path)


def test_optuna_searches_every_objective_while_tune_ranks_by_the_primary(tmp_path):
    """Tune hands its searcher the primary objective alone; Optuna's study still has a direction per objective."""
    from ray import tune

    from toolbox.tuning.search import search_algorithm
    from toolbox.tuning.sweepfile import load

    path = tmp_path / "mo_optuna.py"
    path.write_text(
        "from ray import tune\n"
        'base = {"dataset": "DummyDataset", "dummy_input_shape": (8,)}\n'
        'space = {"lr": tune.loguniform(1e-4, 1e-2)}\n'
        'metric, mode, search, trial_scheduler = ["val_top_1_accuracy", "params"], ["max", "min"], "optuna", "moasha"\n'
    )
    sweep = load(path)
    searcher = search_algorithm(sweep, max_concurrent=2)
    assert searcher.set_search_properties(sweep.metric, sweep.mode, {"lr": tune.loguniform(1e-4, 1e-2)})
    config = searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"val_top_1_accuracy": 50.0, "params": 118, **config})
    study = searcher.searcher._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.trials[0].values == [50.0, 118]


def test_results_rank_by_front_then_the_primary_objective_each_trial_at_its_best_epoch(tmp_path):
    """A trial's point is its epoch that scored best by the primary objective, not each objective's own best."""
    from types import SimpleNamespace

    import pyarrow.fs

    from toolbox.training.epochlog import EpochLog
    from toolbox.tuning import results
    from toolbox.tuning.sweepfile import Sweep

    sweep = Sweep(name="s", space={}, metric=["val_top_1_accuracy", "epoch_s"], trial_scheduler="moasha")
    epochs = {  # (accuracy, seconds) per epoch
        "small": [(60.0, 1.0), (70.0, 3.0)],
        "big": [(80.0, 5.0), (75.0, 2.0)],  # its point is epoch 1's: (80, 5), not (80, 2)
        "slow": [(65.0, 6.0)],  # dominated by both
    }
    grid = []
    for trial_id, values in epochs.items():
        log = EpochLog(tmp_path / trial_id)
        for epoch, (accuracy, seconds) in enumerate(values, start=1):
            row = {"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "val_loss": 1.0, "val_top_1_accuracy": accuracy}
            log.append(row | {"epoch_s": seconds, "samples_per_s": 1.0, "params": 10})
        path = str(tmp_path / trial_id)
        grid.append(
            SimpleNamespace(
                path=path, filesystem=pyarrow.fs.LocalFileSystem(), metrics={"trial_id": trial_id}, config={}, error=None
            )
        )
    rows = results.trial_rows(grid, sweep)
    assert [(r["trial_id"], r["pareto"], r["val_top_1_accuracy"], r["epoch_s"], r["best_epoch"]) for r in rows] == [
        ("big", 1, 80.0, 5.0, 1),
        ("small", 1, 70.0, 3.0, 2),
        ("slow", 2, 65.0, 6.0, 1),
    ]
    header = results.format_table(rows, sweep).splitlines()[0].split()
    assert header[header.index("val_top_1_accuracy") :][:3] == ["val_top_1_accuracy", "epoch_s", "pareto"]
