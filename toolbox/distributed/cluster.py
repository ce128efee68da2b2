"""Starting (or joining) Ray: a private local Ray on loopback, or an existing cluster."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import shutil
import socket
import sys
import warnings
from pathlib import Path

from toolbox.config import user_code
from toolbox.config.registry import ConfigError
from toolbox.distributed import reaper, signals, watchdog
from toolbox.training.epochlog import replace_file

log = logging.getLogger("toolbox")
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_own_session: list[tuple[str, bool]] = []  # the session dir of the local Ray this process started, and whether to keep it


def free_port() -> int:
    """A port free on 127.0.0.1 between Ray's worker ports and the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` can be taken by any outgoing connection before the
    server that was meant to get it binds it; ports below the ephemeral range are only ever bound on purpose."""
    first_ephemeral = _first_ephemeral_port()
    for _ in range(1000):
        port = _port_draws.randrange(_FIRST_OWN_PORT, first_ephemeral)
        if port in _ports_given:  # given to a server of this process that may not have bound it yet
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise OSError(f"no free port on 127.0.0.1 between {_FIRST_OWN_PORT} and {first_ephemeral}")


_FIRST_OWN_PORT = 20000  # below it: Ray's client server (10001) and the worker ports a cluster's nodes often reserve
# Not Python's shared random: a sweep seeds that, and sweeps of one seed would all draw the same ports.
_port_draws = random.SystemRandom()
_ports_given: set[int] = set()


def _first_ephemeral_port() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(int(f.read().split()[0]), _FIRST_OWN_PORT + 1000)
    except (OSError, ValueError, IndexError):  # not Linux: IANA's dynamic range
        return 49152


def dashboard_available() -> bool:
    """Ray's dashboard needs ray[default]'s extras; without them ray.init(include_dashboard=True) fails."""
    return all(importlib.util.find_spec(name) for name in ("aiohttp_cors", "opencensus"))


def quiet_ray(verbose: bool = False) -> None:
    """Keep the console to our own lines: Ray's progress tables, banners and deprecation chatter off."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 the legacy reporter prints nothing
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):  # toolbox says what failed, in one line
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.CRITICAL)


def _set_up_local_ray(log_monitor: bool) -> None:
    """Make every server of the local Ray listen on 127.0.0.1 and on ports chosen free, start Ray's
    log monitor only when ``log_monitor`` (it only forwards worker output to the driver), and never
    the autoscaler's monitor (a private Ray has no nodes to add).

    Ray binds GCS, the raylet, workers and the dashboard agent to loopback only when the node's IP
    is loopback, which on Linux it allows only in its single-machine mode (the switch below, read
    by Ray at call time and by the processes it starts). Three ports are fixed defaults in Ray; a
    second Ray on the host holding them disables the log views, so they are picked free here.

    Its processes start in process groups of their own: a signal to the driver's group (``timeout``
    sends its SIGTERM there) would otherwise kill the raylet under the driver, which then waits
    forever on it while ending the sweep."""
    import ray._private.parameter
    import ray._private.ray_constants
    import ray._private.services

    popen = ray._private.services.ConsolePopen
    if not getattr(popen, "toolbox_own_group", False):

        class ConsolePopen(popen):
            toolbox_own_group = True

            def __init__(self, *args, **kwargs):
                kwargs.setdefault("process_group", 0)
                super().__init__(*args, **kwargs)

        ray._private.services.ConsolePopen = ConsolePopen

    os.environ[ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["DASHBOARD_METRIC_PORT"] = str(free_port())
    os.environ["AUTOSCALER_METRIC_PORT"] = str(free_port())
    base = ray._private.parameter.RayParams
    if not getattr(base, "toolbox_local_ray", False):

        class RayParams(base):  # ray.init takes neither the agent's HTTP port (fixed 52365) nor the monitors' switches
            toolbox_local_ray = True
            log_monitor = True

            def __init__(self, *args, **kwargs):
                if kwargs.get("gcs_address") is None:
                    kwargs.setdefault("dashboard_agent_listen_port", free_port())
                    kwargs.setdefault("include_log_monitor", type(self).log_monitor)
                    kwargs.setdefault("no_monitor", True)  # the autoscaler's monitor: a private Ray adds no nodes
                super().__init__(*args, **kwargs)

        ray._private.parameter.RayParams = base = RayParams
    base.log_monitor = log_monitor


def start(
    address: str | None,
    *,
    job_name: str,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: bool = False,
    dashboard: bool = True,
    dashboard_host: str = "127.0.0.1",
    extra_resources: dict | None = None,
) -> str | None:
    """Start a private local Ray (or join ``address``); returns the dashboard URL when we started one.

    A local Ray binds every port to 127.0.0.1 (the dashboard to ``dashboard_host``) and points
    ``RAY_API_SERVER_ADDRESS`` at its dashboard: without that, Train-in-Tune leaks a worker CPU at
    every trial end and the sweep waits forever (ray-project/ray#54305). The
    driver's job is named ``job_name`` on the dashboard's Jobs page.
    """
    import ray
    from ray.job_config import JobConfig

    quiet_ray(verbose)
    job_config = JobConfig(metadata={"job_name": job_name})
    pythonpath = os.pathsep.join(p for p in (PACKAGE_ROOT, *user_code.code_dirs(), os.environ.get("PYTHONPATH")) if p)
    if address:
        if "RAY_AUTH_MODE" not in os.environ:
            # Ray read its config when it was imported: have it read it again, as its own token setup does.
            os.environ["RAY_AUTH_MODE"] = "token"
            ray._raylet.Config.initialize("")
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # Train runs show in the cluster's dashboard
        try:
            with signals.taking_sigterm_in_ray_init():
                ray.init(
                    address=address,
                    job_config=job_config,
                    log_to_driver=verbose,
                    logging_level=logging.WARNING if verbose else logging.ERROR,
                    runtime_env=_cluster_runtime_env(),
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[0]})") from None
        return None
    dashboard = dashboard and dashboard_available()
    # Train runs show in the dashboard through a state actor of their own: none where no dashboard shows them.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1" if dashboard else "0")
    port = free_port()
    if dashboard:
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ["PYTHONPATH"] = pythonpath  # workers must import toolbox: the runtime env gives them no other path to it
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one machine has no node to be preempted
    # Train's controller takes one report per poll of its workers: short epochs were said, and a run ended, seconds late.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    _set_up_local_ray(log_monitor=verbose)
    with signals.taking_sigterm_in_ray_init():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=dashboard,
            dashboard_host=dashboard_host,
            dashboard_port=port,
            job_config=job_config,
            log_to_driver=verbose,
            logging_level=logging.WARNING if verbose else logging.ERROR,
            configure_logging=True,
            resources=extra_resources or None,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            # Per-handler timing in every Ray process's event loop, read only by Ray's debug dumps; and no idle
            # workers started with the driver, which no trial or task of ours can use (they lack its runtime env).
            _system_config={"event_stats": False, "prestart_worker_first_driver": False},
        )
    node = ray._private.worker._global_node
    _own_session[:] = [(node.get_session_dir_path(), verbose)]
    raylet = node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    logs = Path(node.get_session_dir_path()) / "logs"
    reaper.start(raylet, logs / "toolbox_reaper.log")
    messages = None if verbose else logs / "toolbox_driver_messages.log"
    if messages is not None:
        watchdog.messages_to_log(messages)
    watchdog.watch(node, messages)
    host = "127.0.0.1" if dashboard_host in ("127.0.0.1", "localhost") else dashboard_host
    return f"http://{host}:{port}" if dashboard else None


def _cluster_runtime_env() -> dict:
    """What every worker of a cluster gets: toolbox itself, and the user's Python files as a package of their own."""
    runtime_env: dict = {"py_modules": [str(Path(PACKAGE_ROOT) / "toolbox")]}
    shipped = user_code.shipped_code()
    if shipped:
        runtime_env = {"py_modules": [*runtime_env["py_modules"], shipped], "env_vars": {user_code.SHIPPED: "1"}}
    return runtime_env


def describe_session(directory: Path, url: str | None) -> None:
    """``ray_session.json`` in a run or sweep dir: where this Ray's logs and Prometheus targets are."""
    import ray

    node = ray._private.worker._global_node
    if node is None:  # joined a cluster: its head node has them
        return
    session = node.get_session_dir_path()
    info = {
        "dashboard": url,
        "session_dir": session,
        "prometheus_targets": str(Path(session) / "prom_metrics_service_discovery.json"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    replace_file(directory / "ray_session.json", json.dumps(info, indent=2).encode())


def stop() -> int:
    """Remove the placement groups this driver's job left behind, then shut Ray down; returns how many there were."""
    ray = sys.modules.get("ray")  # None where ray was never imported, or its import was interrupted: no Ray started
    watchdog.stop()
    if ray is None or not ray.is_initialized():
        return 0
    if signals.ended_for_failure():  # the local Ray is lost: nothing of it answers, and its session dir holds why
        _own_session.clear()
        ray.shutdown()
        return 0
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    left = [pg for pg, info in ray.util.placement_group_table().items() if pg.endswith(job) and info["state"] != "REMOVED"]
    for pg in left:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
    if left:
        log.warning("removed %d placement group(s) this job left behind", len(left))
    ray.shutdown()
    _remove_own_session()
    return len(left)


def _remove_own_session() -> None:
    """The session dir (logs, about 2 MB) of the local Ray this process started goes with it; ``--verbose`` keeps it."""
    if not _own_session:
        return
    session, keep = _own_session.pop()
    if keep:
        log.info("Ray's logs are kept in %s", session)
        return
    shutil.rmtree(session, ignore_errors=True)
    latest = Path(session).parent / "session_latest"
    if latest.is_symlink() and os.path.realpath(latest) == os.path.realpath(session):
        latest.unlink(missing_ok=True)


def given_address(address: str | None) -> str | None:
    """--address, else $RAY_ADDRESS; None for the private local Ray, which "local" names too (not a
    Ray of Ray's own defaults, listening on every interface)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def add_ray_flags(group) -> None:
    """The flags that decide where Ray runs and who can see it, shared by toolbox.run and toolbox.sweep."""
    group.add_argument(
        "--address",
        help="an existing Ray cluster, HOST:PORT (default: $RAY_ADDRESS, else a private local Ray); "
        "auto: the cluster you started on this host with `ray start`",
    )
    group.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start Ray's dashboard with a local Ray (default: on)",
    )
    group.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="the address the local dashboard listens on (default: 127.0.0.1; anyone who reaches it can run jobs)",
    )
    group.add_argument("--verbose", action="store_true", help="show Ray's own logs")


def announce(url: str | None, dashboard_host: str) -> None:
    """The dashboard's URL, and how to get past its token prompt, in one line."""
    if url:
        log.info("Ray dashboard: %s (it asks for a token: run `ray get-auth-token`, or read ~/.ray/auth_token)", url)
    if dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "the dashboard listens on %s: anyone who reaches it can run code as you (token auth stays on)", dashboard_host
        )


def check_capacity(
    workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    gpus_per_worker: float = 1.0,
    cpus: float | None = None,
    gpus: float | None = None,
) -> None:
    """Refuse a request Ray could never place (it would wait forever instead of failing)."""
    if cpus is None:
        cpus = float(len(os.sched_getaffinity(0)))  # what this process may use, not the host's count
    if gpus is None:
        import torch

        gpus = float(torch.cuda.device_count())
    if workers <= 0 or cpus_per_worker <= 0:
        raise ConfigError(f"--workers and --cpus-per-worker must be > 0, got {workers} and {cpus_per_worker}")
    if use_gpu and gpus == 0:
        raise ConfigError("--use-gpu: no GPU is visible (torch.cuda.device_count() == 0 here)")
    if workers * cpus_per_worker > cpus:
        raise ConfigError(
            f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} needs {workers * cpus_per_worker:g} CPUs; the cluster has {cpus:g}"
        )
    if use_gpu and workers * gpus_per_worker > gpus:
        raise ConfigError(f"--workers {workers} needs {workers * gpus_per_worker:g} GPUs; the cluster has {gpus:g}")
