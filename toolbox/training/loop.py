"""The training loop, one function for every rank. Ray specifics come in through a ``Session``."""

from __future__ import annotations

import logging
import math
import tempfile
import time

import torch
from torch import nn

from toolbox.config.registry import ConfigError
from toolbox.data.tensors import TensorData
from toolbox.training.builders import build_criterion, build_metrics, build_model, build_optimizer, build_scheduler
from toolbox.training.checkpoint import checkpoint_files, load_state, save_state
from toolbox.training.resume import restore_optimization
from toolbox.training.session import Session

EVAL_BATCH = 2048
log = logging.getLogger("toolbox")


def restore_state(session: Session, resume_from: str | None) -> dict | None:
    """The later of Ray's latest checkpoint (a retried run) and ``resume_from``; Ray's on a tie.

    A damaged checkpoint of Ray's is passed over, and so is a ``resume_from`` gone since (Ray keeps one)."""
    return latest_checkpoint(session, resume_from)[0]


def latest_checkpoint(session: Session, resume_from: str | None, read_files: bool = False) -> tuple[dict | None, dict | None]:
    """``restore_state``'s state, and with ``read_files`` the files of its checkpoint (a fused member travels as them)."""
    found = []
    checkpoint = session.latest_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
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


def _rng_states(session: Session) -> dict:
    """Every rank's torch RNG state (dropout), so a resumed DDP run draws what the uninterrupted one would."""
    own = torch.get_rng_state()
    per_rank = [own]
    if session.world_size > 1:
        per_rank = [None] * session.world_size
        torch.distributed.all_gather_object(per_rank, own)
    return {"torch": own, "per_rank": per_rank}


def flush_denormals() -> None:
    """Flush subnormal floats to zero in this thread and in the OpenMP threads it starts from now on.

    Adam's moments turn subnormal where gradients are zero (dead ReLUs), and x86 computes those on a
    slow path. OpenMP threads keep the mode they started with, so a thread that runs ``train`` calls
    this before its first parallel op (checking a dataset's labels is one)."""
    torch.set_flush_denormal(True)


def train(config: dict, data: TensorData, session: Session, resume_from: str | None = None) -> None:
    """Train for config["epochs"], reporting one row and one checkpoint per epoch.

    The calling thread keeps flushing subnormal floats to zero afterwards (``flush_denormals``)."""
    flush_denormals()
    torch.manual_seed(config["seed"])  # same initial weights on every rank
    model = build_model(config, data.spec)
    state = restore_state(session, resume_from)
    if state is not None:
        model.load_state_dict(state["model"])
    model = session.prepare_model(model)
    plain_model = model.module if hasattr(model, "module") else model
    criterion = build_criterion(config)
    metrics = {name: metric.to(session.device) for name, metric in build_metrics(config, data.num_classes).items()}
    optimizer = build_optimizer(config, model.parameters())
    per_rank = len(data.train_y) // session.world_size  # equal shards keep DDP ranks in step
    steps_per_epoch = math.ceil(per_rank / config["batch_size"])
    scheduler, interval = build_scheduler(config, optimizer, steps_per_epoch)
    start_epoch, global_step, best_val_loss, history = 0, 0, math.inf, []
    torch.manual_seed(config["seed"] + 1 + session.rank)  # dropout differs per rank
    if state is not None:
        restore_optimization(state, config, optimizer, scheduler, interval, steps_per_epoch)
        per_rank_rng = state["rng"].get("per_rank", [state["rng"]["torch"]])
        if session.rank < len(per_rank_rng):
            torch.set_rng_state(per_rank_rng[session.rank])
        start_epoch, global_step, best_val_loss = state["epoch"], state["global_step"], state["best_val_loss"]
        history = list(state.get("history", []))
        session.restored(state)
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

        val = evaluate(plain_model, criterion, metrics, data, config, session)
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
            "history": history + [row],
        }
        history = state["history"]
        report_epoch(session, row, state)


def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """This CPU's bfloat16 instructions (AMX or AVX512-BF16) as /proc/cpuinfo names them; None without them."""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return None
    found = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]
    return ", ".join(found) or None


def warn_if_bf16_is_slow(config: dict, use_gpu: bool) -> None:
    """One line where bf16-mixed is asked for on a CPU without bfloat16 units: it runs slower than 32-true there."""
    if config["precision"] == "bf16-mixed" and not use_gpu and cpu_bf16_units() is None:
        log.warning(
            "--precision bf16-mixed: this CPU has no bfloat16 units (no amx_bf16 or avx512_bf16), so it trains slower than 32-true"
        )


def autocast(config: dict, session: Session) -> torch.autocast:
    """Lightning's "bf16-mixed": matmuls in bfloat16 where autocast allows; "32-true": off.
    Losses and metrics are taken in float32."""
    return torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bf16-mixed")


def report_epoch(session: Session, row: dict, state: dict) -> None:
    """Every rank reports (Ray waits for all); only rank 0 writes the checkpoint."""
    if session.rank != 0:
        session.report(row, None)
        return
    with tempfile.TemporaryDirectory(prefix="toolbox-ckpt-") as directory:
        save_state(directory, state)
        session.report(row, directory)


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, metrics: dict, data: TensorData, config: dict, session: Session) -> dict:
    """Val loss and metrics over the *whole* val set: each rank takes its shard, then the results are reduced."""
    model.eval()
    indices = torch.arange(session.rank, len(data.val_y), session.world_size, device=session.device)
    sums = torch.zeros(2, dtype=torch.float64, device=session.device)
    for metric in metrics.values():
        metric.reset()
    for i in range(0, len(indices), EVAL_BATCH):
        batch = indices[i : i + EVAL_BATCH]
        inputs, targets = data.batch("val", batch)
        with autocast(config, session):
            logits = model(inputs)
        logits = logits.float()
        sums[0] += criterion(logits, targets).double() * len(batch)
        sums[1] += len(batch)
        for metric in metrics.values():
            metric.update(logits, targets)
    loss, count = session.all_reduce(sums).tolist()
    return {"val_loss": loss / count, **{name: float(metric.compute()) for name, metric in metrics.items()}}
