"""Fixes to Ray Tune 2.60's driver, each through one private hook, each installed once and skipped if the hook is gone.

- Snapshots: skip the identical experiment snapshots that toolbox's snapshot period of 0 would take,
  write each finished trial once rather than into every snapshot, and upload only the files that
  changed (``snapshots``).
- Staging race: Tune rewrites its local staging dir while a background thread is still uploading
  it, so the upload can miss a renamed temporary file and log a traceback; wait for it first.
- Killed trials: an actor task that fails with a Ray error other than an actor's or a task's (a
  trial's process killed by Ray's memory monitor raises ``OutOfMemoryError``) escapes Tune's actor
  manager and ends the whole sweep; take it as the death of that trial's actor. A trial killed for
  memory fails at once: at the same config a retry needs the same memory.
- Retries: Tune retries every failed trial; one whose failure a retry would repeat
  (``DeterministicFailure``) fails at once, and a re-run of the sweep, which resumes errored
  trials, leaves it failed.
- Stale statuses: Tune's snapshot holds each trial's status as of the last time it marked that trial
  for saving, and a change of status alone does not mark it: a trial HyperBand paused and that then
  finished was saved as PAUSED; mark the trial at every change of status.
- Grid points: Tune draws every point of a grid before its first trial starts (a grid of 10^5
  values never gets to one); draw them as trials start (``lazy_grid``).
- Restore: Tune's restore brings back the first run's scheduler, without its state, and ignores a
  larger spec; a ``growth.Growth`` given to ``grow_on_restore`` swaps in the current scheduler with
  the trials' epochs replayed, and adds what the spec grew by.
- A full disk: a trial that fails on one ends the sweep as Ctrl-C would (every other trial and each
  retry would fail the same way), and counts as no failure of the trial's: a re-run continues it.
- Interruption: Tune catches Ctrl-C and returns from ``fit()`` as if the sweep had finished, marking
  the running trials TERMINATED; keep its event so the driver can tell.
"""

from __future__ import annotations

import logging
import math
import re
import time

from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError

from toolbox.training.failures import DeterministicFailure, deterministic_cause

log = logging.getLogger("toolbox")
_interrupted: list = []  # Tune's interruption events, one per fit()
_growth: list = []  # the growth.Growth of the sweep this driver restores, if any
_disk_full: list[BaseException] = []  # trial failures on a full disk


def install() -> None:
    fixes = (
        snapshot_after_every_change,
        save_finished_trials_once,
        restore_finished_trials,
        read_finished_trials,
        upload_only_what_changed,
        wait_for_the_previous_upload,
        save_every_status_change,
        fail_the_trial_of_a_killed_actor,
        retry_crashes_only,
        stop_on_a_full_disk,
        resume_crashes_only,
        restore_with_growth,
        draw_grid_points_lazily,
        keep_the_interruption_event,
    )
    for fix in fixes:
        try:
            fix()
        except (ImportError, AttributeError) as exc:  # another Ray version: run without the fix
            log.debug("Tune fix %s not installed: %s", fix.__name__, exc)


def snapshot_after_every_change() -> None:
    """Tune snapshots the sweep (experiment state, searcher and scheduler) after every controller
    step; toolbox sets the period to 0 so that a killed driver loses no finished trial. Most steps
    change nothing, and their identical snapshots cost the driver CPU that the trials need. This
    skips a snapshot when Tune marked no trial for saving (added, started, reported, stopped or
    changed status) since the last one; forced snapshots still run."""
    from ray.tune.execution.tune_controller import TuneController

    save = TuneController.checkpoint
    if getattr(save, "toolbox_skips_unchanged", False):
        return

    def checkpoint(self, force: bool = False, wait: bool = False):
        forced = force or getattr(self._checkpoint_manager, "_should_force_sync_up", True)
        if not forced and not self._trials_to_cache:
            return None
        return save(self, force=force, wait=wait)

    checkpoint.toolbox_skips_unchanged = True
    TuneController.checkpoint = checkpoint


def save_finished_trials_once() -> None:
    from ray.tune.execution.tune_controller import TuneController

    from toolbox.tuning import snapshots

    if TuneController.save_to_dir is snapshots.save:
        return
    TuneController.save_to_dir = snapshots.save


def restore_finished_trials() -> None:
    from ray.tune.execution.tune_controller import TuneController

    from toolbox.tuning import snapshots

    restore = TuneController._restore_trials
    if getattr(restore, "toolbox_merges", False):
        return

    def _restore_trials(self, experiment_state):
        storage = self._storage
        sealed = snapshots.merge(experiment_state, storage.storage_filesystem, storage.experiment_fs_path)
        snapshots.restore_searcher_with_snapshot(self, experiment_state)
        trials = restore(self, experiment_state)
        # After Tune's restore, which moves the staging dir back to the first run's.
        snapshots.restored(self, sealed, experiment_state[snapshots.FINISHED_AFTER])
        return trials

    requeue = TuneController._requeue_restored_trials

    def _requeue_restored_trials(self, trials, resume_config):  # Tune has restored the searcher by now
        snapshots.tell_searcher_of_later_ends(self, trials)
        return requeue(self, trials, resume_config)

    _restore_trials.toolbox_merges = True
    TuneController._restore_trials = _restore_trials
    TuneController._requeue_restored_trials = _requeue_restored_trials


def read_finished_trials() -> None:
    from ray.tune import ExperimentAnalysis

    from toolbox.tuning import snapshots

    if getattr(ExperimentAnalysis._load_trials, "toolbox_merges", False):
        return

    def _load_trials(self):
        return snapshots.saved_trials(self._fs, self._experiment_fs_path, self._experiment_json_fs_path)

    _load_trials.toolbox_merges = True
    ExperimentAnalysis._load_trials = _load_trials


def upload_only_what_changed() -> None:
    from ray.train._internal.storage import _FilesystemSyncer

    from toolbox.tuning import snapshots

    command = _FilesystemSyncer._sync_up_command
    if getattr(command, "toolbox_uploads_changes", False):
        return

    def _sync_up_command(self, local_path, uri, exclude=None):
        if exclude:
            return command(self, local_path, uri, exclude)
        return snapshots.upload_command(self.storage_filesystem, local_path, uri)

    _sync_up_command.toolbox_uploads_changes = True
    _FilesystemSyncer._sync_up_command = _sync_up_command


def wait_for_the_previous_upload() -> None:
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as manager

    save = manager.sync_up_experiment_state
    if getattr(save, "toolbox_waits", False):
        return

    def sync_up_experiment_state(self, save_fn, force: bool = False, wait: bool = False):
        due = force or self._should_force_sync_up or time.monotonic() - self._last_save_time >= self._checkpoint_period
        if due and self._storage is not None and self._storage.syncer is not None:
            try:
                self._storage.syncer.wait()
            except Exception as exc:  # noqa: BLE001 - that upload is retried by the next one
                log.debug("the previous experiment-state upload failed (%s); uploading again", exc)
        return save(self, save_fn, force=force, wait=wait)

    sync_up_experiment_state.toolbox_waits = True
    manager.sync_up_experiment_state = sync_up_experiment_state


def save_every_status_change() -> None:
    from ray.tune.execution.tune_controller import TuneController

    set_status = TuneController._set_trial_status
    if getattr(set_status, "toolbox_saves", False):
        return

    def _set_trial_status(self, trial, status):
        set_status(self, trial, status)
        self._mark_trial_to_checkpoint(trial)

    _set_trial_status.toolbox_saves = True
    TuneController._set_trial_status = _set_trial_status


class KilledForMemory(RayActorError):
    """A trial's actor that Ray's memory monitor killed; its ``cause`` says so in one line, and is not retried."""

    def __init__(self, line: str):
        super().__init__(error_msg=line)
        self.cause = DeterministicFailure(line)


def memory_line(message: str) -> str:
    """Ray's memory monitor's report of a kill, in one line: what the process held, what the node used."""
    held = re.search(r"Selected to kill:.*?actual memory used=([\d.]+\w?B)", message, re.DOTALL)
    node = re.search(r"was ([\d.]+\w?B) used / ([\d.]+\w?B) limit", message)
    threshold = re.search(r"threshold of \d+B \(([\d.]+%) of", message)
    line = "out of memory: Ray's memory monitor killed the trial's process"
    if held:
        line += f", which held {held.group(1)}"
    if node:
        line += f" (the node used {node.group(1)} of {node.group(2)}" + (
            f", over its {threshold.group(1)} threshold)" if threshold else ")"
        )
    return line


def fail_the_trial_of_a_killed_actor() -> None:
    from ray.air.execution._internal.actor_manager import RayActorManager

    failed = RayActorManager._actor_task_failed
    if getattr(failed, "toolbox_fails_the_trial", False):
        return

    def _actor_task_failed(self, tracked_actor_task, exception):
        if isinstance(exception, OutOfMemoryError):
            exception = KilledForMemory(memory_line(str(exception)))
        elif not isinstance(exception, (RayActorError, RayTaskError)):
            exception = RayActorError(error_msg=f"{type(exception).__name__}: {exception}")
        return failed(self, tracked_actor_task, exception)

    _actor_task_failed.toolbox_fails_the_trial = True
    RayActorManager._actor_task_failed = _actor_task_failed


def retry_crashes_only() -> None:
    from ray.tune.execution.tune_controller import TuneController

    process = TuneController._process_trial_failure
    if getattr(process, "toolbox_retries_crashes_only", False):
        return

    def _process_trial_failure(self, trial, exception):
        if deterministic_cause(exception) is None:
            return process(self, trial, exception)
        limit, trial.max_failures = trial.max_failures, 0  # Tune's test: failures so far <= max_failures
        try:
            return process(self, trial, exception)
        finally:
            trial.max_failures = limit

    _process_trial_failure.toolbox_retries_crashes_only = True
    TuneController._process_trial_failure = _process_trial_failure


def grow_on_restore(growth) -> None:
    """The next restore of a sweep in this process goes through ``growth``."""
    _growth[:] = [growth]


def restore_with_growth() -> None:
    from ray.tune.execution.tune_controller import TuneController

    requeue = TuneController._requeue_restored_trials
    if getattr(requeue, "toolbox_grows", False):
        return

    def _requeue_restored_trials(self, trials, resume_config):
        if not _growth:
            return requeue(self, trials, resume_config)
        _growth[0].before_requeue(self, trials)
        requeue(self, trials, resume_config)
        _growth[0].after_requeue(self)

    _requeue_restored_trials.toolbox_grows = True
    TuneController._requeue_restored_trials = _requeue_restored_trials


def stop_on_a_full_disk() -> None:
    from ray.tune.execution.tune_controller import TuneController

    from toolbox.config.flags import is_disk_full

    process = TuneController._process_trial_failure
    if getattr(process, "toolbox_stops_on_a_full_disk", False):
        return

    def _process_trial_failure(self, trial, exception):
        if not is_disk_full(exception) or not _interrupted:
            return process(self, trial, exception)
        _disk_full.append(exception)
        _interrupted[-1].set()  # fit()'s loop ends after this step, as on Ctrl-C
        failures = trial.run_metadata.num_failures
        limit, trial.max_failures = trial.max_failures, -1  # Tune's test: -1 recovers always
        try:
            return process(self, trial, exception)  # the trial waits, PENDING, to continue from its checkpoint
        finally:
            trial.max_failures = limit
            trial.run_metadata.num_failures = failures

    _process_trial_failure.toolbox_stops_on_a_full_disk = True
    TuneController._process_trial_failure = _process_trial_failure


def disk_full() -> BaseException | None:
    """The first trial failure on a full disk, if the last ``fit()`` ended on one."""
    return _disk_full[0] if _disk_full else None


def resume_crashes_only() -> None:
    from ray.tune.execution.tune_controller import TuneController

    requeue = TuneController._requeue_restored_trials
    if getattr(requeue, "toolbox_resumes_crashes_only", False):
        return

    def _requeue_restored_trials(self, trials, resume_config):
        final = [t for t in trials if t.status == "ERROR" and _failed_for_good(t)]
        for trial in final:  # kept ERROR, as Tune keeps an errored trial it does not resume
            self.add_trial(trial)
        return requeue(self, [t for t in trials if t not in final], resume_config)

    _requeue_restored_trials.toolbox_resumes_crashes_only = True
    TuneController._requeue_restored_trials = _requeue_restored_trials


def _failed_for_good(trial) -> bool:
    """Whether a restored trial's last failure was one that a retry would repeat."""
    try:
        error = trial.get_pickled_error()
    except Exception as exc:  # noqa: BLE001 - an error that no longer loads: resume the trial, as Tune would
        log.debug("trial %s: its error does not load (%s); resuming it", trial.trial_id, exc)
        return False
    return error is not None and deterministic_cause(error) is not None


def draw_grid_points_lazily() -> None:
    from ray.tune.search import basic_variant

    from toolbox.tuning.lazy_grid import Variants, grid_points

    if basic_variant._VariantIterator is Variants:
        return
    basic_variant.generate_variants = grid_points
    basic_variant._VariantIterator = Variants
    basic_variant.SERIALIZATION_THRESHOLD = math.inf  # above it Tune draws lazily itself, but saves no state to resume from


def keep_the_interruption_event() -> None:
    import ray.tune.tune as tune_module

    setup = tune_module._setup_signal_catching
    if getattr(setup, "toolbox_keeps", False):
        return

    def _setup_signal_catching():
        event = setup()
        _interrupted.append(event)
        _disk_full.clear()
        return event

    _setup_signal_catching.toolbox_keeps = True
    tune_module._setup_signal_catching = _setup_signal_catching


def was_interrupted() -> bool:
    """Whether the last ``fit()`` ended on Ctrl-C (or SIGUSR1)."""
    return bool(_interrupted) and _interrupted[-1].is_set()
