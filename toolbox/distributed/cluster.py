"""Starting (or joining) Ray the way that works here; see ../shared/RAY-NOTES.md for the traps."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import warnings
from pathlib import Path

from toolbox.config.registry import ConfigError

log = logging.getLogger(__name__)
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_available() -> bool:
    """Ray's dashboard needs ray[default]'s extras; without them ray.init(include_dashboard=True) fails."""
    return all(importlib.util.find_spec(name) for name in ("aiohttp_cors", "opencensus"))


def quiet_ray() -> None:
    """Keep the console to our own lines: Ray's progress tables, banners and deprecation chatter off."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 the legacy reporter prints nothing
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # Train runs show in the dashboard
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def start(
    address: str | None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: bool = False,
    extra_resources: dict | None = None,
) -> str | None:
    """Start a private local Ray (or join ``address``); returns the dashboard URL when we started one.

    A local Ray always gets its dashboard on a free 127.0.0.1 port and ``RAY_API_SERVER_ADDRESS``
    pointing at it: without that, Train-in-Tune leaks a worker CPU at every trial end and the sweep
    waits forever (ray-project/ray#54305, RAY-NOTES trap 8).
    """
    import ray

    quiet_ray()
    pythonpath = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        try:
            ray.init(
                address=address,
                log_to_driver=verbose,
                logging_level=logging.WARNING if verbose else logging.ERROR,
                runtime_env={"py_modules": [str(Path(PACKAGE_ROOT) / "toolbox")]},
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[0]})") from None
        return None
    port = free_port()
    dashboard = dashboard_available()
    if dashboard:
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    else:
        log.warning("Ray's dashboard is off: its dependencies are missing (pip install 'ray[default]')")
    os.environ["PYTHONPATH"] = pythonpath  # workers must import toolbox (trap 3)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=verbose,
        logging_level=logging.WARNING if verbose else logging.ERROR,
        configure_logging=True,
        resources=extra_resources or None,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    return f"http://127.0.0.1:{port}" if dashboard else None


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
