"""Fused trials in a sweep (``fuse = K``): a training actor per device, and Tune trials that attach to it.

Each ``FusedWorker`` holds one device and trains the trials attached to it as stacked groups
(``toolbox.training.fused``), one group per set of configs that can share a stack. A trial stays an
ordinary Tune function trial: it attaches its member, then relays each epoch's row and checkpoint to
Tune, so Tune samples it, schedulers stop it (its member leaves the group) and PBT exploits it (its
member joins again from the other trial's checkpoint). Why an actor and not a trial training its
peers: trials come and go at Tune's pace, and the stack must outlive any one of them.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolbox.tuning.sweepfile import Sweep

log = logging.getLogger("toolbox")

FUSED_SLOT = "TOOLBOX_FUSED_SLOT"  # custom resource: a trial's seat in a worker's group
WAIT_FOR_TRIAL_S = 120.0  # a trial that takes no epoch for this long has gone: its member leaves


def fall_back_unless_fusable(sweep: Sweep, data, address: str | None) -> None:
    """``fuse`` only where every trial can fuse; else each trial runs in its own process, said in one line."""
    from toolbox.data.splits import DatasetSplits
    from toolbox.training.fused import fusable
    from toolbox.tuning.sweepfile import candidate_params

    reason = None
    if address:
        reason = "trials cannot fuse with --address (fusing needs the private local Ray: its worker holds a custom resource)"
    elif isinstance(data, DatasetSplits):
        reason = "trials cannot fuse (the dataset is map-style splits, read through a DataLoader per trial, not shared tensors)"
    elif sweep.trial_scheduler == "hyperband":
        reason = "trials cannot fuse (HyperBand pauses trials, and a member whose trial Tune paused past its rung is not resumed)"
    for params in candidate_params(sweep.space):
        reason = reason or fusable([sweep.trial_config(params)], data.spec)
    if reason:  # one trial that cannot fuse unfuses them all: per-trial seats would change the sweep's resources
        log.info("fuse = %d: %s; each trial runs in its own process", sweep.fuse, reason)
        sweep.fuse = 0


def worker_name(sweep: str, index: int) -> str:
    return f"toolbox-fused-{sweep}-{index}"


def write_checkpoint(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


class _Seat:
    """A trial's member inside the worker: its epochs wait here, one at a time, for the trial to take them."""

    def __init__(self):
        self.rows: queue.Queue = queue.Queue(maxsize=1)
        self.closed = threading.Event()  # left, or given up on: no more epochs come

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from toolbox.training.checkpoint import checkpoint_files
        from toolbox.training.fused import StopMember

        payload = (metrics, checkpoint_files(checkpoint_dir) if checkpoint_dir else None)
        deadline = time.monotonic() + WAIT_FOR_TRIAL_S
        while not self.closed.is_set() and time.monotonic() < deadline:
            try:
                self.rows.put(payload, timeout=1.0)
                return
            except queue.Full:
                continue
        self.closed.set()
        raise StopMember


class FusedWorker:
    """A Ray actor (threaded) that trains every member attached to it on its one device."""

    def __init__(self, data: list, threads: int, use_gpu: bool):
        import ray
        import torch

        from toolbox.data.tensors import TensorData

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.data = TensorData.from_shared(ray.get(data[0]))
        self.groups: dict[tuple, object] = {}
        self.seats: dict[str, _Seat] = {}  # by join token: a trial's late leave cannot close its next seat
        self.lock = threading.Lock()
        self.work = threading.Event()
        self.failure: BaseException | None = None
        threading.Thread(target=self._train, daemon=True, name="fused-training").start()

    def join(self, config: dict, checkpoint: dict[str, bytes] | None) -> str:
        """Attach a member from the next epoch on (from ``checkpoint``'s files if given); returns its token."""
        from toolbox.config import user_code
        from toolbox.training.fused import FusedGroup, group_key
        from toolbox.training.session import Session

        user_code.load(config["imports"])
        seat, token = _Seat(), uuid.uuid4().hex
        device = self.device
        session = Session(0, 1, device, seat.report, lambda: None, lambda model: model.to(device))
        with tempfile.TemporaryDirectory(prefix="toolbox-fused-") as scratch:
            resume = str(write_checkpoint(checkpoint, Path(scratch))) if checkpoint else None
            with self.lock:
                self.seats[token] = seat
                key = group_key(config)
                if key not in self.groups:
                    self.groups[key] = FusedGroup(self.data)
                self.groups[key].add(config, session, resume)  # reads the checkpoint now
        self.work.set()
        return token

    def next(self, token: str) -> tuple[dict, dict[str, bytes] | None]:
        """The member's next epoch: its row and checkpoint files (waits for the group's epoch to end)."""
        seat = self.seats[token]
        while True:
            if self.failure is not None:
                raise RuntimeError(f"the fused worker's training failed: {self.failure!r}")
            try:
                return seat.rows.get(timeout=1.0)
            except queue.Empty:
                if seat.closed.is_set():
                    raise RuntimeError(
                        f"the fused worker gave up on this trial after {WAIT_FOR_TRIAL_S:.0f} s without it"
                    ) from None

    def leave(self, token: str) -> None:
        seat = self.seats.pop(token, None)
        if seat is not None:
            seat.closed.set()

    def members(self) -> int:
        return len(self.seats)

    def _train(self) -> None:
        while True:
            with self.lock:
                groups = [g for g in self.groups.values() if g.members or g.joining]
                try:
                    for group in groups:
                        group.train_epoch()
                except Exception as exc:  # noqa: BLE001 - every trial attached hears of it in next()
                    self.failure = exc
                    return
            if not groups:
                self.work.wait(1.0)
                self.work.clear()


def start_workers(sweep, data_ref, cpus: float, gpus: float) -> list:
    """One FusedWorker per device of this machine's Ray; keep the handles: a worker lives while they do."""
    import ray

    use_gpu = sweep.gpus_per_trial > 0
    count = max(1, int(gpus)) if use_gpu else 1
    threads = max(1, int(min(cpus / count, sweep.fuse * sweep.cpus_per_worker)))
    remote = ray.remote(FusedWorker)
    options = {"num_cpus": threads, "num_gpus": 1 if use_gpu else 0, "max_concurrency": 4 * sweep.fuse + 8}
    return [remote.options(name=worker_name(sweep.name, i), **options).remote([data_ref], threads, use_gpu) for i in range(count)]


def relay(config: dict, sweep, checkpoint: dict[str, bytes] | None, report) -> None:
    """A trial's side: attach to the least busy worker (from ``checkpoint``'s files), then hand each
    epoch to ``report(metrics, checkpoint_dir)``."""
    import ray

    workers = [ray.get_actor(worker_name(sweep.name, i)) for i in range(_worker_count(sweep))]
    worker = min(zip(ray.get([w.members.remote() for w in workers]), range(len(workers)), workers))[2]
    token = ray.get(worker.join.remote(config, checkpoint))
    try:
        epoch = 0
        while epoch < config["epochs"]:
            metrics, files = ray.get(worker.next.remote(token))
            with tempfile.TemporaryDirectory(prefix="toolbox-relay-") as scratch:
                directory = write_checkpoint(files, Path(scratch)) if files else None
                report(metrics, str(directory) if directory else None)
            epoch = metrics["epoch"]
    finally:  # Tune stopped the trial (SystemExit from its report), or it ended: the member leaves
        worker.leave.remote(token)


def _worker_count(sweep) -> int:
    import ray

    count = 0
    while True:
        try:
            ray.get_actor(worker_name(sweep.name, count))
        except ValueError:
            return max(1, count)
        count += 1
