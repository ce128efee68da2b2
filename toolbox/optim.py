"""Optimizers and LR schedulers.

Optimizer: ``fn(params, /, *, <config>)`` with ``params`` a list; ``**fused_if_supported(params)``
picks torch's one-kernel step. Scheduler: ``fn(optimizer, steps_per_epoch, epochs, /, *, <config>)``,
registered with ``interval="step"`` (stepped after every optimizer step) or ``interval="epoch"``
(stepped after every epoch). Warmup lengths are in epochs; fractions are fine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from toolbox.registry import ConfigError, Registry

OPTIMIZERS = Registry("optimizer", selector="optimizer")
SCHEDULERS = Registry("scheduler", selector="scheduler")


# torch runs these optimizers' step as one fused kernel on these devices, but leaves it off by default.
# On CPU, AdamW's per-parameter step took 35% of an MNIST FFNN epoch; fused, it takes 15%.
_FUSED_DEVICES = ("cpu", "cuda")


def fused_if_supported(params: list) -> dict:
    """``{"fused": True}`` where every param is a float tensor on a device with fused kernels, else {}."""
    ok = bool(params) and all(
        isinstance(p, torch.Tensor) and p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params
    )
    return {"fused": True} if ok else {}


def _check_lr(lr: float, weight_decay: float) -> None:
    if not lr > 0:
        raise ConfigError(f"--lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {weight_decay}")


@OPTIMIZERS.register("adamw")
def adamw(params, /, *, lr: float = 1e-3, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW (decoupled weight decay)."""
    _check_lr(lr, weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, **fused_if_supported(params))


@OPTIMIZERS.register("adam")
def adam(params, /, *, lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
    """Adam (L2 penalty as weight decay)."""
    _check_lr(lr, weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas, **fused_if_supported(params))


@OPTIMIZERS.register("sgd")
def sgd(params, /, *, lr: float = 0.01, weight_decay: float = 0.0, momentum: float = 0.9, nesterov: bool = False):
    """SGD with (optionally Nesterov) momentum."""
    _check_lr(lr, weight_decay)
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"--momentum must be in [0, 1), got {momentum}")
    if nesterov and momentum == 0:
        raise ConfigError("--nesterov needs --momentum > 0")
    return torch.optim.SGD(
        params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, **fused_if_supported(params)
    )


def _per_step(optimizer, factor: Callable[[int], float]) -> LRScheduler:
    return LambdaLR(optimizer, factor)


def _warmup_steps(warmup_epochs: float, steps_per_epoch: int, total: int) -> int:
    if warmup_epochs < 0:
        raise ConfigError(f"--warmup-epochs must be >= 0, got {warmup_epochs}")
    return min(total, round(warmup_epochs * steps_per_epoch))


def _cosine(step: int, start: int, total: int, floor: float) -> float:
    progress = (step - start) / max(1, total - start)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@SCHEDULERS.register("none", interval="step")
def constant(optimizer, steps_per_epoch: int, epochs: int, /):
    """Constant learning rate."""
    return _per_step(optimizer, lambda step: 1.0)


@SCHEDULERS.register("linear_lr", interval="step")
def linear_lr(optimizer, steps_per_epoch: int, epochs: int, /, *, warmup_epochs: float = 0.0, end_factor: float = 0.0):
    """Linear warmup from 0, then linear decay to end_factor * lr at the last step."""
    total = steps_per_epoch * epochs
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 1 + (end_factor - 1) * min(1.0, (step - warmup) / max(1, total - warmup))

    return _per_step(optimizer, factor)


@SCHEDULERS.register("cosine_annealing_lr", interval="step")
def cosine_annealing_lr(
    optimizer, steps_per_epoch: int, epochs: int, /, *, warmup_epochs: float = 0.0, eta_min_factor: float = 0.0
):
    """Optional linear warmup, then cosine annealing to eta_min_factor * lr at the last step."""
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
    warmup_epochs: float = 1.0,
    warmup_start_factor: float = 0.01,
    eta_min_factor: float = 0.0,
):
    """Linear warmup from warmup_start_factor * lr to lr, then cosine annealing."""
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
    warmup_epochs: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
):
    """One cycle (as torch's OneCycleLR, without momentum cycling): cosine from lr/div_factor up to lr
    over warmup_epochs, then cosine down to lr/(div_factor*final_div_factor) at the last step."""
    if div_factor <= 0 or final_div_factor <= 0:
        raise ConfigError("--div-factor and --final-div-factor must be > 0")
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
def step_lr(optimizer, steps_per_epoch: int, epochs: int, /, *, step_size: int = 1, gamma: float = 0.1):
    """Multiply the lr by gamma every step_size epochs."""
    if step_size <= 0 or gamma <= 0:
        raise ConfigError("--step-size and --gamma must be > 0")
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


def build_optimizer(config: dict, params) -> torch.optim.Optimizer:
    return OPTIMIZERS[config["optimizer"]].build(list(params), config=config)


def build_scheduler(config: dict, optimizer, steps_per_epoch: int) -> tuple[LRScheduler, str]:
    """The scheduler and its interval ("step" or "epoch")."""
    component = SCHEDULERS[config["scheduler"]]
    return component.build(optimizer, steps_per_epoch, config["epochs"], config=config), component.meta["interval"]


def load_optimizer_and_scheduler(optimizer, scheduler: LRScheduler, optimizer_state: dict, scheduler_state: dict) -> None:
    """Continue from saved states. A per-step factor is rebuilt from the current config, so a run
    resumed with more epochs follows the longer schedule from its very first step."""
    # How a step runs (fused kernel or not) belongs to this optimizer, not to the saved one: a
    # checkpoint from a run without fused kernels (or from another device) must not turn them off.
    groups = [dict(group) for group in optimizer_state["param_groups"]]
    for group, own in zip(groups, optimizer.param_groups):  # a group-count mismatch is still refused below
        group.update({key: own[key] for key in ("fused", "foreach") if key in own})
    optimizer.load_state_dict({**optimizer_state, "param_groups": groups})
    scheduler.load_state_dict(scheduler_state)
    if isinstance(scheduler, LambdaLR):
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def fast_forward(scheduler: LRScheduler, steps: int) -> None:
    """Step a fresh scheduler to where a run already is (no optimizer steps are taken)."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def lr_schedule(config: dict, steps_per_epoch: int) -> list[float]:
    """The lr at every optimizer step of a run with this config (for plots), without training."""
    optimizer = build_optimizer(config, [torch.nn.Parameter(torch.zeros(1))])
    scheduler, interval = build_scheduler(config, optimizer, steps_per_epoch)
    lrs = []
    for step in range(steps_per_epoch * config["epochs"]):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if interval == "step" or (step + 1) % steps_per_epoch == 0:
            scheduler.step()
    return lrs
