"""A real two-node Ray cluster on one machine: a head and a worker node, 1 CPU each and each with its own
temp dir (``ray.cluster_utils.Cluster`` in a process of its own; token auth on, ports chosen free, every
server on 127.0.0.1). toolbox's drivers join it with --address: a DDP run's two workers land on the two
nodes, a sweep's trials run on both, the driver's job is on the dashboard's Jobs API under its name,
``ray job submit`` runs a sweep, and a sweep survives the loss of the worker node. Only the processes
started here are stopped, by their ids; none of them outlives the module."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, python_env

from toolbox.distributed.cluster import free_port
from toolbox.training.epochlog import read_rows

RAY = str(Path(sys.executable).with_name("ray"))
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
STARTED_ON = re.compile(r"trial started on node ([0-9a-f]+):")
# Ray's single-machine mode: every node gets IP 127.0.0.1 and binds its servers there. In its
# default (cluster) mode Ray rewrites 127.0.0.1 to the host's IP, in --address too, and listens on all interfaces.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Runs in its own process: a ray.cluster_utils.Cluster of a head and a worker node, 1 CPU each. It prints
# one JSON line when both are up, then obeys stdin: "crash" SIGKILLs the worker node, "stop" (or EOF) ends all.
CLUSTER = """
import json, sys, psutil, ray
from ray.cluster_utils import Cluster
dashboard_port, head_agent_port, worker_agent_port = map(int, sys.argv[1:4])
head_dir = sys.argv[4] + "/head"
# Each node its own temp dir, as on two machines: one shared by both, each node's runtime-env agent would
# delete the other's files (a job's working_dir, its driver's cwd, is gone when the worker node is done with it).
cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
    num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
    dashboard_agent_listen_port=head_agent_port, temp_dir=head_dir))
worker = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=worker_agent_port, temp_dir=sys.argv[4] + "/worker")
cluster.wait_for_nodes()
# As `ray start --temp-dir` does: a job's supervisor reads the GCS address there, else takes any GCS on the host.
ray._private.utils.write_ray_address(cluster.address, head_dir)
def tree(node):
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]
print(json.dumps({"address": cluster.address, "dashboard": "http://" + cluster.webui_url, "head": cluster.head_node.node_id,
                  "worker": worker.node_id, "node_ips": [cluster.head_node.node_ip_address, worker.node_ip_address]}), flush=True)
for line in sys.stdin:
    if line.strip() == "crash":
        processes = tree(worker)  # the raylet and its workers (the trial actors), all at once
        cluster.remove_node(worker, allow_graceful=False)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=30)
        print(json.dumps({"crashed": worker.node_id, "alive": [p.pid for p in alive]}), flush=True)
    else:
        break
cluster.shutdown()
"""


def kill_all(processes: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    """SIGKILL these processes (psutil checks each is still the one seen); returns any still alive after."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


class Cluster:
    """The CLUSTER script in a session of its own; every process of both nodes lies below it."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {
            **os.environ,
            **LOOPBACK,
            "RAY_AUTH_MODE": "token",
            "RAY_TMPDIR": str(root),  # its ray_current_cluster here, not in the host's /tmp/ray, where other Rays' are
            "DASHBOARD_METRIC_PORT": str(free_port()),  # Ray's fixed defaults may be another Ray's
            "AUTOSCALER_METRIC_PORT": str(free_port()),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # `python` of jobs
        }
        self.env.pop("RAY_ADDRESS", None)
        (root / "ray").mkdir()
        self.stderr = root / "cluster.err"
        self.seen: dict[int, psutil.Process] = {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> None:
        ports = [str(free_port()) for _ in range(3)]
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CLUSTER, *ports, str(self.root)],
                cwd=self.root,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        self.seen[self.proc.pid] = psutil.Process(self.proc.pid)
        info = self._answer(timeout)
        self.address, self.dashboard = info["address"], info["dashboard"]
        self.head_id, self.worker_id = info["head"], info["worker"]
        assert info["node_ips"] == ["127.0.0.1", "127.0.0.1"], info
        assert self.dashboard == f"http://127.0.0.1:{ports[0]}", info
        self.note()

    def _answer(self, timeout: float) -> dict:
        """The cluster script's next JSON line (it reads nothing else from its stdout)."""
        deadline = time.time() + timeout
        line = ""
        while not line and self.proc.poll() is None and time.time() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1)
            line = self.proc.stdout.readline() if ready else ""
        assert line, f"the cluster script did not answer (rc {self.proc.poll()}):\n{self.stderr.read_text()[-4000:]}"
        return json.loads(line)

    def note(self) -> list[psutil.Process]:
        """Remember every process below the cluster script (the raylets' workers come and go)."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return list(self.seen.values())

    def crash_worker(self) -> None:
        """The worker node's machine is lost: SIGKILL its raylet, agents and workers at once."""
        self.note()
        self.proc.stdin.write("crash\n")
        self.proc.stdin.flush()
        answer = self._answer(120)
        assert answer == {"crashed": self.worker_id, "alive": []}, answer

    def stop(self) -> list[str]:
        """Shut the cluster down, then SIGKILL whatever of it is left; returns the names of what had to be killed."""
        if self.proc is None:
            return []
        processes = self.note()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        _, alive = psutil.wait_procs(processes, timeout=60)
        names = []
        for process in alive:
            try:
                names.append(process.name())
            except psutil.NoSuchProcess:
                pass
        kill_all(alive)
        self.proc.wait(timeout=10)
        return names

    def api(self, path: str):
        """GET the head's dashboard, with the token (with token auth on, every /api/* needs it)."""
        request = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {TOKEN_FILE.read_text().strip()}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def state(self, kind: str) -> list[dict]:
        """The state API's list of ``kind`` (nodes, actors), in detail, dead ones included."""
        answer = self.api(f"/api/v0/{kind}?detail=1&limit=10000")
        assert answer["result"], answer
        return answer["data"]["result"]["result"]

    def jobs(self) -> list[dict]:
        return self.api("/api/jobs/")

    def job(self, name: str) -> dict:
        jobs = self.jobs()
        named = [j for j in jobs if (j.get("metadata") or {}).get("job_name") == name]
        assert len(named) == 1, [(j.get("job_id"), j.get("metadata")) for j in jobs]
        return named[0]


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="tbmn-", dir="/tmp"))  # short: Ray's socket paths lie below it
    started = Cluster(root)
    try:
        started.start()
        assert TOKEN_FILE.is_file(), "token auth is on, yet ~/.ray/auth_token is missing"
        nodes = {n["node_id"]: n for n in started.state("nodes") if n["state"] == "ALIVE"}
        assert set(nodes) == {started.head_id, started.worker_id}, nodes
        assert all(n["resources_total"].get("CPU") == 1 for n in nodes.values()), nodes
        yield started
    finally:
        left = started.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"the cluster's processes outlived its shutdown: {left}"


class Driver:
    """``python -m toolbox.<module> ...`` in a session of its own, its output in a file; killed on exit if still running."""

    def __init__(self, out: Path, module: str, *args: str):
        self.out = out
        with open(out, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"toolbox.{module}", *args],
                cwd=ROOT,
                env=python_env(**LOOPBACK),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                below = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                below = []
            kill_all([psutil.Process(self.proc.pid), *below])
        self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.output()[-4000:]}") from None


def started_on(trial_dir: Path) -> list[str]:
    """The node ids of a trial's starts, in order (a retried trial starts again)."""
    log = trial_dir / "training.log"
    return STARTED_ON.findall(log.read_text()) if log.exists() else []


def trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(exp_dir.glob("run_trial_*"))


def write_sweep(directory: Path, name: str, text: str) -> Path:
    """The sweep file, and beside it the user's module that it imports (``SPREAD_MODELS``)."""
    (directory / "spread_models.py").write_text(SPREAD_MODELS)
    path = directory / f"{name}.py"
    path.write_text(text)
    return path


def finished_rows(exp_dir: Path, trials: int) -> list[dict]:
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == trials and len({r["trial_id"] for r in rows}) == trials, rows
    assert all(r["status"] in ("done", "stopped") and r["epochs"] >= 1 for r in rows), rows
    return rows


@pytest.mark.timeout(600)
def test_a_two_worker_ddp_run_puts_one_worker_on_each_node(cluster, tmp_path):
    args = ["--workers", "2", "--cpus-per-worker", "1", "--dummy-n-samples", "2048", "--ff-hidden-sizes", "32"]
    args += ["--epochs", "3", "--storage", str(tmp_path), "--name", "ddp", "--address", cluster.address]
    with Driver(tmp_path / "run.out", "run", *args) as driver:
        code = driver.wait(480)
    out = driver.output()
    assert code == 0, out[-4000:]
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"], out[-4000:]
    job = cluster.job("toolbox.run ddp")
    workers = [a for a in cluster.state("actors") if a["class_name"] == "RayTrainWorker" and a["job_id"] == job["job_id"]]
    assert len(workers) == 2, workers  # one worker group, never restarted
    assert {a["node_id"] for a in workers} == {cluster.head_id, cluster.worker_id}, workers


# About half a second an epoch on one thread, so a trial lasts seconds: longer than a trial actor takes to
# start on the other node (trials of milliseconds all run on the first node up, Tune reusing its actor),
# and long enough to lose a node in.
# The model is the user's own: the worker node gets its module through Ray's runtime_env, not a shared disk.
SPREAD_MODELS = """\
import math
from torch import nn
from toolbox.components.models import MODELS


@MODELS.register("SpreadNet")
def spread_net(sample_shape, num_classes, /) -> nn.Module:
    \"\"\"One hidden layer of 32.\"\"\"
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(sample_shape), 32), nn.ReLU(), nn.Linear(32, num_classes))
"""
SWEEP = """\
from ray import tune
import spread_models
base = {"dummy_n_samples": 4000, "dummy_val_n_samples": 256, "arch": "SpreadNet", "batch_size": 8}
space = {"lr": tune.grid_search([1e-3, 2e-3, 3e-3, 4e-3])}
num_samples = 1
epochs = 8
trial_scheduler = "fifo"
max_concurrent = 2
"""


@pytest.fixture(scope="module")
def spread_sweep(cluster, tmp_path_factory) -> tuple[Path, str]:
    """A 4-trial sweep, 2 at a time (1 CPU each), driven from outside the cluster; its dir and output."""
    storage = tmp_path_factory.mktemp("spread")
    path = write_sweep(storage, "spread", SWEEP)
    with Driver(storage / "sweep.out", "sweep", str(path), "--storage", str(storage), "--address", cluster.address) as driver:
        code = driver.wait(480)
    assert code == 0, driver.output()[-4000:]
    return storage / "spread", driver.output()


@pytest.mark.timeout(600)
def test_a_sweeps_trials_run_on_both_nodes(cluster, spread_sweep):
    exp_dir, _ = spread_sweep
    finished_rows(exp_dir, 4)
    nodes = {node for trial in trial_dirs(exp_dir) for node in started_on(trial)}
    assert nodes == {cluster.head_id, cluster.worker_id}, nodes


@pytest.mark.timeout(600)
def test_the_users_own_model_reaches_every_node_through_the_runtime_env(spread_sweep):
    exp_dir, out = spread_sweep
    for trial in trial_dirs(exp_dir):
        imported = [line for line in (trial / "training.log").read_text().splitlines() if " user code: " in line]
        assert imported and all("runtime_resources" in line for line in imported), imported  # the shipped copy
    assert all(json.loads(r["config"])["arch"] == "SpreadNet" for r in finished_rows(exp_dir, 4))
    assert "--import" in json.loads((exp_dir / "best.json").read_text())["command"], out[-2000:]


@pytest.mark.timeout(600)
def test_the_sweep_drivers_job_is_on_the_dashboards_jobs_api_under_its_name(cluster, spread_sweep):
    job = cluster.job("toolbox.sweep spread")
    assert job["type"] == "DRIVER" and job["status"] == "SUCCEEDED", job
    assert job["driver_info"]["pid"], job


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_a_sweep_with_token_auth(cluster, tmp_path):
    work = tmp_path / "working_dir"
    for part in ("toolbox", "sweeps"):
        shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
    storage = tmp_path / "results"
    env = {**os.environ, **LOOPBACK, "RAY_AUTH_MODE": "token"}
    done = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(work), "--"]
        + ["python", "-m", "toolbox.sweep", "sweeps/smoke.py", "--storage", str(storage)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    finished_rows(storage / "smoke", 4)
    submitted = [j for j in cluster.jobs() if j["type"] == "SUBMISSION" and "sweeps/smoke.py" in (j.get("entrypoint") or "")]
    assert len(submitted) == 1 and submitted[0]["status"] == "SUCCEEDED", submitted


def running_on(exp_dir: Path, node_id: str) -> list[Path]:
    """The trials last started on ``node_id`` that have finished an epoch there (so have a checkpoint) but not the last."""
    running = []
    for trial in trial_dirs(exp_dir):
        starts = started_on(trial)
        if starts and starts[-1] == node_id:
            after = (trial / "training.log").read_text().split(f"trial started on node {node_id}")[-1]
            if " epoch " in after and " epoch 8/8 " not in after:
                running.append(trial)
    return running


@pytest.mark.timeout(900)
def test_a_sweep_that_loses_the_worker_node_finishes_on_the_head_with_every_trial(cluster, tmp_path):
    """Last in this module: it leaves the cluster without its worker node."""
    path = write_sweep(tmp_path, "survivor", SWEEP)
    exp_dir = tmp_path / "survivor"
    with Driver(tmp_path / "sweep.out", "sweep", str(path), "--storage", str(tmp_path), "--address", cluster.address) as driver:
        deadline = time.time() + 300
        while driver.running() and time.time() < deadline and not running_on(exp_dir, cluster.worker_id):
            time.sleep(0.2)
        assert running_on(exp_dir, cluster.worker_id), f"no trial ran an epoch on the worker node:\n{driver.output()[-4000:]}"
        cluster.crash_worker()
        code = driver.wait(600)
    out = driver.output()
    assert code == 0, out[-4000:]
    rows = finished_rows(exp_dir, 4)
    assert all(r["status"] == "done" and r["epochs"] == 8 for r in rows), rows  # fifo: every trial runs all its epochs
    assert sum(r["retries"] for r in rows) >= 1 and "retrying it from its latest checkpoint" in out, rows
    moved = [t for t in trial_dirs(exp_dir) if cluster.worker_id in started_on(t)[:-1] and started_on(t)[-1] == cluster.head_id]
    assert moved, {t.name: started_on(t) for t in trial_dirs(exp_dir)}  # retried on the head, the one node left
    for trial in moved:  # from its checkpoint: every epoch once
        assert [int(r["epoch"]) for r in read_rows(trial)] == list(range(1, 9)), (trial / "training.log").read_text()
    deadline = time.time() + 120  # Ray's health checks mark a lost node dead within about 30 s
    while (alive := [n["node_id"] for n in cluster.state("nodes") if n["state"] == "ALIVE"]) != [cluster.head_id]:
        assert time.time() < deadline, alive
        time.sleep(2)
