"""Models. ``fn(sample_shape, num_outputs, /, *, <config>) -> nn.Module``: the trainer passes the data's shape.

``num_outputs`` is the outputs per sample: the class count (logits), or the real values per target.
A model that takes samples of one rank only declares it by naming their dimensions,
``register(name, sample_dims=("channels", "height", "width"))``; without it, any shape is its to take.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from toolbox.config.registry import Component, ConfigError, Fraction, PositiveInt, Registry

MODELS = Registry("model", selector="arch")

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
Activation = Literal["relu", "gelu", "tanh", "silu"]


def sample_shape_refusal(model: Component, sample_shape: tuple[int, ...]) -> str | None:
    """Why ``model`` does not take samples of ``sample_shape`` (by the ``sample_dims`` it declares), or None."""
    dims = model.meta.get("sample_dims")
    if dims is None or len(dims) == len(sample_shape):
        return None
    return f"{model.name} takes samples of shape [{', '.join(dims)}], the data has {list(sample_shape)}"


def from_data(flag: str, given: int | None, data_says: int, what: str) -> int:
    """A size the data decides: ``given`` may repeat it, never contradict it."""
    if given is not None and given != data_says:
        raise ConfigError(f"{flag} {given} contradicts the data: {what} {data_says}")
    return data_says


@MODELS.register("FeedForwardNeuralNetwork", prefix="ff")
def feed_forward_neural_network(
    sample_shape: tuple[int, ...],
    num_outputs: int,
    /,
    *,
    input_size: PositiveInt | None = None,
    output_dim: PositiveInt | None = None,
    hidden_sizes: tuple[PositiveInt, ...] = (512, 512),
    activation: Activation = "relu",
    dropout: Fraction = 0.0,
) -> nn.Module:
    """Fully connected network: flattened input -> hidden layers (activation, dropout) -> logits.

    Args:
        input_size: input features (default: what the data's samples hold).
        output_dim: outputs (default: the data's class count or target values).
        hidden_sizes: width of each hidden layer.
        activation: after each hidden layer.
        dropout: probability of zeroing a hidden unit while training.
    """
    width = from_data("--ff-input-size", input_size, math.prod(sample_shape), f"its samples {list(sample_shape)} hold")
    output_dim = from_data("--ff-output-dim", output_dim, num_outputs, "its outputs per sample (classes or target values) are")
    layers: list[nn.Module] = [nn.Flatten()]
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(*layers)


@MODELS.register("ConvNet", prefix="cnn", sample_dims=("channels", "height", "width"))
def conv_net(
    sample_shape: tuple[int, ...],
    num_outputs: int,
    /,
    *,
    channels: tuple[PositiveInt, ...] = (16, 32),
    kernel_size: PositiveInt = 3,
    hidden_size: PositiveInt = 128,
    activation: Activation = "relu",
    dropout: Fraction = 0.25,
) -> nn.Module:
    """Convolutional network: blocks of conv, activation and 2x2 max-pool, then a hidden layer and logits.

    Args:
        channels: output channels of each conv block; each block halves height and width.
        kernel_size: odd size of every conv kernel (padded to keep the size).
        hidden_size: width of the linear layer before the logits.
        activation: after each conv and the hidden layer.
        dropout: probability of zeroing a hidden unit while training.
    """
    if kernel_size % 2 == 0:
        raise ConfigError(f"--cnn-kernel-size must be odd, got {kernel_size}")
    depth, height, width = sample_shape
    if min(height, width) < 2 ** len(channels):
        raise ConfigError(f"{len(channels)} conv blocks halve {height}x{width} samples below 1 pixel; use fewer --cnn-channels")
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(depth, out, kernel_size, padding=kernel_size // 2), ACTIVATIONS[activation](), nn.MaxPool2d(2)]
        depth, height, width = out, height // 2, width // 2
    layers += [nn.Flatten(), nn.Linear(depth * height * width, hidden_size), ACTIVATIONS[activation]()]
    if dropout:
        layers.append(Dropout(dropout))
    layers.append(nn.Linear(hidden_size, num_outputs))
    return nn.Sequential(*layers)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (keep each element with probability 1 - p, scale by 1 / (1 - p)) with a
    faster mask on CPU; on other devices, and in eval mode, it is ``nn.Dropout``.

    torch's CPU ``bernoulli_`` draws one random number per element on one thread. Here each 64-bit
    draw gives two elements 31 random bits each, compared with p without bool tensors (slow on
    CPU). Like ``nn.Dropout`` it draws from torch's generator, so seeds and saved RNG states
    replay the same masks. ``inplace`` is ignored on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * dropout_mask(x.shape, self.p, None, x.dtype)


def dropout_mask(shape: torch.Size, p: float, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """``Dropout``'s CPU mask, keep / (1 - p), drawn from ``generator`` (torch's default when None)."""
    n = math.prod(shape)
    # int64 random_() leaves only the sign bit 0, so both int32 halves carry 31 uniform bits.
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(generator=generator).view(torch.int32)[:n]
    # (bits - threshold) >> 31 is -1 below the threshold (drop) and 0 from it on (keep).
    keep = bits.bitwise_and_(0x7FFFFFFF).sub_(round(p * 2**31)).bitwise_right_shift_(31).add_(1)
    return keep.view(shape).to(dtype).div_(1 - p)  # as ATen scales its mask
