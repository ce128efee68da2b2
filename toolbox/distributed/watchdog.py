"""The private local Ray, watched from its driver: when its raylet or GCS ends, the command ends
within seconds the way Ctrl-C ends it (Ray's driver would otherwise wait a minute for the GCS, or
print the raylet's log twice), and Ray's own messages go to a log file, not the console."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from toolbox.distributed import signals

POLL_S = 0.5
GRACE_S = 15.0  # for the command to end by itself: a call into a lost GCS waits a minute, deaf to signals
_stop = threading.Event()


def watch(node, messages: Path | None) -> None:
    """Poll the raylet and GCS of ``node`` (a ``ray._private.node.Node`` this process started: they are its
    children, so their exit status is its to read) until ``stop()``; ``messages``: where Ray's messages go,
    if not to the console."""
    from ray._private.ray_constants import PROCESS_TYPE_GCS_SERVER, PROCESS_TYPE_RAYLET

    core = {name: node.all_processes[name][0].process for name in (PROCESS_TYPE_RAYLET, PROCESS_TYPE_GCS_SERVER)}
    _stop.clear()
    threading.Thread(target=_poll, args=(node, core, messages), name="toolbox-ray-watchdog", daemon=True).start()


def _poll(node, core: dict[str, subprocess.Popen], messages: Path | None) -> None:
    import ray

    while not _stop.wait(POLL_S):
        lost = next(((name, code) for name, process in core.items() if (code := process.poll()) is not None), None)
        if lost is not None:
            break
    else:
        return
    if _stop.is_set() or not ray.is_initialized():  # ray.shutdown() disconnects before it ends Ray's processes
        return
    name, code = lost
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    where = f"; Ray's messages are in {messages}" if messages else ""
    signals.end_like_ctrl_c(f"the local Ray was lost (its {name} {how}{where})")
    time.sleep(GRACE_S)  # the command ends by itself meanwhile, unless a call into the lost Ray holds it
    signals.say_last_words()
    with contextlib.suppress(Exception):
        node.kill_all_processes(check_alive=False)
    os._exit(1)


def stop() -> None:
    """Before Ray is shut down by toolbox (a loss seen before still ends the command)."""
    _stop.set()


def messages_to_log(path: Path) -> None:
    """Ray's messages to this driver (a dead worker, a dead raylet) and what Ray's C++ core writes on
    stderr go to ``path``; ``sys.stderr``, where toolbox says what happened, stays on the console."""
    import ray._private.worker

    log = open(path, "a", buffering=1)  # noqa: SIM115 - open as long as the process is
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    os.dup2(log.fileno(), 2)

    def print_to_log(data: dict, ignore_prefix: bool) -> None:
        ray._private.worker.print_worker_logs(data, log, ignore_prefix)

    ray._private.worker.print_to_stdstream = print_to_log
