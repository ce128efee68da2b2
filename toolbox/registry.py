"""Component registries: a component is one function, and its keyword-only parameters are its config.

    @OPTIMIZERS.register("sgd")
    def sgd(params, /, *, lr: float = 0.1, momentum: float = 0.9) -> torch.optim.Optimizer: ...

Positional parameters are supplied by the trainer (the model's parameters, the optimizer) and are
not config. Each keyword-only parameter becomes a flat config key (``prefix_name``; the prefix is
given at registration), a CLI flag (``--prefix-name``), a results column and a sweep-space key.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad configuration, reported to the user as one line (exit code 2), before Ray starts."""


@dataclass(frozen=True)
class Param:
    key: str  # flat config key, e.g. "ff_hidden_sizes"
    name: str  # the function's parameter name, e.g. "hidden_sizes"
    annotation: Any
    default: Any

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

    def defaults(self) -> dict[str, Any]:
        return {p.key: p.default for p in self.params}

    def build(self, *args: Any, config: dict[str, Any]) -> Any:
        """Call the component with its own keys taken from the flat config (defaults fill gaps)."""
        kwargs = {p.name: config.get(p.key, p.default) for p in self.params}
        return self.fn(*args, **kwargs)


def nearest(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' for a near miss, else ''."""
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[match[0]]!r}?)" if match else ""


class Registry:
    """Components of one kind (models, optimizers, ...), selected in the config by ``selector``."""

    def __init__(self, kind: str, selector: str):
        self.kind = kind
        self.selector = selector  # the config key naming the chosen component, e.g. "optimizer"
        self._components: dict[str, Component] = {}

    def register(self, name: str, *, prefix: str = "", **meta: Any) -> Callable:
        def decorate(fn: Callable) -> Callable:
            if name in self._components:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            hints = typing.get_type_hints(fn)
            params = tuple(
                Param(
                    key=f"{prefix}_{p.name}" if prefix else p.name,
                    name=p.name,
                    annotation=hints.get(p.name, type(p.default)),
                    default=p.default,
                )
                for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
            )
            missing = [p.name for p in params if p.default is inspect.Parameter.empty]
            if missing:
                raise ValueError(f"{self.kind} {name!r}: config parameters need defaults: {missing}")
            self._components[name] = Component(self.kind, name, fn, params, meta)
            return fn

        return decorate

    def names(self) -> list[str]:
        return list(self._components)

    def __iter__(self):
        return iter(self._components.values())

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

    def keys(self) -> dict[str, Param]:
        """Every config key any component of this kind takes (first registration wins for help)."""
        out: dict[str, Param] = {}
        for component in self:
            for p in component.params:
                out.setdefault(p.key, p)
        return out

    def owners(self, key: str) -> list[str]:
        return [c.name for c in self if any(p.key == key for p in c.params)]
