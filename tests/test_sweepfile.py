"""Sweep files are checked before Ray starts: every shipped one loads, and each mistake gets exit code 2."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT

from toolbox import sweep as sweep_cli
from toolbox.components.datasets import DATASETS
from toolbox.config.registry import ConfigError
from toolbox.training.builders import build_dataset
from toolbox.tuning.fused_trials import fall_back_unless_fusable
from toolbox.tuning.range_tests import range_test_config
from toolbox.tuning.sweepfile import candidate_params, check_trials, load, range_tested, with_lr_bounds
from toolbox.tuning.trial_schedulers import TRIAL_SCHEDULERS, trial_scheduler

SHIPPED = sorted((ROOT / "sweeps").glob("*.py"))
GOOD = """\
from ray import tune
base = {"dataset": "DummyDataset", "dummy_input_shape": (8,)}
space = {
    "optimizer": tune.choice(["adamw", "sgd"]),
    "lr": {"adamw": tune.loguniform(1e-4, 1e-3), "sgd": tune.loguniform(1e-2, 1e-1)},
    "momentum": tune.uniform(0.8, 0.9),
}
num_samples = 2
epochs = 2
"""


def write(tmp_path: Path, text: str, name: str = "sweep_under_test.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_sweep_files_load_and_their_trials_build(path, tmp_path):
    """Each shipped sweep file, on its dataset's tiny test data: every candidate trial builds for that data."""
    dataset = load(path).trial_config({})["dataset"]
    sweep = load(path, base_overrides=DATASETS[dataset].meta["tiny"](tmp_path))
    assert sweep.space and sweep.num_samples >= 1
    assert candidate_params(sweep.space), "the checks must have tried some trial configs"
    check_trials(sweep, build_dataset(sweep.trial_config({})).spec, str(path))


def test_lr_sched_is_the_issue_sweep():
    sweep = load(ROOT / "sweeps" / "lr_sched.py")
    assert sweep.trial_config({})["dataset"] == "MNIST"
    assert sweep.trial_scheduler == "asha" and sweep.num_samples >= 16 and sweep.epochs <= 10
    assert {"optimizer", "scheduler", "lr", "warmup_epochs"} <= set(sweep.space)


def test_space_is_conditional_on_the_chosen_component(tmp_path):
    sweep = load(write(tmp_path, GOOD))
    adamw = sweep.trial_config({"optimizer": "adamw", "lr": {"adamw": 5e-4, "sgd": 0.05}, "momentum": 0.85})
    sgd = sweep.trial_config({"optimizer": "sgd", "lr": {"adamw": 5e-4, "sgd": 0.05}, "momentum": 0.85})
    assert adamw["lr"] == 5e-4 and "momentum" not in adamw
    assert sgd["lr"] == 0.05 and sgd["momentum"] == 0.85
    assert sgd["epochs"] == 2 and sgd["dummy_input_shape"] == (8,)


BAD = {
    "unknown key": ('space = {"lrr": 0.1}', "unknown key 'lrr' (did you mean 'lr'?)"),
    "unknown field": ('space = {"lr": 0.1}\nnum_sample = 3', "unknown sweep field 'num_sample' (did you mean 'num_samples'?)"),
    "unknown component": (
        'from ray import tune\nspace = {"optimizer": tune.choice(["adamw", "sgdd"])}',
        "unknown optimizer 'sgdd' (did you mean 'sgd'?)",
    ),
    "value a component refuses": ('from ray import tune\nspace = {"lr": tune.uniform(-1.0, 1.0)}', "--lr must be > 0"),
    "value of the wrong type": ('space = {"ff_activation": "swish"}', "--ff-activation: 'swish' is not one of"),
    "wrong per-component name": (
        'from ray import tune\nspace = {"lr": {"adamw": 1e-3, "adagrad": 1e-2}}',
        "'adagrad' is not a optimizer that takes 'lr'",
    ),
    "metric nothing reports": (
        'space = {"lr": 0.1}\nmetric = "val_top_3_accuracy"',
        "metric 'val_top_3_accuracy' is never reported",
    ),
    "swept dataset key": ('from ray import tune\nspace = {"dummy_n_samples": tune.choice([64, 128])}', "cannot be swept"),
    "unknown trial scheduler": (
        'space = {"lr": 0.1}\ntrial_scheduler = "ashaa"',
        "unknown trial scheduler 'ashaa' (did you mean 'asha'?); choices: asha, fifo,",
    ),
    "unknown scheduler option": (
        'space = {"lr": 0.1}\nscheduler_options = {"grace": 2}',
        "scheduler_options: asha takes no option 'grace' (did you mean 'grace_period'?); it takes: grace_period, reduction_factor, brackets",
    ),
    "scheduler option breaking its rule": (
        'space = {"lr": 0.1}\ntrial_scheduler = "hyperband"\nscheduler_options = {"reduction_factor": 0.5}',
        "scheduler_options['reduction_factor'] must be > 1, got 0.5",
    ),
    "misspelled range test": (
        'space = {"lr": "range_tst"}',
        "space['lr']: 'range_tst' is no lr (did you mean 'range_test'?); the one text it takes is 'range_test'",
    ),
    "misspelled per-optimizer range test": (
        'space = {"lr": {"adamw": "range-test"}}',
        "space['lr']['adamw']: 'range-test' is no lr (did you mean 'range_test'?)",
    ),
    "range test of another key": (
        'space = {"weight_decay": "range_test"}',
        "space['weight_decay']: an LR range test sets the bounds of 'lr' only, not of 'weight_decay'",
    ),
    "range test of another per-component key": (
        'space = {"lr": "range_test", "momentum": {"sgd": "range_test"}}',
        "space['momentum']['sgd']: an LR range test sets the bounds of 'lr' only",
    ),
    "range test in base": (
        'base = {"lr": "range_test"}\nspace = {"momentum": 0.9}',
        "base['lr']: 'range_test' goes in `space` (as the lr), not in base",
    ),
    "unknown range test option": (
        'space = {"lr": "range_test"}\nrange_test = {"step": 20}',
        "range_test: no option 'step' (did you mean 'steps'?); it takes: start_lr, end_lr, steps",
    ),
    "range test option breaking its rule": (
        'space = {"lr": "range_test"}\nrange_test = {"start_lr": 0}',
        "range_test['start_lr'] must be > 0, got 0",
    ),
    "range test ramp going down": (
        'space = {"lr": "range_test"}\nrange_test = {"start_lr": 1.0, "end_lr": 0.1}',
        "range_test: --end-lr 0.1 must be larger than --start-lr 1",
    ),
    "a mode short of the metrics": (
        'space = {"lr": 0.1}\nmetric = ["val_top_1_accuracy", "params"]\nmode = ["max"]\ntrial_scheduler = "moasha"',
        "mode: ['max'] is not one mode per metric of ['val_top_1_accuracy', 'params']: give 2, or none",
    ),
    "an unknown mode in a list": (
        'space = {"lr": 0.1}\nmetric = ["val_top_1_accuracy", "params"]\nmode = ["max", "least"]\ntrial_scheduler = "moasha"',
        "mode: 'least' is not one of min, max",
    ),
    "a metric named twice": (
        'space = {"lr": 0.1}\nmetric = ["val_loss", "params", "val_loss"]\ntrial_scheduler = "moasha"',
        "metric: 'val_loss' is named twice in ['val_loss', 'params', 'val_loss']",
    ),
    "an objective nothing reports": (
        'space = {"lr": 0.1}\nmetric = ["val_top_1_accuracy", "param"]\ntrial_scheduler = "moasha"',
        "metric 'param' is never reported (did you mean 'params'?)",
    ),
    "moasha with one objective": (
        'space = {"lr": 0.1}\ntrial_scheduler = "moasha"',
        "moasha ranks by several objectives, and this sweep has one ('val_top_1_accuracy'): use trial_scheduler 'asha'",
    ),
    "asha with two objectives": (
        'space = {"lr": 0.1}\nmetric = ["val_top_1_accuracy", "params"]',
        "asha ranks by one metric, and this sweep has 2: use trial_scheduler 'moasha'",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_sweep_file_is_refused_before_ray(tmp_path, capsys, case):
    text, expected = BAD[case]
    path = write(tmp_path, text)
    assert sweep_cli.main([str(path), "--storage", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "out").exists(), "nothing may be written for a refused sweep"


@pytest.mark.parametrize(
    ("lr", "tested"),
    [
        ('"range_test"', ["adamw", "sgd"]),
        ('{"adamw": "range_test", "sgd": tune.loguniform(1e-2, 1e-1)}', ["adamw"]),
    ],
    ids=["plain", "per-optimizer"],
)
def test_range_test_is_an_lr_whose_bounds_the_test_sets(lr, tested, tmp_path):
    """The text "range_test" loads as the lr, plain (every optimizer the sweep may choose) or per optimizer; its trials
    check and build; the bounds replace it, per optimizer, and each test trains the base with its optimizer."""
    from ray.tune.search.sample import Float

    sweep = load(write(tmp_path, GOOD.replace(GOOD.split('"lr": ')[1].split(",\n")[0], lr) + 'range_test = {"steps": 20}\n'))
    assert range_tested(sweep) == tested and sweep.ramp.steps == 20 and sweep.ramp.start_lr == 1e-7
    check_trials(sweep, build_dataset(sweep.trial_config({})).spec, "sweep")
    bounds = {"adamw": [1e-4, 2e-3], "sgd": [3e-3, 4e-2]}
    space = with_lr_bounds(sweep, bounds)
    for optimizer in tested:
        domain = space["lr"][optimizer]
        assert isinstance(domain, Float) and [domain.lower, domain.upper] == bounds[optimizer]
    assert candidate_params(space)[0]["lr"].keys() == {"adamw", "sgd"}
    config = range_test_config(sweep, "sgd")
    assert config["optimizer"] == "sgd" and config["dummy_input_shape"] == (8,) and config["momentum"] == 0.8


def test_a_sweep_without_range_test_keeps_its_space(tmp_path):
    sweep = load(write(tmp_path, GOOD))
    assert range_tested(sweep) == [] and with_lr_bounds(sweep, {}) is sweep.space


def test_import_error_names_the_file_and_line(tmp_path, capsys):
    path = write(tmp_path, 'from ray import tune\nspace = {"lr": 0.1}\nepochs = 1 / 0\n', name="broken.py")
    assert sweep_cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3" in err and "ZeroDivisionError" in err


def test_cli_override_is_checked_too(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="num_samples must be > 0, got 0"):
        load(path, {"num_samples": 0})
    with pytest.raises(ConfigError, match=r"--ff-dropout must be >= 0 and < 1, got 1.5"):
        load(path, base_overrides={"ff_dropout": 1.5})


def test_another_trial_scheduler_on_the_command_line_drops_the_files_options():
    """--trial-scheduler fifo on lr_sched.py: its ASHA options are not fifo's, and the sweep still loads."""
    sweep = load(ROOT / "sweeps" / "lr_sched.py", {"trial_scheduler": "fifo"})
    assert sweep.trial_scheduler == "fifo" and sweep.scheduler_options == {}
    assert load(ROOT / "sweeps" / "lr_sched.py", {"trial_scheduler": "asha"}).scheduler_options == {
        "grace_period": 1,
        "reduction_factor": 3.0,
    }


@pytest.mark.parametrize("name", TRIAL_SCHEDULERS.names())
def test_every_trial_scheduler_builds_with_its_default_options(name, tmp_path):
    from ray.tune.schedulers import TrialScheduler

    text = GOOD + f"trial_scheduler = {name!r}\n"
    try:
        sweep = load(write(tmp_path, text))
    except ConfigError:  # one for several objectives (moasha)
        sweep = load(write(tmp_path, text + 'metric = ["val_top_1_accuracy", "params"]\n'))
    assert isinstance(trial_scheduler(sweep), TrialScheduler)


@pytest.mark.parametrize("scheduler", ["asha", "hyperband"])
def test_fuse_falls_back_for_hyperband_and_says_why(scheduler, tmp_path, caplog):
    """HyperBand pauses trials; a fused member's paused trial is never resumed, so its sweeps run unfused."""
    path = write(tmp_path, GOOD.replace("num_samples = 2", f"num_samples = 2\nfuse = 2\ntrial_scheduler = {scheduler!r}"))
    sweep = load(path)
    data = build_dataset(sweep.trial_config(candidate_params(sweep.space)[0]))
    with caplog.at_level("INFO", logger="toolbox"):
        fall_back_unless_fusable(sweep, data, None)
    assert (sweep.fuse, "HyperBand pauses trials" in caplog.text) == ((0, True) if scheduler == "hyperband" else (2, False))


def test_fuse_falls_back_where_a_trials_optimizer_has_no_stacked_step_and_names_it(test_only_components, tmp_path, caplog):
    """Trials with an optimizer that cannot fuse run unfused, and so do the others: one line names the optimizer."""
    path = write(tmp_path, GOOD.replace('tune.choice(["adamw", "sgd"])', 'tune.choice(["adamw", "test_rmsprop"])') + "fuse = 2\n")
    sweep = load(path)
    data = build_dataset(sweep.trial_config(candidate_params(sweep.space)[0]))
    with caplog.at_level("INFO", logger="toolbox"):
        fall_back_unless_fusable(sweep, data, None)
    assert sweep.fuse == 0
    assert [r.getMessage() for r in caplog.records if "cannot fuse" in r.getMessage()] == [
        "fuse = 2: trials with test_rmsprop cannot fuse (RMSprop has no stacked step; Adam, AdamW and SGD have); "
        "each trial runs in its own process"
    ]


@pytest.mark.parametrize(
    ("lines", "mode"),
    [
        ('metric = "val_top_1_accuracy"', "max"),
        ('metric = "val_loss"', "min"),
        ('metric = "val_mean_absolute_error"\nbase = {"dataset": "Regression"}', "min"),
        ('metric = "val_mean_absolute_error"\nmode = "max"\nbase = {"dataset": "Regression"}', "max"),
    ],
    ids=["accuracy", "loss", "error", "set-in-the-file"],
)
def test_mode_not_set_is_the_metrics_own(lines, mode, tmp_path):
    """A sweep file without `mode` ranks by its metric's registered mode (errors and losses fall); a set one stays."""
    space = '{"lr": tune.loguniform(1e-4, 1e-3)}'
    assert load(write(tmp_path, f"from ray import tune\nspace = {space}\n{lines}\n")).mode == mode


@pytest.mark.parametrize(
    ("lines", "objectives"),
    [
        (
            'metric = ["val_top_1_accuracy", "params", "epoch_s"]',
            [("val_top_1_accuracy", "max"), ("params", "min"), ("epoch_s", "min")],
        ),
        ('metric = ["params", "val_loss"]\nmode = ["max", "min"]', [("params", "max"), ("val_loss", "min")]),
        ('metric = ("val_loss",)', [("val_loss", "min")]),
    ],
    ids=["own-modes", "set-in-the-file", "a-list-of-one"],
)
def test_several_objectives_each_with_its_mode_the_first_the_primary(lines, objectives, tmp_path):
    """``metric`` and ``mode`` hold the primary objective, which Tune ranks by; ``objectives`` all of them."""
    sweep = load(write(tmp_path, f'space = {{"lr": 0.1}}\ntrial_scheduler = "fifo"\n{lines}\n'))
    assert list(sweep.objectives) == objectives and (sweep.metric, sweep.mode) == objectives[0]
    assert sweep.multi_objective == (len(objectives) > 1)


def test_fuse_falls_back_for_map_style_splits_and_says_why(tmp_path, caplog, monkeypatch):
    """A dataset of map-style splits is read through a DataLoader per trial: its trials cannot share one stack."""
    from helpers import register_map_style_dataset

    given = register_map_style_dataset(monkeypatch)
    path = write(
        tmp_path,
        GOOD.replace('"dataset": "DummyDataset", "dummy_input_shape": (8,)', f'"dataset": {given["dataset"]!r}') + "fuse = 2\n",
    )
    sweep = load(path)
    data = build_dataset(sweep.trial_config(candidate_params(sweep.space)[0]))
    with caplog.at_level("INFO", logger="toolbox"):
        fall_back_unless_fusable(sweep, data, None)
    assert sweep.fuse == 0 and "the dataset is map-style splits" in caplog.text
