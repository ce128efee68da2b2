"""Criteria (loss functions). ``fn(*, <config>) -> nn.Module`` taking (logits, targets)."""

from __future__ import annotations

from torch import nn

from toolbox.registry import ConfigError, Registry

CRITERIA = Registry("criterion", selector="criterion")


@CRITERIA.register("cross_entropy_loss")
def cross_entropy_loss(*, label_smoothing: float = 0.0) -> nn.Module:
    """Cross-entropy on logits, with optional label smoothing."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
