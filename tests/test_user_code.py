"""The user's own components, from a project outside the repository: imported in every process, refused early when broken.

The project is written by the tests into a temporary directory: a model, a dataset, a metric and an optimizer
of its own, and a sweep file that imports them.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import python_env, run_cli

from toolbox import run as run_cli_module
from toolbox import sweep as sweep_cli_module
from toolbox.training.epochlog import read_rows

PROJECT_COMPONENTS = '''\
import math

import torch
import torchmetrics
from torch import nn

from toolbox.components.datasets import DATASETS
from toolbox.components.metrics import METRICS
from toolbox.components.models import MODELS
from toolbox.components.optimizers import OPTIMIZERS
from toolbox.config.registry import NonNegativeFloat, PositiveFloat, PositiveInt
from toolbox.data.splits import DatasetSplits
from toolbox.data.tensors import Target, TensorData


@MODELS.register("ProjectMLP", prefix="project")
def project_mlp(sample_shape, num_classes, /, *, width: PositiveInt = 16) -> nn.Module:
    """One hidden layer.

    Args:
        width: hidden units.
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(sample_shape), width), nn.ReLU(), nn.Linear(width, num_classes))


@DATASETS.register("ProjectTeacher", prefix="teacher")
def project_teacher(seed, /, *, n_samples: PositiveInt = 256) -> TensorData:
    """Points labelled by the side of a plane they lie on.

    Args:
        n_samples: training samples.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples + 64, 6, generator=g)
    y = (x @ torch.randn(6, generator=g) > 0).long()
    return TensorData(x[:n_samples], y[:n_samples], x[n_samples:], y[n_samples:], num_classes=2)


class Points(torch.utils.data.Dataset):
    """The user's own map-style Dataset: each sample jittered as it is read (a per-sample transform)."""

    def __init__(self, x, y, jitter):
        self.x, self.y, self.jitter = x, y, jitter

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return self.x[index] + self.jitter * torch.randn(self.x[index].shape), self.y[index]


@DATASETS.register("ProjectPoints", prefix="points")
def project_points(seed, /, *, jitter: NonNegativeFloat = 0.1) -> DatasetSplits:
    """ProjectTeacher's points, read one by one through a DataLoader.

    Args:
        jitter: standard deviation of the noise added to each training sample as it is read.
    """
    tensors = project_teacher(seed)
    train, val = Points(tensors.train_x, tensors.train_y, jitter), Points(tensors.val_x, tensors.val_y, 0.0)
    return DatasetSplits(train, val, Target.classes(2))


class ErrorRate(torchmetrics.Metric):
    def __init__(self):
        super().__init__()
        self.add_state("wrong", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, logits, targets):
        self.wrong += (logits.argmax(1) != targets).sum()
        self.total += targets.numel()

    def compute(self):
        return 100 * self.wrong / self.total


@METRICS.register("project_error_rate")
def project_error_rate(num_classes, /) -> torchmetrics.Metric:
    """Percent of samples whose top logit is not the target."""
    return ErrorRate()


@OPTIMIZERS.register("project_sgd")
def project_sgd(params, /, *, lr: PositiveFloat = 0.05) -> torch.optim.Optimizer:
    """Plain SGD.

    Args:
        lr: learning rate.
    """
    return torch.optim.SGD(params, lr=lr)
'''

PROJECT_SWEEP = """\
from ray import tune

import project_components  # noqa: F401

base = {"dataset": "ProjectTeacher", "arch": "ProjectMLP", "optimizer": "project_sgd", "metrics": ["project_error_rate"]}
space = {"lr": tune.grid_search([0.05, 0.3]), "project_width": tune.choice([8, 16])}
metric, mode, num_samples, epochs = "val_project_error_rate", "min", 1, 2
trial_scheduler = "fifo"
"""

STOPS_EARLY = '''\
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from toolbox.config.registry import PositiveInt
from toolbox.tuning.trial_schedulers import TRIAL_SCHEDULERS


class StopAfter(FIFOScheduler):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_trial_result(self, tune_controller, trial, result):
        return TrialScheduler.STOP if result["training_iteration"] >= self.epochs else TrialScheduler.CONTINUE


@TRIAL_SCHEDULERS.register("project_stop_after")
def project_stop_after(sweep, /, *, stop_after: PositiveInt = 2) -> TrialScheduler:
    """Stops every trial after the same number of epochs.

    Args:
        stop_after: epochs every trial runs.
    """
    return StopAfter(stop_after)
'''

# A model that passes every check before Ray (they run it in eval mode) and fails at its first training step,
# noting each attempt in a file: a retried run would note more than one.
BREAKS_WHEN_TRAINING = '''\
import math
from pathlib import Path

import torch
from torch import nn

from toolbox.components.models import MODELS

ATTEMPTS = Path(__file__).with_name("attempts.txt")


class BreaksWhenTraining(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, 2)

    def forward(self, x):
        if self.training:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            with open(ATTEMPTS, "a") as f:
                f.write(f"attempt of rank {rank}\\n")
            x = x.view(-1, 5)
        return self.linear(x.flatten(1))


@MODELS.register("BreaksWhenTraining")
def breaks_when_training(sample_shape, num_classes, /) -> nn.Module:
    """Fails at its first training step."""
    return BreaksWhenTraining(math.prod(sample_shape))
'''


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    """A user project outside the repository: its components and a sweep file that imports them."""
    directory = tmp_path / "my_project"
    write(directory, "project_components.py", PROJECT_COMPONENTS)
    write(directory, "project_sweep.py", PROJECT_SWEEP)
    return directory


def test_the_users_project_runs_with_two_ddp_workers_and_sweeps_and_its_best_retrains_as_printed(project, tmp_path):
    """A DDP run on the user's own map-style Dataset, then a sweep on its tensor dataset, then its winner re-trained."""
    storage = tmp_path / "results"
    args = ["--import", str(project / "project_components.py"), "--arch", "ProjectMLP", "--dataset", "ProjectPoints"]
    args += ["--optimizer", "project_sgd", "--metrics", "project_error_rate", "--project-width", "8", "--workers", "2"]
    args += ["--loader-workers", "1"]  # the user's Dataset read by a DataLoader worker process on each of the two ranks
    done = run_cli("run", *args, "--epochs", "2", "--storage", str(storage), "--name", "ddp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_rows(storage / "ddp")
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["val_project_error_rate"] <= 100 for r in rows), rows

    done = run_cli("sweep", str(project / "project_sweep.py"), "--storage", str(storage))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = pq.read_table(storage / "project_sweep" / "results.parquet").to_pylist()
    assert len(results) == 2 and all(r["status"] == "done" for r in results), results
    assert results[0]["val_project_error_rate"] <= results[1]["val_project_error_rate"]  # ranked by the metric's min
    best = json.loads((storage / "project_sweep" / "best.json").read_text())
    command = shlex.split(best["command"])
    assert command[command.index("--import") + 1] == str((project / "project_sweep.py").resolve()), best["command"]

    # The command as printed, from another directory: it names the imports it needs.
    retrain = subprocess.run(
        [sys.executable, *command[1:]], cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300
    )
    assert retrain.returncode == 0, retrain.stdout[-3000:] + retrain.stderr[-3000:]
    retrained = read_rows(tmp_path / "ray_results" / command[command.index("--name") + 1])
    assert retrained[best["best_epoch"] - 1]["val_project_error_rate"] == best["value"]


def test_a_trial_scheduler_of_the_users_module_named_in_base_imports_schedules_the_sweep(tmp_path):
    """The sweep file names a trial scheduler that only the user's module registers, and sets its option."""
    module = write(tmp_path / "schedulers", "stops_early.py", STOPS_EARLY)
    sweep = write(
        tmp_path,
        "stopped_sweep.py",
        f"""\
        from ray import tune
        base = {{"imports": [{str(module)!r}], "dummy_n_samples": 64, "dummy_val_n_samples": 32, "dummy_input_shape": (8,),
                "ff_hidden_sizes": (8,), "batch_size": 32}}
        space = {{"lr": tune.grid_search([1e-3, 1e-2])}}
        num_samples, epochs = 1, 3
        trial_scheduler, scheduler_options = "project_stop_after", {{"stop_after": 1}}
        """,
    )
    done = run_cli("sweep", str(sweep), "--storage", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp_dir = tmp_path / "out" / "stopped_sweep"
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == 2 and all((r["status"], r["epochs"]) == ("stopped", 1) for r in rows), rows
    trials = sorted(exp_dir.glob("run_trial_*"))
    assert len(trials) == 2 and all([r["epoch"] for r in read_rows(t)] == [1] for t in trials)


def test_a_failure_that_a_retry_would_repeat_fails_once_in_a_run_and_in_a_sweep(tmp_path):
    project = tmp_path / "breaking"
    models = write(project, "breaking_models.py", BREAKS_WHEN_TRAINING)
    attempts = project / "attempts.txt"
    args = ["--import", str(models), "--arch", "BreaksWhenTraining", "--dummy-input-shape", "8", "--dummy-num-classes", "2"]
    args += ["--metrics", "top_1_accuracy"]
    done = run_cli(
        "run",
        *args,
        "--epochs",
        "1",
        "--max-failures",
        "3",
        "--storage",
        str(tmp_path / "out"),
        "--name",
        "breaks",
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not retried: a retry would fail the same way" in done.stderr and "shape '[-1, 5]' is invalid" in done.stderr
    assert attempts.read_text().count("attempt") == 1, done.stdout[-3000:]

    attempts.unlink()
    sweep = write(
        project,
        "breaking_sweep.py",
        """\
        from ray import tune
        import breaking_models
        base = {"dummy_input_shape": (8,), "dummy_num_classes": 2, "dummy_n_samples": 128, "ff_hidden_sizes": (8,),
                "metrics": ["top_1_accuracy"]}
        space = {"arch": tune.grid_search(["FeedForwardNeuralNetwork", "BreaksWhenTraining"])}
        num_samples, epochs, max_failures = 1, 1, 2
        workers_per_trial = 2  # through a TorchTrainer: Train's retries and Tune's both
        trial_scheduler = "fifo"
        """,
    )
    done = run_cli("sweep", str(sweep), "--storage", str(tmp_path / "out"), dashboard=True)  # Train-in-Tune needs it
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["arch"]: r for r in pq.read_table(tmp_path / "out" / "breaking_sweep" / "results.parquet").to_pylist()}
    assert rows["FeedForwardNeuralNetwork"]["status"] == "done", rows
    failed = rows["BreaksWhenTraining"]
    assert failed["status"] == "error" and failed["retries"] == 0 and "not retried" in failed["error"], failed
    # No rank twice (a retry restarts the group); a rank may fail before the other reaches its first step.
    ranks = attempts.read_text().split()[3::4]
    assert ranks and len(ranks) == len(set(ranks)) and set(ranks) <= {"0", "1"}, attempts.read_text()


@pytest.mark.parametrize(
    ("name", "body", "where", "why"),
    [
        ("syntax_slip", "x = 1\ndef broken(:\n", "syntax_slip.py:2", "SyntaxError"),
        (
            "raises_on_import",
            "x = 1\nraise RuntimeError('no GPU driver')\n",
            "raises_on_import.py:2",
            "RuntimeError: no GPU driver",
        ),
        (
            "registers_twice",
            "from torch import nn\nfrom toolbox.components.models import MODELS\n\n\n@MODELS.register('ConvNet')\n"
            "def mine(shape, classes, /):\n    return nn.Identity()\n",
            "registers_twice.py:5",
            "ValueError: model 'ConvNet' is registered twice (first at",
        ),
    ],
)
def test_a_broken_user_module_is_refused_before_ray_naming_its_file_and_line(
    name, body, where, why, tmp_path, capsys, ray_never_starts
):
    path = write(tmp_path / "code", f"{name}.py", body)
    sweep = write(path.parent, f"sweep_of_{name}.py", f"import {name}\nspace = {{'lr': 0.1}}\n")
    for main, argv in (
        (run_cli_module.main, ["--import", str(path)]),
        (sweep_cli_module.main, [str(sweep), "--storage", str(tmp_path / "out")]),
    ):
        assert main(argv) == 2
        line = capsys.readouterr().err.strip()
        assert f"{where}: cannot import " in line and why in line and "\n" not in line, line
    assert not (tmp_path / "out").exists()


def test_an_unknown_module_is_refused_before_ray(capsys, ray_never_starts):
    assert run_cli_module.main(["--import", "no_such_module_of_the_user"]) == 2
    line = capsys.readouterr().err.strip()
    assert "cannot import no_such_module_of_the_user: ModuleNotFoundError" in line, line


def test_a_user_component_gets_flags_and_help_lines(tmp_path, capsys):
    path = write(
        tmp_path,
        "help_components.py",
        PROJECT_COMPONENTS.replace('"ProjectMLP"', '"HelpMLP"')
        .replace('"ProjectTeacher"', '"HelpTeacher"')
        .replace('"project_error_rate"', '"help_error_rate"')
        .replace('"project_sgd"', '"help_sgd"'),
    )
    with pytest.raises(SystemExit) as exit_:
        run_cli_module.main(["--import", str(path), "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert "HelpMLP: One hidden layer." in shown and "--project-width" in shown and "hidden units." in shown, shown
    assert "HelpTeacher: Points labelled" in shown and "help_sgd: Plain SGD." in shown and "help_error_rate" in shown


ENTRY_POINT_MODULE = '''\
import math
from torch import nn
from toolbox.components.models import MODELS


@MODELS.register("PluginNet")
def plugin_net(sample_shape, num_classes, /) -> nn.Module:
    """A model from an installed package."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(sample_shape), num_classes))
'''


def test_an_installed_packages_entry_point_registers_its_components_in_every_process(tmp_path):
    site = tmp_path / "site"
    write(site, "plugin_models.py", ENTRY_POINT_MODULE)
    write(site / "toolbox_plugin-0.1.dist-info", "METADATA", "Metadata-Version: 2.1\nName: toolbox-plugin\nVersion: 0.1\n")
    write(site / "toolbox_plugin-0.1.dist-info", "entry_points.txt", "[toolbox.components]\nplugin = plugin_models\n")
    env = python_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    command = [sys.executable, "-m", "toolbox.run", "--arch", "PluginNet", "--epochs", "1", "--dummy-n-samples", "64"]
    shown = subprocess.run([*command, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert "PluginNet: A model from an installed package." in shown.stdout, shown.stdout[-2000:] + shown.stderr
    done = subprocess.run(
        [*command, "--storage", str(tmp_path / "out"), "--name", "plugin", "--no-dashboard"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [r["epoch"] for r in read_rows(tmp_path / "out" / "plugin")] == [1]
