"""Components built from a config, and the checks that build each once before Ray starts."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from toolbox.components.datasets import DATASETS
from toolbox.components.losses import CRITERIA
from toolbox.components.metrics import METRICS
from toolbox.components.models import MODELS, sample_shape_refusal
from toolbox.components.optimizers import OPTIMIZERS
from toolbox.components.schedulers import SCHEDULERS
from toolbox.config.registry import Component, ConfigError
from toolbox.config.resolve import KINDS
from toolbox.data.tensors import DataSpec, TensorData

if TYPE_CHECKING:
    import torchmetrics


def build_dataset(config: dict) -> TensorData:
    """The config's dataset; torch's and numpy's refusals of its values become one ConfigError."""
    try:
        return DATASETS[config["dataset"]].build(config["seed"], config=config)
    except (ValueError, TypeError, ArithmeticError, RuntimeError, MemoryError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"dataset {config['dataset']}: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def build_model(config: dict, spec: DataSpec) -> nn.Module:
    return _model_taking(config, spec).build(*spec, config=config)


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


def build_metrics(config: dict, num_classes: int) -> dict[str, torchmetrics.Metric]:
    """The config's metrics, by reported name (``val_<metric>``)."""
    return {f"val_{c.name}": c.build(num_classes, config=config) for c in METRICS.chosen(config)}


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

    try:
        model = build(_model_taking(config, spec), *spec)
        build(CRITERIA[config["criterion"]])
        optimizer = build(OPTIMIZERS[config["optimizer"]], list(model.parameters()))
        build(SCHEDULERS[config["scheduler"]], optimizer, 10, config["epochs"])  # any optimizer will do to check a schedule
        for metric in METRICS.chosen(config):
            build(metric, spec.num_classes)
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError, RuntimeError, MemoryError) as exc:  # torch's own checks of the values
        chosen = ", ".join(f"{r.selector}={config[r.selector]}" for r in KINDS)
        raise ConfigError(f"{chosen}: {type(exc).__name__}: {_first_line(exc)}") from None
    return model


def check_shards(data: TensorData, workers: int, flag: str) -> None:
    """Every worker needs a training sample at least: the loop gives each an equal shard."""
    if len(data.train_y) < workers:
        raise ConfigError(f"{flag} {workers}: the training set has {len(data.train_y)} samples, fewer than one per worker")


def check_against_data(config: dict, model: nn.Module, data: TensorData) -> None:
    """The model must take the dataset's samples and give one logit per class."""
    try:
        with torch.no_grad():
            logits = model.eval()(data.normalize(data.train_x[:2]))
    except RuntimeError as exc:
        raise ConfigError(
            f"model {config['arch']!r} does not accept {config['dataset']} samples of shape "
            f"{list(data.sample_shape)}: {str(exc).splitlines()[0]}"
        ) from None
    if tuple(logits.shape) != (len(data.train_x[:2]), data.num_classes):
        raise ConfigError(
            f"model {config['arch']!r} gives logits of shape {list(logits.shape[1:])} per sample; "
            f"{config['dataset']} has {data.num_classes} classes"
        )
