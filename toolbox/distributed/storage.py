"""Ray storage whose files are whole or absent.

Ray writes experiment state, searcher state and checkpoints to storage in place. A driver killed
mid-write (SIGKILL, a lost terminal) then leaves a truncated ``experiment_state-*.json``, and Tune
restores from it a sweep that has lost its trials. On a local or shared path, toolbox hands Ray
this filesystem instead: each file is written under a hidden temporary name in its directory and
renamed over the real name when closed, so a reader only ever sees a previous version or the new one.

Tune also writes its experiment state in place in a local staging dir while a background thread
may be copying that same file to storage, so a copy can be whole yet empty or cut short. Tune's
state files are therefore published only when they parse; otherwise the previous version stays.

Ray deletes a trial's older checkpoints while the last published experiment snapshot may still
name one, so a driver killed in between restored a trial from a deleted checkpoint. Deletions of
checkpoint dirs therefore wait until no published record can name them.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import json
import os
import pickletools
import shutil
import threading
import uuid

import pyarrow
import pyarrow.fs


def _parses_as_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _is_whole_pickle(data: bytes) -> bool:
    """Walks the opcodes (nothing is unpickled): a cut-short pickle never reaches STOP."""
    try:
        return any(opcode.name == "STOP" for opcode, _, _ in pickletools.genops(data))
    except ValueError:
        return False


# error.pkl: Tune unpickles a trial's last error when it lists the results; an empty one fails the whole sweep.
STATE_FILES = {
    "experiment_state-*.json": _parses_as_json,
    "searcher-state-*.pkl": _is_whole_pickle,
    "error.pkl": _is_whole_pickle,
}
# Checkpoint dirs Tune has deleted, held back while a published snapshot may still name them: path ->
# how many snapshots were published since. Tune saves a snapshot, uploads it in the background and
# may delete meanwhile, so only the second snapshot published after a deletion is sure not to name
# it. Train writes its record before it deletes, so its deletions happen at once.
_deferred: dict[str, int] = {}
_deferred_lock = threading.Lock()  # Tune deletes in its loop and publishes from its upload thread
TRAIN_RECORD = "checkpoint_manager_snapshot.json"


def _published(path: str) -> None:
    if not fnmatch.fnmatch(os.path.basename(path), "experiment_state-*.json"):
        return
    with _deferred_lock:
        for p in list(_deferred):
            _deferred[p] += 1
        freed = [p for p, seen in _deferred.items() if seen >= 2]
        for p in freed:
            del _deferred[p]
    for p in freed:
        shutil.rmtree(p, ignore_errors=True)


def delete_deferred() -> None:
    """Carry out the held-back deletions (once nothing runs that a snapshot could still send back to them)."""
    with _deferred_lock:
        held = list(_deferred)
        _deferred.clear()
    for p in held:
        shutil.rmtree(p, ignore_errors=True)


def _whole(path: str, data_path: str) -> bool:
    name = os.path.basename(path)
    for pattern, check in STATE_FILES.items():
        if fnmatch.fnmatch(name, pattern):
            with open(data_path, "rb") as f:
                return check(f.read())
    return True


class _RenamedOnClose(io.FileIO):
    """A file written at a hidden temporary path, renamed to ``path`` when closed whole.

    A failed write or flush (a full disk, a read-only remount) removes the temporary file and
    raises: the file at ``path``, if any, is never replaced by a partial one."""

    def __init__(self, path: str):
        directory, name = os.path.split(path)
        self._final = path
        self._temporary = os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        self._failed = False
        super().__init__(self._temporary, "w")

    def write(self, data) -> int:
        try:
            written = super().write(data)
        except OSError:
            self._fail()
            raise
        if written is not None and written < len(memoryview(data)):  # a short write: the disk is full
            self._fail()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._final)
        return written

    def _fail(self) -> None:
        """Removed at once: a worker that failed may be killed before the file is closed."""
        self._failed = True
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._temporary)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._failed:
                os.fsync(self.fileno())
        except OSError:
            self._failed = True
            raise
        finally:
            super().close()
            if self._failed or not _whole(self._final, self._temporary):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self._temporary)
            else:
                os.replace(self._temporary, self._final)  # atomic on POSIX
                _published(self._final)


class AtomicLocalFiles(pyarrow.fs.FileSystemHandler):
    """The local filesystem, except that new files appear whole (see the module's docstring)."""

    def __init__(self):
        self._local = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalFiles)

    def __ne__(self, other) -> bool:
        return not self == other

    def __reduce__(self):  # travels to trial and worker processes with Ray's storage context
        return (AtomicLocalFiles, ())

    def get_type_name(self) -> str:
        return "toolbox-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self._local.normalize_path(path)

    def get_file_info(self, paths):
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        parent = os.path.dirname(path.rstrip("/"))
        if os.path.basename(path.rstrip("/")).startswith("checkpoint_") and not os.path.exists(
            os.path.join(parent, TRAIN_RECORD)
        ):
            with _deferred_lock:
                _deferred.setdefault(path, 0)
            return
        self._local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("toolbox storage will not delete the contents of /")

    def delete_file(self, path: str) -> None:
        self._local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self._local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str):
        return self._local.open_input_stream(path)

    def open_input_file(self, path: str):
        return self._local.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return pyarrow.PythonFile(_RenamedOnClose(path), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self._local.open_append_stream(path, metadata=metadata)


def atomic_local_files() -> pyarrow.fs.FileSystem:
    """The filesystem toolbox gives Ray for a local (or mounted) storage path."""
    return pyarrow.fs.PyFileSystem(AtomicLocalFiles())
