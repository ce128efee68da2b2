"""SIGTERM (from Kubernetes, Slurm, ``timeout``) ends a run or a sweep the way Ctrl-C does, and is told apart from it."""

from __future__ import annotations

import contextlib
import signal
import threading

_terminated: list[int] = []  # SIGTERMs received, taken as Ctrl-C


def end_on_sigterm_like_ctrl_c() -> None:
    """Take SIGTERM (from Kubernetes, Slurm, ``timeout``) the way Ctrl-C is taken, remembering it for the exit code.

    ``ray.init`` replaces the handler: Ray's driver then dies on SIGTERM with a C++ stack dump and
    exit code 134; so this is called again once Ray is up (a Python handler replaces Ray's C++ one
    for this signal only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    """The path Ctrl-C takes: Train's or Tune's own SIGINT handler, else KeyboardInterrupt (also where SIGINT is
    ignored, as in a job that a shell started in the background)."""
    _terminated.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


@contextlib.contextmanager
def taking_sigterm_in_ray_init():
    """While ``ray.init`` runs, SIGTERM meets Ray's own handler, ``sys.exit(15)``: end as Ctrl-C would instead."""
    try:
        yield
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        _terminated.append(signal.SIGTERM)
        raise KeyboardInterrupt from None
    finally:
        end_on_sigterm_like_ctrl_c()


def interruption() -> tuple[str, int]:
    """How an interrupted command names its end, and its exit code: 143 after SIGTERM, 130 after Ctrl-C."""
    return ("terminated (SIGTERM)", 128 + signal.SIGTERM) if _terminated else ("interrupted", 128 + signal.SIGINT)
