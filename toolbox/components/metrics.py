"""Validation metrics. ``fn(num_classes, /, *, <config>) -> torchmetrics.Metric``.

A metric keeps its state across batches and reduces it across DDP ranks (torchmetrics does both),
so any metric of the whole val set can be one function. Values are reported as ``val_<name>``;
the ones here are in percent.
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
