"""LR schedulers. ``fn(optimizer, steps_per_epoch, epochs, /, *, <config>) -> LRScheduler``, registered
with ``interval="step"`` (stepped after every optimizer step) or ``interval="epoch"`` (after every
epoch). Warmup lengths are in epochs; fractions are fine.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from toolbox.config.registry import NonNegativeFloat, PositiveFloat, PositiveInt, Registry, UnitInterval

SCHEDULERS = Registry("scheduler", selector="scheduler")


def _per_step(optimizer, factor: Callable[[int], float]) -> LRScheduler:
    return LambdaLR(optimizer, factor)


def _warmup_steps(warmup_epochs: float, steps_per_epoch: int, total: int) -> int:
    return min(total, round(warmup_epochs * steps_per_epoch))


def _cosine(step: int, start: int, total: int, floor: float) -> float:
    progress = (step - start) / max(1, total - start)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@SCHEDULERS.register("none", interval="step")
def constant(optimizer, steps_per_epoch: int, epochs: int, /) -> LRScheduler:
    """Constant learning rate."""
    return _per_step(optimizer, lambda step: 1.0)


@SCHEDULERS.register("linear_lr", interval="step")
def linear_lr(
    optimizer, steps_per_epoch: int, epochs: int, /, *, warmup_epochs: NonNegativeFloat = 0.0, end_factor: UnitInterval = 0.0
) -> LRScheduler:
    """Linear warmup from 0, then linear decay to end_factor * lr at the last step.

    Args:
        warmup_epochs: epochs of warmup (fractions allowed).
        end_factor: the last step's lr, as a fraction of lr.
    """
    total = steps_per_epoch * epochs
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 1 + (end_factor - 1) * min(1.0, (step - warmup) / max(1, total - warmup))

    return _per_step(optimizer, factor)


@SCHEDULERS.register("cosine_annealing_lr", interval="step")
def cosine_annealing_lr(
    optimizer,
    steps_per_epoch: int,
    epochs: int,
    /,
    *,
    warmup_epochs: NonNegativeFloat = 0.0,
    eta_min_factor: UnitInterval = 0.0,
) -> LRScheduler:
    """Optional linear warmup, then cosine annealing to eta_min_factor * lr at the last step.

    Args:
        warmup_epochs: epochs of warmup (fractions allowed).
        eta_min_factor: the last step's lr, as a fraction of lr.
    """
    total = steps_per_epoch * epochs
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total)
    return _per_step(optimizer, lambda s: (s + 1) / warmup if s < warmup else _cosine(s, warmup, total, eta_min_factor))


@SCHEDULERS.register("linear_then_cosine_annealing_lr", interval="step")
def linear_then_cosine_annealing_lr(
    optimizer,
    steps_per_epoch: int,
    epochs: int,
    /,
    *,
    warmup_epochs: NonNegativeFloat = 1.0,
    warmup_start_factor: UnitInterval = 0.01,
    eta_min_factor: UnitInterval = 0.0,
) -> LRScheduler:
    """Linear warmup from warmup_start_factor * lr to lr, then cosine annealing.

    Args:
        warmup_epochs: epochs of warmup (fractions allowed).
        warmup_start_factor: the first step's lr, as a fraction of lr.
        eta_min_factor: the last step's lr, as a fraction of lr.
    """
    total = steps_per_epoch * epochs
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total)

    def factor(step: int) -> float:
        if step < warmup:
            return warmup_start_factor + (1 - warmup_start_factor) * step / warmup
        return _cosine(step, warmup, total, eta_min_factor)

    return _per_step(optimizer, factor)


@SCHEDULERS.register("one_cycle_lr", interval="step")
def one_cycle_lr(
    optimizer,
    steps_per_epoch: int,
    epochs: int,
    /,
    *,
    warmup_epochs: NonNegativeFloat = 0.3,
    div_factor: PositiveFloat = 25.0,
    final_div_factor: PositiveFloat = 1e4,
) -> LRScheduler:
    """One cycle (as torch's OneCycleLR, without momentum cycling): cosine from lr/div_factor up to lr
    over warmup_epochs, then cosine down to lr/(div_factor*final_div_factor) at the last step.

    Args:
        warmup_epochs: epochs of the rise (fractions allowed).
        div_factor: the first step's lr is lr / div_factor.
        final_div_factor: the last step's lr is lr / (div_factor * final_div_factor).
    """
    total = steps_per_epoch * epochs
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total)
    start, end = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def factor(step: int) -> float:
        if step < warmup:
            return 1 - (1 - start) * _cosine(step, 0, warmup, 0.0)
        return _cosine(step, warmup, total, end)

    # A factor of the step, like the others: its state holds no total, so a resumed run may be longer.
    return _per_step(optimizer, factor)


@SCHEDULERS.register("step_lr", interval="epoch")
def step_lr(
    optimizer, steps_per_epoch: int, epochs: int, /, *, step_size: PositiveInt = 1, gamma: PositiveFloat = 0.1
) -> LRScheduler:
    """Multiply the lr by gamma every step_size epochs.

    Args:
        step_size: epochs between two multiplications.
        gamma: the factor.
    """
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
