"""The phases of a training run, each written once: the per-rank loop (``loop.train``) and a fused
group (``fused.FusedGroup``) both call them, so a fused member is the unfused run to float rounding.

A ``Run`` is one run's components and progress; ``setup`` builds it and ``restore`` continues it from
a checkpoint; ``epoch_order``, ``training_batches``, ``augmented``, ``take_step``, ``after_step``, ``evaluate``, ``end_epoch`` and
``checkpoint_state`` are what an epoch does with it.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from toolbox.config.registry import ConfigError
from toolbox.data.splits import DatasetSplits
from toolbox.data.tensors import TensorData
from toolbox.training.builders import (
    build_augmentations,
    build_criterion,
    build_metrics,
    build_model,
    build_optimizer,
    build_scheduler,
)
from toolbox.training.checkpoint import checkpoint_files, load_state, save_state
from toolbox.training.resume import restore_optimization
from toolbox.training.session import Session, checkpoint_directory

EVAL_BATCH = 2048
log = logging.getLogger("toolbox")


def flush_denormals() -> None:
    """Flush subnormal floats to zero in this thread and in the OpenMP threads it starts from now on.

    Adam's moments turn subnormal where gradients are zero (dead ReLUs), and x86 computes those on a
    slow path. OpenMP threads keep the mode they started with, so a thread that runs ``train`` calls
    this before its first parallel op (checking a dataset's labels is one)."""
    torch.set_flush_denormal(True)


def restore_state(session: Session, resume_from: str | None) -> dict | None:
    """The later of Ray's latest checkpoint (a retried run) and ``resume_from``; Ray's on a tie.

    A damaged checkpoint of Ray's is passed over, and so is a ``resume_from`` gone since (Ray keeps one)."""
    return latest_checkpoint(session, resume_from)[0]


def latest_checkpoint(session: Session, resume_from: str | None, read_files: bool = False) -> tuple[dict | None, dict | None]:
    """``restore_state``'s state, and with ``read_files`` the files of its checkpoint (a fused member travels as them)."""
    found = []
    checkpoint = session.latest_checkpoint()
    if checkpoint is not None:
        with checkpoint_directory(checkpoint) as directory:
            try:
                found.append((load_state(directory), checkpoint_files(directory) if read_files else None))
            except ConfigError as exc:
                log.warning("skipping Ray's latest checkpoint: %s", exc)
    if resume_from:
        try:
            found.append((load_state(resume_from), checkpoint_files(resume_from) if read_files else None))
        except ConfigError as exc:
            if not found:
                raise
            # A retried group's run has checkpoints of its own since, and Ray may have removed this one.
            log.warning("continuing from Ray's latest checkpoint: %s", exc)
    return max(found, key=lambda pair: pair[0]["epoch"], default=(None, None))


@dataclass(eq=False)  # runs are told apart by identity
class Run:
    """One run on one rank: its components, and its progress as its checkpoints save and restore it."""

    config: dict
    session: Session
    model: nn.Module  # as placed on the device (DDP-wrapped where the session wraps it)
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    interval: str  # when the scheduler steps: "step" or "epoch"
    criterion: nn.Module
    metrics: dict
    steps_per_epoch: int
    dropout: torch.Generator  # the generator its dropout draws from on the CPU, checkpointed per rank
    augmentations: list  # (inputs, generator) -> inputs, applied to training batches in order
    augmentation: torch.Generator  # on the training device, what the augmentations draw from, checkpointed per rank
    epoch: int = 0
    global_step: int = 0
    best_val_loss: float = math.inf
    first_step_time: float | None = None
    history: list = field(default_factory=list)  # its rows so far, carried in its checkpoints
    params: int = 0  # the model's parameter count


def dropout_seed(config: dict, rank: int) -> int:
    """The seed of a rank's dropout generator: dropout differs per rank, and from the initial weights' seed."""
    return config["seed"] + 1 + rank


def augmentation_seed(config: dict, rank: int) -> int:
    """The seed of a rank's augmentation generator: a stream apart from the weights' and dropout's seeds."""
    return 2**32 + config["seed"] * 4096 + rank


def shard_size(num_samples: int, world_size: int) -> int:
    """Training samples per rank and epoch: equal shards keep DDP ranks in step."""
    return num_samples // world_size


def setup(
    config: dict,
    data: TensorData | DatasetSplits,
    session: Session,
    resume_from: str | None,
    place: Callable[[nn.Module], nn.Module],
    dropout: torch.Generator,
    record: type[Run] = Run,
) -> tuple[Run, dict | None]:
    """A run (a ``record``) built under its seed (the same initial weights on every rank), ``place``d on its
    device, with the checkpoint it continues from (None for a fresh run). ``dropout`` is seeded here."""
    torch.manual_seed(config["seed"])
    model = build_model(config, data.spec)
    state = restore_state(session, resume_from)
    # A rank that continued from another epoch than the others would leave them waiting in its first collective.
    session.check_in_step(state["epoch"] if state is not None else 0, "epochs to continue from")
    if state is not None:
        model.load_state_dict(state["model"])
    model = place(model)
    criterion = build_criterion(config)
    metrics = {name: metric.to(session.device) for name, metric in build_metrics(config, data.target.num_outputs).items()}
    optimizer = build_optimizer(config, model.parameters())
    steps_per_epoch = math.ceil(shard_size(data.size("train"), session.world_size) / config["batch_size"])
    scheduler, interval = build_scheduler(config, optimizer, steps_per_epoch)
    if dropout is torch.default_generator:
        torch.manual_seed(dropout_seed(config, session.rank))  # the device's default generators too
    else:
        dropout.manual_seed(dropout_seed(config, session.rank))
    augmentation = torch.Generator(session.device).manual_seed(augmentation_seed(config, session.rank))
    components = (model, optimizer, scheduler, interval, criterion, metrics)
    run = record(config, session, *components, steps_per_epoch, dropout, build_augmentations(config), augmentation)
    run.params = sum(p.numel() for p in run.model.parameters())
    return run, state


def restore(run: Run, state: dict) -> bool:
    """Continue ``run`` from checkpoint ``state``; True, having reported its last row again, where it is already done."""
    restore_optimization(state, run.config, run.optimizer, run.scheduler, run.interval, run.steps_per_epoch)
    per_rank = state["rng"].get("per_rank", [state["rng"]["torch"]])
    if run.session.rank < len(per_rank):
        run.dropout.set_state(per_rank[run.session.rank])
    augmentation = state["rng"].get("augmentation", []) if run.augmentations else []  # absent where none ran
    if run.session.rank < len(augmentation):
        try:
            run.augmentation.set_state(augmentation[run.session.rank])
        except RuntimeError:  # another device's kind of generator
            log.warning("the checkpoint's augmentation draws are another device's: this run's start afresh from its seed")
    run.epoch, run.global_step, run.best_val_loss = state["epoch"], state["global_step"], state["best_val_loss"]
    run.history = list(state.get("history", []))
    run.session.restored(state)
    if run.epoch >= run.config["epochs"]:
        run.session.report(state["row"], None)  # a re-run finished run or trial: say so again
        return True
    return False


def epoch_order(config: dict, epoch: int, num_samples: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The training samples of ``rank`` in epoch ``epoch``, in the order of the run's seed."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(config["seed"] * 7919 + epoch))
    if world_size == 1:
        return order
    return order[: shard_size(num_samples, world_size) * world_size][rank::world_size]


def training_batches(config: dict, data: TensorData | DatasetSplits, epoch: int, session: Session) -> Iterator:
    """The (inputs, targets) batches of ``session``'s rank in ``epoch``: its shard, in the run's order."""
    shard = epoch_order(config, epoch, data.size("train"), session.rank, session.world_size)
    return data.batches("train", shard, config["batch_size"], loader_seed(config, epoch, session.rank))


def aligned(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs in float32 as criteria and metrics take them with ``targets``: real targets as [batch, values] both."""
    if not targets.is_floating_point():
        return outputs.float(), targets
    return outputs.float().reshape(len(targets), -1), targets.reshape(len(targets), -1)


def augmented(run: Run, inputs: torch.Tensor) -> torch.Tensor:
    """A training batch through the run's augmentations, each drawing from the run's augmentation generator."""
    for augment in run.augmentations:
        inputs = augment(inputs, run.augmentation)
    return inputs


def loader_seed(config: dict, epoch: int, rank: int) -> int:
    """The seed of a rank's data-loading worker processes in ``epoch`` (per-sample random transforms)."""
    return (config["seed"] * 7919 + epoch) * 4096 + rank


def batch_loss(run: Run, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The run's criterion on a batch of model outputs."""
    return run.criterion(*aligned(outputs, targets))


def take_step(loss: torch.Tensor, optimizer) -> None:
    """Backward and one optimizer step (a stacked optimizer steps every member at once)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def after_step(run: Run) -> None:
    if run.interval == "step":
        run.scheduler.step()
    run.global_step += 1


def after_epoch_steps(run: Run) -> None:
    if run.interval == "epoch":
        run.scheduler.step()


@torch.no_grad()
def evaluate(
    runs: Sequence[Run],
    outputs: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    data: TensorData | DatasetSplits,
    session: Session,
) -> list[dict]:
    """Each run's val loss and metrics over the *whole* val set: each rank takes its shard, then the results are reduced.

    ``outputs(inputs)`` gives every run's model outputs for a batch, in the order of ``runs``."""
    indices = torch.arange(session.rank, data.size("val"), session.world_size)
    sums = torch.zeros(len(runs), 2, dtype=torch.float64, device=session.device)
    for run in runs:
        for metric in run.metrics.values():
            metric.reset()
    for inputs, targets in data.batches("val", indices, EVAL_BATCH):
        for k, (run, output) in enumerate(zip(runs, outputs(inputs))):
            output, target = aligned(output, targets)
            sums[k, 0] += run.criterion(output, target).double() * len(targets)
            sums[k, 1] += len(targets)
            for metric in run.metrics.values():
                metric.update(output, target)
    totals = session.all_reduce(sums).tolist()
    return [
        {"val_loss": loss / count, **{name: float(metric.compute()) for name, metric in run.metrics.items()}}
        for run, (loss, count) in zip(runs, totals)
    ]


def end_epoch(run: Run, lr: float, train_loss: float, val: dict, epoch_s: float, samples_per_s: float) -> dict:
    """Count the epoch as done; its row."""
    run.epoch += 1
    run.best_val_loss = min(run.best_val_loss, val["val_loss"])
    return {
        "epoch": run.epoch,
        "lr": lr,
        "train_loss": train_loss,
        **val,
        "epoch_s": epoch_s,
        "samples_per_s": samples_per_s,
        "global_step": run.global_step,
        "steps_per_epoch": run.steps_per_epoch,
        "params": run.params,
        "first_step_time": run.first_step_time,
    }


def checkpoint_state(run: Run, row: dict, weights: dict, optimizer_state: dict, rng: dict) -> dict:
    """The run's checkpoint after the epoch of ``row``: everything ``setup`` and ``restore`` continue it from."""
    state = {
        "model": weights,
        "optimizer": optimizer_state,
        "scheduler": run.scheduler.state_dict(),
        "epoch": run.epoch,
        "global_step": run.global_step,
        "rng": rng,
        "best_val_loss": run.best_val_loss,
        "val_loss": row["val_loss"],
        "config": run.config,
        "row": row,
        "history": run.history + [row],
    }
    run.history = state["history"]
    return state


def rng_states(run: Run) -> dict:
    """Every rank's dropout and augmentation generator states, so a resumed DDP run draws what the uninterrupted one would."""
    own = (run.dropout.get_state(), run.augmentation.get_state() if run.augmentations else None)
    per_rank = [own]
    if run.session.world_size > 1:
        per_rank = [None] * run.session.world_size
        torch.distributed.all_gather_object(per_rank, own)
    states = {"torch": own[0], "per_rank": [dropout for dropout, _ in per_rank]}
    return states | ({"augmentation": [augmentation for _, augmentation in per_rank]} if run.augmentations else {})


def report_epoch(session: Session, row: dict, state: dict) -> None:
    """Every rank reports (Ray waits for all); only rank 0 writes the checkpoint."""
    if session.rank != 0:
        session.report(row, None)
        return
    with tempfile.TemporaryDirectory(prefix="toolbox-ckpt-") as directory:
        save_state(directory, state)
        session.report(row, directory)
