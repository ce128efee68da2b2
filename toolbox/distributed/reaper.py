"""``python -m toolbox.distributed.reaper DRIVER_PID RAYLET_PID LOG``: ends the Ray processes a toolbox
driver started as soon as that driver is gone, even killed with SIGKILL.

Ray's own processes follow a dead driver within seconds, except its dashboard and runtime-env
agents, which wait on the dead GCS for a minute first. This process, in a session of its own so
that a terminal's hang-up does not take it along, watches the driver's process tree through
/proc and kills what is left of it once the driver has exited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0
# Reading all of /proc is the costly part, and the agents it is for start with Ray, so it is done less often.
RESCAN_EVERY = 5


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every process below ``root``: pid -> start time (a pid reused later has another start time)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))):
            children.setdefault(stat[0], []).append(int(entry))
            starts[int(entry)] = stat[1]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == start


def watch(driver: int, raylet: int, log: Path) -> None:
    """Until the driver exits (then end its tree) or its Ray does (ray.shutdown: nothing to do)."""
    driver_stat, raylet_stat = _stat(driver), _stat(raylet)
    if driver_stat is None or raylet_stat is None:
        return
    tree: dict[int, int] = {}
    polls = 0
    while alive(driver, driver_stat[1]):
        if not alive(raylet, raylet_stat[1]):
            return
        if polls % RESCAN_EVERY == 0:
            tree = {
                pid: start for pid, start in {**tree, **descendants(driver)}.items() if pid != os.getpid() and alive(pid, start)
            }
        polls += 1
        time.sleep(POLL_S)
    time.sleep(POLL_S)  # a clean exit's own shutdown goes first
    left = [pid for pid, start in tree.items() if alive(pid, start)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        with open(log, "a") as f:
            f.write(
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} driver {driver} gone; ended {len(left)} Ray processes it left: {left}\n"
            )


def start(raylet: int, log: Path) -> None:
    """Watch this process and the raylet of the Ray it started (Linux only: it reads /proc)."""
    if not Path("/proc/self/stat").exists():
        return
    subprocess.Popen(
        [sys.executable, "-m", "toolbox.distributed.reaper", str(os.getpid()), str(raylet), str(log)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
