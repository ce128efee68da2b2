"""The training loop, one function for every rank. Ray specifics come in through a ``Session``.

A Ray Train worker gets ``train_session()``; a single-process Tune trial gets ``tune_session()``
(Ray refuses ``ray.train.report`` there), so the same loop serves ``toolbox.run`` and sweeps.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolbox.checkpoint import load_state, save_state
from toolbox.data import TensorData
from toolbox.losses import CRITERIA
from toolbox.metrics import METRICS
from toolbox.models import build_model
from toolbox.optim import build_optimizer, build_scheduler, fast_forward, load_optimizer_and_scheduler

EVAL_BATCH = 2048


@dataclass
class Session:
    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict, str | None], None]  # (metrics, checkpoint dir or None)
    latest_checkpoint: Callable[[], Any]  # a ray/tune Checkpoint or None
    prepare_model: Callable[[nn.Module], nn.Module]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor


def train_session() -> Session:
    """Edges for a Ray Train worker (TorchTrainer): ray.train.report, DDP via prepare_model."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    return Session(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=report,
        latest_checkpoint=ray.train.get_checkpoint,
        prepare_model=ray.train.torch.prepare_model,
    )


def tune_session(use_gpu: bool) -> Session:
    """Edges for a loop that runs inside a Tune function trial's own process (no worker group)."""
    from ray import tune

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    return Session(0, 1, device, report, tune.get_checkpoint, lambda model: model.to(device))


def _restore_state(session: Session, resume_from: str | None) -> dict | None:
    """Ray's own latest checkpoint (a retried or re-run run) wins over --resume."""
    checkpoint = session.latest_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return load_state(directory)
    return load_state(resume_from) if resume_from else None


def _apply_new_hparams(state: dict, config: dict) -> None:
    """Let a checkpoint from another config (PBT's exploit) continue with this config's optimizer values."""
    old = state["config"]
    if config.get("lr") and old.get("lr") and config["lr"] != old["lr"]:
        ratio = config["lr"] / old["lr"]
        for group in state["optimizer"]["param_groups"]:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] *= ratio
        for key in ("base_lrs", "_last_lr"):
            if key in state["scheduler"]:
                state["scheduler"][key] = [value * ratio for value in state["scheduler"][key]]
    for group in state["optimizer"]["param_groups"]:
        for key in ("weight_decay", "momentum", "nesterov", "betas"):
            if key in group and key in config and config[key] != old.get(key):
                group[key] = config[key]


def _continue_from(state: dict, config: dict, session: Session, optimizer, scheduler, interval: str) -> tuple[int, int, float]:
    """Load optimizer, scheduler and this rank's RNG from a checkpoint; returns (epoch, global step, best val loss)."""
    old = state["config"]
    if (old["optimizer"], old["scheduler"]) == (config["optimizer"], config["scheduler"]):
        _apply_new_hparams(state, config)
        load_optimizer_and_scheduler(optimizer, scheduler, state["optimizer"], state["scheduler"])
    else:  # PBT switched the optimizer or scheduler: theirs start afresh, the schedule at this point of the run
        fast_forward(scheduler, state["global_step"] if interval == "step" else state["epoch"])
    per_rank = state["rng"].get("per_rank", [state["rng"]["torch"]])
    if session.rank < len(per_rank):
        torch.set_rng_state(per_rank[session.rank])
    return state["epoch"], state["global_step"], state["best_val_loss"]


def _rng_states(session: Session) -> dict:
    """Every rank's torch RNG state (dropout), so a resumed DDP run draws what the uninterrupted one would."""
    own = torch.get_rng_state()
    per_rank = [own]
    if session.world_size > 1:
        per_rank = [None] * session.world_size
        torch.distributed.all_gather_object(per_rank, own)
    return {"torch": own, "per_rank": per_rank}


def train(config: dict, data: TensorData, session: Session, resume_from: str | None = None) -> None:
    """Train for config["epochs"], reporting one row and one checkpoint per epoch.

    The calling thread keeps flushing subnormal floats to zero afterwards (see below)."""
    # Where a gradient is zero (a dead ReLU), Adam's first moment shrinks by beta1 every step and
    # turns subnormal: 2 % of it after one MNIST epoch. x86 CPUs take a slow microcode path for each,
    # which made later epochs 15 % slower. The mode is per thread; set first, the OpenMP threads torch
    # starts for this one inherit it. Flushing them to zero changed no reported digit.
    torch.set_flush_denormal(True)
    torch.manual_seed(config["seed"])  # same initial weights on every rank
    model = build_model(config)
    state = _restore_state(session, resume_from)
    if state is not None:
        model.load_state_dict(state["model"])
    model = session.prepare_model(model)
    plain_model = model.module if hasattr(model, "module") else model
    criterion = CRITERIA[config["criterion"]].build(config=config)
    optimizer = build_optimizer(config, model.parameters())
    per_rank = len(data.train_y) // session.world_size  # equal shards keep DDP ranks in step
    steps_per_epoch = math.ceil(per_rank / config["batch_size"])
    scheduler, interval = build_scheduler(config, optimizer, steps_per_epoch)
    start_epoch, global_step, best_val_loss = 0, 0, math.inf
    torch.manual_seed(config["seed"] + 1 + session.rank)  # dropout differs per rank
    if state is not None:
        start_epoch, global_step, best_val_loss = _continue_from(state, config, session, optimizer, scheduler, interval)
    if state is not None and start_epoch >= config["epochs"]:
        session.report(state["row"], None)  # already done (a re-run finished run or trial): say so again
        return
    data = data.to(session.device)
    first_step_time = None

    for epoch in range(start_epoch, config["epochs"]):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(config["seed"] * 7919 + epoch))
        shard = order[: per_rank * session.world_size][session.rank :: session.world_size].to(session.device)
        loss_sum = torch.zeros((), device=session.device)
        for i in range(0, per_rank, config["batch_size"]):
            if first_step_time is None:
                first_step_time = time.time()
            batch = shard[i : i + config["batch_size"]]
            inputs, targets = data.batch("train", batch)
            with autocast(config, session):
                logits = model(inputs)
            loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if interval == "step":
                scheduler.step()
            loss_sum += loss.detach() * len(batch)
            global_step += 1
        if interval == "epoch":
            scheduler.step()
        train_loss = session.all_reduce(loss_sum).item() / (per_rank * session.world_size)
        train_seconds = time.perf_counter() - started

        val = evaluate(plain_model, criterion, data, config, session)
        best_val_loss = min(best_val_loss, val["val_loss"])
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_loss,
            **val,
            "epoch_s": time.perf_counter() - started,
            "samples_per_s": per_rank * session.world_size / train_seconds,
            "global_step": global_step,
            "steps_per_epoch": steps_per_epoch,
            "first_step_time": first_step_time,
        }
        state = {
            "model": plain_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "global_step": global_step,
            "rng": _rng_states(session),
            "best_val_loss": best_val_loss,
            "val_loss": val["val_loss"],
            "config": config,
            "row": row,
        }
        _report(session, row, state)


def autocast(config: dict, session: Session) -> torch.autocast:
    """Lightning's "bf16-mixed": matmuls in bfloat16 where autocast allows (GPUs, and CPUs with
    AMX or AVX512-BF16 gain most); "32-true": off. Losses and metrics are taken in float32."""
    return torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bf16-mixed")


def _report(session: Session, row: dict, state: dict) -> None:
    """Every rank reports (Ray waits for all); only rank 0 writes the checkpoint."""
    if session.rank != 0:
        session.report(row, None)
        return
    with tempfile.TemporaryDirectory(prefix="toolbox-ckpt-") as directory:
        save_state(directory, state)
        session.report(row, directory)


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, data: TensorData, config: dict, session: Session) -> dict:
    """Val loss and metrics over the *whole* val set: each rank sums its shard, then the sums are reduced."""
    model.eval()
    metrics = config["metrics"]
    indices = torch.arange(session.rank, len(data.val_y), session.world_size, device=session.device)
    sums = torch.zeros(2 + len(metrics), dtype=torch.float64, device=session.device)
    for i in range(0, len(indices), EVAL_BATCH):
        batch = indices[i : i + EVAL_BATCH]
        inputs, targets = data.batch("val", batch)
        with autocast(config, session):
            logits = model(inputs)
        logits = logits.float()
        sums[0] += criterion(logits, targets).double() * len(batch)
        sums[1] += len(batch)
        for j, name in enumerate(metrics):
            sums[2 + j] += METRICS[name].fn(logits, targets).double()
    sums = session.all_reduce(sums).tolist()
    count = sums[1]
    return {"val_loss": sums[0] / count, **{f"val_{name}": sums[2 + j] / count for j, name in enumerate(metrics)}}
