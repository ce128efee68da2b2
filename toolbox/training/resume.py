"""Continuing from a checkpoint, possibly of another config (``--resume ... --gamma 0.9``, PBT's exploit).

Which values a config changed is read off the components themselves: the optimizer and scheduler
are built once with the checkpoint's config and once with this one, and every hyperparameter that
differs between the two takes this config's value. The saved state (moments, step counts) is kept.
No list of keys is kept by hand, so a new component's own parameters move too.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from toolbox.training.builders import build_optimizer, build_scheduler, fast_forward

# How a step runs belongs to this optimizer, not to the saved one (another device, another torch).
EXECUTION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and a == b


def restore_optimization(
    state: dict, config: dict, optimizer, scheduler: LRScheduler, interval: str, steps_per_epoch: int
) -> None:
    """Load ``state``'s optimizer and scheduler into this config's, carrying every value the config changed."""
    old = state["config"]
    if (old["optimizer"], old["scheduler"]) != (config["optimizer"], config["scheduler"]):
        # Another optimizer or scheduler (PBT switched it): theirs start afresh, at this point of the run.
        fast_forward(scheduler, state["global_step"] if interval == "step" else state["epoch"])
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = build_optimizer(old, params)  # what the checkpoint's run was built with
    before_scheduler, _ = build_scheduler(old, before, steps_per_epoch)

    groups = []
    for saved, own, was in zip(state["optimizer"]["param_groups"], optimizer.param_groups, before.param_groups):
        # Only this optimizer's own execution keys, none where it has none (RMSprop has no ``fused``);
        # a group-count mismatch is refused by load_state_dict below.
        group = {key: value for key, value in saved.items() if key not in EXECUTION_KEYS}
        for key, value in own.items():
            if key != "params" and (key in EXECUTION_KEYS or not _same(value, was.get(key))):
                group[key] = value
        # The lr where the run is, scaled like the base lr: the schedule continues from here.
        group["lr"] = saved["lr"] * own["initial_lr"] / was["initial_lr"]
        groups.append(group)
    optimizer.load_state_dict({**state["optimizer"], "param_groups": groups})

    fresh, fresh_before = scheduler.state_dict(), before_scheduler.state_dict()
    merged = dict(state["scheduler"])
    merged.update({k: v for k, v in fresh.items() if not _same(v, fresh_before.get(k))})
    scheduler.load_state_dict(merged)
    if isinstance(scheduler, LambdaLR):  # its factor is rebuilt from this config: follow it from this step
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
