"""Metrics. ``fn(logits, targets) -> tensor``: the batch's *sum* (so ranks and batches add up exactly).

Reported as a mean over the whole set, in percent for accuracies. ``min_classes`` is checked
against the model's output size before Ray starts.
"""

from __future__ import annotations

import torch

from toolbox.registry import Registry

METRICS = Registry("metric", selector="metrics")


def _top_k_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1).sum() * 100.0


@METRICS.register("top_1_accuracy", min_classes=1)
def top_1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Percent of samples whose top logit is the target."""
    return _top_k_correct(logits, targets, 1)


@METRICS.register("top_5_accuracy", min_classes=5)
def top_5_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Percent of samples whose target is among the 5 top logits."""
    return _top_k_correct(logits, targets, 5)
