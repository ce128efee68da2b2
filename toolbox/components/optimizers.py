"""Optimizers. ``fn(params, /, *, <config>) -> torch.optim.Optimizer`` with ``params`` a list.

Pass ``**fused_if_supported(params)`` where torch has a one-kernel step (Adam, AdamW, SGD): torch
leaves it off by default, and the per-parameter step is a large share of a small model's epoch.
"""

from __future__ import annotations

import torch

from toolbox.config.registry import ConfigError, Fraction, NonNegativeFloat, PositiveFloat, Registry

OPTIMIZERS = Registry("optimizer", selector="optimizer")

_FUSED_DEVICES = ("cpu", "cuda")


def fused_if_supported(params: list) -> dict:
    """``{"fused": True}`` where every param is a float tensor on a device with fused kernels, else {}."""
    ok = bool(params) and all(
        isinstance(p, torch.Tensor) and p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params
    )
    return {"fused": True} if ok else {}


def runs_fused_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` steps with torch's fused kernels: every param group says ``fused=True``.

    Optimizers torch has no fused step for (RMSprop) carry no ``fused`` flag at all."""
    return all(group.get("fused") is True for group in optimizer.param_groups)


@OPTIMIZERS.register("adamw")
def adamw(
    params,
    /,
    *,
    lr: PositiveFloat = 1e-3,
    weight_decay: NonNegativeFloat = 0.01,
    betas: tuple[Fraction, Fraction] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay).

    Args:
        lr: learning rate (the peak, where a scheduler warms up or decays).
        weight_decay: decoupled weight decay.
        betas: decay rates of the first and second moment estimates.
    """
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, **fused_if_supported(params))


@OPTIMIZERS.register("adam")
def adam(
    params,
    /,
    *,
    lr: PositiveFloat = 1e-3,
    weight_decay: NonNegativeFloat = 0.0,
    betas: tuple[Fraction, Fraction] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """Adam (L2 penalty as weight decay).

    Args:
        lr: learning rate (the peak, where a scheduler warms up or decays).
        weight_decay: L2 penalty added to the gradients.
        betas: decay rates of the first and second moment estimates.
    """
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas, **fused_if_supported(params))


@OPTIMIZERS.register("sgd")
def sgd(
    params,
    /,
    *,
    lr: PositiveFloat = 0.01,
    weight_decay: NonNegativeFloat = 0.0,
    momentum: Fraction = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD with (optionally Nesterov) momentum.

    Args:
        lr: learning rate (the peak, where a scheduler warms up or decays).
        weight_decay: L2 penalty added to the gradients.
        momentum: momentum factor.
        nesterov: Nesterov momentum (needs momentum > 0).
    """
    if nesterov and momentum == 0:
        raise ConfigError("--nesterov needs --momentum > 0")
    return torch.optim.SGD(
        params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, **fused_if_supported(params)
    )
