"""The one place a Ray Train ``TorchTrainer`` is built: for ``toolbox.run`` and for multi-worker trials."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolbox.distributed.locations import Place
from toolbox.training.epochlog import EpochLog, read_rows, replace_file

REPORTS_FILE = "worker_reports.json"  # a worker's reports that are not epochs, a list of one per rank


@dataclass(frozen=True)
class Workers:
    """A worker group: how many, and what each one holds."""

    count: int = 1
    cpus: float = 1.0
    gpus: float = 0.0  # per worker; fractions share a GPU

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def _worker_start(loop_config: dict):
    """What every worker does first: the user's code, its threads, its data and its session."""
    from toolbox.training.session import train_session

    return _process_start(loop_config), train_session()


def _process_start(loop_config: dict):
    """The user's code, the process's threads and its data."""
    import ray
    import torch

    from toolbox.config import user_code
    from toolbox.distributed.cluster import quiet_ray
    from toolbox.training.builders import shared_data
    from toolbox.training.failures import fail_once
    from toolbox.training.phases import flush_denormals

    flush_denormals()
    quiet_ray()
    with fail_once():
        user_code.load(loop_config["config"]["imports"])
    torch.set_num_threads(loop_config["threads"])
    return shared_data(ray.get(loop_config["data"]), loop_config["config"])


def train_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry point."""
    from toolbox.distributed.live_metrics import LiveMetrics
    from toolbox.training.epochlog import format_row
    from toolbox.training.failures import fail_once
    from toolbox.training.loop import train

    data, session = _worker_start(loop_config)
    if session.rank == 0:  # one worker's epoch lines in its log, and its numbers as Ray metrics
        report, live = session.report, LiveMetrics(**loop_config["live_tags"])

        def report_and_show(metrics: dict, checkpoint_dir: str | None) -> None:
            print(format_row(metrics, loop_config["config"]["epochs"]), flush=True)
            live.record(metrics)
            report(metrics, checkpoint_dir)

        session.report = report_and_show
    with fail_once(session):
        train(loop_config["config"], data, session, loop_config["resume_from"])


def range_test_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry point of the LR range test: every rank reports its curve once, and no checkpoint."""
    data, session = _worker_start(loop_config)
    session.report(_range_test_curve(loop_config, data, session), None)


def range_test_process(loop_config: dict, use_gpu: bool) -> dict:
    """The LR range test in this process alone (a Ray task of a sweep's): its curve, as a worker reports it."""
    import torch

    from toolbox.training.session import local_session

    data = _process_start(loop_config)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return _range_test_curve(loop_config, data, local_session(lambda metrics, checkpoint: None, device))


def _range_test_curve(loop_config: dict, data, session) -> dict:
    from toolbox.training.failures import fail_once
    from toolbox.training.lr_range import Curve, Ramp
    from toolbox.training.range_test import range_test

    ramp, curve = Ramp(**loop_config["settings"]["ramp"]), Curve(**loop_config["settings"]["curve"])
    with fail_once(session):
        range_test(loop_config["config"], data, session, ramp, curve, loop_config["resume_from"])
    return {"rows": curve.rows, "diverged": curve.diverged}


def epoch_log_callback(where: Place, epochs: int, hparams: dict | None, rows: bool = True):
    """A Ray Train callback, run in the controller on the driver's node, that writes the epoch table and the lines
    that say a restart. Without ``rows`` the reports are not epochs: every rank's latest goes to ``REPORTS_FILE``."""
    from ray.train import UserCallback

    class EpochLogCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if rows:
                self._log().append(metrics[0])
            else:
                where.local.mkdir(parents=True, exist_ok=True)
                replace_file(where.local / REPORTS_FILE, json.dumps(metrics).encode())

        def _log(self) -> EpochLog:
            if not hasattr(self, "log"):
                self.log = EpochLog(where.local, epochs, hparams, mirror=where.mirror)
            return self.log

        def say(self, message: str) -> None:
            """A line in the run's log, which ``toolbox.run`` echoes on the console."""
            self._log().log(message)

        def latest_epoch(self) -> int | None:
            """The last epoch reported, whose checkpoint (one each epoch) a restarted group continues from."""
            return max((int(row["epoch"]) for row in read_rows(where.local)), default=None)

    return EpochLogCallback()


# In Train's controller process: rank -> (node id, pid) of the worker group's processes, as they started.
_worker_processes: dict[int, tuple[str, int]] = {}


def record_worker_processes(workers: list) -> None:
    """Train's workers, sorted by rank, as their group started (a module-level function, so that the callback that
    calls it in the controller fills this module's record rather than a copy of it)."""
    _worker_processes.clear()
    _worker_processes.update({rank: (w.metadata.node_id, w.metadata.pid) for rank, w in enumerate(workers)})


def _gone_here(processes: dict[int, tuple[str, int]]) -> list[int]:
    """The ranks whose process, on this node, has ended."""
    import psutil
    import ray

    node = ray.get_runtime_context().get_node_id()
    gone = []
    for rank, (worker_node, pid) in processes.items():
        try:
            alive = worker_node != node or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            gone.append(rank)
    return gone


def restart_line(error, restarts: int, limit: int, epoch: int | None) -> str:
    """What a worker group's restart is said as: which rank died and how, where the group continues, how many are left.

    Ray's error names no signal (the raylet, not the controller, sees a worker's exit), only its guesses at one; and
    with two workers it may hold only the survivor's error ("Connection closed by peer"), so the ranks whose process
    has ended are looked up."""
    from ray.exceptions import RayActorError

    from toolbox.config.registry import one_line

    failures = getattr(error, "worker_failures", {})
    died = sorted({rank for rank, exc in failures.items() if isinstance(exc, RayActorError)} | set(_gone_here(_worker_processes)))
    if died:
        memory = any("running low on memory" in str(failures.get(rank)) for rank in died)
        how = "killed by Ray's memory monitor" if memory else "its process ended: killed, or crashed"
        who = f"worker{'s' * (len(died) > 1)} {', '.join(map(str, died))} died ({how})"
    elif failures:
        rank, exc = min(failures.items())
        who = f"worker {rank} failed ({one_line(exc)[:200]})"
    else:
        who = "the worker group failed"
    start = f"from epoch {epoch}'s checkpoint" if epoch else "from the start (no checkpoint yet)"
    count = f"{restarts} of {limit} restarts" if limit >= 0 else f"restart {restarts}, no limit"
    return f"{who}; restarting the group {start} ({count})"


def torch_trainer(
    config: dict,
    data_ref: Any,
    workers: Workers,
    *,
    name: str,
    storage: Place,
    resume_from: str | None = None,
    callbacks: tuple = (),
    max_failures: int = 0,
    hparams: dict | None = None,
    live_tags: dict | None = None,
    score: tuple[str, str] = ("val_loss", "min"),
    ray_ends_with_driver: bool = False,
    worker: Callable[[dict], None] = train_worker,
    settings: dict | None = None,
):
    """A TorchTrainer of ``workers`` running the training loop (or another ``worker``, given ``settings`` in
    its loop config, whose reports are not epochs) on the shared dataset ``data_ref``.

    Ray writes ``storage.parent``/``name`` in ``storage.fs``; the epoch table goes to ``storage``'s own
    dir. It keeps the latest checkpoint and the best by ``score`` (a metric, and "min" or "max").
    Re-fitting one with the same name and storage resumes from its latest checkpoint, which is how
    runs and trials continue. ``ray_ends_with_driver``: fitted in the driver of a private local Ray
    (``toolbox.run`` without ``--address``), so Train's two helpers for shared clusters are left out."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    resources = {"CPU": workers.cpus} | ({"GPU": workers.gpus} if workers.gpus else {})
    return _lean_trainer(ray_ends_with_driver)(
        worker,
        train_loop_config={
            "config": config,
            "data": data_ref,
            "resume_from": resume_from,
            "threads": workers.threads,
            "live_tags": live_tags or {"sweep": "", "trial": name},
            "settings": settings or {},
        },
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=workers.gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage.parent,
            storage_filesystem=storage.fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=score[0], checkpoint_score_order=score[1]
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            # The epoch table first: Tune may stop a trial inside TuneReportCallback's report.
            callbacks=[epoch_log_callback(storage, config["epochs"], hparams, rows=worker is train_worker), *callbacks],
        ),
    )


@functools.cache
def _lean_trainer(ray_ends_with_driver: bool):
    """TorchTrainer with some of its default helpers changed; each one left out is an actor process
    that would take CPU from training all along.

    - No Ray Data callback: toolbox passes no Ray Datasets, and that callback starts an actor per run
      that does nothing else.
    - The dashboard's state callback records package versions as plain strings: torch's version is a
      ``TorchVersion``, and unpickling one made Train's long-lived state actor import all of torch.
    - Its failure policy retries a worker group that crashed, never one whose training failed as a
      retry would again (``DeterministicFailure``).
    - With ``ray_ends_with_driver``, no placement-group cleaner and no autoscaling coordinator. The
      cleaner removes a dead controller's placement group, which the driver's exit does here too (a
      sweep's trials keep it: without it Train-in-Tune leaks a CPU at each trial's end). The
      coordinator passes resource requests on to an autoscaler, which a private local Ray does not have."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback, StateManagerCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    from ray.train.v2.api.exceptions import WorkerGroupError

    from toolbox.training.failures import deterministic_cause

    left_out = (DatasetsCallback, PlacementGroupCleanerCallback) if ray_ends_with_driver else (DatasetsCallback,)

    class StateWithPlainVersions(StateManagerCallback):
        def after_worker_group_start(self, worker_group):
            super().after_worker_group_start(_VersionsAsText(worker_group))

    class FixedWithoutAutoscaler(FixedScalingPolicy):
        def after_controller_start(self, train_run_context):
            pass

        def _maybe_send_resource_request(self):
            pass

    class RecordWorkerProcesses(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            record_worker_processes(worker_group.get_workers())

    class RetryCrashesOnly(DefaultFailurePolicy):
        def __init__(self, failure_config, epoch_log):
            super().__init__(failure_config)
            self.epoch_log = epoch_log  # where a restart is said

        def make_decision(self, training_failed_error):
            if deterministic_cause(training_failed_error) is not None:
                return FailureDecision.RAISE
            decision = super().make_decision(training_failed_error)
            if decision == FailureDecision.RETRY and isinstance(training_failed_error, WorkerGroupError):
                restarts, limit = self._worker_group_failures, self.failure_config.max_failures
                epoch = self.epoch_log.latest_epoch()
                self.epoch_log.say(restart_line(training_failed_error, restarts, limit, epoch))
            return decision

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            kept = [c for c in super()._create_default_callbacks() if not isinstance(c, left_out)]
            kept = [StateWithPlainVersions(datasets=self.datasets) if type(c) is StateManagerCallback else c for c in kept]
            return [*kept, RecordWorkerProcesses()]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            epoch_log = next(c for c in self.run_config.callbacks if hasattr(c, "latest_epoch"))
            controller_init_kwargs["failure_policy"] = RetryCrashesOnly(self.run_config.failure_config, epoch_log)
            if ray_ends_with_driver and type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = FixedWithoutAutoscaler(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return LeanTorchTrainer


class _VersionsAsText:
    """A worker group whose one-worker calls answer a dict's values as ``str`` (the state callback's only one)."""

    def __init__(self, group):
        self._group = group

    def __getattr__(self, name: str):
        return getattr(self._group, name)

    def execute_single(self, rank: int, fn, *args, **kwargs):
        answer = self._group.execute_single(rank, fn, *args, **kwargs)
        return {key: str(value) for key, value in answer.items()} if isinstance(answer, dict) else answer


def fit(trainer):
    """``trainer.fit()``, raising KeyboardInterrupt on Ctrl-C.

    Train aborts its workers on Ctrl-C and then exits the driver with ``SystemExit(1)``, which reads
    like any other failure; the SIGINT handler it installs is wrapped to tell the two apart."""
    import signal

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    interrupted = []
    register = DataParallelTrainer._register_sigint_handler

    def register_and_watch(self, controller):
        register(self, controller)
        handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            interrupted.append(signum)
            handler(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)

    DataParallelTrainer._register_sigint_handler = register_and_watch
    try:
        return trainer.fit()
    except SystemExit:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        DataParallelTrainer._register_sigint_handler = register
