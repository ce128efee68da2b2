"""The one place a Ray Train ``TorchTrainer`` is built: for ``toolbox.run`` and for multi-worker trials."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.distributed.storage import filesystem_for
from toolbox.training.epochlog import EpochLog


@dataclass(frozen=True)
class Workers:
    """A worker group: how many, and what each one holds."""

    count: int = 1
    cpus: float = 1.0
    gpus: float = 0.0  # per worker; fractions share a GPU

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def train_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry point."""
    import ray
    import torch

    from toolbox.data.tensors import TensorData
    from toolbox.training.loop import train
    from toolbox.training.session import train_session

    torch.set_num_threads(loop_config["threads"])
    data = TensorData.from_shared(ray.get(loop_config["data"]))
    train(loop_config["config"], data, train_session(), loop_config["resume_from"])


def epoch_log_callback(run_dir: Path, epochs: int):
    """A Ray Train callback, run in the controller on the driver's node, that writes the epoch table."""
    from ray.train import UserCallback

    class EpochLogCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not hasattr(self, "log"):
                self.log = EpochLog(run_dir, epochs)
            self.log.append(metrics[0])

    return EpochLogCallback()


def torch_trainer(
    config: dict,
    data_ref: Any,
    workers: Workers,
    *,
    name: str,
    storage: Path,
    epoch_log_dir: Path,
    resume_from: str | None = None,
    callbacks: tuple = (),
    max_failures: int = 0,
):
    """A TorchTrainer of ``workers`` running the training loop on the shared dataset ``data_ref``.

    It keeps the latest checkpoint and the best by val loss. Re-fitting one with the same name and
    storage resumes from its latest checkpoint, which is how runs and trials continue."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": workers.cpus} | ({"GPU": workers.gpus} if workers.gpus else {})
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "data": data_ref, "resume_from": resume_from, "threads": workers.threads},
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=workers.gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            storage_filesystem=filesystem_for(storage),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=[*callbacks, epoch_log_callback(epoch_log_dir, config["epochs"])],
        ),
    )
