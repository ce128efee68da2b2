"""A sweep trial: a Tune function trial running the same loop as ``toolbox.run``.

One worker per trial: the loop runs in the trial's own process (no worker group to start, and the
trial actor is reused). Several workers: the trial builds and fits a TorchTrainer that reports to
Tune through ``TuneReportCallback`` (Ray 2.60's Train-in-Tune pattern).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from toolbox.config.registry import ConfigError
from toolbox.data.tensors import TensorData
from toolbox.training.checkpoint import STATE_FILE, load_latest
from toolbox.training.epochlog import EpochLog
from toolbox.tuning.sweepfile import Sweep

# Custom resource that the Train-in-Tune trial function holds instead of a CPU (RAY-NOTES trap 8).
TRAIN_DRIVER_RESOURCE = "TRAIN_DRIVER_RESOURCE"


def run_trial(params: dict[str, Any], *, sweep: Sweep, data: list, exp_dir: str) -> None:
    """Tune entry point; ``data`` is ``[ObjectRef]`` of the shared dataset (one copy per node).

    Our files go straight to the trial's dir under the sweep's storage: Tune's own trial dir is a
    local staging dir whose files are synced only with checkpoints.
    """
    from ray import tune

    config = sweep.trial_config(params)
    trial_dir = Path(exp_dir) / Path(tune.get_context().get_trial_dir()).name
    epoch_log = EpochLog(trial_dir, config["epochs"])
    epoch_log.log(f"trial started: {config}")
    if sweep.trials_in_process:
        _train_in_process(config, sweep, data[0], epoch_log, trial_dir)
    else:
        _train_with_workers(config, sweep, data[0], trial_dir)


def _own_latest(trial_dir: Path) -> str | None:
    """The trial's own newest whole checkpoint: it may be newer than the one Tune registered before a crash."""
    if not any(trial_dir.rglob(STATE_FILE)):
        return None
    try:
        return str(load_latest(trial_dir)[0])
    except ConfigError:
        return None


def _train_in_process(config: dict, sweep: Sweep, data_ref, epoch_log: EpochLog, trial_dir: Path) -> None:
    import ray

    from toolbox.training.loop import train
    from toolbox.training.session import tune_session

    torch.set_num_threads(max(1, int(sweep.cpus_per_worker)))
    session = tune_session(use_gpu=sweep.gpus_per_trial > 0)
    checkpoint = session.latest_checkpoint()
    exploited = checkpoint is not None and trial_dir.name not in Path(checkpoint.path).parts  # PBT gave another trial's
    report = session.report

    def report_and_log(metrics: dict, checkpoint_dir: str | None) -> None:
        epoch_log.append(metrics)  # first: Tune may stop the trial inside report
        report(metrics, checkpoint_dir)

    def restored(state: dict) -> None:
        if exploited:
            epoch_log.restart(state["epoch"], f"continuing from epoch {state['epoch']} of {checkpoint.path} (exploited)")
        else:
            epoch_log.backfill(state.get("history", []))

    session.report, session.restored = report_and_log, restored
    train(config, TensorData.from_shared(ray.get(data_ref)), session, None if exploited else _own_latest(trial_dir))


def _train_with_workers(config: dict, sweep: Sweep, data_ref, trial_dir: Path) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from toolbox.distributed.trainer import Workers, torch_trainer

    count = sweep.workers_per_trial
    workers = Workers(count, sweep.cpus_per_worker, sweep.gpus_per_trial / count)
    # Re-running a trial (sweep resume) re-fits this same run, which resumes from its checkpoint.
    trainer = torch_trainer(
        config, data_ref, workers, name="train", storage=trial_dir, epoch_log_dir=trial_dir, callbacks=(TuneReportCallback(),)
    )
    trainer.fit()
