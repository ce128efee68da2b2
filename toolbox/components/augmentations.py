"""Training-batch augmentations. ``fn(inputs, generator, /, *, <config>) -> inputs``.

``inputs`` is a normalized training batch [batch, *sample_shape] on the training device. An
augmentation draws only from ``generator`` (seeded per run and rank, checkpointed: a resumed run
draws what the uninterrupted one would) and returns a batch of the same shape. Chosen with
``--augmentations`` (a list), applied in that order; validation batches are never augmented.
A sample shape an augmentation cannot take raises ConfigError (checked before Ray starts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolbox.config.registry import ConfigError, PositiveInt, Registry, UnitInterval

AUGMENTATIONS = Registry("augmentation", selector="augmentations", many=True)


def _images(inputs: torch.Tensor, name: str) -> None:
    if inputs.dim() != 4:
        raise ConfigError(f"{name} takes image samples [channels, height, width], not samples of shape {list(inputs.shape[1:])}")


@AUGMENTATIONS.register("random_crop", prefix="crop")
def random_crop(inputs: torch.Tensor, generator: torch.Generator, /, *, padding: PositiveInt = 4) -> torch.Tensor:
    """Pad each image with zeros on every side, then crop it back to its size at a random offset per sample.

    Args:
        padding: pixels of zeros added on each side before cropping.
    """
    _images(inputs, "random_crop")
    n, _, height, width = inputs.shape
    padded = F.pad(inputs, (padding, padding, padding, padding)).permute(0, 2, 3, 1)  # [n, H, W, channels]
    offsets = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device=inputs.device)
    rows = offsets[0] + torch.arange(height, device=inputs.device)  # [n, height]
    cols = offsets[1] + torch.arange(width, device=inputs.device)
    samples = torch.arange(n, device=inputs.device)[:, None, None]
    return padded[samples, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@AUGMENTATIONS.register("horizontal_flip", prefix="flip")
def horizontal_flip(inputs: torch.Tensor, generator: torch.Generator, /, *, p: UnitInterval = 0.5) -> torch.Tensor:
    """Mirror each image left to right with probability p.

    Args:
        p: probability of flipping a sample.
    """
    _images(inputs, "horizontal_flip")
    flipped = torch.rand(len(inputs), generator=generator, device=inputs.device) < p
    return torch.where(flipped[:, None, None, None], inputs.flip(-1), inputs)
