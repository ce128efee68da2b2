"""CLI: flags and --help follow the registries; bad input is refused before Ray starts, one line, exit code 2."""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from helpers import TINY_DUMMY, python_env, train_locally

from toolbox.components.datasets import DATASETS
from toolbox.components.losses import CRITERIA
from toolbox.components.metrics import METRICS
from toolbox.components.models import MODELS
from toolbox.components.optimizers import OPTIMIZERS
from toolbox.components.schedulers import SCHEDULERS
from toolbox.config.flags import exit_with, given_config
from toolbox.config.resolve import KINDS, resolve
from toolbox.run import build_parser, main
from toolbox.training.builders import build_dataset, build_metrics


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """toolbox.run.main in this process: (exit code, stdout, stderr); argparse's SystemExit becomes a code."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def test_sweep_help_lists_every_trial_scheduler_and_its_options(capsys, monkeypatch):
    from toolbox import sweep as sweep_cli
    from toolbox.tuning.trial_schedulers import TRIAL_SCHEDULERS

    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exit_:
        sweep_cli.main(["--help"])
    words = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and ", ".join(TRIAL_SCHEDULERS.names()) in words
    for scheduler in TRIAL_SCHEDULERS:
        options = ", ".join(f"{p.name}={p.default}" for p in scheduler.params)
        assert f"{scheduler.name}: {scheduler.summary}" + (f" [{options}]" if options else "") in words


def test_help_lists_every_component_and_its_parameters(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps help text at the terminal width
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    words = " ".join(out.split())  # argparse wraps long help lines
    for registry in KINDS:
        assert registry.names(), f"no {registry.kind} registered"
        for component in registry:
            assert f"{component.name}: {component.summary}" in words
            for param in component.params:
                assert f"{param.flag} {show(param.default)}" in words, f"{component.name}: {param.flag} and its default"
                assert re.search(rf"^\s+{re.escape(param.flag)}(?![\w-])", out, re.MULTILINE), f"{param.flag} is not an option"
                assert param.help.rstrip(".") in words, f"{param.flag}: its docstring line is not in --help"
    for flag in (
        "--epochs",
        "--batch-size",
        "--seed",
        "--metrics",
        "--workers",
        "--cpus-per-worker",
        "--use-gpu",
        "--name",
        "--storage",
        "--resume",
    ):
        assert re.search(rf"^\s+{re.escape(flag)}(?![\w-])", out, re.MULTILINE), flag


def flag_tokens(param) -> list[str]:
    """Command-line tokens that set ``param`` to its default value."""
    value = param.default
    if value is None:
        return [param.flag, "none"]
    if isinstance(value, bool):
        return [param.flag if value else "--no-" + param.flag[2:]]
    if isinstance(value, tuple):
        return [param.flag, *map(str, value)]
    return [param.flag, str(value)]


@pytest.mark.parametrize(("registry", "name"), [pytest.param(r, c.name, id=f"{r.kind}-{c.name}") for r in KINDS for c in r])
def test_every_parameter_flag_reaches_the_config(registry, name):
    """Choosing a component and passing each of its flags gives exactly those keys, typed as the signature says."""
    component = registry[name]
    argv = [f"--{registry.selector.replace('_', '-')}", name]
    for param in component.params:
        argv += flag_tokens(param)
    given = given_config(build_parser().parse_args(argv))
    selected = (name,) if registry.many else name
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()} == {
        registry.selector: selected,
        **{p.key: p.default for p in component.params},
    }
    config = resolve(given)
    assert config[registry.selector] == selected
    for param in component.params:
        assert config[param.key] == param.default and type(config[param.key]) is type(param.default), param.key
    if registry is METRICS:  # the dataset's (DummyDataset's) classes are enough for every metric
        assert f"val_{name}" in build_metrics(config, build_dataset(config).target.num_outputs)


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resume_paths(tmp_path_factory) -> dict[str, Path]:
    """A real checkpoint (the loop without Ray, hidden size 8) and broken variants of it."""
    base = tmp_path_factory.mktemp("resume")
    config = resolve({**TINY_DUMMY, "epochs": 1, "batch_size": 32, "ff_hidden_sizes": (8,)})
    train_locally(config, build_dataset(config), checkpoints=base / "run")
    good = base / "run" / "epoch_1"
    truncated = base / "truncated"
    shutil.copytree(good, truncated)
    data = (truncated / "state.pt").read_bytes()
    (truncated / "state.pt").write_bytes(data[: len(data) // 2])
    garbage = base / "garbage"
    garbage.mkdir()
    (garbage / "state.pt").write_bytes(b"this is not a checkpoint")
    (base / "empty").mkdir()
    (base / "no_mnist").mkdir()
    return {
        "good": good,
        "truncated": truncated,
        "garbage": garbage,
        "empty": base / "empty",
        "missing": base / "does-not-exist",
        "no_mnist": base / "no_mnist",
    }


def choices(registry) -> str:
    return "choices: " + ", ".join(registry.names())


# (id, argv from the paths above, substrings the one error line must hold)
REFUSALS = [
    (
        "unknown-model",
        lambda p: ["--arch", "FeedForwardNeuralNet"],
        ["--arch", "unknown model 'FeedForwardNeuralNet'", "did you mean 'FeedForwardNeuralNetwork'", choices(MODELS)],
    ),
    ("unknown-dataset", lambda p: ["--dataset", "mnist"], ["--dataset", "did you mean 'MNIST'", choices(DATASETS)]),
    (
        "unknown-criterion",
        lambda p: ["--criterion", "cross_entropy"],
        ["--criterion", "did you mean 'cross_entropy_loss'", choices(CRITERIA)],
    ),
    ("unknown-optimizer", lambda p: ["--optimizer", "adamww"], ["--optimizer", "did you mean 'adamw'", choices(OPTIMIZERS)]),
    ("unknown-scheduler", lambda p: ["--scheduler", "steplr"], ["--scheduler", "did you mean 'step_lr'", choices(SCHEDULERS)]),
    (
        "unknown-metric",
        lambda p: ["--metrics", "top_1_accuracy", "top1_accuracy"],
        ["--metrics", "unknown metric 'top1_accuracy'", "did you mean 'top_1_accuracy'", choices(METRICS)],
    ),
    ("unknown-flag", lambda p: ["--lrr", "0.1"], ["unrecognized argument --lrr", "did you mean '--lr'"]),
    (
        "flag-of-another-component",
        lambda p: ["--momentum", "0.5"],
        ["--momentum does not apply to optimizer 'adamw'", "sgd", "--optimizer"],
    ),
    ("not-an-int", lambda p: ["--epochs", "two"], ["--epochs", "invalid int value: 'two'"]),
    ("unknown-precision", lambda p: ["--precision", "bf16"], ["--precision", "invalid choice: 'bf16'", "bf16-mixed"]),
    (
        "top5-with-3-classes",
        lambda p: ["--dummy-num-classes", "3", "--ff-output-dim", "3"],
        ["top_5_accuracy", "at least 5 classes", "outputs 3"],
    ),
    ("no-validation-samples", lambda p: ["--dummy-val-n-samples", "0"], ["--dummy-val-n-samples", "got 0"]),
    ("model-input-size", lambda p: ["--ff-input-size", "100"], ["--ff-input-size 100 contradicts the data", "hold 784"]),
    (
        "model-output-dim",
        lambda p: ["--ff-output-dim", "7"],
        ["--ff-output-dim 7 contradicts the data", "(classes or target values) are 10"],
    ),
    (
        "dataset-sample-size",
        lambda p: ["--dummy-input-shape", "100", "--ff-input-size", "784"],
        ["--ff-input-size 784 contradicts the data: its samples [100] hold 100"],
    ),
    ("cnn-on-flat-samples", lambda p: ["--arch", "ConvNet"], ["ConvNet takes samples of shape [channels, height, width]"]),
    ("zero-epochs", lambda p: ["--epochs", "0"], ["--epochs must be > 0, got 0"]),
    ("negative-batch-size", lambda p: ["--batch-size", "-8"], ["--batch-size must be > 0, got -8"]),
    ("zero-lr", lambda p: ["--lr", "0"], ["--lr must be > 0, got 0"]),
    ("negative-lr", lambda p: ["--optimizer", "sgd", "--lr=-0.1"], ["--lr must be > 0, got -0.1"]),
    ("too-many-workers", lambda p: ["--workers", "64"], ["--workers 64", "needs 64 CPUs"]),
    ("zero-workers", lambda p: ["--workers", "0"], ["--workers", "must be > 0"]),
    ("resume-missing", lambda p: ["--resume", str(p["missing"])], ["--resume", "does-not-exist does not exist"]),
    ("resume-without-checkpoint", lambda p: ["--resume", str(p["empty"])], ["--resume", "no checkpoint"]),
    ("resume-garbage", lambda p: ["--resume", str(p["garbage"])], ["--resume", "is not a readable checkpoint"]),
    ("resume-truncated", lambda p: ["--resume", str(p["truncated"])], ["--resume", "is not a readable checkpoint"]),
    (
        "resume-other-architecture",
        lambda p: ["--resume", str(p["good"]), "--ff-hidden-sizes", "16"],
        ["does not match the model's architecture", "size mismatch"],
    ),
    (
        "mnist-missing",
        lambda p: ["--dataset", "MNIST", "--mnist-root", str(p["no_mnist"])],
        ["MNIST files missing", str(Path("MNIST") / "raw"), "train-images-idx3-ubyte", "--mnist-download"],
    ),
]
if not torch.cuda.is_available():
    REFUSALS.append(("use-gpu-without-gpu", lambda p: ["--use-gpu"], ["--use-gpu", "no GPU"]))


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(a, e, id=i) for i, a, e in REFUSALS])
def test_bad_input_is_refused_before_ray_with_one_line(argv, expected, resume_paths, tmp_path, capsys, ray_never_starts):
    code, out, err = run_main([*argv(resume_paths), "--storage", str(tmp_path), "--name", "refused"], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("toolbox.run: error: ", "python -m toolbox.run: error: ")), lines[0]
    for text in expected:
        assert text in lines[0]
    assert out == ""
    assert not ray.is_initialized()
    assert not (tmp_path / "refused").exists()


def test_a_checkpoint_of_the_same_architecture_is_accepted(resume_paths, tmp_path):
    """The contrast to resume-other-architecture: the checks pass for the checkpoint's own model (no Ray here)."""
    from toolbox.run import prepare

    plan = prepare(["--resume", str(resume_paths["good"]), "--epochs", "2", "--storage", str(tmp_path)])
    assert plan.resume_from == str(resume_paths["good"])
    assert plan.config["ff_hidden_sizes"] == (8,) and plan.config["epochs"] == 2
    assert plan.config["dummy_n_samples"] == TINY_DUMMY["dummy_n_samples"]  # the rest comes from the checkpoint


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--arch", "MLP"], "choices: " + ", ".join(MODELS.names()), id="unknown-model"),
        pytest.param(["--dummy-num-classes", "3", "--ff-output-dim", "3"], "top_5_accuracy", id="top5-with-3-classes"),
        pytest.param(["--workers", "64"], "--workers 64", id="too-many-workers"),
    ],
)
@pytest.mark.timeout(120)
def test_python_m_toolbox_run_refuses_with_exit_code_2(argv, expected, tmp_path):
    """The real command line: exit code 2, one line on stderr, nothing on stdout, and no Ray session created."""
    ray_tmp = tmp_path / "ray-tmp"  # a Ray started by this process would create its session dir here
    proc = subprocess.run(
        [sys.executable, "-m", "toolbox.run", *argv, "--storage", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=python_env(RAY_TMPDIR=str(ray_tmp)),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("toolbox.run: error: "), proc.stderr
    assert expected in proc.stderr
    assert proc.stdout == ""
    assert not ray_tmp.exists() and not (tmp_path / "runs").exists()


def test_exit_with_exits_with_the_code_and_freezes_the_heap():
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as exited:
            exit_with(3)
        assert exited.value.code == 3
        assert gc.get_freeze_count() > 0  # moved out of the collector's reach, so exit skips them
    finally:
        gc.unfreeze()
