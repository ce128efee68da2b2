"""A sweep trial: a Tune function trial running the same loop as ``toolbox.run``.

One worker per trial: the loop runs in the trial's own process (no worker group to start, and the
trial actor is reused). Several workers: the trial builds and fits a TorchTrainer that reports to
Tune through ``TuneReportCallback`` (Ray 2.60's Train-in-Tune pattern).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from toolbox.config import user_code
from toolbox.distributed.live_metrics import LiveMetrics
from toolbox.distributed.locations import Place
from toolbox.training.checkpoint import first_whole
from toolbox.training.epochlog import EpochLog
from toolbox.training.failures import deterministic_cause, fail_once
from toolbox.tuning.sweepfile import Sweep
from toolbox.tuning.trial_dirs import keep_as_best, recover_best

# Custom resource that the Train-in-Tune trial function holds instead of a CPU: one it held leaked at the trial's end.
TRAIN_DRIVER_RESOURCE = "TRAIN_DRIVER_RESOURCE"


def run_trial(params: dict[str, Any], *, sweep: Sweep, data: list, exp: Place) -> None:
    """Tune entry point; ``data`` is ``[ObjectRef]`` of the shared dataset (one copy per node).

    Our files go to the trial's dir under the sweep's storage (for a URI, through a local staging
    copy): Tune's own trial dir is a local staging dir whose files are synced only with checkpoints.
    """
    import ray
    from ray import tune

    with fail_once():  # a drawn value its component refuses, or the user's code failing to import
        config = sweep.trial_config(params)
    name = Path(tune.get_context().get_trial_dir()).name
    trial = Place(exp.fs, f"{exp.path}/{name}", f"{exp.path}/{name}", exp.local / name, exp.remote)
    trial_dir = trial.local
    epoch_log = EpochLog(trial_dir, config["epochs"], hparams=hparams(sweep, config), mirror=trial.mirror)
    epoch_log.log(f"trial started on node {ray.get_runtime_context().get_node_id()}: {config}")
    if config["imports"]:
        epoch_log.log(f"user code: {', '.join(f'{spec} from {file}' for spec, file in user_code.origins().items())}")
    print(f"trial {tune.get_context().get_trial_name()} started", flush=True)  # a reused trial process runs several
    if sweep.trials_fused:
        _train_fused(config, sweep, epoch_log, trial)
    elif sweep.trials_in_process:
        _train_in_process(config, sweep, data[0], epoch_log, trial)
    else:
        _train_with_workers(config, sweep, data[0], trial)


def hparams(sweep: Sweep, config: dict) -> dict:
    """What TensorBoard's HParams view shows for a trial: its components and its swept values."""
    from toolbox.config.resolve import KINDS

    chosen = {r.selector: config[r.selector] for r in KINDS if not r.many}
    return chosen | {key: config[key] for key in sweep.space if key in config}


def trainable(function, **parameters):
    """Tune's trainable for ``function``, showing as ``run_trial[<trial name>]`` on the dashboard's Actors page."""
    from ray import tune
    from ray.tune.trainable import wrap_function

    class RunTrial(wrap_function(tune.with_parameters(function, **parameters))):
        def __repr__(self) -> str:
            return f"run_trial[{self.trial_name}]"

    return RunTrial


def _own_latest(trial_dir: Path) -> str | None:
    """The trial's own last written whole checkpoint: it may be newer than the one Tune registered before a crash.

    Last written by Tune's checkpoint index, not highest epoch: after a PBT exploit of a trial that was
    behind, the trial's earlier trajectory holds higher epochs than the one it now continues."""
    found = first_whole(sorted(trial_dir.glob("checkpoint_*"), key=_checkpoint_index, reverse=True))
    return None if found is None else str(found[0])


def _checkpoint_index(directory: Path) -> int:
    suffix = directory.name.removeprefix("checkpoint_")
    return int(suffix) if suffix.isdigit() else -1


def _improves(value: float | None, earlier: list[float], mode: str) -> bool:
    if value is None:
        return False
    return not earlier or (value > max(earlier) if mode == "max" else value < min(earlier))


def _tune_session(sweep: Sweep, epoch_log: EpochLog, trial: Place):
    """The Tune session a one-process or fused trial reports through, and the checkpoint it continues from.

    Each epoch goes to the trial's own files, its actor's log, Ray's metrics and best/, then to Tune."""
    from ray import tune

    from toolbox.training.session import tune_session

    recover_best(trial.local)
    session = tune_session(use_gpu=sweep.gpus_per_trial > 0)
    checkpoint = session.latest_checkpoint()
    exploited = checkpoint is not None and trial.local.name not in Path(checkpoint.path).parts  # PBT gave another trial's
    report = session.report
    live = LiveMetrics(sweep.name, tune.get_context().get_trial_name())

    def report_and_log(metrics: dict, checkpoint_dir: str | None) -> None:
        # Epochs before this one: a retried epoch's own earlier row must not hide that it is the best.
        earlier = [r[sweep.metric] for r in epoch_log.rows if r["epoch"] < metrics["epoch"] and r.get(sweep.metric) is not None]
        # Written before reporting: Tune may stop the trial inside report. The print goes to the actor's log.
        print(epoch_log.append(metrics), flush=True)
        live.record(metrics)
        if checkpoint_dir and _improves(metrics.get(sweep.metric), earlier, sweep.mode):
            keep_as_best(Path(checkpoint_dir), trial)
        report(metrics, checkpoint_dir)

    def restored(state: dict) -> None:
        if exploited:
            note = f"continuing from epoch {state['epoch']} of {checkpoint.path} (exploited)"
            epoch_log.restart(state["epoch"], note, state.get("history", []))
        else:
            epoch_log.backfill(state.get("history", []))

    session.report, session.restored = report_and_log, restored
    return session, None if exploited else _own_latest(trial.local)


def _train_in_process(config: dict, sweep: Sweep, data_ref, epoch_log: EpochLog, trial: Place) -> None:
    import ray

    from toolbox.training.builders import shared_data
    from toolbox.training.loop import flush_denormals, train

    flush_denormals()
    torch.set_num_threads(max(1, int(sweep.cpus_per_worker)))
    session, resume_from = _tune_session(sweep, epoch_log, trial)
    with fail_once(session):
        train(config, shared_data(ray.get(data_ref), config), session, resume_from)


def _train_fused(config: dict, sweep: Sweep, epoch_log: EpochLog, trial: Place) -> None:
    """The trial's member trains in the sweep's FusedWorker; this relays its epochs to Tune."""
    from toolbox.training.phases import latest_checkpoint
    from toolbox.tuning.fused_trials import relay

    session, resume_from = _tune_session(sweep, epoch_log, trial)
    state, files = latest_checkpoint(session, resume_from, read_files=True)
    if state is not None:
        session.restored(state)
    relay(config, sweep, files, session.report)


def _train_with_workers(config: dict, sweep: Sweep, data_ref, trial: Place) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from toolbox.distributed.trainer import Workers, torch_trainer

    count = sweep.workers_per_trial
    workers = Workers(count, sweep.cpus_per_worker, sweep.gpus_per_trial / count)
    # Re-running a trial (sweep resume) re-fits this same run, which resumes from its checkpoint.
    trainer = torch_trainer(
        config,
        data_ref,
        workers,
        name="train",
        storage=trial,
        callbacks=(TuneReportCallback(),),
        hparams=hparams(sweep, config),
        live_tags={"sweep": sweep.name, "trial": tune.get_context().get_trial_name()},
        score=(sweep.metric, sweep.mode),
    )
    try:
        trainer.fit()
    except Exception as exc:
        cause = deterministic_cause(exc)
        if cause is None:
            raise
        raise cause from None  # as Tune's error, so that Tune does not retry it either
