"""One optimizer step for K stacked members, each with the hyperparameters of its own torch optimizer.

Every member keeps the real optimizer the registry builds for it (over its own, unstacked model's
parameters, which only serve as placeholders): its scheduler drives it as in the unfused loop, and
each step reads ``param_groups[0]`` of every member into ``[K, 1, ...]`` tensors broadcast over the
stacked parameters. The moments live stacked here; ``member_state_dict`` writes member k's back into
its optimizer's own ``state_dict`` format, and ``member_moments`` reads them out of a restored one.

One broadcast step serves every member, so a step's kernel launches do not grow with K, which is
what a GPU running small models waits on; on a CPU it makes more passes than torch's fused kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from toolbox.components.optimizers import runs_fused_step

MOMENTS = {
    torch.optim.Adam: ("exp_avg", "exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq"),
    torch.optim.SGD: ("momentum_buffer",),
}


def no_stacked_step(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer``'s step has no stacked form here, or None."""
    if type(optimizer) not in MOMENTS:
        return f"{type(optimizer).__name__} has no stacked step; Adam, AdamW and SGD have"
    if len(optimizer.param_groups) != 1:
        return f"{type(optimizer).__name__} with {len(optimizer.param_groups)} param groups (one stacks)"
    group = optimizer.param_groups[0]
    for flag in ("amsgrad", "maximize", "differentiable"):
        if group.get(flag):
            return f"{type(optimizer).__name__} with {flag}=True has no stacked step"
    if group.get("dampening", 0) != 0:
        return f"SGD with dampening={group['dampening']} has no stacked step"
    return None


def _decoupled(optimizer: torch.optim.Optimizer) -> bool:
    return optimizer.param_groups[0].get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))


def member_moments(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> tuple[dict, int]:
    """``({key: {moment: tensor}}, adam step)`` from a member's optimizer; zeros where it has no state yet.

    A zero momentum buffer gives SGD's first step exactly (``0 * momentum + grad``), so none is needed."""
    moments, step = {}, 0
    for key, p in params.items():
        state = optimizer.state.get(p, {})
        moments[key] = {
            m: state[m].detach() if state.get(m) is not None else torch.zeros_like(p) for m in MOMENTS[type(optimizer)]
        }
        if "step" in state:
            step = int(state["step"])
        elif state.get("momentum_buffer") is not None:
            step = 1  # SGD's state only says whether it has stepped
    return moments, step


def member_state_dict(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], moments: dict, step: int) -> dict:
    """Member's ``optimizer.state_dict()`` as its own unfused run's would be, holding ``moments`` at ``step``."""
    optimizer.state.clear()
    if step > 0:
        sgd_without_buffer = isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0
        for key, p in params.items():
            if isinstance(optimizer, torch.optim.SGD):
                state = {} if sgd_without_buffer else {"momentum_buffer": moments[key]["momentum_buffer"]}
            else:
                state = {
                    "step": torch.tensor(float(step), device=p.device if _step_on_param_device(optimizer) else "cpu"),
                    **moments[key],
                }
            if state:
                optimizer.state[p] = {m: t.clone(memory_format=torch.contiguous_format) for m, t in state.items()}
    saved = optimizer.state_dict()
    optimizer.state.clear()  # the stack holds the live moments
    return saved


def _step_on_param_device(optimizer: torch.optim.Optimizer) -> bool:
    return runs_fused_step(optimizer) or bool(optimizer.param_groups[0].get("capturable"))


class StackedOptimizer:
    """Adam, AdamW or SGD over stacked parameters; ``optimizers[k]`` holds member k's hyperparameters.

    ``moments`` is ``{key: {moment: stacked tensor}}``; ``steps[k]`` member k's Adam step count."""

    def __init__(self, params: dict[str, nn.Parameter], optimizers: list[torch.optim.Optimizer], moments: dict, steps: list[int]):
        self.params, self.optimizers, self.moments, self.steps = params, optimizers, moments, list(steps)
        self.kind = type(optimizers[0])
        # Reused every step: temporaries the size of a parameter cost more to allocate than to fill.
        self.scratch = {key: (torch.empty_like(p), torch.empty_like(p)) for key, p in params.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are always set to None, as ``phases.take_step`` asks of every optimizer."""
        for p in self.params.values():
            p.grad = None

    def _per_member(self, name: str, index: int | None = None) -> torch.Tensor:
        values = [o.param_groups[0][name] for o in self.optimizers]
        return torch.tensor(values if index is None else [v[index] for v in values], dtype=torch.float64)

    @torch.no_grad()
    def step(self) -> None:
        """One step of every member; each parameter's gradient is used up (changed in place)."""
        if self.kind is torch.optim.SGD:
            self._sgd_step()
        else:
            self._adam_step()
        self.steps = [s + 1 for s in self.steps]

    def _broadcast(self, values: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """For a parameter ``p``: the ``[K]`` float64 ``values`` as ``[K, 1, ...]`` of ``p``'s dtype and device."""
        stacked, moved = torch.stack(list(values.values())), {}

        def like(p: torch.Tensor) -> dict[str, torch.Tensor]:
            if (p.dtype, p.device) not in moved:  # one copy to the device per step
                moved[p.dtype, p.device] = stacked.to(p.device, p.dtype)
            shape = (len(self.steps),) + (1,) * (p.ndim - 1)
            return {name: v.view(shape) for name, v in zip(values, moved[p.dtype, p.device])}

        return like

    def _adam_step(self) -> None:
        """torch's Adam/AdamW, with ``sqrt(1 - beta2^t)`` moved from the denominator into eps and the step size."""
        step = torch.tensor(self.steps, dtype=torch.float64) + 1
        lr, weight_decay, eps = self._per_member("lr"), self._per_member("weight_decay"), self._per_member("eps")
        beta1, beta2 = self._per_member("betas", 0), self._per_member("betas", 1)
        bias_correction2_sqrt = (1 - beta2**step).sqrt()
        values = {
            "weight_decay": weight_decay,
            "decay": 1 - lr * weight_decay,
            "one_minus_beta1": 1 - beta1,
            "one_minus_beta2": 1 - beta2,
            "neg_step_size": -lr / (1 - beta1**step) * bias_correction2_sqrt,
            "eps": eps * bias_correction2_sqrt,
        }
        decoupled, any_decay, like = _decoupled(self.optimizers[0]), bool(weight_decay.any()), self._broadcast(values)
        for key, p in self.params.items():
            h, grad, (scratch, denom) = like(p), p.grad, self.scratch[key]
            exp_avg, exp_avg_sq = self.moments[key]["exp_avg"], self.moments[key]["exp_avg_sq"]
            if any_decay and decoupled:
                p.mul_(h["decay"])
            elif any_decay:
                grad.addcmul_(p, h["weight_decay"])
            exp_avg.lerp_(grad, h["one_minus_beta1"])
            exp_avg_sq.lerp_(torch.mul(grad, grad, out=scratch), h["one_minus_beta2"])
            torch.sqrt(exp_avg_sq, out=denom).add_(h["eps"])
            p.addcdiv_(torch.mul(exp_avg, h["neg_step_size"], out=scratch), denom)

    def _sgd_step(self) -> None:
        """torch's SGD (dampening 0); a zero momentum buffer makes the first step's buffer the gradient, as torch's."""
        weight_decay, momentum, nesterov = (
            self._per_member("weight_decay"),
            self._per_member("momentum"),
            self._per_member("nesterov"),
        )
        values = {"weight_decay": weight_decay, "momentum": momentum, "neg_lr": -self._per_member("lr"), "nesterov": nesterov}
        any_decay, any_nesterov, like = bool(weight_decay.any()), bool(nesterov.any()), self._broadcast(values)
        for key, p in self.params.items():
            h, grad, (scratch, _) = like(p), p.grad, self.scratch[key]
            if any_decay:
                grad.addcmul_(p, h["weight_decay"])
            update = buffer = self.moments[key]["momentum_buffer"].mul_(h["momentum"]).add_(grad)
            if any_nesterov:
                update = torch.where(
                    h["nesterov"] != 0, torch.addcmul(grad, buffer, h["momentum"], out=scratch), buffer, out=scratch
                )
            p.addcmul_(update, h["neg_lr"])
