"""Tune pieces chosen by name in a sweep file: search algorithm, trial scheduler, console progress."""

from __future__ import annotations

import logging
import time

from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from toolbox.sweepfile import Sweep

log = logging.getLogger("toolbox")


def snapshot_after_every_change() -> None:
    """Tune snapshots the sweep (experiment state, searcher and scheduler) after every controller
    step; toolbox sets the period to 0 so that a killed driver loses no finished trial. But a step
    also ends every 0.1 s with nothing new, and those identical snapshots took 40% of the driver's
    CPU during an MNIST sweep on 2 cores, CPU the trials were short of. This skips a snapshot when no
    trial was added, changed status or reported since the last one; forced snapshots still run."""
    from ray.tune.execution.tune_controller import TuneController

    save = TuneController.checkpoint
    if getattr(save, "toolbox_skips_unchanged", False):
        return

    def checkpoint(self, force: bool = False, wait: bool = False):
        state = [(t.trial_id, t.status, t.last_result.get("training_iteration")) for t in self._trials]
        forced = force or getattr(self._checkpoint_manager, "_should_force_sync_up", True)
        if not forced and state == getattr(self, "_toolbox_snapshot_state", None):
            return None
        saved = save(self, force=force, wait=wait)
        self._toolbox_snapshot_state = state  # only once saved: a failed snapshot is not skipped next time
        return saved

    checkpoint.toolbox_skips_unchanged = True
    TuneController.checkpoint = checkpoint


def search_algorithm(sweep: Sweep, max_concurrent: int):
    """Concurrency is bounded on the searcher: Tune ignores max_concurrent_trials when one is given (trap 9)."""
    seed = sweep.base.get("seed", 0)
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def trial_scheduler(sweep: Sweep):
    """Early stopping by name; ``scheduler_options`` in the sweep file go to the constructor."""
    common = {"time_attr": "training_iteration"}  # one iteration = one epoch
    options = dict(sweep.scheduler_options)
    if sweep.trial_scheduler == "asha":
        return tune.schedulers.ASHAScheduler(**common, max_t=sweep.epochs, **{"grace_period": 1, "reduction_factor": 3} | options)
    if sweep.trial_scheduler == "hyperband":
        return tune.schedulers.HyperBandScheduler(**common, max_t=sweep.epochs, **{"reduction_factor": 3} | options)
    if sweep.trial_scheduler == "median_stopping":
        return tune.schedulers.MedianStoppingRule(**common, **{"grace_period": 1, "min_samples_required": 3} | options)
    if sweep.trial_scheduler == "pbt":
        mutations = {k: m for k, m in ((k, _mutation(v)) for k, v in sweep.space.items()) if m is not None}
        return tune.schedulers.PopulationBasedTraining(
            **common, **{"perturbation_interval": 2, "hyperparam_mutations": mutations} | options
        )
    return tune.schedulers.FIFOScheduler()


def _mutation(value):
    """PBT perturbs numbers by factors: categorical values must go to it as lists (it shifts along them)."""
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, dict):
        if set(value) == {"grid_search"}:
            return list(value["grid_search"])
        nested = {k: _mutation(v) for k, v in value.items()}
        return {k: v for k, v in nested.items() if v is not None} or None
    return value if isinstance(value, Domain) else None


class Progress(tune.Callback):
    """One console line per finished trial, and a status line at most every 30 s."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.best: dict[str, float] = {}
        self.epochs: dict[str, int] = {}
        self.done = 0
        self.started: dict[str, float] = {}
        self.startup_s: dict[str, float] = {}  # Tune starting the trial -> its first training step
        self.last_status = time.time()
        self.interrupted = False

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.sweep.mode == "max" else a < b)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        first_step = result.get("first_step_time")
        if first_step and trial.trial_id in self.started and trial.trial_id not in self.startup_s:
            self.startup_s[trial.trial_id] = first_step - self.started[trial.trial_id]
        value = result.get(self.sweep.metric)
        if value is not None and self._better(value, self.best.get(trial.trial_id)):
            self.best[trial.trial_id] = value
        self.epochs[trial.trial_id] = result.get("epoch", 0)
        if time.time() - self.last_status > 30:
            self.last_status = time.time()
            running = sum(t.status == "RUNNING" for t in trials)
            overall = [v for v in self.best.values()]
            top = (max if self.sweep.mode == "max" else min)(overall) if overall else float("nan")
            log.info(
                "... %d/%d trials finished, %d running, best %s so far %.4f",
                self.done,
                self.sweep.total_trials,
                running,
                self.sweep.metric,
                top,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "done" if self.epochs.get(trial.trial_id, 0) >= self.sweep.epochs else "stopped early")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, f"FAILED (see {trial.local_path}/error.txt)")

    def _line(self, trial, what: str) -> None:
        self.done += 1
        config = self.sweep.trial_config(trial.config)
        swept = ", ".join(f"{k}={_short(config[k])}" for k in self.sweep.space if k in config)
        best = self.best.get(trial.trial_id)
        log.info(
            "[%d/%d] trial %s %s after %d epochs: best %s %s | %s",
            self.done,
            self.sweep.total_trials,
            trial.trial_id,
            what,
            self.epochs.get(trial.trial_id, 0),
            self.sweep.metric,
            "-" if best is None else f"{best:.4f}",
            swept,
        )

    def on_experiment_end(self, trials, **info):
        self.interrupted = any(t.status in ("PENDING", "RUNNING", "PAUSED") for t in trials)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
