"""Addresses and storage that cannot answer are refused within seconds, with one line: a server that is not
Ray, ``--address auto`` without a Ray of the user's own, a storage URI that never answers."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest
from helpers import TINY_DUMMY

from toolbox.config.registry import ConfigError
from toolbox.distributed.cluster import free_port
from toolbox.distributed.locations import check_address, own_cluster, place
from toolbox.run import main as run_main


@pytest.fixture
def http_server():
    """A plain HTTP server on 127.0.0.1: it answers, but not as Ray."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # its log would share the test's stderr
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("server", ["http_server", "silent_server"])
def test_an_address_where_something_else_answers_is_named_as_not_ray(server, request, tmp_path, capsys, ray_never_starts):
    address = request.getfixturevalue(server)
    code = run_main(
        [*(f"--{k.replace('_', '-')}={v}" for k, v in TINY_DUMMY.items()), "--address", address, "--storage", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert (
        err[0]
        == f"toolbox.run: error: --address {address}: something answers on {address} but is not a Ray GCS (it does not speak gRPC)"
    )


def test_a_storage_uri_that_never_answers_is_refused(silent_server):
    """A GCS bucket whose endpoint never answers (as one without credentials retries for minutes)."""
    storage = f"gs://bucket/x?endpoint_override={silent_server}&scheme=http"
    with pytest.raises(ConfigError, match=r"^--storage gs://bucket/x\S*: no answer within 10 s"):
        place(storage, "run")


@pytest.fixture
def own_head(monkeypatch):
    """A head started with `ray start --head`, its record (ray_current_cluster) in a temp dir of its own; its
    processes are killed by pid at the end (never `ray stop`: it would end other users' Rays too)."""
    root = Path(tempfile.mkdtemp(prefix="tbad-", dir="/tmp"))  # short: Ray's socket paths lie below it
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": str(root), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    for key in ("RAY_TMPDIR", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    ray_cli = str(Path(sys.executable).parent / "ray")
    started = subprocess.run(
        [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield f"127.0.0.1:{port}", root
    finally:
        ours = [p for p in psutil.process_iter(["cmdline"]) if str(root) in " ".join(p.info["cmdline"] or [])]
        for process in ours:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(ours, timeout=30)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def kill_raylet(root: Path) -> None:
    raylets = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "raylet" and str(root) in " ".join(p.info["cmdline"])
    ]
    assert len(raylets) == 1, raylets
    raylets[0].kill()
    raylets[0].wait(30)


@pytest.mark.timeout(300)
def test_address_auto_joins_only_the_users_own_ray_start_cluster(own_head):
    address, root = own_head
    assert own_cluster() == address
    assert check_address("auto") == address  # its GCS answers as Ray
    with pytest.raises(
        ConfigError,
        match=rf"names, {address}, was started by {psutil.Process().username()}, not by you; pass --address HOST:PORT",
    ):
        own_cluster(uid=os.getuid() + 1)  # as another user on this host sees it
    kill_raylet(root)
    with pytest.raises(ConfigError, match=rf"names, {address}, has no raylet on this host \(it ended\)"):
        own_cluster()


def test_address_auto_without_any_cluster_record_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"no Ray cluster was started on this host .*ray_current_cluster is missing"):
        own_cluster()
