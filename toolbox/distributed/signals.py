"""SIGTERM (from Kubernetes, Slurm, ``timeout``) ends a run or a sweep the way Ctrl-C does, and is told apart from it."""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
from collections.abc import Callable

_terminated: list[int] = []  # SIGTERMs received, taken as Ctrl-C
_ended: list[str] = []  # why toolbox itself ended the command as Ctrl-C would
_last_words: list[Callable[[str], None]] = []  # how the command says its end, given how it ended
_said: list[str] = []  # the command's last line, once said


def end_on_sigterm_like_ctrl_c() -> None:
    """Take SIGTERM (from Kubernetes, Slurm, ``timeout``) the way Ctrl-C is taken, remembering it for the exit code.

    ``ray.init`` replaces the handler: Ray's driver then dies on SIGTERM with a C++ stack dump and
    exit code 134; so this is called again once Ray is up (a Python handler replaces Ray's C++ one
    for this signal only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    """The path Ctrl-C takes: Train's or Tune's own SIGINT handler, else KeyboardInterrupt (also where SIGINT is
    ignored, as in a job that a shell started in the background). Ended by toolbox itself, it is
    KeyboardInterrupt at once: Train's and Tune's handlers would wait on the Ray that was lost."""
    if _ended:
        raise KeyboardInterrupt
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


def end_like_ctrl_c(reason: str) -> None:
    """From another thread: end the command the way Ctrl-C does, for ``reason`` (a failure: exit code 1)."""
    _ended.append(reason)
    _thread.interrupt_main(signal.SIGTERM)  # as if it came: its handler is toolbox's own


def interruption() -> tuple[str, int]:
    """How an interrupted command names its end, and its exit code: 1 when toolbox ended it for a failure,
    143 after SIGTERM, 130 after Ctrl-C."""
    if _ended:
        return _ended[0], 1
    return ("terminated (SIGTERM)", 128 + signal.SIGTERM) if _terminated else ("interrupted", 128 + signal.SIGINT)


def ended_for_failure() -> bool:
    return bool(_ended)


def last_words(say: Callable[[str], None]) -> None:
    """``say(how)`` says the command's last line (through ``say_end``), for an end the command cannot reach by itself."""
    _last_words[:] = [say]


def say_last_words() -> None:
    for say in _last_words:
        say(interruption()[0])


def say_end(line: str) -> None:
    """Print the command's last line on stderr, once: an end that toolbox forces does not say it again."""
    if not _said:
        _said.append(line)
        print(line, file=sys.stderr, flush=True)
