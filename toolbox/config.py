"""The run configuration: one flat, JSON-able dict, resolved from the registries and checked before Ray starts.

Keys are shared by CLI flags (``--weight-decay``), sweep spaces (``"weight_decay"``), results
columns and the checkpoint. A config holds the general training keys below plus the keys of the
chosen model, dataset, criterion, optimizer and scheduler, with their defaults filled in.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import torch

from toolbox.data import DATASETS, TensorData
from toolbox.losses import CRITERIA
from toolbox.metrics import METRICS
from toolbox.models import MODELS
from toolbox.optim import OPTIMIZERS, SCHEDULERS
from toolbox.registry import ConfigError, Param, Registry, nearest

# Registries whose chosen component's parameters join the config, in config order.
KINDS: tuple[Registry, ...] = (MODELS, DATASETS, CRITERIA, OPTIMIZERS, SCHEDULERS)


@dataclass(frozen=True)
class Option:
    key: str
    type: Any
    default: Any
    help: str


TRAINING_OPTIONS = (
    Option("arch", str, "FeedForwardNeuralNetwork", "model"),
    Option("dataset", str, "DummyDataset", "dataset"),
    Option("criterion", str, "cross_entropy_loss", "loss function"),
    Option("optimizer", str, "adamw", "optimizer"),
    Option("scheduler", str, "none", "learning-rate scheduler"),
    Option("metrics", tuple[str, ...], ("top_1_accuracy", "top_5_accuracy"), "validation metrics"),
    Option("epochs", int, 10, "epochs to train (a resumed run stops at this epoch)"),
    Option("batch_size", int, 128, "batch size per worker"),
    Option("seed", int, 0, "seed for weights, data order, dropout and sweep sampling"),
    Option(
        "precision",
        typing.Literal["32-true", "bf16-mixed"],
        "32-true",
        "bf16-mixed runs forward passes in bfloat16 (torch.autocast); weights, optimizer and checkpoints stay float32",
    ),
)
TRAINING_KEYS = {o.key for o in TRAINING_OPTIONS}
SELECTORS = {r.selector: r for r in KINDS} | {METRICS.selector: METRICS}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def all_keys() -> dict[str, Param | Option]:
    """Every key a config may hold, for validation of sweep spaces and overrides."""
    keys: dict[str, Param | Option] = {o.key: o for o in TRAINING_OPTIONS}
    for registry in KINDS:
        for key, param in registry.keys().items():
            keys.setdefault(key, param)
    return keys


def coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a type hint; return it in canonical form (tuples, ints, floats)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    bad = ConfigError(f"{flag(key)}: expected {_type_name(annotation)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{flag(key)}: {value!r} is not one of {', '.join(map(str, args))}{nearest(str(value), list(map(str, args)))}"
            )
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = (value,)
        value = tuple(value)
        item_types = (args[0],) * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(item_types) != len(value):
            raise bad
        return tuple(coerce(key, t, v) for t, v in zip(item_types, value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return f"a list of {_type_name(args[0])}" if args[-1] is Ellipsis else f"{len(args)} values"
    return getattr(annotation, "__name__", str(annotation))


def resolve(given: dict[str, Any], base: dict[str, Any] | None = None, *, strict: bool = True) -> dict[str, Any]:
    """The full config: ``base`` (e.g. a checkpoint's config), then ``given``, then defaults.

    With ``strict``, a given key that the chosen components do not take is an error (CLI);
    without it such keys are dropped, which makes sweep spaces conditional on the component
    chosen (``momentum`` only reaches trials whose optimizer is sgd).
    """
    source = {**(base or {}), **given}
    config: dict[str, Any] = {o.key: coerce(o.key, o.type, source.get(o.key, o.default)) for o in TRAINING_OPTIONS}
    for name in config["metrics"]:
        METRICS[name]  # noqa: B018 - raises a ConfigError naming the choices
    for registry in KINDS:
        component = registry[config[registry.selector]]
        for p in component.params:
            config[p.key] = coerce(p.key, p.annotation, source.get(p.key, p.default))
    for key in given:
        if key not in config and strict:
            raise ConfigError(_not_taken(key, config))
    for key in ("epochs", "batch_size"):
        if config[key] <= 0:
            raise ConfigError(f"{flag(key)} must be > 0, got {config[key]}")
    return config


def _not_taken(key: str, config: dict) -> str:
    for registry in KINDS:
        owners = registry.owners(key)
        if owners:
            return (
                f"{flag(key)} does not apply to {registry.kind} {config[registry.selector]!r} "
                f"(it belongs to {', '.join(owners)}; choose one with {flag(registry.selector)})"
            )
    return f"unknown option {key!r}{nearest(key, list(all_keys()))}"


def check_components(config: dict, built: dict | None = None) -> torch.nn.Module:
    """Build every component once on the CPU, so value errors surface before Ray starts.

    ``built``, shared across calls (a sweep's candidate configs), skips a component already built
    with the same values: a space of hundreds of candidates builds its one model once.
    """
    built = {} if built is None else built

    def build(registry, *args):
        component = registry[config[registry.selector]]
        key = (registry.kind, component.name, args[1:], tuple(repr(config.get(p.key, p.default)) for p in component.params))
        if key not in built:
            built[key] = component.build(*args, config=config)
        return built[key]

    try:
        model = build(MODELS)
        build(CRITERIA)
        optimizer = build(OPTIMIZERS, list(model.parameters()))
        build(SCHEDULERS, optimizer, 10, config["epochs"])  # any optimizer will do to check a schedule's values
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError) as exc:  # torch's own checks of the values
        chosen = ", ".join(f"{r.selector}={config[r.selector]}" for r in KINDS)
        raise ConfigError(f"{chosen}: {type(exc).__name__}: {exc}") from None
    return model


def check_against_data(config: dict, model: torch.nn.Module, data: TensorData) -> None:
    """The model must take the dataset's samples and output at least what the metrics need."""
    try:
        with torch.no_grad():
            logits = model.eval()(data.normalize(data.train_x[:2]))
    except RuntimeError as exc:
        raise ConfigError(
            f"model {config['arch']!r} does not accept {config['dataset']} samples of shape "
            f"{data.sample_shape} (check its input size flag): {str(exc).splitlines()[0]}"
        ) from None
    outputs = logits.shape[-1]
    if outputs < data.num_classes:
        raise ConfigError(f"model {config['arch']!r} outputs {outputs} classes, but {config['dataset']} has {data.num_classes}")
    for name in config["metrics"]:
        needed = METRICS[name].meta.get("min_classes", 1)
        if outputs < needed:
            raise ConfigError(f"metric {name} needs at least {needed} classes; the model outputs {outputs}")
