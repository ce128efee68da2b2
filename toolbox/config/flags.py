"""Command-line flags generated from the registries: adding a component adds its flags and its --help."""

from __future__ import annotations

import argparse
import errno
import gc
import sys
import typing
from typing import Any, NoReturn

from toolbox.config.registry import Component, Param, nearest
from toolbox.config.resolve import KINDS, SELECTORS, TRAINING_OPTIONS, all_keys, flag, optional_of, type_name, unwrap


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


def _parse_none(inner: Any):
    def parse(text: str):
        return None if text.lower() == "none" else inner(text)

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def _argument(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a type hint (values are checked by the config's rules afterwards)."""
    inner = optional_of(annotation)
    if inner is not None:
        kwargs = _argument(inner)
        kwargs["type"] = _parse_none(kwargs["type"])
        kwargs.pop("choices", None)
        return kwargs
    annotation, _ = unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin is tuple:
        item, _ = unwrap(args[0])
        return {"nargs": "+" if args[-1] is Ellipsis else len(args), "type": item, "metavar": "N" if item is int else "X"}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


def _describe(component: Component) -> str:
    params = ", ".join(f"{p.flag} {_show(p.default)}" for p in component.params)
    interval = component.meta.get("interval")
    stepping = f" Steps once per {'optimizer step' if interval == 'step' else 'epoch'}." if interval else ""
    return f"{component.name}: {component.summary}{stepping}" + (f" [{params}]" if params else "")


def _show(value: Any) -> str:
    if value == ():
        return "none"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Flags for every config key but ``exclude``; each defaults to "not given", so defaults come from resolve()."""
    training = parser.add_argument_group("training")
    for option in TRAINING_OPTIONS:
        if option.key in exclude:
            continue
        help_text = f"{option.help} (default: {_show(option.default)})"
        names = [flag(option.key)]
        kwargs = _argument(option.type)
        if option.key in SELECTORS and SELECTORS[option.key].many:
            kwargs = {"nargs": "+", "metavar": SELECTORS[option.key].kind.upper()}
        if option.key == "metrics":
            names.append("--active-metrics")  # the original toolbox's name
        if option.key == "imports":
            kwargs = {"nargs": "+", "action": "extend", "metavar": "MODULE_OR_FILE"}
        training.add_argument(*names, dest=option.key, default=argparse.SUPPRESS, help=help_text, **kwargs)
    for registry in KINDS:
        default = next(o.default for o in TRAINING_OPTIONS if o.key == registry.selector)
        description = f"choose with {flag(registry.selector)} (default {_show(default)}):\n  " + "\n  ".join(
            map(_describe, registry)
        )
        group = parser.add_argument_group(f"{registry.kind}s", description)
        for key, param in registry.keys().items():
            takers = [(c.name, p) for c in registry for p in c.params if p.key == key]
            defaults = ", ".join(f"{name}={_show(p.default)}" for name, p in takers)
            help_text = f"{_shared_help(takers)} ({type_name(param.annotation)}; default: {defaults})"
            group.add_argument(
                param.flag, dest=key, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"), **_argument(param.annotation)
            )


def _shared_help(takers: list[tuple[str, Param]]) -> str:
    """One key's docstring lines; where components describe it differently, each says its own."""
    by_text: dict[str, list[str]] = {}
    for name, param in takers:
        by_text.setdefault(param.help, []).append(name)
    if len(by_text) == 1:
        return next(iter(by_text))
    return "; ".join(f"{', '.join(names)}: {text.rstrip('.')}" for text, names in by_text.items())


class _PreParseError(Exception):
    pass


def parse_before_imports(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | None:
    """What ``parser`` (built without ``-h``) reads of ``argv`` before the user's code is imported: the
    ``--import``s and the sweep file, whose components' flags it cannot know yet. None where it cannot
    tell; the full parse after the imports then says what is wrong."""

    def error(message: str) -> NoReturn:
        raise _PreParseError(message)

    parser.error = error
    try:
        return parser.parse_known_args(argv)[0]
    except _PreParseError:
        return None


def given_config(namespace: argparse.Namespace) -> dict[str, Any]:
    """The config keys the user actually passed."""
    keys = all_keys()
    return {k: v for k, v in vars(namespace).items() if k in keys}


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an error behind it (also one raised in a Ray task, said in its text), is a full disk."""
    chain = _chain(exc)
    text = "\n".join(f"{type(e).__name__}: {e}" for e in chain)
    return any(getattr(e, "errno", None) == errno.ENOSPC for e in chain) or "No space left on device" in text


def describe_failure(exc: BaseException) -> str:
    """One line for an error from Ray or a worker: a full disk said plainly, else the innermost message."""
    if is_disk_full(exc):
        return "the disk is full (No space left on device): free space, then re-run the same command"
    last = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {last[-1] if last else ''} (re-run with --verbose for Ray's logs)"


def exit_with(code: int) -> NoReturn:
    """``sys.exit(code)`` without the interpreter's last full garbage collection over what torch, Ray
    and Tune leave behind: the process is ending, and the OS frees its memory."""
    gc.freeze()
    sys.exit(code)
