"""Validation metrics. ``fn(num_outputs, /, *, <config>) -> torchmetrics.Metric``.

A metric keeps its state across batches and reduces it across DDP ranks (torchmetrics does both),
so any metric of the whole val set can be one function. Values are reported as ``val_<name>``.
``num_outputs`` is the model's outputs per sample: the class count, or the real values per sample.
A metric says at registration which targets it takes (``targets="real"``; class indices by default,
those here in percent) and which way is better (``mode="min"`` for errors; "max" by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolbox.config.registry import ConfigError, Registry

if TYPE_CHECKING:  # torchmetrics is imported where a metric is built: it takes seconds to import
    import torchmetrics

METRICS = Registry("metric", selector="metrics", many=True)


def _top_k(num_classes: int, k: int) -> torchmetrics.Metric:
    if num_classes < k:
        raise ConfigError(f"top_{k}_accuracy needs at least {k} classes; the model outputs {num_classes}")
    from torchmetrics.classification import MulticlassAccuracy

    return MulticlassAccuracy(num_classes, top_k=k, average="micro") * 100


@METRICS.register("top_1_accuracy")
def top_1_accuracy(num_classes: int, /) -> torchmetrics.Metric:
    """Percent of samples whose top logit is the target."""
    return _top_k(num_classes, 1)


@METRICS.register("top_5_accuracy")
def top_5_accuracy(num_classes: int, /) -> torchmetrics.Metric:
    """Percent of samples whose target is among the 5 top logits."""
    return _top_k(num_classes, 5)


@METRICS.register("macro_f1", prefix="f1")
def macro_f1(num_classes: int, /, *, ignore_index: int | None = None) -> torchmetrics.Metric:
    """F1 score of each class, averaged with equal weight per class, in percent.

    Args:
        ignore_index: a target class whose samples are left out (default: none).
    """
    if ignore_index is not None and not 0 <= ignore_index < num_classes:
        raise ConfigError(f"--f1-ignore-index {ignore_index} is not a class of the {num_classes}")
    from torchmetrics.classification import MulticlassF1Score

    return MulticlassF1Score(num_classes, average="macro", ignore_index=ignore_index) * 100


@METRICS.register("mean_absolute_error", targets="real", mode="min")
def mean_absolute_error(num_outputs: int, /) -> torchmetrics.Metric:
    """Mean absolute difference between outputs and real-valued targets, over every value."""
    from torchmetrics import MeanAbsoluteError

    return MeanAbsoluteError()


@METRICS.register("r2_score", targets="real")
def r2_score(num_outputs: int, /) -> torchmetrics.Metric:
    """Coefficient of determination (1 is a perfect fit), averaged over the target's values."""
    from torchmetrics import R2Score

    return R2Score(multioutput="uniform_average")


def mode_of(reported: str) -> str:
    """Which way a reported value is better, "min" or "max": losses fall; a metric says at registration (default "max")."""
    if reported.endswith("_loss"):
        return "min"
    name = reported.removeprefix("val_")
    return METRICS[name].meta.get("mode", "max") if name in METRICS else "max"
