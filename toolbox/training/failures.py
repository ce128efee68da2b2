"""Failures that a retry would repeat: raised as ``DeterministicFailure``, which Ray Train and Tune do not retry.

A bad config, a module that cannot be imported, or an error of the model's or the data's code before
the first epoch has ended (a shape or dtype mismatch at the first step) fails the same way every time.
Retries are for crashes: a worker or trial process that dies, a lost node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from toolbox.config.registry import ConfigError, one_line
from toolbox.training.session import Session

# Errors of Python code that, raised before the first epoch ends, the same config raises again.
FIRST_EPOCH_ERRORS = (
    RuntimeError,
    TypeError,
    ValueError,
    IndexError,
    KeyError,
    AttributeError,
    NotImplementedError,
    ZeroDivisionError,
    AssertionError,
)


class DeterministicFailure(Exception):
    """A run's failure that a retry would repeat; its message is one line saying why."""


@contextlib.contextmanager
def fail_once(session: Session | None = None) -> Iterator[None]:
    """Raise what a retry would repeat as ``DeterministicFailure``. With ``session``, an error of
    ``FIRST_EPOCH_ERRORS`` counts as such until the session reports its first epoch."""
    reported = False
    if session is not None:
        report = session.report

        def report_and_note(metrics: dict, checkpoint_dir: str | None) -> None:
            nonlocal reported
            reported = True
            report(metrics, checkpoint_dir)

        session.report = report_and_note
    try:
        yield
    except DeterministicFailure:
        raise
    except (ConfigError, ImportError) as exc:
        raise DeterministicFailure(one_line(exc)) from None
    except FIRST_EPOCH_ERRORS as exc:
        if session is None or reported:
            raise
        raise DeterministicFailure(f"{one_line(exc)} (before the first epoch ended)") from None


def deterministic_cause(exc: BaseException) -> DeterministicFailure | None:
    """The ``DeterministicFailure`` behind ``exc``: itself, its cause chain, a Ray task's cause or a worker group's failures."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        cause = getattr(error, "cause", None)  # a Ray task's error: the exception the task raised
        if isinstance(cause, DeterministicFailure):
            return cause
        if isinstance(error, DeterministicFailure):
            return error
        pending += [error.__cause__, error.__context__, cause]
        pending += list(getattr(error, "worker_failures", {}).values())
    return None
