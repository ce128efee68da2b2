"""The training loop, one function for every rank. Ray specifics come in through a ``Session``."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from toolbox.data.splits import DatasetSplits
from toolbox.data.tensors import TensorData
from toolbox.training.phases import (
    Run,
    after_epoch_steps,
    after_step,
    augmented,
    batch_loss,
    checkpoint_state,
    end_epoch,
    evaluate,
    flush_denormals,
    report_epoch,
    restore,
    rng_states,
    setup,
    shard_size,
    take_step,
    training_batches,
)
from toolbox.training.session import Session

log = logging.getLogger("toolbox")


def train(config: dict, data: TensorData | DatasetSplits, session: Session, resume_from: str | None = None) -> None:
    """Train for config["epochs"], reporting one row and one checkpoint per epoch.

    The calling thread keeps flushing subnormal floats to zero afterwards (``flush_denormals``)."""
    flush_denormals()
    run, state = setup(config, data, session, resume_from, session.prepare_model, torch.default_generator)
    if state is not None and restore(run, state):
        return
    model, optimizer = run.model, run.optimizer
    plain_model = model.module if hasattr(model, "module") else model
    per_rank = shard_size(data.size("train"), session.world_size)
    data = data.to(session.device)

    while run.epoch < config["epochs"]:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        loss_sum = torch.zeros((), device=session.device)
        for inputs, targets in training_batches(config, data, run.epoch, session):
            if run.first_step_time is None:
                run.first_step_time = time.time()
            loss = training_loss(run, inputs, targets)
            take_step(loss, optimizer)
            after_step(run)
            loss_sum += loss.detach() * len(targets)
        after_epoch_steps(run)
        train_loss = session.all_reduce(loss_sum).item() / (per_rank * session.world_size)
        train_seconds = time.perf_counter() - started

        plain_model.eval()
        val = evaluate([run], lambda inputs: [_forward(plain_model, inputs, config, session)], data, session)[0]
        samples_per_s = per_rank * session.world_size / train_seconds
        row = end_epoch(run, lr, train_loss, val, time.perf_counter() - started, samples_per_s)
        state = checkpoint_state(run, row, plain_model.state_dict(), optimizer.state_dict(), rng_states(run))
        report_epoch(session, row, state)


def training_loss(run: Run, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The run's loss on a training batch: augmented, and forward at the run's precision."""
    inputs = augmented(run, inputs)
    with autocast(run.config, run.session):
        outputs = run.model(inputs)
    return batch_loss(run, outputs, targets)


def _forward(model: nn.Module, inputs: torch.Tensor, config: dict, session: Session) -> torch.Tensor:
    with autocast(config, session):
        return model(inputs)


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
