"""Bad input of every kind is refused before Ray starts: one line, exit code 2, no traceback, nothing written.

Tables: flags of toolbox.run (beside tests/test_cli.py's), sweep-file fields, spaces and scheduler
options, sweep flags, data files, resume files, names, storage and addresses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray
import torch
from helpers import MNIST_FILES, ROOT, TINY_DUMMY, python_env, train_locally, write_idx_labels, write_tiny_mnist

from toolbox import sweep as sweep_cli
from toolbox.config.resolve import resolve
from toolbox.run import main as run_main
from toolbox.training.builders import build_dataset


def refused(main, argv: list[str], capsys) -> str:
    """Run a CLI's main in this process; assert it refused with one line, and return that line."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err
    assert out == "", out
    assert not ray.is_initialized()
    return lines[0]


class Evil:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("inputs")
    config = resolve({**TINY_DUMMY, "epochs": 1, "batch_size": 32, "ff_hidden_sizes": (8,)})
    train_locally(config, build_dataset(config), checkpoints=base / "run")
    foreign = base / "foreign"
    foreign.mkdir()
    torch.save({"weights": torch.zeros(3)}, foreign / "state.pt")
    evil = base / "evil"
    evil.mkdir()
    torch.save(Evil(base / "pwned"), evil / "state.pt")
    (base / "a-file").write_text("not a directory")
    (base / "loop").symlink_to(base / "loop")
    good = base / "run" / "epoch_1"
    for key in ("config", "model"):  # a checkpoint whose config (model) is a string
        (base / f"{key}-is-text").mkdir()
        state = torch.load(good / "state.pt", weights_only=True)
        torch.save({**state, key: "text"}, base / f"{key}-is-text" / "state.pt")
    for name in ("mnist_short", "mnist_labels"):
        write_tiny_mnist(base / name)
    images = base / "mnist_short" / "MNIST" / "raw" / MNIST_FILES["train_x"]
    images.write_bytes(images.read_bytes()[:-10])
    write_idx_labels(base / "mnist_labels" / "MNIST" / "raw" / MNIST_FILES["val_y"], torch.full((32,), 12, dtype=torch.uint8))
    return {"base": base, "good": base / "run" / "epoch_1", "foreign": foreign, "evil": evil, "file": base / "a-file"}


# (id, argv built from the files above, text the one error line must hold)
RUN = [
    ("lr-inf", lambda f: ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("lr-nan", lambda f: ["--lr", "nan"], "--lr must be a finite number, got nan"),
    ("seed-negative", lambda f: ["--seed", "-1"], "--seed must be >= 0, got -1"),
    ("epochs-not-int", lambda f: ["--epochs", "2.5"], "--epochs: invalid int value: '2.5'"),
    ("cpus-nan", lambda f: ["--cpus-per-worker", "nan"], "--cpus-per-worker must be a finite number, got nan"),
    ("cpus-zero", lambda f: ["--cpus-per-worker", "0"], "--cpus-per-worker must be > 0, got 0"),
    ("workers-negative", lambda f: ["--workers", "-1"], "--workers must be > 0, got -1"),
    ("max-failures-negative", lambda f: ["--max-failures", "-1"], "--max-failures must be >= 0, got -1"),
    ("dropout-one", lambda f: ["--ff-dropout", "1.0"], "--ff-dropout must be >= 0 and < 1, got 1"),
    ("dropout-negative", lambda f: ["--ff-dropout=-0.1"], "--ff-dropout must be >= 0 and < 1, got -0.1"),
    ("label-smoothing-one", lambda f: ["--label-smoothing", "1"], "--label-smoothing must be >= 0 and < 1, got 1"),
    ("momentum-one", lambda f: ["--optimizer", "sgd", "--momentum", "1"], "--momentum must be >= 0 and < 1, got 1"),
    (
        "nesterov-without-momentum",
        lambda f: ["--optimizer", "sgd", "--momentum", "0", "--nesterov"],
        "--nesterov needs --momentum > 0",
    ),
    ("beta-above-one", lambda f: ["--betas", "0.9", "1.5"], "--betas must be >= 0 and < 1, got 1.5"),
    ("betas-count", lambda f: ["--betas", "0.9"], "--betas: expected 2 arguments"),
    ("warmup-negative", lambda f: ["--scheduler", "linear_lr", "--warmup-epochs=-1"], "--warmup-epochs must be >= 0, got -1"),
    ("end-factor-two", lambda f: ["--scheduler", "linear_lr", "--end-factor", "2"], "--end-factor must be >= 0 and <= 1, got 2"),
    ("gamma-zero", lambda f: ["--scheduler", "step_lr", "--gamma", "0"], "--gamma must be > 0, got 0"),
    ("step-size-zero", lambda f: ["--scheduler", "step_lr", "--step-size", "0"], "--step-size must be > 0, got 0"),
    ("div-factor-inf", lambda f: ["--scheduler", "one_cycle_lr", "--div-factor", "inf"], "--div-factor must be a finite number"),
    ("samples-zero", lambda f: ["--dummy-n-samples", "0"], "--dummy-n-samples must be > 0, got 0"),
    ("classes-zero", lambda f: ["--dummy-num-classes", "0"], "--dummy-num-classes must be > 0, got 0"),
    (
        "int-beyond-int64",
        lambda f: ["--dummy-num-classes", "99999999999999999999"],
        "--dummy-num-classes: expected an integer > 0",
    ),
    ("samples-too-many", lambda f: ["--dummy-n-samples", "999999999999"], "dataset DummyDataset: RuntimeError"),
    ("input-shape-zero", lambda f: ["--dummy-input-shape", "0"], "--dummy-input-shape must be > 0, got 0"),
    ("hidden-size-zero", lambda f: ["--ff-hidden-sizes", "0"], "--ff-hidden-sizes must be > 0, got 0"),
    (
        "cnn-even-kernel",
        lambda f: ["--arch", "ConvNet", "--dummy-input-shape", "1", "8", "8", "--cnn-kernel-size", "2"],
        "--cnn-kernel-size must be odd, got 2",
    ),
    (
        "f1-ignore-out-of-range",
        lambda f: ["--metrics", "macro_f1", "--f1-ignore-index", "10"],
        "--f1-ignore-index 10 is not a class of the 10",
    ),
    (
        "mse-on-class-labels",
        lambda f: ["--criterion", "mse_loss", "--dummy-n-samples", "64"],
        "--criterion mse_loss takes real-valued targets, but dataset DummyDataset has class labels (10 classes)",
    ),
    (
        "accuracy-on-real-targets",
        lambda f: ["--dataset", "Regression", "--regression-n-samples", "64", "--metrics", "top_1_accuracy"],
        "--metrics top_1_accuracy takes class labels, but dataset Regression has real-valued targets (shape [1])",
    ),
    ("precision-unknown", lambda f: ["--precision", "fp16"], "--precision: invalid choice: 'fp16'"),
    ("name-empty", lambda f: ["--name", ""], "--name '' is not a name"),
    ("name-parent", lambda f: ["--name", "../x"], "--name '../x' is not a name"),
    ("name-nested", lambda f: ["--name", "a/b"], "--name 'a/b' is not a name"),
    ("name-hidden", lambda f: ["--name", ".x"], "--name '.x' is not a name"),
    ("storage-is-a-file", lambda f: ["--storage", str(f["file"])], "is a file, not a directory"),
    ("storage-empty", lambda f: ["--storage", ""], "--storage '': give a directory"),
    ("storage-sys", lambda f: ["--storage", "/sys"], "--storage /sys: cannot write in /sys"),
    ("storage-symlink-loop", lambda f: ["--storage", str(f["base"] / "loop")], "loop: cannot resolve it"),
    (
        "address-unresolvable",
        lambda f: ["--address", "no-such-host.invalid:6379"],
        "--address no-such-host.invalid:6379: nothing answers on no-such-host.invalid:6379",
    ),
    (
        "workers-more-than-samples",
        lambda f: ["--dummy-n-samples", "1", "--workers", "2"],
        "--workers 2: the training set has 1 samples, fewer than one per worker",
    ),
    (
        "resume-config-text",
        lambda f: ["--resume", str(f["base"] / "config-is-text")],
        "is not a toolbox checkpoint (its config is a str, not a dict)",
    ),
    (
        "resume-model-text",
        lambda f: ["--resume", str(f["base"] / "model-is-text")],
        "is not a toolbox checkpoint (its model is a str, not a dict)",
    ),
    (
        "mnist-root-a-file-to-download-into",
        lambda f: ["--dataset", "MNIST", "--mnist-root", str(f["file"]), "--mnist-download"],
        "a-file: is a file, not a directory",
    ),
    ("address-refused", lambda f: ["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing answers on 127.0.0.1:1"),
    ("address-malformed", lambda f: ["--address", "host:port"], "--address 'host:port': expected HOST:PORT"),
    ("resume-foreign", lambda f: ["--resume", str(f["foreign"])], "is not a toolbox checkpoint (it has no model"),
    ("resume-code-in-pickle", lambda f: ["--resume", str(f["evil"])], "is not a readable checkpoint (UnpicklingError"),
    (
        "mnist-cut-short",
        lambda f: ["--dataset", "MNIST", "--mnist-root", str(f["base"] / "mnist_short")],
        "train-images-idx3-ubyte: cut short",
    ),
    (
        "mnist-label-range",
        lambda f: ["--dataset", "MNIST", "--mnist-root", str(f["base"] / "mnist_labels")],
        "the val labels run from 12 to 12",
    ),
]


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(a, e, id=i) for i, a, e in RUN])
def test_run_refuses(argv, expected, files, tmp_path, capsys, ray_never_starts):
    args = argv(files)
    storage = [] if "--storage" in args else ["--storage", str(tmp_path / "out")]
    name = [] if "--name" in args else ["--name", "refused"]
    line = refused(run_main, [*args, *storage, *name], capsys)
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_runs_code_is_refused_and_the_code_never_runs(files, tmp_path, capsys, ray_never_starts):
    marker = files["base"] / "pwned"
    line = refused(run_main, ["--resume", str(files["evil"]), "--storage", str(tmp_path)], capsys)
    assert "not a readable checkpoint" in line and not marker.exists()
    # The control: loaded the unsafe way, the same file does run its command.
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(files['evil'] / 'state.pt')!r}, weights_only=False)"], check=False
    )
    assert marker.exists()
    marker.unlink()


SWEEP_HEAD = 'from ray import tune\nbase = {"dummy_n_samples": 64, "dummy_val_n_samples": 32}\n'
# (id, sweep-file body after SWEEP_HEAD, text the one error line must hold)
SWEEP_FILE = [
    ("space-list", 'space = [{"lr": 0.1}]', "space: expected a dict, got [{'lr': 0.1}]"),
    ("space-missing", "epochs = 2", "no `space` defined"),
    ("empty-choice", 'space = {"lr": tune.choice([])}', "space['lr']: tune.choice([]) has no values"),
    ("empty-grid", 'space = {"lr": tune.grid_search([])}', "space['lr']: tune.grid_search needs a non-empty list"),
    ("empty-range", 'space = {"lr": tune.uniform(0.2, 0.1)}', "space['lr']: the range [0.2, 0.1) is empty"),
    ("empty-int-range", 'space = {"batch_size": tune.randint(8, 8)}', "space['batch_size']: the range [8, 8) is empty"),
    ("choice-wrong-type", 'space = {"lr": tune.choice([1e-3, "fast"])}', "--lr: expected a number > 0, got 'fast'"),
    ("choice-refused-value", 'space = {"ff_hidden_sizes": tune.choice([(0,)])}', "--ff-hidden-sizes must be > 0, got 0"),
    (
        "grid-last-value",
        'space = {"lr": tune.grid_search([1e-3 * (1 + i / 1e5) for i in range(99_999)] + [-1.0])}',
        "space['lr']: --lr must be > 0, got -1",
    ),
    ("per-component-empty", 'space = {"lr": {"adamw": tune.choice([])}}', "space['lr']['adamw']: tune.choice([]) has no values"),
    ("lr-inf", 'space = {"lr": float("inf")}', "--lr must be a finite number, got inf"),
    ("num-samples-zero", 'space = {"lr": 0.1}\nnum_samples = 0', "num_samples must be > 0, got 0"),
    ("num-samples-float", 'space = {"lr": 0.1}\nnum_samples = 2.5', "num_samples: expected an integer > 0, got 2.5"),
    ("num-samples-text", 'space = {"lr": 0.1}\nnum_samples = "3"', "num_samples: expected an integer > 0, got '3'"),
    ("epochs-negative", 'space = {"lr": 0.1}\nepochs = -1', "epochs must be > 0, got -1"),
    ("mode-unknown", 'space = {"lr": 0.1}\nmode = "maximize"', "mode: 'maximize' is not one of min, max"),
    ("metric-not-text", 'space = {"lr": 0.1}\nmetric = 3', "metric: expected a metric or a non-empty list of them, got 3"),
    ("cpus-zero", 'space = {"lr": 0.1}\ncpus_per_worker = 0', "cpus_per_worker must be > 0, got 0"),
    ("gpus-nan", 'space = {"lr": 0.1}\ngpus_per_trial = float("nan")', "gpus_per_trial must be a finite number, got nan"),
    ("gpus-negative", 'space = {"lr": 0.1}\ngpus_per_trial = -1', "gpus_per_trial must be >= 0, got -1"),
    ("concurrency-negative", 'space = {"lr": 0.1}\nmax_concurrent = -2', "max_concurrent must be >= 0, got -2"),
    ("failures-negative", 'space = {"lr": 0.1}\nmax_failures = -1', "max_failures must be >= 0, got -1"),
    ("workers-zero", 'space = {"lr": 0.1}\nworkers_per_trial = 0', "workers_per_trial must be > 0, got 0"),
    ("in-process-text", 'space = {"lr": 0.1}\nin_process = "yes"', "in_process: expected true or false, got 'yes'"),
    ("search-unknown", 'space = {"lr": 0.1}\nsearch = "bayes"', "search: 'bayes' is not one of random, optuna"),
    ("base-not-dict", 'space = {"lr": 0.1}\nbase = ["MNIST"]', "base: expected a dict"),
    ("base-unknown-key", 'space = {"lr": 0.1}\nbase = {"learning_rate": 0.1}', "unknown key 'learning_rate'"),
    ("name-parent", 'space = {"lr": 0.1}\nname = "../x"', "name '../x' is not a name"),
    ("options-not-dict", 'space = {"lr": 0.1}\nscheduler_options = 3', "scheduler_options: expected a dict, got 3"),
    (
        "option-unknown",
        'space = {"lr": 0.1}\nscheduler_options = {"grace": 1}',
        "asha takes no option 'grace' (did you mean 'grace_period'?)",
    ),
    (
        "grace-zero",
        'space = {"lr": 0.1}\nscheduler_options = {"grace_period": 0}',
        "scheduler_options['grace_period'] must be > 0, got 0",
    ),
    (
        "grace-above-epochs",
        'space = {"lr": 0.1}\nepochs = 3\nscheduler_options = {"grace_period": 5}',
        "grace_period'] 5 is more than the 3 epochs",
    ),
    (
        "reduction-one",
        'space = {"lr": 0.1}\nscheduler_options = {"reduction_factor": 1}',
        "reduction_factor'] must be > 1, got 1",
    ),
    (
        "fifo-option",
        'space = {"lr": 0.1}\ntrial_scheduler = "fifo"\nscheduler_options = {"grace_period": 1}',
        "fifo takes no option 'grace_period'",
    ),
    (
        "pbt-quantile",
        'space = {"lr": tune.uniform(0.01, 0.1)}\ntrial_scheduler = "pbt"\nscheduler_options = {"quantile_fraction": 0.9}',
        "quantile_fraction'] must be > 0 and <= 0.5, got 0.9",
    ),
    (
        "pbt-interval-nan",
        'space = {"lr": 0.1}\ntrial_scheduler = "pbt"\nscheduler_options = {"perturbation_interval": float("nan")}',
        "perturbation_interval'] must be a finite number",
    ),
    (
        "median-samples-zero",
        'space = {"lr": 0.1}\ntrial_scheduler = "median_stopping"\nscheduler_options = {"min_samples_required": 0}',
        "min_samples_required'] must be > 0, got 0",
    ),
    ("loguniform-zero", 'space = {"lr": tune.loguniform(0, 1)}', "cannot import the sweep file: ValueError"),
    ("syntax-error", 'space = {"lr": 0.1', "cannot import the sweep file: SyntaxError"),
    ("exits-at-import", "raise SystemExit(0)", "bad.py:3: cannot import the sweep file: SystemExit"),
    ("fuse-huge", 'space = {"lr": 0.1}\nfuse = 1000000000', "fuse must be >= 0 and <= 1024, got 1e+09"),
    (
        "optuna-with-pbt",
        'space = {"lr": tune.uniform(0.01, 0.1)}\nsearch = "optuna"\ntrial_scheduler = "pbt"',
        "search 'optuna' cannot run with trial_scheduler 'pbt'",
    ),
    (
        "pbt-mutates-a-shape",
        'space = {"ff_hidden_sizes": tune.choice([(8,), (16,)])}\ntrial_scheduler = "pbt"',
        "pbt cannot mutate ff_hidden_sizes: checkpoints do not carry across model shapes",
    ),
    (
        "workers-more-than-samples",
        'space = {"lr": 0.1}\nbase["dummy_n_samples"] = 1\nworkers_per_trial = 2',
        "workers_per_trial 2: the training set has 1 samples, fewer than one per worker",
    ),
]


@pytest.mark.parametrize(("body", "expected"), [pytest.param(b, e, id=i) for i, b, e in SWEEP_FILE])
def test_sweep_file_refused(body, expected, tmp_path, capsys, ray_never_starts):
    path = tmp_path / "bad.py"
    path.write_text(SWEEP_HEAD + textwrap.dedent(body) + "\n")
    line = refused(sweep_cli.main, [str(path), "--storage", str(tmp_path / "out")], capsys)
    assert expected in line, line
    assert not (tmp_path / "out").exists()


SMOKE = str(ROOT / "sweeps" / "smoke.py")
SWEEP_FLAGS = [
    ("gpus-nan", ["--gpus-per-trial", "nan"], "gpus_per_trial must be a finite number, got nan"),
    ("samples-zero", ["--num-samples", "0"], "num_samples must be > 0, got 0"),
    ("seed-negative", ["--seed", "-1"], "--seed must be >= 0, got -1"),
    ("name-empty", ["--name", ""], "name '' is not a name"),
    ("name-nested", ["--name", "a/b"], "name 'a/b' is not a name"),
    ("scheduler-unknown", ["--trial-scheduler", "bohb"], "--trial-scheduler: unknown trial scheduler 'bohb'"),
    ("address-refused", ["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing answers"),
    ("base-key-refused", ["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    ("too-many-cpus", ["--cpus-per-worker", "64"], "needs 64 CPUs"),
    ("fuse-huge", ["--fuse", "1000000000"], "fuse must be >= 0 and <= 1024, got 1e+09"),
    ("storage-empty", ["--storage", ""], "--storage '': give a directory"),
]


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(a, e, id=i) for i, a, e in SWEEP_FLAGS])
def test_sweep_flags_refused(argv, expected, tmp_path, capsys, ray_never_starts):
    storage = [] if "--storage" in argv else ["--storage", str(tmp_path / "out")]
    line = refused(sweep_cli.main, [SMOKE, *argv, *storage], capsys)
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_pbt_may_mutate_what_keeps_the_models_shape(tmp_path, ray_never_starts):
    """The control of pbt-mutates-a-shape: a dropout above 0 and lr change no shape, so the sweep goes on to Ray
    (a dropout of 0 leaves the layer out, which renames the weights after it)."""
    from conftest import RayStarted

    path = tmp_path / "pbt.py"
    path.write_text(
        SWEEP_HEAD + 'space = {"ff_dropout": tune.choice([0.1, 0.2]), "lr": tune.uniform(0.01, 0.1)}\ntrial_scheduler = "pbt"\n'
    )
    with pytest.raises(RayStarted):
        sweep_cli.main([str(path), "--storage", str(tmp_path / "out")])


def test_address_local_is_the_private_local_ray(tmp_path, ray_never_starts):
    """--address local starts the Ray whose servers listen on 127.0.0.1 only, as no --address does."""
    from conftest import RayStarted

    with pytest.raises(RayStarted, match=r"start\(None,"):
        run_main(
            [*(f"--{k.replace('_', '-')}={v}" for k, v in TINY_DUMMY.items()), "--address", "local", "--storage", str(tmp_path)]
        )


def test_restart_deletes_nothing_but_a_sweep_dir(tmp_path, capsys, ray_never_starts):
    """--restart of a name whose dir holds no sweep (another run's files, say) deletes nothing."""
    run_dir = tmp_path / "smoke"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    line = refused(sweep_cli.main, [SMOKE, "--storage", str(tmp_path), "--restart"], capsys)
    assert "holds no sweep" in line and (run_dir / "precious.txt").read_text() == "keep me"


def test_the_refusal_tables_hold_at_least_sixty_cases():
    from test_cli import REFUSALS
    from test_sweepfile import BAD

    assert len(RUN) + len(SWEEP_FILE) + len(SWEEP_FLAGS) + len(REFUSALS) + len(BAD) >= 60


def test_python_m_toolbox_sweep_refuses_in_its_own_process(tmp_path):
    """The real command line, for one case: exit code 2, one line on stderr, no Ray session dir."""
    proc = subprocess.run(
        [sys.executable, "-m", "toolbox.sweep", SMOKE, "--gpus-per-trial", "nan", "--storage", str(tmp_path / "out")],
        cwd=tmp_path,
        env=python_env(RAY_TMPDIR=str(tmp_path / "ray-tmp")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "gpus_per_trial" in proc.stderr, proc.stderr
    assert not (tmp_path / "ray-tmp").exists() and not (tmp_path / "out").exists()
