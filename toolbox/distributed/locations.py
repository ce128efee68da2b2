"""Where a run or sweep lives and which cluster it joins: the value rules for --name, --storage and --address."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow
import pyarrow.fs

from toolbox.config.registry import ConfigError
from toolbox.distributed.storage import atomic_local_files

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]{0,199}")
LOCK_FILE = ".toolbox.lock"
ADDRESS_TIMEOUT_S = 10.0
STORAGE_TIMEOUT_S = 10.0
# What an HTTP/2 client sends first (the connection preface, then an empty SETTINGS frame); a gRPC server, as Ray's
# GCS and client server are, answers with a SETTINGS frame of its own.
HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def check_name(name: str, label: str = "--name") -> str:
    """A run or sweep name: one path component inside the storage dir, never '', '..' or 'a/b'."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{label} {name!r} is not a name: use letters, digits and . _ + = @ - (at most 200, no '..', "
            "not starting with '.' or '-'), so that it stays one directory inside --storage"
        )
    return name


def is_uri(storage: str) -> bool:
    return "://" in str(storage)


def local_dir(storage: str, name: str) -> Path:
    """STORAGE/NAME on a local (or mounted) filesystem, checked to be a writable directory inside STORAGE."""
    if not str(storage).strip():
        raise ConfigError("--storage '': give a directory (the default is ./ray_results) or a URI")
    try:
        root = Path(storage).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ConfigError(f"--storage {storage}: cannot resolve it ({exc})") from None
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--storage {storage}: is a file, not a directory")
    path = root / check_name(name)
    if path.parent != root:
        raise ConfigError(f"--name {name!r} leaves --storage {storage}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run directory")
    _check_writable(path, storage)
    return path


def _check_writable(path: Path, storage: str) -> None:
    """Write and remove a file in ``path`` or its nearest existing parent: a read-only mount, a dir
    without permission or /sys fails here, not in Ray's first checkpoint."""
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as exc:
        raise ConfigError(f"--storage {storage}: cannot reach {path} ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".toolbox-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--storage {storage}: cannot write in {existing} ({exc.strerror or exc})") from None


class DirLock:
    """An exclusive lock on a run or sweep dir for as long as this process uses it (released when it exits)."""

    def __init__(self, directory: Path, what: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise ConfigError(f"{directory} is in use by {holder}: wait for that {what} to end, or use another --name") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()}".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> str:
    """The cluster address to join (``auto`` made one); refused where nothing answers, or something that is not a
    Ray server does, instead of waiting minutes inside ray.init."""
    if address == "local":
        return address
    if address == "auto":
        address = own_cluster()
    parsed = urllib.parse.urlsplit(address if "://" in address else f"ray-gcs://{address}")
    default_port = 10001 if parsed.scheme == "ray" else 6379
    try:
        host, port = parsed.hostname, parsed.port or default_port
    except ValueError:
        host, port = None, None
    if not host:
        raise ConfigError(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        connection = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError(f"--address {address}: nothing answers on {host}:{port} ({reason})") from None
    with connection:
        if not os.environ.get("RAY_USE_TLS") and not _speaks_http2(connection):
            raise ConfigError(
                f"--address {address}: something answers on {host}:{port} but is not a Ray GCS (it does not speak gRPC)"
            )
    return address


def _speaks_http2(connection: socket.socket) -> bool:
    try:
        connection.sendall(HTTP2_HELLO)
        answer = b""
        while len(answer) < 9:  # a frame's header: length (3 bytes), type, flags, stream (4)
            chunk = connection.recv(9 - len(answer))
            if not chunk:
                return False
            answer += chunk
    except OSError:  # silent until the timeout, or reset
        return False
    return answer[3] == HTTP2_SETTINGS


def own_cluster(uid: int | None = None) -> str:
    """What ``--address auto`` joins: $RAY_ADDRESS, else the cluster that Ray's record of the last ``ray start``
    on this host names, where a raylet of that cluster runs here as this user (``uid``). Never another user's
    Ray, nor a Ray that a driver started for itself (those are in no record)."""
    if os.environ.get("RAY_ADDRESS", "auto") not in ("", "auto"):
        return os.environ["RAY_ADDRESS"]
    import psutil
    from ray._common.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    how = "pass --address HOST:PORT, or start one here with `ray start --head`"
    try:
        recorded = record.read_text().strip()
    except OSError:
        raise ConfigError(f"--address auto: no Ray cluster was started on this host ({record} is missing); {how}") from None
    owners = set()
    for process in psutil.process_iter(["name", "cmdline", "uids", "username"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "raylet" and f"--gcs-address={recorded}" in " ".join(cmdline).split(" "):
            if process.info["uids"].real == (os.getuid() if uid is None else uid):
                return recorded
            owners.add(process.info["username"])
    whose = f"was started by {', '.join(sorted(owners))}, not by you" if owners else "has no raylet on this host (it ended)"
    raise ConfigError(f"--address auto: the Ray cluster that {record} names, {recorded}, {whose}; {how}")


@dataclass(frozen=True)
class Place:
    """A run or sweep dir: on a local (or mounted) disk, or under a URI (s3://, gs://) every node can read.

    Ray writes checkpoints and Tune's state through ``fs``; toolbox writes its own files (epoch
    tables, logs, results) in ``local`` and, for a URI, copies each to ``path`` in ``fs`` as it
    changes (``mirror``)."""

    fs: pyarrow.fs.FileSystem
    parent: str  # where Ray writes the runs of this dir (its storage_path): the storage root, or a trial's own dir
    path: str  # this run's or sweep's dir in fs
    local: Path
    remote: bool

    @property
    def mirror(self) -> Mirror | None:
        return Mirror(self.fs, self.path) if self.remote else None


@dataclass(frozen=True)
class Mirror:
    """A copy under a URI of the small files toolbox writes in a local dir."""

    fs: pyarrow.fs.FileSystem
    path: str

    def push(self, local: Path, relative: str) -> None:
        target = f"{self.path}/{relative}"
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(target) as out:
            out.write((local / relative).read_bytes())

    def pull(self, local: Path, names: tuple[str, ...]) -> None:
        """Fetch the mirrored files into a staging dir: the copy under the URI is the run's, the staged one
        may be another machine's older one."""
        local.mkdir(parents=True, exist_ok=True)
        for info in self.fs.get_file_info([f"{self.path}/{name}" for name in names]):
            if info.type == pyarrow.fs.FileType.File:
                with self.fs.open_input_stream(info.path) as source:
                    (local / info.base_name).write_bytes(source.read())


def place(storage: str, name: str) -> Place:
    """STORAGE/NAME, checked: a directory inside a local storage dir, or a reachable URI."""
    if not is_uri(storage):
        path = local_dir(storage, name)
        return Place(atomic_local_files(), str(path.parent), str(path), path, remote=False)
    check_name(name)
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowInvalid, OSError, ValueError) as exc:
        raise ConfigError(f"--storage {storage}: {' '.join(str(exc).split())[:300]}") from None
    root = root.rstrip("/")
    try:
        info = _within(STORAGE_TIMEOUT_S, lambda: fs.get_file_info(root))
    except TimeoutError:
        raise ConfigError(
            f"--storage {storage}: no answer within {STORAGE_TIMEOUT_S:g} s (are its credentials set up here, "
            "and can this machine reach it?)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"--storage {storage}: cannot reach it ({' '.join(str(exc).split())[:300]})") from None
    if info.type == pyarrow.fs.FileType.File:
        raise ConfigError(f"--storage {storage}: is a file, not a directory")
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", f"{storage}/{name}")[:120]
    staging = (
        Path(tempfile.gettempdir())
        / "toolbox-staging"
        / f"{readable}-{hashlib.sha1(f'{storage}/{name}'.encode()).hexdigest()[:10]}"
    )
    return Place(fs, root, f"{root}/{name}", staging, remote=True)


def _within(seconds: float, call: Callable):
    """``call()``, raising TimeoutError after ``seconds``: a filesystem client may retry for many minutes, deaf to
    Ctrl-C. It runs in a daemon thread, which this process leaves behind if it must."""
    answer: dict = {}

    def run() -> None:
        try:
            answer["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            answer["error"] = exc

    thread = threading.Thread(target=run, name="toolbox-storage-check", daemon=True)
    thread.start()
    thread.join(seconds)  # Ctrl-C ends the wait
    if thread.is_alive():
        raise TimeoutError
    if "error" in answer:
        raise answer["error"]
    return answer["value"]
