"""Baselines that ``toolbox.bench`` measures toolbox against, in the same run.

- ``plain_epoch``: the same model, batch and threads in a bare PyTorch loop over tensors.
- ``original_pipeline_epoch_s``: the original toolbox's data path rebuilt (torchvision MNIST with
  per-sample ToTensor/Normalize/Flatten and a DataLoader), with its defaults.
- ``original_toolbox_epoch_s``: the original toolbox itself, from a checkout, when one is given.
- ``optuna_sweep``: an in-process Optuna study over given configs with SuccessiveHalvingPruner,
  running toolbox's own loop (so only the orchestration differs).
"""

from __future__ import annotations

import datetime
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from toolbox.data.tensors import TensorData
from toolbox.training.builders import build_model, build_optimizer
from toolbox.training.loop import train
from toolbox.training.session import local_session

ORIGINAL_DROPOUT = 0.1  # the original FFNN's, fixed (no flag)


def plain_epoch(config: dict, data: TensorData, device: str = "cpu", validate: bool = False) -> float:
    """Seconds for one training epoch of a bare loop (with ``validate``, then a pass over the val set
    computing loss and top-1 as toolbox's epoch does): data pre-normalized, batched by index with
    ``index_select``, so toolbox's loop gets no head start."""
    torch.manual_seed(config["seed"])
    model = build_model(config, data.spec).to(device)
    optimizer = build_optimizer(config, model.parameters())
    x, y = data.normalize(data.train_x).to(device), data.train_y.to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(y), device=device)
    _sync(device)
    started = time.perf_counter()
    for i in range(0, len(y), config["batch_size"]):
        batch = order[i : i + config["batch_size"]]
        loss = loss_fn(model(x.index_select(0, batch)), y.index_select(0, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if validate:
        model.eval()
        val_x, val_y = data.normalize(data.val_x).to(device), data.val_y.to(device)
        with torch.no_grad():
            for i in range(0, len(val_y), 2048):
                logits = model(val_x[i : i + 2048])
                loss_fn(logits, val_y[i : i + 2048]).item()
                (logits.argmax(1) == val_y[i : i + 2048]).sum().item()
    _sync(device)
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def original_pipeline_epoch_s(root: str, batch_size: int, loader_workers: int = 4) -> float:
    """Seconds for one epoch (train + val) as the original toolbox ran it, with its defaults:
    torchvision MNIST with per-sample ToTensor/Normalize/nn.Flatten, DataLoader(shuffle, 4 workers,
    pinned memory), an FFNN with dropout 0.1, AdamW(5e-4, weight decay 0.05), and per-batch loss,
    top-1 and top-5 meters read with ``.item()`` (the PyTorch ImageNet example's pattern)."""
    import torchvision
    from torchvision import transforms

    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,)), torch.nn.Flatten(start_dim=0)]
    )
    train_set = torchvision.datasets.MNIST(root, train=True, download=False, transform=transform)
    val_set = torchvision.datasets.MNIST(root, train=False, download=False, transform=transform)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Dropout(ORIGINAL_DROPOUT)]
    layers += [torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Dropout(ORIGINAL_DROPOUT), torch.nn.Linear(512, 10)]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    pin = torch.cuda.is_available()  # the original asks for pinned memory; without a GPU, torch ignores it with a warning

    def batches(dataset, shuffle: bool):
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=loader_workers, pin_memory=pin
        )

    def meters(logits, y, loss) -> list[float]:
        top5 = logits.topk(5, dim=1).indices == y[:, None]
        return [loss.item(), top5[:, 0].float().mean().item(), top5.any(1).float().mean().item()]

    started = time.perf_counter()
    model.train()
    for x, y in batches(train_set, shuffle=True):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        meters(logits, y, loss)
    model.eval()
    with torch.no_grad():
        for x, y in batches(val_set, shuffle=False):
            logits = model(x)
            meters(logits, y, torch.nn.functional.cross_entropy(logits, y))
    return time.perf_counter() - started


ORIGINAL_EPOCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \| INFO \| trainer \| Epoch: (\d+)$", re.M)


def original_toolbox_epoch_s(checkout: str, root: str, batch_size: int, epochs: int = 3) -> float:
    """The best epoch (train + val + its checkpoint) of the original toolbox itself, run from a
    checkout of it (github.com/yslcoat/pytorch-training-toolbox, commit 26eadce, whose README is the
    one toolbox started from) on the same MNIST files, FFNN 784-512-512-10 and batch. Epochs are
    timed between the "Epoch: N" lines of its training.log, so its start-up is left out."""
    script = Path(checkout).expanduser().resolve() / "train.py"
    if not script.is_file():
        raise FileNotFoundError(f"--original-toolbox: no train.py in {checkout}")
    flags = ["--dataset", "MNIST", "--arch", "FeedForwardNeuralNetwork", "--epochs", str(epochs)]
    flags += ["--batch-size", str(batch_size), "--mnist-root", str(Path(root).resolve()), "--no-mnist-download"]
    flags += ["--ff-input-size", "784", "--ff-output-dim", "10", "--ff-hidden-dim", "512", "--ff-n-layers", "1"]
    with tempfile.TemporaryDirectory(prefix="original-toolbox-") as cwd:  # it writes ./outputs/<timestamp>/
        done = subprocess.run([sys.executable, str(script), *flags], cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the original toolbox failed:\n{(done.stdout + done.stderr)[-3000:]}")
        log_text = "".join(log.read_text() for log in Path(cwd).glob("outputs/*/training.log"))
    starts = [datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp, _ in ORIGINAL_EPOCH_LINE.findall(log_text)]
    if len(starts) != epochs:
        raise RuntimeError(f"the original toolbox's training.log has {len(starts)} epoch lines, expected {epochs}")
    return min((b - a).total_seconds() for a, b in zip(starts, starts[1:]))


def optuna_sweep(
    configs: list[dict],
    data: TensorData,
    metric: str,
    mode: str,
    concurrency: int,
    grace_epochs: int = 2,
    reduction_factor: int = 2,
) -> dict:
    """Run ``configs`` as an Optuna study (threads, 1 torch thread each) with successive halving."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize" if mode == "max" else "minimize",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=grace_epochs, reduction_factor=reduction_factor),
    )
    for index in range(len(configs)):
        study.enqueue_trial({"index": index})
    epochs_run = []
    lock = threading.Lock()

    def objective(trial) -> float:
        config = configs[trial.suggest_int("index", 0, len(configs) - 1)]
        best = -math.inf if mode == "max" else math.inf

        def report(metrics: dict) -> None:
            nonlocal best
            value = metrics[metric]
            best = max(best, value) if mode == "max" else min(best, value)
            with lock:
                epochs_run.append(metrics["epoch_s"])
            trial.report(value, metrics["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        train(config, data, local_session(lambda metrics, _: report(metrics)))
        return best

    torch.set_num_threads(1)
    started = time.perf_counter()
    study.optimize(objective, n_trials=len(configs), n_jobs=concurrency)
    wall = time.perf_counter() - started
    values = [t.value for t in study.trials if t.value is not None]
    pruned_best = [
        max(t.intermediate_values.values()) if mode == "max" else min(t.intermediate_values.values())
        for t in study.trials
        if t.intermediate_values
    ]
    best = (max if mode == "max" else min)(values + pruned_best)
    return {"wall_s": wall, "epochs": len(epochs_run), "compute_s": sum(epochs_run), "best": best}
