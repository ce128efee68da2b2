"""Horizontally fused training (HFTA, Wang et al., MLSys 2021): K same-shaped trials as one stacked model.

Each member is a ``phases.Run`` and goes through ``loop.train``'s phases, keeping what makes it its
own run: its initial weights (built under its seed), its hyperparameters and schedule (its own
registry-built optimizer and scheduler, read every step), its dropout masks (its own generator,
seeded and drawn as the loop's global one), its data order, its augmentations (drawn from its own
generator), its criterion and metrics, and its rows and checkpoints. On CPU its numbers are the
unfused loop's to float rounding, and its checkpoints resume in the unfused loop and back.

Members join (``add``) and leave at epoch boundaries. A member leaves after its last epoch, or when
its session's ``report`` raises ``StopMember`` (the report itself is kept). Members may be at
different epochs: each has its own epoch, step counts and schedule; an epoch of the group is the
next epoch of every member.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from toolbox.components.datasets import DATASETS
from toolbox.components.models import MODELS
from toolbox.config.registry import ConfigError
from toolbox.data.tensors import DataSpec, TensorData
from toolbox.training.builders import build_model, build_optimizer
from toolbox.training.fused_model import StackedModel, layout, no_stacked_form
from toolbox.training.fused_optim import StackedOptimizer, member_moments, member_state_dict, no_stacked_step
from toolbox.training.phases import (
    Run,
    after_epoch_steps,
    after_step,
    augmented,
    batch_loss,
    checkpoint_state,
    dropout_seed,
    end_epoch,
    epoch_order,
    evaluate,
    flush_denormals,
    report_epoch,
    restore,
    rng_states,
    setup,
    take_step,
)
from toolbox.training.session import Session

SHARED_KEYS = ("arch", "dataset", "batch_size", "optimizer")  # besides the model's and the dataset's own keys


class StopMember(Exception):
    """Raised by a member's ``session.report`` to take it out of the group; the epoch counts as reported."""


def _shared_keys(config: dict) -> list[str]:
    """Keys every member must share: the model's (but its dropout probabilities), the dataset's, and SHARED_KEYS."""
    model_keys = [p.key for p in MODELS[config["arch"]].params if p.name != "dropout"]
    return [*SHARED_KEYS, *model_keys, *(p.key for p in DATASETS[config["dataset"]].params)]


def group_key(config: dict) -> tuple:
    """Configs with equal keys here can share one stack (a dropout of 0 has no layer: it is a key too)."""
    dropouts = tuple(config.get(p.key, p.default) > 0 for p in MODELS[config["arch"]].params if p.name == "dropout")
    return tuple(repr(config.get(key)) for key in _shared_keys(config)) + (config["precision"], dropouts)


def fusable(configs: list[dict], spec: DataSpec | None = None) -> str | None:
    """None if ``configs`` can train as one fused group, else a one-line reason why not.

    Given the data's ``spec``, the models are built too (on the meta device: no memory, no RNG
    draws) and their layers compared and checked for stacked forms; a group always checks that."""
    if not configs:
        return None
    first = configs[0]
    for config in configs[1:]:
        for key in _shared_keys(first):
            if config.get(key) != first.get(key):
                return f"different {key}: {first.get(key)!r} vs {config.get(key)!r}"
    for config in configs:
        if config["precision"] != "32-true":
            return f"trials with precision {config['precision']!r} cannot fuse (only 32-true fuses)"
        reason = no_stacked_step(build_optimizer(config, [nn.Parameter(torch.zeros(1))]))
        if reason:
            return f"trials with {config['optimizer']} cannot fuse ({reason})"
    return None if spec is None else _unstackable_models(configs, spec)


def _unstackable_models(configs: list[dict], spec: DataSpec) -> str | None:
    with torch.device("meta"):
        models = [build_model(config, spec) for config in configs]
    if not isinstance(models[0], nn.Sequential):
        return f"trials with {configs[0]['arch']} cannot fuse (it is a {type(models[0]).__name__}, not an nn.Sequential)"
    for layer in models[0]:
        reason = no_stacked_form(layer)
        if reason:
            return f"trials with {configs[0]['arch']} cannot fuse (it has {reason})"
    for config, model in zip(configs[1:], models[1:]):
        ours, theirs = layout(models[0]), layout(model)
        if ours != theirs:
            first_difference = next((a, b) for a, b in zip([*ours, None], [*theirs, None]) if a != b)
            return f"their models' layers differ (seed {configs[0]['seed']}: {first_difference[0]}, seed {config['seed']}: {first_difference[1]})"
    return None


@dataclass(eq=False)
class Member(Run):
    """One trial of a group: its ``Run`` (weights and moments live in the stack). Its model holds the state dict's
    keys and the placeholders its optimizer holds; its optimizer the hyperparameters its scheduler drives."""

    device_generator: torch.Generator | None = None  # dropout off the CPU (not checkpointed, as in the loop)
    unstacked: tuple | None = None  # (weights, moments, optimizer steps) until it joins the stack


class FusedGroup:
    """Members ``(config, session)`` trained as one stacked model on ``data`` (every member trains on it).

    Sessions must be single-process (rank 0 of 1) on one device."""

    def __init__(self, data: TensorData, members: Iterable[tuple[dict, Session]] = ()):
        if not isinstance(data, TensorData):
            raise ConfigError(f"a fused group trains on TensorData, not {type(data).__name__}")
        flush_denormals()
        self.data, self.device = data, None
        self.members: list[Member] = []  # in the stack's order
        self.joining: list[Member] = []
        self.model: StackedModel | None = None
        self.optimizer: StackedOptimizer | None = None
        for config, session in members:
            self.add(config, session)

    def add(self, config: dict, session: Session, resume_from: str | None = None) -> bool:
        """Let a member join from the next epoch on: from its session's latest checkpoint, ``resume_from``, or fresh.

        Returns False, having reported its last row again (as the loop does), where its checkpoint is already done."""
        reason = fusable([m.config for m in (*self.members, *self.joining)] + [config], self.data.spec)
        if reason:
            raise ConfigError(f"cannot fuse this config with the group's: {reason}")
        if session.world_size != 1:
            raise ValueError("a fused member trains in one process (world_size 1)")
        if self.device is None:
            self.device, self.data = session.device, self.data.to(session.device)
        elif session.device != self.device:
            raise ValueError(f"members on {self.device} and {session.device}: a group trains on one device")
        member = self._build_member(config, session, resume_from)
        if member is not None:
            self.joining.append(member)
        return member is not None

    @property
    def steps_per_epoch(self) -> int:
        return (self.members or self.joining)[0].steps_per_epoch

    @property
    def _batch_size(self) -> int:
        return (self.members or self.joining)[0].config["batch_size"]

    def run(self) -> None:
        """Train until every member has left."""
        while self.members or self.joining:
            self.train_epoch()

    def train_epoch(self) -> None:
        """The next epoch of every member (joining ones first join), reported per member; then finished and stopped ones leave."""
        flush_denormals()  # the calling thread may be new
        if self.joining:
            self._restack([*self.members, *self.joining])
        if not self.members:
            return
        started = time.perf_counter()
        lrs = [m.optimizer.param_groups[0]["lr"] for m in self.members]
        loss_sums = self._train_steps()
        train_seconds = time.perf_counter() - started
        self.model.eval()
        count = len(self.members)
        vals = evaluate(
            self.members, lambda inputs: self.model(inputs.expand(count, *inputs.shape)), self.data, self.members[0].session
        )
        epoch_seconds = time.perf_counter() - started
        leaving, n = [], self.data.size("train")
        for k, member in enumerate(self.members):
            # samples_per_s counts this member's samples
            row = end_epoch(member, lrs[k], loss_sums[k].item() / n, vals[k], epoch_seconds, n / train_seconds)
            state = self._checkpoint(k, row)
            try:
                report_epoch(member.session, row, state)
            except StopMember:
                leaving.append(member)
                continue
            if member.epoch >= member.config["epochs"]:
                leaving.append(member)
        if leaving:
            self._restack([m for m in self.members if m not in leaving])

    def _build_member(self, config: dict, session: Session, resume_from: str | None) -> Member | None:
        """As ``loop.train`` sets a run up: the same seeds, builders and restored state."""
        member, state = setup(
            config, self.data, session, resume_from, lambda model: model.to(self.device), torch.Generator(), record=Member
        )
        if self.device.type != "cpu":
            member.device_generator = torch.Generator(self.device).manual_seed(dropout_seed(config, 0))
        if state is not None and restore(member, state):
            return None
        model, optimizer = member.model, member.optimizer
        params = dict(model.named_parameters())
        member.unstacked = ({key: p.detach() for key, p in params.items()}, *member_moments(optimizer, params))
        optimizer.state.clear()  # the stack holds the moments from here on
        return member

    def _unstacked(self, member: Member) -> tuple[dict, dict, int]:
        """(weights, moments, optimizer steps) of ``member``, from the stack where it is in it."""
        if member.unstacked is not None:
            unstacked, member.unstacked = member.unstacked, None
            return unstacked
        k = self.members.index(member)
        moments = {
            key: {name: self.model.member_tensor(key, t, k) for name, t in m.items()} for key, m in self.optimizer.moments.items()
        }
        return self.model.member_weights(k), moments, self.optimizer.steps[k]

    def _restack(self, members: list[Member]) -> None:
        """Stack ``members`` (their order is the stack's): a new model and optimizer over their weights and moments."""
        unstacked = [self._unstacked(m) for m in members]
        self.members, self.joining = members, [m for m in self.joining if m not in members]
        if not members:
            self.model = self.optimizer = None
            return
        generators = [m.device_generator or m.dropout for m in members]
        self.model = StackedModel([m.model for m in members], [u[0] for u in unstacked], generators)
        params = dict(self.model.named_parameters())
        moments = {
            key: {name: self.model.stack_tensors(key, [u[1][key][name] for u in unstacked]) for name in unstacked[0][1][key]}
            for key in params
        }
        self.optimizer = StackedOptimizer(params, [m.optimizer for m in members], moments, [u[2] for u in unstacked])

    def _train_steps(self) -> torch.Tensor:
        """One epoch of steps for every member, each in its own data order; the members' summed train losses."""
        members, n, batch_size = self.members, self.data.size("train"), self._batch_size
        order = torch.stack([epoch_order(m.config, m.epoch, n) for m in members]).to(self.device)
        loss_sums = torch.zeros(len(members), device=self.device)
        augmenting = any(m.augmentations for m in members)
        self.model.train()
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": the stacked step is the optimizer's
            warnings.simplefilter("ignore", UserWarning)
            for i in range(0, n, batch_size):
                now = time.time()
                for member in members:
                    member.first_step_time = member.first_step_time or now
                batch = order[:, i : i + batch_size]
                inputs, targets = self.data.batch("train", batch.flatten())
                inputs = inputs.view(*batch.shape, *inputs.shape[1:])
                if augmenting:  # each member's batch through its own augmentations and generator
                    inputs = torch.stack([augmented(m, inputs[k]) for k, m in enumerate(members)])
                outputs = self.model(inputs)
                targets = targets.view(*batch.shape, *targets.shape[1:])
                losses = torch.stack([batch_loss(m, outputs[k], targets[k]) for k, m in enumerate(members)])
                take_step(losses.sum(), self.optimizer)  # member k's parameters get the gradient of its own loss alone
                for member in members:
                    after_step(member)
                loss_sums += losses.detach() * batch.shape[1]
            for member in members:
                after_epoch_steps(member)
        return loss_sums

    def _checkpoint(self, k: int, row: dict) -> dict:
        """Member k's checkpoint state, as ``loop.train`` saves it."""
        member = self.members[k]
        weights = {key: t.clone(memory_format=torch.contiguous_format) for key, t in self.model.member_weights(k).items()}
        _, moments, steps = self._unstacked(member)
        optimizer_state = member_state_dict(member.optimizer, dict(member.model.named_parameters()), moments, steps)
        return checkpoint_state(member, row, weights, optimizer_state, rng_states(member))
