"""What the training loop knows of Ray: a ``Session`` of rank, device, report and checkpoint edges.

A Ray Train worker gets ``train_session()``; a single-process Tune trial gets ``tune_session()``
(Ray refuses ``ray.train.report`` there), so the same loop serves ``toolbox.run`` and sweeps.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Session:
    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict, str | None], None]  # (metrics, checkpoint dir or None)
    latest_checkpoint: Callable[[], Any]  # a ray/tune Checkpoint or None
    prepare_model: Callable[[nn.Module], nn.Module]
    restored: Callable[[dict], None] = lambda state: None  # told of the checkpoint state training continues from

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def check_in_step(self, value: float, what: str) -> None:
        """Raise ``RanksOutOfStep`` where the ranks hold different ``value``s of ``what``."""
        if self.world_size == 1:
            return
        highest_and_lowest = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(highest_and_lowest, op=torch.distributed.ReduceOp.MAX)
        highest, lowest = highest_and_lowest[0].item(), 0.0 - highest_and_lowest[1].item()
        if highest != lowest:
            raise RanksOutOfStep(f"the ranks hold different {what}, from {lowest:g} to {highest:g}")


class RanksOutOfStep(Exception):
    """Ranks that would wait on each other forever in their next collective; a retry of the group starts them anew."""


@contextlib.contextmanager
def checkpoint_directory(checkpoint) -> Iterator[str]:
    """A Ray checkpoint's files: in place on local or mounted storage, else downloaded to a directory of this
    process's own. Ray's ``as_directory`` shares one per machine, where one rank could read a file another rewrites."""
    import pyarrow.fs

    from toolbox.distributed.storage import AtomicLocalFiles

    fs = checkpoint.filesystem
    if isinstance(fs, pyarrow.fs.LocalFileSystem) or (
        isinstance(fs, pyarrow.fs.PyFileSystem) and isinstance(fs.handler, AtomicLocalFiles)
    ):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="toolbox-checkpoint-") as directory:
        yield checkpoint.to_directory(directory)


def local_session(report: Callable[[dict, str | None], None], device: str = "cpu") -> Session:
    """One process, no Ray: the loop reports to ``report(metrics, checkpoint_dir)``."""
    device = torch.device(device)
    return Session(0, 1, device, report, lambda: None, lambda model: model.to(device))


def train_session() -> Session:
    """Edges for a Ray Train worker (TorchTrainer): ray.train.report, DDP via prepare_model."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    return Session(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=report,
        latest_checkpoint=ray.train.get_checkpoint,
        prepare_model=ray.train.torch.prepare_model,
    )


def tune_session(use_gpu: bool) -> Session:
    """Edges for a loop that runs inside a Tune function trial's own process (no worker group)."""
    from ray import tune

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    return Session(0, 1, device, report, tune.get_checkpoint, lambda model: model.to(device))
