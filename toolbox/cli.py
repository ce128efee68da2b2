"""Command-line flags generated from the registries: adding a component adds its flags and its --help."""

from __future__ import annotations

import argparse
import gc
import sys
import typing
from typing import Any, NoReturn

from toolbox.config import KINDS, TRAINING_OPTIONS, all_keys, flag
from toolbox.metrics import METRICS
from toolbox.registry import Component, nearest


class Parser(argparse.ArgumentParser):
    """argparse that fails with one line (and exit code 2) and suggests the nearest flag."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flags = [s for action in self._actions for s in action.option_strings]
            word = unknown[0].split("=")[0]
            self.error(f"unrecognized argument {word}{nearest(word, flags)}")
        return parsed


def _argument(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a type hint."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin is tuple:
        variadic = args[-1] is Ellipsis
        return {"nargs": "+" if variadic else len(args), "type": args[0], "metavar": "N" if args[0] is int else "X"}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


def _describe(component: Component) -> str:
    params = ", ".join(f"{p.flag} {_show(p.default)}" for p in component.params)
    interval = component.meta.get("interval")
    stepping = f" Steps once per {'optimizer step' if interval == 'step' else 'epoch'}." if interval else ""
    return f"{component.name}: {component.summary}{stepping}" + (f" [{params}]" if params else "")


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Flags for every config key but ``exclude``; each defaults to "not given", so defaults come from resolve()."""
    training = parser.add_argument_group("training")
    for option in TRAINING_OPTIONS:
        if option.key in exclude:
            continue
        if option.key == METRICS.selector:
            kwargs = {"nargs": "+", "metavar": "METRIC"}
            names = "; ".join(_describe(m) for m in METRICS)
            help_text = f"{option.help} (default: {_show(option.default)}). Choices: {names}"
            training.add_argument(
                flag(option.key), "--active-metrics", dest=option.key, default=argparse.SUPPRESS, help=help_text, **kwargs
            )
            continue
        help_text = f"{option.help} (default: {_show(option.default)})"
        training.add_argument(
            flag(option.key), dest=option.key, default=argparse.SUPPRESS, help=help_text, **_argument(option.type)
        )
    for registry in KINDS:
        default = next(o.default for o in TRAINING_OPTIONS if o.key == registry.selector)
        description = f"choose with {flag(registry.selector)} (default {default}):\n  " + "\n  ".join(map(_describe, registry))
        group = parser.add_argument_group(f"{registry.kind}s", description)
        for key, param in registry.keys().items():
            users = [f"{c.name}={_show(p.default)}" for c in registry for p in c.params if p.key == key]
            group.add_argument(
                param.flag,
                dest=key,
                default=argparse.SUPPRESS,
                help=f"default: {', '.join(users)}",
                **_argument(param.annotation),
            )


def given_config(namespace: argparse.Namespace) -> dict[str, Any]:
    """The config keys the user actually passed."""
    keys = all_keys()
    return {k: v for k, v in vars(namespace).items() if k in keys}


def exit_with(code: int) -> NoReturn:
    """``sys.exit(code)`` without the interpreter's last full garbage collection: over the objects
    that torch, Ray and Tune leave behind it took about 1 s after a sweep had printed its results.
    The process is ending; the OS frees its memory."""
    gc.freeze()
    sys.exit(code)
