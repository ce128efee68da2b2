"""The LR range test on one rank: the run's components, trained at the ramp's lr for at most its steps.

Every rank steps the same lr and adds the loss averaged over the ranks to its curve, so all of them
stop at the same step. The weights are discarded: the test is a probe, and reports no checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from toolbox.data.splits import DatasetSplits
from toolbox.data.tensors import TensorData
from toolbox.training.loop import training_loss
from toolbox.training.lr_range import Curve, Ramp
from toolbox.training.phases import Run, flush_denormals, setup, take_step, training_batches
from toolbox.training.session import Session


def range_test(
    config: dict,
    data: TensorData | DatasetSplits,
    session: Session,
    ramp: Ramp,
    curve: Curve,
    resume_from: str | None = None,
) -> Curve:
    """Step the run of ``config`` at each lr of ``ramp`` until its last step or until ``curve`` says the loss diverged."""
    flush_denormals()
    # The run's scheduler is left out: one may change the optimizer as it is built (one-cycle sets momentum).
    run, _ = setup({**config, "scheduler": "none"}, data, session, resume_from, session.prepare_model, torch.default_generator)
    run.model.train()
    batches = _endless_batches(run, data.to(session.device))
    for step, (inputs, targets) in zip(range(ramp.steps), batches):
        lr = ramp.lr(step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss = training_loss(run, inputs, targets)
        take_step(loss, run.optimizer)
        mean_loss = session.all_reduce(loss.detach().float().clone()).item() / session.world_size
        if curve.add(lr, mean_loss):
            break
    return curve


def _endless_batches(run: Run, data: TensorData | DatasetSplits) -> Iterator:
    """The rank's training batches, epoch after epoch."""
    return itertools.chain.from_iterable(training_batches(run.config, data, epoch, run.session) for epoch in itertools.count())
