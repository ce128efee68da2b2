"""Baselines that ``toolbox.bench`` measures toolbox against, in the same run.

- ``plain_epoch``: the same model, batch and threads in a bare PyTorch loop over tensors.
- ``original_pipeline_epoch_s``: the original toolbox's data path (torchvision MNIST with
  per-sample ToTensor/Normalize/Flatten and a DataLoader).
- ``optuna_sweep``: an in-process Optuna study over given configs with SuccessiveHalvingPruner,
  running toolbox's own loop (so only the orchestration differs).
"""

from __future__ import annotations

import math
import threading
import time

import torch

from toolbox.data import TensorData
from toolbox.loop import Session, train
from toolbox.models import build_model
from toolbox.optim import build_optimizer


def plain_epoch(config: dict, data: TensorData, device: str = "cpu") -> float:
    """Seconds for one training epoch of a bare loop: data pre-normalized, batched by index."""
    torch.manual_seed(config["seed"])
    model = build_model(config).to(device)
    optimizer = build_optimizer(config, model.parameters())
    x, y = data.normalize(data.train_x).to(device), data.train_y.to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(y), device=device)
    _sync(device)
    started = time.perf_counter()
    for i in range(0, len(y), config["batch_size"]):
        batch = order[i : i + config["batch_size"]]
        loss = loss_fn(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def original_pipeline_epoch_s(root: str, batch_size: int, loader_workers: int = 4) -> float:
    """Seconds for one epoch (train + val) as the original toolbox ran it: torchvision MNIST with
    per-sample ToTensor/Normalize/Flatten, DataLoader(shuffle, 4 workers), and per-batch loss and
    top-1/top-5 meters read with ``.item()``, as in the PyTorch ImageNet example it follows."""
    import torchvision
    from torchvision import transforms

    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,)), transforms.Lambda(torch.flatten)]
    )
    train_set = torchvision.datasets.MNIST(root, train=True, download=False, transform=transform)
    val_set = torchvision.datasets.MNIST(root, train=False, download=False, transform=transform)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def batches(dataset, shuffle: bool):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=loader_workers)

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


def local_session(report, device: str = "cpu") -> Session:
    """A Session with no Ray: one process on ``device``, reporting to ``report(metrics)``."""
    device = torch.device(device)
    return Session(0, 1, device, lambda metrics, _checkpoint: report(metrics), lambda: None, lambda model: model.to(device))


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

        train(config, data, local_session(report))
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
