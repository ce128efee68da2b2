"""The run configuration: one flat, JSON-able dict, resolved from the registries and checked as it enters.

Keys are shared by CLI flags (``--weight-decay``), sweep spaces (``"weight_decay"``), results
columns and the checkpoint. A config holds the training options below plus the keys of the
chosen model, dataset, criterion, optimizer, scheduler and metrics, with their defaults filled in.
Every value is checked against its type hint and rules (``coerce``), wherever it comes from.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from toolbox.components.augmentations import AUGMENTATIONS
from toolbox.components.datasets import DATASETS
from toolbox.components.losses import CRITERIA
from toolbox.components.metrics import METRICS
from toolbox.components.models import MODELS
from toolbox.components.optimizers import OPTIMIZERS
from toolbox.components.schedulers import SCHEDULERS
from toolbox.config import user_code
from toolbox.config.registry import ConfigError, NonNegativeInt, Param, PositiveInt, Range, Registry, nearest

# Registries whose chosen components' parameters join the config, in config order.
KINDS: tuple[Registry, ...] = (MODELS, DATASETS, CRITERIA, OPTIMIZERS, SCHEDULERS, METRICS, AUGMENTATIONS)


@dataclass(frozen=True)
class Option:
    key: str
    type: Any
    default: Any
    help: str


IMPORTS = Option(
    "imports",
    tuple[str, ...],
    (),
    "your modules or .py files to import first, in every process: their registered components join the choices",
)
TRAINING_OPTIONS = (
    IMPORTS,
    Option("arch", str, "FeedForwardNeuralNetwork", "model"),
    Option("dataset", str, "DummyDataset", "dataset"),
    Option("criterion", str, "cross_entropy_loss", "loss function"),
    Option("optimizer", str, "adamw", "optimizer"),
    Option("scheduler", str, "none", "learning-rate scheduler"),
    Option("metrics", tuple[str, ...], ("top_1_accuracy", "top_5_accuracy"), "validation metrics"),
    Option("augmentations", tuple[str, ...], (), "training-batch augmentations, applied in this order"),
    Option("epochs", PositiveInt, 10, "epochs to train (a resumed run stops at this epoch)"),
    Option("batch_size", PositiveInt, 128, "batch size per worker"),
    Option(
        "loader_workers",
        NonNegativeInt,
        0,
        "DataLoader worker processes per training process, for a dataset of map-style splits (0: read in that process)",
    ),
    Option("seed", NonNegativeInt, 0, "seed for weights, data order, dropout and sweep sampling"),
    Option(
        "precision",
        typing.Literal["32-true", "bf16-mixed"],
        "32-true",
        "bf16-mixed runs forward passes in bfloat16 (torch.autocast); weights, optimizer and checkpoints stay float32",
    ),
)
TRAINING_KEYS = {o.key for o in TRAINING_OPTIONS}
SELECTORS = {r.selector: r for r in KINDS}


# Keys whose flag is not their name spelled with dashes.
FLAGS = {"imports": "--import"}


def flag(key: str) -> str:
    return FLAGS.get(key) or "--" + key.replace("_", "-")


def all_keys() -> dict[str, Param | Option]:
    """Every key a config may hold, for validation of sweep spaces and overrides."""
    keys: dict[str, Param | Option] = {o.key: o for o in TRAINING_OPTIONS}
    for registry in KINDS:
        for key, param in registry.keys().items():
            keys.setdefault(key, param)
    return keys


def unwrap(annotation: Any) -> tuple[Any, list[Range]]:
    """The type inside ``Annotated[type, Range(...), ...]`` and its rules."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, [e for e in extras if isinstance(e, Range)]
    return annotation, []


def optional_of(annotation: Any) -> Any | None:
    """``T`` for ``T | None`` (or ``Optional[T]``), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def coerce(key: str, annotation: Any, value: Any, label: str | None = None) -> Any:
    """Check ``value`` against a type hint and its rules; return it in canonical form (tuples, ints, floats).

    Errors name ``label`` (default: the key's flag, ``--weight-decay``)."""
    label = label or flag(key)
    inner = optional_of(annotation)
    if inner is not None:
        return None if value is None else coerce(key, inner, value, label)
    bad = ConfigError(f"{label}: expected {type_name(annotation)}, got {value!r}"[:300])
    annotation, rules = unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{label}: {value!r} is not one of {', '.join(map(str, args))}{nearest(str(value), list(map(str, args)))}"
            )
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = (value,)
        value = tuple(value)
        item_types = (args[0],) * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        # An empty list of names chooses none (no augmentations); an empty list of sizes is a mistake.
        if len(item_types) != len(value) or (args[-1] is Ellipsis and not value and args[0] is not str):
            raise bad
        return tuple(coerce(key, t, v, label) for t, v in zip(item_types, value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number, got {value}")
        if annotation is int and (int(value) != value or abs(value) >= 2**63):
            raise bad
        value = annotation(value)
        for rule in rules:
            if not rule.holds(value):
                raise ConfigError(f"{label} must be {rule}, got {value:g}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def type_name(annotation: Any) -> str:
    inner = optional_of(annotation)
    if inner is not None:
        return f"{type_name(inner)} or None"
    annotation, rules = unwrap(annotation)
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return f"a list of {type_name(args[0])}" if args[-1] is Ellipsis else f"{len(args)} values"
    if typing.get_origin(annotation) is dict:
        return "a dict"
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation)
    name = name or getattr(annotation, "__name__", str(annotation))
    return " ".join([name, *map(str, rules)])


def resolve(given: dict[str, Any], base: dict[str, Any] | None = None, *, strict: bool = True) -> dict[str, Any]:
    """The full config: ``base`` (e.g. a checkpoint's config), then ``given``, then defaults.

    With ``strict``, a given key that the chosen components do not take is an error (CLI);
    without it such keys are dropped, which makes sweep spaces conditional on the component
    chosen (``momentum`` only reaches trials whose optimizer is sgd).
    """
    source = {**(base or {}), **given}
    source[IMPORTS.key] = user_code.canonical(coerce(IMPORTS.key, IMPORTS.type, source.get(IMPORTS.key, IMPORTS.default)))
    user_code.load(source[IMPORTS.key])  # their components must be registered before the config names them
    config: dict[str, Any] = {}
    for o in TRAINING_OPTIONS:
        config[o.key] = coerce(o.key, o.type, source[o.key] if o.key in source else _default(o, config))
    for registry in KINDS:
        for component in registry.chosen(config):
            for p in component.params:
                config[p.key] = coerce(p.key, p.annotation, source.get(p.key, p.default))
    for key in given:
        if key not in config and strict:
            raise ConfigError(_not_taken(key, config))
    return config


def _default(option: Option, config: dict[str, Any]) -> Any:
    """``option``'s default; a criterion's and the metrics' follow the kind of target the chosen dataset declares."""
    registry = SELECTORS.get(option.key)
    if registry is None or registry.kind not in ("criterion", "metric") or "dataset" not in config:
        return option.default
    targets = DATASETS[config["dataset"]].targets
    if all(c.targets == targets for c in registry.chosen({option.key: option.default})):
        return option.default
    taking = tuple(c.name for c in registry if c.targets == targets)
    return taking if registry.many else taking[0]


def _not_taken(key: str, config: dict) -> str:
    for registry in KINDS:
        owners = registry.owners(key)
        if owners:
            chosen = ", ".join(c.name for c in registry.chosen(config))
            return (
                f"{flag(key)} does not apply to {registry.kind} {chosen!r} "
                f"(it belongs to {', '.join(owners)}; choose one with {flag(registry.selector)})"
            )
    return f"unknown option {key!r}{nearest(key, list(all_keys()))}"


def changed_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The keys whose values differ from what the chosen components take by default, and the choices themselves."""
    config = resolve(config)  # canonical values: tuples, not the lists of a JSON round trip
    defaults = resolve({r.selector: config[r.selector] for r in KINDS})
    chosen = {o.key: o.default for o in TRAINING_OPTIONS if o.key in SELECTORS}  # a list of choices counts when not the default
    return {k: v for k, v in config.items() if v != defaults[k] or (k in SELECTORS and (not SELECTORS[k].many or v != chosen[k]))}
