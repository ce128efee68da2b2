"""The LR range test's arithmetic (Smith's test, as fastai's and Lightning's ``lr_find``): the exponential ramp,
the smoothed loss and when it has diverged, and the suggested lr and sweep range read off the curve.

Plain Python: the per-rank loop (``range_test``), ``toolbox.lr_find`` and a sweep's range tests call it, and tests may too.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field

from toolbox.config.registry import PositiveFloat, PositiveInt

SUGGESTION_RULE = "steepest descent of the smoothed loss"
RANGE_RULE = "the suggestion / 10 .. the smoothed loss's minimum / 10, and at least the suggestion"
# The ramp's first tenth is left out of the steepest descent: its smoothed loss averages only a few batches.
SKIPPED_SHARE = 0.1


@dataclass(frozen=True)
class Ramp:
    """An exponential ramp of the lr from ``start_lr`` at step 0 to ``end_lr`` at step ``steps - 1``."""

    start_lr: PositiveFloat = 1e-7
    end_lr: PositiveFloat = 10.0
    steps: PositiveInt = 100

    def lr(self, step: int) -> float:
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.steps - 1))

    def refusal(self) -> str | None:
        """What is wrong with the ramp's values (each a positive number already), or None."""
        if self.end_lr <= self.start_lr:
            return f"--end-lr {self.end_lr:g} must be larger than --start-lr {self.start_lr:g}"
        if self.steps < 2:
            return f"--steps must be at least 2, got {self.steps}"
        return None


RAMP_RULES = typing.get_type_hints(Ramp, include_extras=True)  # each setting's value rule


@dataclass
class Curve:
    """The loss at each lr of the ramp, smoothed by an exponential moving average with bias correction.

    ``add`` says when to stop: the smoothed loss is not finite, or above ``diverge_factor`` times its minimum."""

    smoothing: float = 0.98  # the moving average's beta
    diverge_factor: float = 4.0
    rows: list[dict] = field(default_factory=list)
    average: float = 0.0
    lowest: float = math.inf
    diverged: bool = False

    def add(self, lr: float, loss: float) -> bool:
        """Record the loss of the step taken at ``lr``; True once the loss has diverged."""
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        smoothed = self.average / (1 - self.smoothing ** (len(self.rows) + 1))
        self.rows.append({"step": len(self.rows), "lr": lr, "loss": loss, "smoothed_loss": smoothed})
        self.lowest = min(self.lowest, smoothed)
        self.diverged = not math.isfinite(smoothed) or smoothed > self.diverge_factor * self.lowest
        return self.diverged


@dataclass(frozen=True)
class Suggestion:
    """The suggested lr and the range around it, or None for each with ``why`` there is none."""

    lr: float | None
    low: float | None
    high: float | None
    minimum_lr: float | None  # where the smoothed loss was lowest
    why: str = ""


def slopes(rows: list[dict]) -> list[float]:
    """The smoothed loss's slope against log(lr) at each row: central differences, one-sided at the ends."""
    x = [math.log(r["lr"]) for r in rows]
    y = [r["smoothed_loss"] for r in rows]
    last = len(rows) - 1
    return [(y[min(i + 1, last)] - y[max(i - 1, 0)]) / (x[min(i + 1, last)] - x[max(i - 1, 0)]) for i in range(len(rows))]


def suggest(rows: list[dict], steps: int) -> Suggestion:
    """The lr of the steepest descent of the smoothed loss (against log lr), between the ramp's first tenth of
    ``steps`` and the smoothed loss's minimum; the range ``RANGE_RULE`` says."""
    finite = [r for r in rows if math.isfinite(r["smoothed_loss"])]
    if not finite:
        return Suggestion(None, None, None, None, "the loss was never finite: try a smaller --start-lr")
    lowest = min(range(len(finite)), key=lambda i: finite[i]["smoothed_loss"])
    minimum_lr = finite[lowest]["lr"]
    first = math.ceil(SKIPPED_SHARE * steps)
    window = finite[: lowest + 1]
    if len(window) < 3 or lowest <= first:
        return Suggestion(None, None, None, minimum_lr, "the loss stopped falling at once: try a smaller --start-lr")
    slope = slopes(window)
    steepest = min(range(first, len(window)), key=lambda i: slope[i])
    if slope[steepest] >= 0:
        return Suggestion(None, None, None, minimum_lr, "the smoothed loss never fell: try a larger --end-lr or more --steps")
    lr = window[steepest]["lr"]
    return Suggestion(lr, lr / 10, max(minimum_lr / 10, lr), minimum_lr)


def describe(suggestion: Suggestion) -> str:
    """The suggestion, the range and their rules, in one line."""
    if suggestion.lr is None:
        return f"no suggested lr: {suggestion.why}"
    return (
        f"suggested lr {suggestion.lr:.2e} ({SUGGESTION_RULE}); "
        f"range {suggestion.low:.2e} .. {suggestion.high:.2e} ({RANGE_RULE})"
    )
