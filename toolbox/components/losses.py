"""Criteria (loss functions). ``fn(*, <config>) -> nn.Module`` taking (outputs, targets).

A criterion says which targets it takes: ``register(name, targets="real")`` for real values
(outputs and targets then come as [batch, values]); class indices by default.
"""

from __future__ import annotations

from torch import nn

from toolbox.config.registry import Fraction, Registry

CRITERIA = Registry("criterion", selector="criterion")


@CRITERIA.register("cross_entropy_loss")
def cross_entropy_loss(*, label_smoothing: Fraction = 0.0) -> nn.Module:
    """Cross-entropy on logits, with optional label smoothing.

    Args:
        label_smoothing: share of each target's probability spread over all classes.
    """
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


@CRITERIA.register("mse_loss", targets="real")
def mse_loss() -> nn.Module:
    """Mean squared error between outputs and real-valued targets."""
    return nn.MSELoss()
