"""Components built from a config, and the checks that build each once before Ray starts."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from toolbox.components.augmentations import AUGMENTATIONS
from toolbox.components.datasets import DATASETS
from toolbox.components.losses import CRITERIA
from toolbox.components.metrics import METRICS
from toolbox.components.models import MODELS, sample_shape_refusal
from toolbox.components.optimizers import OPTIMIZERS
from toolbox.components.schedulers import SCHEDULERS
from toolbox.config.registry import Component, ConfigError
from toolbox.config.resolve import KINDS, flag
from toolbox.data.splits import BUILD_IN_EACH_PROCESS, DatasetSplits
from toolbox.data.tensors import DataSpec, Target, TensorData

if TYPE_CHECKING:
    import torchmetrics

TARGET_WORDS = {"classes": "class labels", "real": "real-valued targets"}


def build_dataset(config: dict) -> TensorData | DatasetSplits:
    """The config's dataset; torch's and numpy's refusals of its values become one ConfigError."""
    try:
        data = DATASETS[config["dataset"]].build(config["seed"], config=config)
        return dataclasses.replace(data, loader_workers=config["loader_workers"]) if isinstance(data, DatasetSplits) else data
    except (ValueError, TypeError, ArithmeticError, RuntimeError, MemoryError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"dataset {config['dataset']}: {type(exc).__name__}: {_first_line(exc)}") from None


def shared_data(shared: dict, config: dict) -> TensorData | DatasetSplits:
    """The data a training process trains on: the object store's tensors, or a map-style dataset it builds itself."""
    return build_dataset(config) if shared == BUILD_IN_EACH_PROCESS else TensorData.from_shared(shared)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def build_model(config: dict, spec: DataSpec) -> nn.Module:
    return _model_taking(config, spec).build(spec.sample_shape, spec.num_outputs, config=config)


def _model_taking(config: dict, spec: DataSpec) -> Component:
    """The config's model, refused where it declares that it does not take the data's sample shape."""
    model = MODELS[config["arch"]]
    refusal = sample_shape_refusal(model, spec.sample_shape)
    if refusal:
        raise ConfigError(refusal)
    return model


def build_criterion(config: dict) -> nn.Module:
    return CRITERIA[config["criterion"]].build(config=config)


def build_optimizer(config: dict, params) -> torch.optim.Optimizer:
    return OPTIMIZERS[config["optimizer"]].build(list(params), config=config)


def build_scheduler(config: dict, optimizer, steps_per_epoch: int) -> tuple[LRScheduler, str]:
    """The scheduler and its interval ("step" or "epoch")."""
    component = SCHEDULERS[config["scheduler"]]
    return component.build(optimizer, steps_per_epoch, config["epochs"], config=config), component.meta["interval"]


def build_metrics(config: dict, num_outputs: int) -> dict[str, torchmetrics.Metric]:
    """The config's metrics, by reported name (``val_<metric>``), for a model of ``num_outputs`` outputs per sample."""
    return {f"val_{c.name}": c.build(num_outputs, config=config) for c in METRICS.chosen(config)}


def build_augmentations(config: dict) -> list[Callable[[torch.Tensor, torch.Generator], torch.Tensor]]:
    """The config's augmentations in order, each ``(inputs, generator) -> inputs`` with its config values bound."""
    return [
        functools.partial(c.fn, **{p.name: config.get(p.key, p.default) for p in c.params}) for c in AUGMENTATIONS.chosen(config)
    ]


def check_targets(config: dict, target: Target) -> None:
    """The chosen criterion and metrics take the data's kind of target (their registration's ``targets``)."""
    for registry in (CRITERIA, METRICS):
        for component in registry.chosen(config):
            if component.targets != target.kind:
                raise ConfigError(
                    f"{flag(registry.selector)} {component.name} takes {TARGET_WORDS[component.targets]}, "
                    f"but dataset {config['dataset']} has {target}"
                )


def fast_forward(scheduler: LRScheduler, steps: int) -> None:
    """Step a fresh scheduler to where a run already is (no optimizer steps are taken)."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def lr_schedule(config: dict, steps_per_epoch: int) -> list[float]:
    """The lr at every optimizer step of a run with this config (for plots), without training."""
    optimizer = build_optimizer(config, [torch.nn.Parameter(torch.zeros(1))])
    scheduler, interval = build_scheduler(config, optimizer, steps_per_epoch)
    lrs = []
    for step in range(steps_per_epoch * config["epochs"]):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if interval == "step" or (step + 1) % steps_per_epoch == 0:
            scheduler.step()
    return lrs


def check_components(config: dict, spec: DataSpec, built: dict | None = None) -> nn.Module:
    """Build every component once on the CPU, so value errors surface before Ray starts.

    ``built``, shared across calls (a sweep's candidate configs), skips a component already built
    with the same values: a space of hundreds of candidates builds its one model once.
    """
    built = {} if built is None else built

    def build(component, *args):
        key = (component.kind, component.name, args[1:], tuple(repr(config.get(p.key, p.default)) for p in component.params))
        if key not in built:
            built[key] = component.build(*args, config=config)
        return built[key]

    check_targets(config, spec.targets)
    check_augmentations(config, spec.sample_shape)
    try:
        model = build(_model_taking(config, spec), spec.sample_shape, spec.num_outputs)
        build(CRITERIA[config["criterion"]])
        optimizer = build(OPTIMIZERS[config["optimizer"]], list(model.parameters()))
        build(SCHEDULERS[config["scheduler"]], optimizer, 10, config["epochs"])  # any optimizer will do to check a schedule
        for metric in METRICS.chosen(config):
            build(metric, spec.num_outputs)
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError, RuntimeError, MemoryError) as exc:  # torch's own checks of the values
        chosen = ", ".join(f"{r.selector}={config[r.selector]}" for r in KINDS)
        raise ConfigError(f"{chosen}: {type(exc).__name__}: {_first_line(exc)}") from None
    return model


def check_augmentations(config: dict, sample_shape: tuple[int, ...]) -> None:
    """Each chosen augmentation takes a batch of the data's samples and keeps its shape."""
    inputs = torch.zeros(2, *sample_shape)
    for name, augment in zip(config["augmentations"], build_augmentations(config)):
        try:
            shape = augment(inputs, torch.Generator().manual_seed(0)).shape
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ConfigError(f"--augmentations {name} does not take {config['dataset']} samples: {_first_line(exc)}") from None
        if shape != inputs.shape:
            raise ConfigError(
                f"--augmentations {name} turns {config['dataset']} samples of shape {list(sample_shape)} into {list(shape[1:])}"
            )


def check_shards(data: TensorData | DatasetSplits, workers: int, flag: str) -> None:
    """Every worker needs a training sample at least: the loop gives each an equal shard."""
    if data.size("train") < workers:
        raise ConfigError(f"{flag} {workers}: the training set has {data.size('train')} samples, fewer than one per worker")


def check_against_data(config: dict, model: nn.Module, data: TensorData | DatasetSplits) -> None:
    """The model must take the dataset's samples and give one output per class or real target value."""
    inputs = data.first_inputs(min(2, data.size("train")))
    try:
        with torch.no_grad():
            logits = model.eval()(inputs)
    except RuntimeError as exc:
        raise ConfigError(
            f"model {config['arch']!r} does not accept {config['dataset']} samples of shape "
            f"{list(data.sample_shape)}: {str(exc).splitlines()[0]}"
        ) from None
    if tuple(logits.shape) != (len(inputs), data.target.num_outputs):
        raise ConfigError(
            f"model {config['arch']!r} gives outputs of shape {list(logits.shape[1:])} per sample; "
            f"{config['dataset']} has {data.target}, which take {data.target.num_outputs}"
        )
