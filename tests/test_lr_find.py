"""``python -m toolbox.lr_find``: the LR range test's arithmetic, its suggestion on a quadratic whose good lr is
known, its early stop, a two-worker DDP test on a real local Ray, and its outputs (of which nothing resumes);
and a sweep whose lr is "range_test", whose bounds a grown re-run reuses."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_DUMMY, run_cli, train_locally
from test_refusals import refused

from toolbox import lr_find
from toolbox.components.models import MODELS
from toolbox.config.resolve import resolve
from toolbox.run import main as run_main
from toolbox.training.builders import build_criterion, build_dataset, build_model
from toolbox.training.checkpoint import load_state
from toolbox.training.lr_range import Curve, Ramp, suggest
from toolbox.training.phases import training_batches
from toolbox.training.range_test import range_test
from toolbox.training.session import local_session
from toolbox.tuning import sweepfile
from toolbox.tuning.range_tests import BOUNDS_FILE, TESTS_DIR, range_test_config

# One linear layer: with mse_loss, its loss is a quadratic whose curvature the data decides.
LINEAR_MODEL = '''\
import math

from torch import nn

from toolbox.components.models import MODELS


@MODELS.register("test_linear")
def test_linear(sample_shape, num_outputs, /) -> nn.Module:
    """One linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(sample_shape), num_outputs))
'''
SAMPLES, FEATURES = 64, 8
# Full-batch plain SGD (every step sees all the samples): gradient descent on the quadratic.
QUADRATIC = {
    "arch": "test_linear",
    "dataset": "Regression",
    "regression_n_samples": SAMPLES,
    "regression_val_n_samples": 16,
    "regression_input_shape": (FEATURES,),
    "optimizer": "sgd",
    "momentum": 0.0,
}
RAMP = Ramp(start_lr=1e-3, end_lr=10.0, steps=30)


def curvature(config: dict) -> float:
    """L, the largest eigenvalue of the mean squared error's Hessian in the linear layer's weights and bias: gradient
    descent on it diverges above lr 2/L and converges fastest near 1/L."""
    data = build_dataset(config)
    inputs = torch.cat([data.normalize(data.train_x).flatten(1).double(), torch.ones(SAMPLES, 1, dtype=torch.float64)], 1)
    return 2 * torch.linalg.eigvalsh(inputs.T @ inputs / SAMPLES).max().item()


@pytest.fixture
def linear_model(monkeypatch):
    """``test_linear`` registered in this process for this test only, from the source the CLI imports."""
    monkeypatch.setattr(MODELS, "_components", dict(MODELS._components))
    exec(LINEAR_MODEL, {})


def local_curve(config: dict, resume_from: Path | None = None) -> Curve:
    """The range test of ``config`` in this process, one rank, no Ray."""
    data = build_dataset(config)
    session = local_session(lambda metrics, checkpoint: None)
    return range_test(config, data, session, RAMP, Curve(), str(resume_from) if resume_from else None)


def test_the_ramp_rises_exponentially_from_start_to_end():
    ramp = Ramp(1e-6, 1.0, 7)
    lrs = [ramp.lr(step) for step in range(ramp.steps)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert [b / a for a, b in zip(lrs, lrs[1:])] == pytest.approx([10.0] * 6)
    assert Ramp(1.0, 0.5, 10).refusal() and Ramp(1e-3, 1.0, 1).refusal() and Ramp().refusal() is None


def test_the_smoothed_loss_is_a_bias_corrected_moving_average_that_stops_on_divergence():
    curve = Curve(smoothing=0.9, diverge_factor=4.0)
    assert not curve.add(1e-3, 2.0)
    assert curve.rows[0]["smoothed_loss"] == pytest.approx(2.0)  # bias-corrected: the first loss, not 0.1 of it
    assert not curve.add(1e-2, 1.0)
    assert curve.rows[1]["smoothed_loss"] == pytest.approx((0.9 * 0.1 * 2.0 + 0.1 * 1.0) / (1 - 0.9**2))
    while not curve.add(1.0, 100.0):
        assert len(curve.rows) < 10
    assert curve.diverged and curve.rows[-1]["smoothed_loss"] > 4.0 * min(r["smoothed_loss"] for r in curve.rows)
    assert Curve().add(1e-3, math.nan) and Curve().add(1e-3, math.inf)


def test_the_suggestion_is_the_steepest_descent_before_the_minimum():
    # A loss that falls fastest at lr 1e-2 (a logistic step in log lr), then rises past 1.
    lrs = [10 ** (-5 + 6 * i / 99) for i in range(100)]
    rows = [{"lr": lr, "smoothed_loss": 1 / (1 + math.exp(4 * (math.log10(lr) + 2))) + (lr > 1) * (lr - 1)} for lr in lrs]
    suggestion = suggest(rows, 100)
    assert suggestion.lr == pytest.approx(1e-2, rel=0.1)
    assert suggestion.minimum_lr == pytest.approx(1.0, rel=0.1)
    assert (suggestion.low, suggestion.high) == pytest.approx((suggestion.lr / 10, 0.1), rel=0.1)
    rising = [{"lr": lr, "smoothed_loss": lr} for lr in lrs]
    assert suggest(rising, 100).lr is None and "--start-lr" in suggest(rising, 100).why


def test_the_suggestion_on_a_quadratic_lies_between_the_stable_lrs_and_its_range_below_divergence(linear_model):
    config = resolve({**QUADRATIC, "batch_size": SAMPLES})
    known = curvature(config)
    curve = local_curve(config)
    suggestion = suggest(curve.rows, RAMP.steps)
    # Gradient descent converges fastest at lr 1/L and diverges above 2/L: the steepest descent of the loss comes
    # before both, and the minimum of the smoothed loss (a rule that read it off) lies far past 2/L.
    assert 0.2 / known < suggestion.lr < 1 / known, (suggestion, 1 / known)
    assert 0.01 / known < suggestion.low and suggestion.high < 2 / known, (suggestion, 2 / known)
    assert suggestion.minimum_lr > 2 / known
    assert curve.diverged and len(curve.rows) < RAMP.steps and curve.rows[-1]["lr"] > 2 / known


@pytest.fixture(scope="module")
def ddp_test(tmp_path_factory) -> Path:
    """``python -m toolbox.lr_find`` of the quadratic on 2 DDP workers, each taking half of every full batch."""
    root = tmp_path_factory.mktemp("lr_find")
    module = root / "linear_model.py"
    module.write_text(LINEAR_MODEL)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in QUADRATIC.items() if key != "regression_input_shape"]
    flags += ["--regression-input-shape", str(FEATURES), "--import", str(module), "--batch-size", str(SAMPLES // 2)]
    flags += ["--workers", "2", "--start-lr", str(RAMP.start_lr), "--end-lr", str(RAMP.end_lr), "--steps", str(RAMP.steps)]
    done = run_cli("lr_find", *flags, "--storage", str(root / "results"), "--name", "quadratic", timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "suggested lr " in done.stdout and "(steepest descent of the smoothed loss); range " in done.stdout
    return root / "results" / "quadratic"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


@pytest.mark.timeout(300)
def test_two_workers_step_the_curve_of_one_worker_with_their_batches_together(ddp_test, linear_model):
    rows = read_csv(ddp_test / lr_find.CSV_FILE)
    summary = json.loads((ddp_test / lr_find.JSON_FILE).read_text())
    assert summary["workers"] == 2 and summary["workers_agree"], summary
    # Both ranks' half batches make the one worker's full batch, and their losses are averaged.
    alone = local_curve(resolve({**QUADRATIC, "batch_size": SAMPLES})).rows
    assert len(rows) == len(alone)
    for got, want in zip(rows, alone):
        assert got["step"] == want["step"] and got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
        assert got["smoothed_loss"] == pytest.approx(want["smoothed_loss"], rel=1e-3)
    assert summary["suggestion"] == pytest.approx(suggest(alone, RAMP.steps).lr, rel=1e-9)


@pytest.mark.timeout(300)
def test_the_ramp_stops_early_once_the_loss_diverges(ddp_test):
    rows = read_csv(ddp_test / lr_find.CSV_FILE)
    summary = json.loads((ddp_test / lr_find.JSON_FILE).read_text())
    assert summary["stopped_early"] and summary["steps"] == len(rows) < RAMP.steps == summary["max_steps"]
    assert [r["step"] for r in rows] == list(range(len(rows)))
    assert rows[-1]["smoothed_loss"] > 4 * min(r["smoothed_loss"] for r in rows)
    assert all(r["smoothed_loss"] <= 4 * min(s["smoothed_loss"] for s in rows[: i + 1]) for i, r in enumerate(rows[:-1]))


@pytest.mark.timeout(300)
def test_the_outputs_are_written_and_nothing_resumes_from_them(ddp_test, tmp_path, capsys, ray_never_starts):
    summary = json.loads((ddp_test / lr_find.JSON_FILE).read_text())
    assert summary["range"][0] < summary["suggestion"] <= summary["range"][1]
    assert summary["rule"]["suggestion"] and summary["rule"]["range"] and summary["config"]["arch"] == "test_linear"
    assert (ddp_test / lr_find.PNG_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(read_csv(ddp_test / lr_find.CSV_FILE)[0]) == ["step", "lr", "loss", "smoothed_loss"]
    assert not list(ddp_test.rglob("state.pt")) and not [p for p in ddp_test.glob("checkpoint_*") if p.is_dir()]
    line = refused(run_main, ["--storage", str(ddp_test.parent), "--name", ddp_test.name], capsys)
    assert f"{ddp_test} holds a lr_find (written by toolbox.lr_find), not a run" in line, line


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--steps", "1"], "--steps must be at least 2"),
        (["--start-lr", "1", "--end-lr", "0.1"], "--end-lr 0.1 must be larger than --start-lr 1"),
        (["--start-lr", "0"], "--start-lr must be > 0"),
        (["--smoothing", "1"], "--smoothing must be"),
        (["--diverge-factor", "1"], "--diverge-factor must be larger than 1"),
    ],
)
def test_bad_range_test_flags_are_refused_before_ray(flags, said, tmp_path, capsys, ray_never_starts):
    line = refused(lr_find.main, [*flags, "--storage", str(tmp_path)], capsys)
    assert line.startswith("toolbox.lr_find: error: ") and said in line, line
    assert not list(tmp_path.iterdir())


def test_a_range_test_resumed_from_a_checkpoint_starts_from_its_weights(tmp_path):
    config = resolve({**TINY_DUMMY, "epochs": 1, "batch_size": 16, "ff_hidden_sizes": (8,)})
    data = build_dataset(config)
    train_locally(config, data, checkpoints=tmp_path)
    trained = build_model(config, data.spec)
    trained.load_state_dict(load_state(tmp_path / "epoch_1")["model"])
    inputs, targets = next(iter(training_batches(config, data, 0, local_session(lambda metrics, checkpoint: None))))
    with torch.no_grad():
        want = build_criterion(config)(trained(inputs), targets).item()
    assert local_curve(config, tmp_path / "epoch_1").rows[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert local_curve(config).rows[0]["loss"] != pytest.approx(want, rel=1e-3)


RANGE_TEST_SWEEP = """\
from ray import tune
base = {"dummy_n_samples": 64, "dummy_val_n_samples": 32, "ff_hidden_sizes": (8,), "batch_size": 16}
space = {"optimizer": tune.choice(["adamw", "sgd"]), "lr": {"adamw": "range_test", "sgd": "range_test"}}
num_samples = 2
epochs = 1
trial_scheduler = "fifo"
max_concurrent = 2
range_test = {"start_lr": 1e-4, "end_lr": 10.0, "steps": 20}
"""


def assert_every_trial_inside_its_optimizers_bounds(exp_dir: Path, bounds: dict, trials: int) -> None:
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == trials and all(r["status"] == "done" for r in rows), rows
    for row in rows:
        low, high = bounds[row["optimizer"]]
        assert low <= row["lr"] <= high, (row["optimizer"], row["lr"], low, high)


def test_a_sweeps_range_test_steps_on_a_whole_trials_batch_as_its_ddp_workers_do_together(tmp_path):
    path = tmp_path / "ranged_ddp.py"
    path.write_text(RANGE_TEST_SWEEP + "workers_per_trial = 2\n")
    config = range_test_config(sweepfile.load(path), "sgd")
    assert config["optimizer"] == "sgd" and config["batch_size"] == 2 * 16, config
    path.write_text(RANGE_TEST_SWEEP)
    assert range_test_config(sweepfile.load(path), "sgd")["batch_size"] == 16


@pytest.mark.timeout(900)
def test_a_sweep_sets_each_optimizers_lr_bounds_by_a_range_test_that_a_grown_rerun_reuses(tmp_path):
    path = tmp_path / "ranged.py"
    path.write_text(RANGE_TEST_SWEEP)
    command = (str(path), "--storage", str(tmp_path), "--seed", "1")
    done = run_cli("sweep", *command, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp_dir = tmp_path / "ranged"
    record = json.loads((exp_dir / BOUNDS_FILE).read_text())
    bounds = record["bounds"]
    assert sorted(bounds) == ["adamw", "sgd"], record
    for optimizer, (low, high) in bounds.items():
        tested = exp_dir / TESTS_DIR / optimizer
        summary = json.loads((tested / lr_find.JSON_FILE).read_text())
        suggestion = suggest(read_csv(tested / lr_find.CSV_FILE), summary["max_steps"])
        assert [low, high] == summary["range"] == [suggestion.low, suggestion.high], (optimizer, summary)
        assert summary["config"]["optimizer"] == optimizer and summary["max_steps"] == 20 and summary["start_lr"] == 1e-4
        assert (tested / lr_find.PNG_FILE).is_file()
        assert f"lr range test of {optimizer}: suggested lr {suggestion.lr:.2e}" in done.stdout, done.stdout[-3000:]
    assert "lr bounds from LR range tests (range_tests.json" in done.stdout
    assert json.loads((exp_dir / "best.json").read_text())["lr_bounds_from_range_tests"] == bounds
    assert_every_trial_inside_its_optimizers_bounds(exp_dir, bounds, trials=2)

    tested_files = list((exp_dir / TESTS_DIR).rglob("lr_find.*"))
    written = {file: file.stat().st_mtime_ns for file in tested_files}
    grown = run_cli("sweep", *command, "--num-samples", "3", timeout=420)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert f"reusing range-test bounds from {exp_dir}/{BOUNDS_FILE}" in grown.stdout, grown.stdout[-3000:]
    assert "lr range test of" not in grown.stdout and "lr range tests of" not in grown.stdout
    assert len(tested_files) == 6 and {file: file.stat().st_mtime_ns for file in tested_files} == written
    # Tune's restore copies the sweep dir to its staging dir and back: the record may be rewritten, never changed.
    assert json.loads((exp_dir / BOUNDS_FILE).read_text()) == record
    assert_every_trial_inside_its_optimizers_bounds(exp_dir, bounds, trials=3)
