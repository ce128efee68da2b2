"""MO-ASHA: asynchronous successive halving whose rungs rank trials by Pareto fronts over several objectives.

Schmucker et al. 2021, "Multi-objective Asynchronous Successive Halving", as Syne Tune's MOASHA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from toolbox.tuning.pareto import pareto_fronts, pareto_order


class MultiObjectiveASHA(FIFOScheduler):
    """A trial that reaches a rung (``grace_period`` epochs, then each ``reduction_factor`` times as many) is ranked
    against every trial that reached that rung before it: by non-dominated sorting over ``objectives`` (pairs of
    reported metric and "min" or "max"), ties within a front broken by crowding distance (the lonelier first). It
    continues if it is in the top 1 / reduction_factor of that order, or on the rung's first front: a trial that no
    other at its rung dominates is never stopped. Trials stop at ``max_t`` epochs.
    """

    def __init__(
        self, objectives: Sequence[tuple[str, str]], time_attr: str, max_t: int, grace_period: int, reduction_factor: float
    ):
        super().__init__()
        self.metrics = [metric for metric, _ in objectives]
        self.modes = [mode for _, mode in objectives]
        self.time_attr, self.max_t, self.reduction_factor = time_attr, max_t, reduction_factor
        milestones, milestone = [], float(grace_period)
        while milestone <= max_t:
            milestones.append(milestone)
            milestone *= reduction_factor
        self.rungs: dict[float, dict[str, list[float]]] = {m: {} for m in reversed(milestones)}  # highest first

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        values = self._values(result)
        if values is None:
            return TrialScheduler.CONTINUE
        if result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP
        kept = self._reaches_rung(trial.trial_id, result[self.time_attr], values)
        return TrialScheduler.CONTINUE if kept else TrialScheduler.STOP

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        values = self._values(result)
        if values is not None:
            self._reaches_rung(trial.trial_id, result[self.time_attr], values)

    def _values(self, result: dict) -> list[float] | None:
        """The result's objective values; None where it lacks one (or its epoch), or one is not a number."""
        values = [result.get(metric) for metric in self.metrics]
        if result.get(self.time_attr) is None or any(v is None or not math.isfinite(v) for v in values):
            return None
        return values

    def _reaches_rung(self, trial_id: str, epoch: float, values: list[float]) -> bool:
        """Records the trial at the highest rung its epoch reached, where not yet; whether it may go on."""
        for milestone, recorded in self.rungs.items():
            if epoch < milestone:
                continue
            if trial_id in recorded:
                return True
            recorded[trial_id] = values
            return self.keeps(recorded, trial_id)
        return True

    def keeps(self, recorded: dict[str, list[float]], trial_id: str) -> bool:
        """Whether ``trial_id`` is among the top 1 / reduction_factor of a rung's ``recorded`` trials, or on their first front."""
        ids, points = list(recorded), list(recorded.values())
        index = ids.index(trial_id)
        kept = pareto_order(points, self.modes)[: math.ceil(len(ids) / self.reduction_factor)]
        return index in kept or pareto_fronts(points, self.modes)[index] == 1

    def debug_string(self) -> str:
        return "MO-ASHA: " + " | ".join(f"epoch {m:g}: {len(r)} trials" for m, r in self.rungs.items())
