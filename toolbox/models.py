"""Models. Register a model with ``@MODELS.register(name, prefix=...)``; its keyword-only parameters become flags."""

from __future__ import annotations

from typing import Literal

from torch import nn

from toolbox.registry import ConfigError, Registry

MODELS = Registry("model", selector="arch")

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@MODELS.register("FeedForwardNeuralNetwork", prefix="ff")
def feed_forward_neural_network(
    *,
    input_size: int = 784,
    output_dim: int = 10,
    hidden_sizes: tuple[int, ...] = (512, 512),
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu",
    dropout: float = 0.0,
) -> nn.Module:
    """Fully connected network: input -> hidden layers (activation, dropout) -> logits."""
    if input_size <= 0 or output_dim <= 0 or any(h <= 0 for h in hidden_sizes):
        raise ConfigError("--ff-input-size, --ff-output-dim and --ff-hidden-sizes must be positive")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--ff-dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width = input_size
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(nn.Flatten(), *layers)


def build_model(config: dict) -> nn.Module:
    return MODELS[config["arch"]].build(config=config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
