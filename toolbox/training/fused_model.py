"""K same-shaped ``nn.Sequential`` models as one stacked model: every activation is ``[K, B, ...]``.

A Linear layer runs as one ``baddbmm`` over weights stored ``[K, in, out]``; a Conv2d as one grouped
convolution with the members' channels side by side (``groups=K``), its output viewed back as
``[K, B, ...]`` without a copy, so a following pool or activation works on that memory as it lies.
Batched matmuls are used rather than ``vmap(functional_call)``: on CPU they are faster for these
layers, and each member's dropout can draw from its own generator, which vmap's randomness cannot.
"""

from __future__ import annotations

import torch
from torch import nn

from toolbox.components.models import ACTIVATIONS, Dropout, dropout_mask

ELEMENTWISE = (*ACTIVATIONS.values(), nn.Identity)  # parameter-free layers that apply to any shape


class StackedLinear(nn.Module):
    """K ``nn.Linear`` layers: ``[K, B, in]`` -> ``[K, B, out]``."""

    transposed = ("weight",)  # a member's [out, in] weight is stored [in, out]: the faster bmm operand

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """``[K, B, C, H, W]`` -> ``[B, K*C, H, W]``; a view when the memory already lies that way."""
    k, b, c, h, w = x.shape
    return x.transpose(0, 1).reshape(b, k * c, h, w)


def from_channels(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, K*C, H, W]`` -> ``[K, B, C, H, W]``, always a view."""
    b, kc, h, w = x.shape
    return x.view(b, k, kc // k, h, w).transpose(0, 1)


class StackedConv2d(nn.Module):
    """K ``nn.Conv2d`` layers (groups=1) as one convolution with groups=K."""

    transposed = ()

    def __init__(self, like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.options = {"stride": like.stride, "padding": like.padding, "dilation": like.dilation}
        self.weight = nn.Parameter(weight)  # [K, out, in, kh, kw]
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        weight = self.weight.flatten(0, 1)
        bias = None if self.bias is None else self.bias.flatten()
        return from_channels(nn.functional.conv2d(to_channels(x), weight, bias, groups=k, **self.options), k)


class PerChannel(nn.Module):
    """A layer that works on each channel alone (a 2-D pool), run once on the members' channels side by side."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return from_channels(self.layer(to_channels(x)), x.shape[0])


class StackedFlatten(nn.Module):
    """``nn.Flatten()`` of each member: every dimension after the batch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)


class StackedDropout(nn.Module):
    """Each member's dropout, with its own probability, drawn from its own generator.

    On CPU the masks are bit for bit those toolbox's ``Dropout`` draws from a generator in the
    same state; elsewhere each member draws ``bernoulli_`` masks from its device generator."""

    def __init__(self, probabilities: list[float], generators: list[torch.Generator]):
        super().__init__()
        self.probabilities, self.generators = probabilities, generators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        masks = [self._scale(x[0].shape, p, g, x) for p, g in zip(self.probabilities, self.generators)]
        return x * torch.stack(masks)

    @staticmethod
    def _scale(shape: torch.Size, p: float, generator: torch.Generator, x: torch.Tensor) -> torch.Tensor:
        if p == 0:
            return torch.ones(shape, dtype=x.dtype, device=x.device)
        if x.device.type == "cpu":
            return dropout_mask(shape, p, generator, x.dtype)
        return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=generator).div_(1 - p)


def no_stacked_form(layer: nn.Module) -> str | None:
    """Why ``layer`` has no stacked form here, or None."""
    if isinstance(layer, nn.Linear | Dropout):
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            return f"a Conv2d with groups={layer.groups}, padding_mode={layer.padding_mode!r} (only groups=1, 'zeros' stack)"
        return None
    if isinstance(layer, nn.Flatten):
        return None if (layer.start_dim, layer.end_dim) == (1, -1) else "an nn.Flatten other than Flatten(1, -1)"
    if isinstance(layer, (nn.MaxPool2d, *ELEMENTWISE)) and not list(layer.parameters()) and not list(layer.buffers()):
        return None
    return f"a layer with no stacked form: {type(layer).__module__}.{type(layer).__qualname__}"


def layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Layer types and parameter shapes: what must be equal for models to stack."""
    return [(type(m).__name__, *(tuple(p.shape) for p in m.parameters(recurse=False))) for m in model.modules()]


def _stacked(weights: list[dict[str, torch.Tensor]], key: str, transposed: bool = False) -> torch.Tensor | None:
    if weights[0].get(key) is None:  # a layer without bias
        return None
    return torch.stack([w[key].mT if transposed else w[key] for w in weights]).contiguous()


def _stack_layer(i: int, layers: list[nn.Module], weights: list[dict], generators: list[torch.Generator]) -> nn.Module:
    """The stacked form of layer ``i`` of every member (``layers``), holding the members' ``weights``."""
    first = layers[0]
    if isinstance(first, nn.Linear):
        return StackedLinear(_stacked(weights, f"{i}.weight", transposed=True), _stacked(weights, f"{i}.bias"))
    if isinstance(first, nn.Conv2d):
        return StackedConv2d(first, _stacked(weights, f"{i}.weight"), _stacked(weights, f"{i}.bias"))
    if isinstance(first, nn.MaxPool2d):
        return PerChannel(first)
    if isinstance(first, nn.Flatten):
        return StackedFlatten()
    if isinstance(first, Dropout):
        return StackedDropout([layer.p for layer in layers], generators)
    return first  # elementwise


class StackedModel(nn.Sequential):
    """The members' models stacked; its ``named_parameters`` keys are those of each member's model.

    ``weights[k]`` is member k's ``{key: tensor}`` (its model's state dict or a slice of an earlier
    stack); ``generators[k]`` is the generator member k's dropout draws from."""

    def __init__(self, models: list[nn.Sequential], weights: list[dict[str, torch.Tensor]], generators: list[torch.Generator]):
        super().__init__(*(_stack_layer(i, [m[i] for m in models], weights, generators) for i in range(len(models[0]))))
        self.transposed = {f"{i}.{n}" for i, m in enumerate(self) for n in getattr(m, "transposed", ())}

    def member_tensor(self, key: str, stacked: torch.Tensor, k: int) -> torch.Tensor:
        """Member k's slice of ``stacked`` (a parameter at ``key`` or a tensor shaped like it), in its model's layout."""
        return stacked[k].mT if key in self.transposed else stacked[k]

    def stack_tensors(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The members' tensors for the parameter at ``key`` (model layout) stacked as that parameter is."""
        return torch.stack([t.mT if key in self.transposed else t for t in tensors]).contiguous()

    def member_weights(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's parameters, views into the stack, keyed as in its own model."""
        return {key: self.member_tensor(key, p.detach(), k) for key, p in self.named_parameters()}
