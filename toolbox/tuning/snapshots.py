"""The sweep's saved trial states, at a cost per trial that does not grow with the sweep.

Tune snapshots every trial into one experiment-state file at each step, and uploads its whole
staging dir (a dir per trial) after each: two costs that grow as the square of the trial count.

- A snapshot here holds only the unfinished trials; each trial that finishes is written once, in a
  small file of ``finished_trials/`` written straight to the sweep dir before the snapshot that
  leaves it out. Reading merges the two, the newer entry of a trial winning: a batch newer than the
  snapshot (a driver killed in between) holds what the snapshot lacks.
- An upload copies the staging dir's own files that changed, and looks only into the dirs of the
  trials that changed since the last upload (Tune writes a trial's error files there).
- The searcher's state travels inside the snapshot too, and a restore takes it from there: its own
  file, uploaded apart, can be a snapshot older or newer than the experiment state when the driver
  was killed mid-upload, and a searcher that counts a finished trial as live waits for it forever.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path

import pyarrow.fs

log = logging.getLogger("toolbox")
FINISHED_DIR = "finished_trials"
NEWEST_BATCH = "toolbox_finished_upto"  # the experiment state's key: the newest batch written before it
SEARCHER_FILES = "toolbox_searcher_files"  # the experiment state's key: the searcher's files of the same step
FINISHED_AFTER = "toolbox_finished_after"  # merge's note in a state it read: trials of batches newer than the snapshot
SEARCHER_PATTERNS = ("basic-variant-state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
FINAL = ("TERMINATED", "ERROR")
_sealed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # controller -> {trial id: status last written in a batch}
_next_batch: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # controller -> the number of its next batch
_finished_after: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # controller -> trials that ended after its snapshot
_changed_dirs: dict[str, set[str]] = {}  # staging dir -> its trial dirs that changed since its last upload
_uploaded: dict[str, dict[str, bytes]] = {}  # staging dir -> each file's digest when last uploaded
_changed_lock = threading.Lock()  # the controller adds to _changed_dirs while an upload thread takes from it


def save(controller) -> None:
    """``TuneController.save_to_dir``, writing each newly finished trial once into a batch of its own."""
    from ray.tune.execution.tune_controller import TuneFunctionEncoder

    changed = set(controller._trials_to_cache)
    try:
        data = controller._get_trial_checkpoints()
        sealed = _sealed.setdefault(controller, {})
        finished = {t.trial_id: t.status for t in changed if t.status in FINAL and sealed.get(t.trial_id) != t.status}
        storage = controller._storage
        if controller not in _next_batch:  # a restored sweep's batches go on from those its earlier runs wrote
            _next_batch[controller] = _newest_batch(storage.storage_filesystem, storage.experiment_fs_path) + 1
        if finished:
            batch = _next_batch[controller]
            _write_batch(storage.storage_filesystem, storage.experiment_fs_path, batch, [data[i] for i in finished])
            _next_batch[controller] = batch + 1
            sealed.update(finished)
        for trial in changed:  # a trial written in a batch leaves the snapshots until it changes status
            if sealed.get(trial.trial_id) == trial.status:
                data.pop(trial.trial_id, None)
        searcher = _searcher_files(controller)
        state = {
            "trial_data": list(data.values()),
            "runner_data": controller.__getstate__(),
            "stats": {"start_time": controller._start_time},
            NEWEST_BATCH: _next_batch[controller] - 1,
            SEARCHER_FILES: {name: base64.b64encode(content).decode() for name, content in searcher.items()},
        }
        staging = Path(storage.experiment_driver_staging_path)
        staging.mkdir(parents=True, exist_ok=True)
        with _changed_lock:
            _changed_dirs.setdefault(str(staging), set()).update(
                t.storage.trial_dir_name for t in changed if t.storage.trial_dir_name
            )
        (staging / controller.experiment_state_file_name).write_text(json.dumps(state, cls=TuneFunctionEncoder))
        for name, content in searcher.items():
            (staging / name).write_bytes(content)
        controller._callbacks.save_to_dir(str(staging), session_str=controller._session_str)
    except BaseException:
        controller._trials_to_cache |= changed  # a failed snapshot is taken again at the next step
        raise


def _searcher_files(controller) -> dict[str, bytes]:
    """The files the controller's searcher saves its state in, by name."""
    with tempfile.TemporaryDirectory(prefix="toolbox-searcher-") as scratch:
        controller._search_alg.save_to_dir(scratch, session_str=controller._session_str)
        return {path.name: path.read_bytes() for path in Path(scratch).iterdir() if path.is_file()}


def restore_searcher_with_snapshot(controller, state: dict) -> None:
    """Have the restore of ``controller`` read its searcher from the files saved in the snapshot ``state``: they are
    put in the staging dir once Tune has downloaded the sweep dir there, in place of the searcher files it holds."""
    saved = state.get(SEARCHER_FILES)
    if saved is None:  # a snapshot from before the searcher's state travelled in it
        return
    manager = controller._checkpoint_manager
    sync_down = manager.sync_down_experiment_state

    def sync_down_then_put_back(*args, **kwargs):
        manager.sync_down_experiment_state = sync_down
        synced = sync_down(*args, **kwargs)
        staging = Path(controller._storage.experiment_driver_staging_path)
        for stale in (path for pattern in SEARCHER_PATTERNS for path in staging.glob(pattern)):
            stale.unlink()
        for name, content in saved.items():
            (staging / name).write_bytes(base64.b64decode(content))
        return synced

    manager.sync_down_experiment_state = sync_down_then_put_back


def upload_command(fs: pyarrow.fs.FileSystem, staging: str, fs_path: str):
    """What ``_FilesystemSyncer`` runs in its thread to upload the staging dir ``staging``: a function and its arguments."""
    with _changed_lock:
        trial_dirs = _changed_dirs.pop(staging, set())
    return _upload_changed, {"staging": staging, "fs": fs, "fs_path": fs_path, "trial_dirs": trial_dirs}


def _upload_changed(staging: str, fs: pyarrow.fs.FileSystem, fs_path: str, trial_dirs: set[str]) -> None:
    uploaded = _uploaded.setdefault(staging, {})
    try:
        files = [entry.name for entry in os.scandir(staging) if entry.is_file()]
        for trial_dir in trial_dirs:
            for parent, _, names in os.walk(Path(staging, trial_dir)):
                files += [os.path.relpath(Path(parent, name), staging) for name in names]
        for name in files:
            data = Path(staging, name).read_bytes()
            digest = hashlib.blake2b(data, digest_size=16).digest()  # a rewrite can keep the size and the mtime's tick
            if uploaded.get(name) == digest:
                continue
            parent = Path(name).parent
            if name not in uploaded and parent != Path("."):
                fs.create_dir(f"{fs_path}/{parent.as_posix()}", recursive=True)
            with fs.open_output_stream(f"{fs_path}/{Path(name).as_posix()}") as sink:
                sink.write(data)
            uploaded[name] = digest
    except BaseException:
        with _changed_lock:  # looked into again by the next upload
            _changed_dirs.setdefault(staging, set()).update(trial_dirs)
        raise


def merge(state: dict, fs: pyarrow.fs.FileSystem, path: str) -> dict:
    """The experiment state ``state`` with the finished trials of ``finished_trials/`` put back; returns the
    ids and statuses of the trials that came from a batch. ``state[FINISHED_AFTER]`` lists those of a batch newer
    than the snapshot: they finished after it."""
    upto = state.get(NEWEST_BATCH, -1)
    from_batch: dict[str, tuple[int, list]] = {}
    for batch, entries in _batches(fs, path):
        for entry in entries:
            from_batch[_trial_id(entry)] = (batch, entry)
    newest = {trial_id: entry for trial_id, (_, entry) in from_batch.items()}
    for entry in state["trial_data"]:
        trial_id = _trial_id(entry)
        if trial_id not in from_batch or from_batch[trial_id][0] <= upto:
            newest[trial_id] = entry
            from_batch.pop(trial_id, None)
    state["trial_data"] = [newest[trial_id] for trial_id in sorted(newest)]
    state[FINISHED_AFTER] = [trial_id for trial_id, (batch, _) in from_batch.items() if batch > upto]
    return {trial_id: json.loads(entry[0])["status"] for trial_id, (_, entry) in from_batch.items()}


def restored(controller, sealed: dict, finished_after: list[str]) -> None:
    """The trials a restored ``controller`` read from batches: they are not written again while they stay as they
    were, and those that ``finished_after`` its snapshot are told to its searcher once Tune has restored that. The
    sweep dir's logs (PBT's ``pbt_global.txt``) come back to the staging dir, where Tune appends to them."""
    _sealed[controller] = dict(sealed)
    _finished_after[controller] = set(finished_after)
    storage = controller._storage
    fs, staging = storage.storage_filesystem, Path(storage.experiment_driver_staging_path)
    staging.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(storage.experiment_fs_path, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.File and info.base_name.endswith(".txt"):
            with fs.open_input_stream(info.path) as source:
                (staging / info.base_name).write_bytes(source.readall())


def tell_searcher_of_later_ends(controller, trials: list) -> None:
    """Tell the restored searcher, which is the snapshot's, of the restored trials that ended after that snapshot, as Tune
    tells it when a trial ends: else it counts them as live, and a searcher at its concurrency waits for them forever."""
    from ray.tune.utils import flatten_dict

    ended_after = _finished_after.pop(controller, set())
    for trial in trials:
        if trial.trial_id in ended_after and trial.status in FINAL:
            result = flatten_dict(trial.last_result) if trial.last_result else None
            controller._search_alg.on_trial_complete(trial.trial_id, result=result, error=trial.status == "ERROR")


def saved_trials(fs: pyarrow.fs.FileSystem, path: str, state_file: str | None = None) -> list:
    """Each trial as the sweep dir at ``path`` last saved it (stub trials, as ``ExperimentAnalysis`` reads
    them), from its newest experiment state or ``state_file``."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.experiment import Trial
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    state_file = state_file or _find_newest_experiment_checkpoint(experiment_path=path, fs=fs)
    if state_file is None:
        raise ValueError(f"no experiment state in {path}")
    with fs.open_input_stream(state_file) as source:
        state = _loads_with_cloudpickle(source.readall())
    merge(state, fs, path)
    trials = []
    for trial_state, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_state, stub=True)
        trial.restore_run_metadata(run_metadata)
        storage = copy.copy(trial.storage)
        storage.storage_fs_path, storage.storage_filesystem = Path(path).parent.as_posix(), fs
        storage.experiment_dir_name = Path(path).name
        trial.set_storage(storage)
        trials.append(trial)
    return trials


def _trial_id(entry: list) -> str:
    return json.loads(entry[0])["trial_id"]


def _batch_name(batch: int) -> str:
    return f"finished-{batch:08d}.json"


def _write_batch(fs: pyarrow.fs.FileSystem, path: str, batch: int, entries: list) -> None:
    """Written under a temporary name and moved: a batch is whole or absent."""
    directory = f"{path}/{FINISHED_DIR}"
    fs.create_dir(directory, recursive=True)
    temporary = f"{directory}/.{_batch_name(batch)}.partial"
    with fs.open_output_stream(temporary) as sink:
        sink.write(json.dumps({"batch": batch, "trial_data": entries}).encode())
    fs.move(temporary, f"{directory}/{_batch_name(batch)}")


def _batch_files(fs: pyarrow.fs.FileSystem, path: str) -> list:
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{FINISHED_DIR}", allow_not_found=True))
    batches = [i for i in infos if i.base_name.startswith("finished-") and i.base_name.endswith(".json")]
    return sorted(batches, key=lambda info: info.base_name)


def _newest_batch(fs: pyarrow.fs.FileSystem, path: str) -> int:
    files = _batch_files(fs, path)
    return int(files[-1].base_name[len("finished-") : -len(".json")]) if files else -1


def _batches(fs: pyarrow.fs.FileSystem, path: str):
    for info in _batch_files(fs, path):
        with fs.open_input_stream(info.path) as source:
            batch = json.loads(source.readall())
        yield batch["batch"], batch["trial_data"]
