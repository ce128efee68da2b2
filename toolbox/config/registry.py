"""Component registries: a component is one function, and its keyword-only parameters are its config.

    @OPTIMIZERS.register("sgd")
    def sgd(params, /, *, lr: PositiveFloat = 0.1, momentum: Fraction = 0.9) -> torch.optim.Optimizer:
        \"\"\"SGD with momentum.

        Args:
            lr: learning rate.
            momentum: momentum factor.
        \"\"\"

Positional parameters are supplied by the trainer (the model's parameters, the data's shape) and
are not config. Each keyword-only parameter becomes a flat config key (``prefix_name``; the prefix
is given at registration), a CLI flag (``--prefix-name``) whose help is its line under ``Args:``,
a results column and a sweep-space key. Its type hint, rules included (``PositiveFloat``), is
checked wherever a value enters: flags, sweep files, checkpoints.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any


class ConfigError(ValueError):
    """A bad configuration, reported to the user as one line (exit code 2), before Ray starts."""


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for an error of the user's code."""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class Range:
    """A value rule for a number, used inside ``Annotated``: ``Annotated[float, Range(gt=0)]``."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, value: float) -> bool:
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )

    def __str__(self) -> str:
        bounds = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
        return " and ".join(f"{op} {value:g}" for op, value in bounds if value is not None)


PositiveInt = Annotated[int, Range(gt=0)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]  # [0, 1): dropout, momentum, label smoothing
UnitInterval = Annotated[float, Range(ge=0, le=1)]


@dataclass(frozen=True)
class Param:
    key: str  # flat config key, e.g. "ff_hidden_sizes"
    name: str  # the function's parameter name, e.g. "hidden_sizes"
    annotation: Any
    default: Any
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    fn: Callable
    params: tuple[Param, ...]
    meta: dict = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n")[0]

    @property
    def targets(self) -> str:
        """The kind of target a dataset gives or a criterion or metric takes: "classes" (default) or "real"."""
        return self.meta.get("targets", "classes")

    def defaults(self) -> dict[str, Any]:
        return {p.key: p.default for p in self.params}

    def build(self, *args: Any, config: dict[str, Any]) -> Any:
        """Call the component with its own keys taken from the flat config (defaults fill gaps)."""
        kwargs = {p.name: config.get(p.key, p.default) for p in self.params}
        return self.fn(*args, **kwargs)


def nearest(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' for a near miss, else ''."""
    lowered = {c.lower(): c for c in choices}
    prefixed = [c for c in lowered if c.startswith(name.lower())] if name else []
    if len(prefixed) == 1:  # "grace" -> "grace_period", before any closer spelling
        return f" (did you mean {lowered[prefixed[0]]!r}?)"
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[match[0]]!r}?)" if match else ""


_SECTION = re.compile(r"^(Args|Arguments|Parameters):\s*$")
_ENTRY = re.compile(r"^(\s+)(\w+)\s*(?:\([^)]*\))?:\s*(.*)$")


def config_hints(fn: Callable, keyword_only: list[inspect.Parameter]) -> dict[str, Any]:
    """The evaluated type hints of ``fn``'s config parameters only: its positional and return
    annotations may name types that its module imports only for type checkers."""
    annotations = {p.name: fn.__annotations__[p.name] for p in keyword_only if p.name in fn.__annotations__}
    holder = types.SimpleNamespace(__annotations__=annotations)
    return typing.get_type_hints(holder, globalns=fn.__globals__, include_extras=True)


def parameter_docs(fn: Callable) -> dict[str, str]:
    """The ``name: text`` entries of a docstring's ``Args:`` section (Google style, as LightningCLI reads it)."""
    docs: dict[str, str] = {}
    inside, indent, current = False, None, None
    for line in (inspect.getdoc(fn) or "").splitlines():
        if _SECTION.match(line):
            inside, indent, current = True, None, None
            continue
        if not inside:
            continue
        if line.strip() and not line.startswith((" ", "\t")):
            inside = False  # the next section
            continue
        entry = _ENTRY.match(line)
        if entry and (indent is None or len(entry.group(1)) == indent):
            indent, current = len(entry.group(1)), entry.group(2)
            docs[current] = entry.group(3).strip()
        elif current and line.strip():
            docs[current] = f"{docs[current]} {line.strip()}".strip()
    return docs


class Registry:
    """Components of one kind (models, optimizers, ...), selected in the config by ``selector``."""

    registrations = 0  # across every registry: tells whether importing a module registered anything

    def __init__(self, kind: str, selector: str, *, many: bool = False):
        self.kind = kind
        self.selector = selector  # the config key naming the chosen component, e.g. "optimizer"
        self.many = many  # the selector holds a list of names (metrics)
        self._components: dict[str, Component] = {}

    def register(self, name: str, *, prefix: str = "", **meta: Any) -> Callable:
        def decorate(fn: Callable) -> Callable:
            if name in self._components:
                first = self._components[name].fn
                where = f"{inspect.getsourcefile(first)}:{first.__code__.co_firstlineno}" if hasattr(first, "__code__") else "?"
                raise ValueError(f"{self.kind} {name!r} is registered twice (first at {where})")
            keyword_only = [p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
            hints = config_hints(fn, keyword_only)
            docs = parameter_docs(fn)
            params = tuple(
                Param(
                    key=f"{prefix}_{p.name}" if prefix else p.name,
                    name=p.name,
                    annotation=hints.get(p.name, type(p.default)),
                    default=p.default,
                    help=docs.get(p.name, ""),
                )
                for p in keyword_only
            )
            missing = [p.name for p in params if p.default is inspect.Parameter.empty]
            if missing:
                raise ValueError(f"{self.kind} {name!r}: config parameters need defaults: {missing}")
            self._components[name] = Component(self.kind, name, fn, params, meta)
            Registry.registrations += 1
            return fn

        return decorate

    def names(self) -> list[str]:
        return list(self._components)

    def __iter__(self):
        return iter(self._components.values())

    def __len__(self) -> int:
        return len(self._components)

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def __getitem__(self, name: str) -> Component:
        try:
            return self._components[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"--{self.selector.replace('_', '-')}: unknown {self.kind} {name!r}{nearest(str(name), self.names())}; "
                f"choices: {', '.join(self.names())}"
            ) from None

    def chosen(self, config: dict[str, Any]) -> list[Component]:
        """The components a config selects (one, or every listed one for a ``many`` registry)."""
        names = config[self.selector]
        return [self[name] for name in (names if self.many else [names])]

    def keys(self) -> dict[str, Param]:
        """Every config key any component of this kind takes (first registration wins for help)."""
        out: dict[str, Param] = {}
        for component in self:
            for p in component.params:
                out.setdefault(p.key, p)
        return out

    def owners(self, key: str) -> list[str]:
        return [c.name for c in self if any(p.key == key for p in c.params)]
