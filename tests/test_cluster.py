"""The private local Ray toolbox starts: loopback only, free ports, a named job, findable trials."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from helpers import ROOT, python_env

LISTENERS = """
import json, os, psutil, ray
from toolbox.distributed import cluster
url = cluster.start(None, job_name="toolbox.run listeners", num_cpus=1)
ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process listens too
import urllib.request
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
request = urllib.request.Request(url + "/api/jobs/", headers=get_auth_headers_if_auth_enabled({}))
jobs = json.loads(urllib.request.urlopen(request, timeout=30).read())
tree = [psutil.Process()] + psutil.Process().children(recursive=True)
sockets = []
for process in tree:
    try:
        for c in process.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                sockets.append([process.name(), c.laddr.ip, c.laddr.port])
    except psutil.NoSuchProcess:
        pass
print(json.dumps({"url": url, "sockets": sockets, "names": [j.get("metadata", {}).get("job_name") for j in jobs],
                  "agent_port": ray._private.worker._global_node.dashboard_agent_listen_port}))
ray.shutdown()
"""


@pytest.mark.timeout(240)
def test_every_port_of_the_local_ray_listens_on_loopback_and_the_job_has_the_runs_name():
    proc = subprocess.run(
        [sys.executable, "-c", LISTENERS], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    sockets = seen["sockets"]
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the servers are there, so the check has something to check
    assert len(sockets) >= 8, sockets
    public = [s for s in sockets if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not public, f"listening beyond loopback: {public}"
    assert seen["agent_port"] not in (52365, -1), "the dashboard agent's HTTP port is Ray's fixed default, or off"
    assert "toolbox.run listeners" in seen["names"]


LEAN_RUN = """
import json, sys, ray
from ray.util.state import list_actors
from toolbox import run
from toolbox.distributed import cluster
plan = run.prepare(["--dummy-n-samples", "64", "--dummy-val-n-samples", "32", "--epochs", "1", "--batch-size", "16",
                    "--storage", sys.argv[1], "--name", "lean"])
run.fit(plan)
listed = list_actors(limit=1000)
actors = sorted({actor.class_name for actor in listed})
processes = sorted(ray._private.worker._global_node.all_processes)
from ray.train.v2._internal.state.state_actor import get_state_actor
versions = [train_run.framework_versions for train_run in ray.get(get_state_actor().get_train_runs.remote()).values()]
state_pid = next(actor.pid for actor in listed if actor.class_name == "TrainStateActor" and actor.state == "ALIVE")
state_has_torch = "libtorch_cpu" in open(f"/proc/{state_pid}/maps").read()
cluster.stop()
print(json.dumps({"actors": actors, "processes": processes, "state_has_torch": state_has_torch,
                  "versions": [{k: [v, type(v).__name__] for k, v in found.items()} for found in versions]}))
"""


@pytest.mark.timeout(240)
def test_a_run_on_the_local_ray_starts_no_process_that_only_takes_cpu_from_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", LEAN_RUN, str(tmp_path)], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"RayTrainWorker", "TrainController"} <= set(seen["actors"]), seen  # the run's own actors are listed
    idle_helpers = {"DatasetManager", "PreemptionWatcher", "PlacementGroupCleaner", "_AutoscalingCoordinatorActor"}
    assert not idle_helpers & set(seen["actors"]), seen["actors"]
    assert {"raylet", "gcs_server"} <= set(seen["processes"]), seen
    assert "log_monitor" not in seen["processes"] and "monitor" not in seen["processes"], seen["processes"]
    assert seen["versions"] == [{"ray": [ray.__version__, "str"], "torch": [str(torch.__version__), "str"]}], seen["versions"]
    assert not seen["state_has_torch"], "Train's state actor imported torch to read torch's version"


VERBOSE_SESSION = """
import json, logging, os, sys
from toolbox.distributed import cluster
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
cluster.start(None, job_name="toolbox.run kept", num_cpus=1, dashboard=False, verbose=True)
import ray
session = ray._private.worker._global_node.get_session_dir_path()
processes = sorted(ray._private.worker._global_node.all_processes)
cluster.stop()
print(json.dumps({"session": session, "processes": processes, "tracking": os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"]}))
"""


@pytest.mark.timeout(240)
def test_verbose_keeps_the_session_dir_of_the_local_ray_and_says_where(tmp_path):
    """Without --verbose the session dir goes when Ray ends (tests/test_runs.py checks it after a run)."""
    proc = subprocess.run(
        [sys.executable, "-c", VERBOSE_SESSION], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    session = Path(seen["session"])
    # Without a dashboard to show them, Train runs keep no state actor; no private Ray runs the autoscaler's monitor.
    assert seen["tracking"] == "0" and "monitor" not in seen["processes"] and "log_monitor" in seen["processes"], seen
    try:
        assert session.is_dir() and (session / "logs").is_dir(), session
        assert f"Ray's logs are kept in {session}" in proc.stdout, proc.stdout[-3000:]
    finally:
        shutil.rmtree(session, ignore_errors=True)


def test_processes_that_seed_pythons_random_alike_draw_different_free_ports():
    """A sweep seeds Python's random before it starts its Ray: two sweeps of one seed drew the same ports, and one's
    dashboard found its port taken by the other's."""
    draw = "import random; from toolbox.distributed.cluster import free_port; random.seed(0); print(free_port(), free_port())"
    drawn = [
        subprocess.run([sys.executable, "-c", draw], cwd=ROOT, env=python_env(), capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    ports = [int(port) for done in drawn for port in done.stdout.split()]
    assert len(set(ports)) == 4, ports
