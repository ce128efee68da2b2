"""Console progress of a sweep: one line per finished trial, and a status line at most every 30 s."""

from __future__ import annotations

import logging
import math
import time

from ray import tune

from toolbox.training.epochlog import read_rows
from toolbox.tuning import tune_fixes
from toolbox.tuning.growth import in_space
from toolbox.tuning.results import best_value
from toolbox.tuning.sweepfile import Sweep

log = logging.getLogger("toolbox")


class Progress(tune.Callback):
    """One console line per finished trial, and a status line at most every 30 s."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.best: dict[str, float] = {}
        self.epochs: dict[str, int] = {}
        self.done: int | None = None  # trials finished, counted from a re-run's first step
        self.started: dict[str, float] = {}
        self.startup_s: dict[str, float] = {}  # Tune starting the trial -> its first training step
        self.last_status = time.time()

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.sweep.mode == "max" else a < b)

    def on_step_begin(self, iteration, trials, **info):
        if self.done is None:  # a re-run restores the trials that finished before it
            self.done = sum(t.status in ("TERMINATED", "ERROR") and in_space(self.sweep, t.config) for t in trials)
            if self.done:
                log.info("%d of %d trials had finished before this run", self.done, self.sweep.total_trials)

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
                self.done or 0,
                self.sweep.total_trials,
                running,
                self.sweep.metric,
                top,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "done" if self.epochs.get(trial.trial_id, 0) >= self.sweep.epochs else "stopped early")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, f"FAILED after {trial.num_failures - 1} retries (see {trial.path}/error.txt)")

    def on_trial_recover(self, iteration, trials, trial, **info):
        if tune_fixes.disk_full() is not None:  # the sweep stops: the trial continues when it is re-run
            log.info("trial %s stopped: the disk is full", trial.trial_id)
            return
        history = read_rows(trial.path, trial.storage.storage_filesystem) if trial.path else []
        count = f"{trial.num_failures} of {self.sweep.max_failures} retries"
        if history:
            epoch = max(int(r["epoch"]) for r in history)
            log.info("trial %s died; retrying it from its latest checkpoint, epoch %d's (%s)", trial.trial_id, epoch, count)
        else:
            log.info("trial %s died before its first epoch ended; retrying it from the start (%s)", trial.trial_id, count)

    def _line(self, trial, what: str) -> None:
        self.done = (self.done or 0) + 1
        config = self.sweep.shown_config(trial.config)
        swept = ", ".join(f"{k}={_short(config[k])}" for k in self.sweep.space if k in config)
        history = read_rows(trial.path, trial.storage.storage_filesystem) if trial.path else []
        best = best_value(history, self.sweep)  # over every run of the trial, as the table has it
        best = self.best.get(trial.trial_id) if math.isnan(best) else best
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


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
