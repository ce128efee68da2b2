"""Load: many trials, and several toolbox drivers with private Rays on one machine at once. Each accounts
for all its work, and leaves no Ray process and no placement group behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from helpers import start_cli

TINY = """\
from ray import tune
base = {"dummy_n_samples": 128, "dummy_val_n_samples": 32, "dummy_input_shape": (8,), "ff_hidden_sizes": (8,), "batch_size": 32}
space = {"lr": tune.loguniform(1e-3, 1e-1), "optimizer": tune.choice(["adamw", "sgd"])}
epochs = 2
max_concurrent = 2
"""


class Driver:
    """A toolbox CLI in its own session; remembers every process below it, to check none outlives it."""

    def __init__(self, module: str, *args: str):
        self.proc = start_cli(module, *args, dashboard=True)  # each Ray's own dashboard, on a port of its own
        self.seen: dict[int, psutil.Process] = {}

    def watch(self) -> bool:
        """Note the processes below the driver; False once it has exited."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return self.proc.poll() is None

    def output(self) -> str:
        return self.proc.stdout.read()


def run_together(drivers: list[Driver], timeout: float) -> list[str]:
    deadline = time.time() + timeout
    while any([d.watch() for d in drivers]) and time.time() < deadline:  # a list: every driver is watched each round
        time.sleep(0.5)
    outputs = [d.output() for d in drivers]
    for driver, out in zip(drivers, outputs):
        assert driver.proc.wait(timeout=5) == 0, out[-3000:]
        assert driver.seen, "no process was seen below the driver"
        _, alive = psutil.wait_procs(list(driver.seen.values()), timeout=30)
        assert not alive, f"left running: {[p.name() for p in alive]}"
    return outputs


def sweep_file(tmp_path: Path, name: str, extra: str = "") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(TINY + extra)
    return path


def assert_sweep_accounts_for_every_trial(exp_dir: Path, trials: int) -> None:
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == trials and len({r["trial_id"] for r in rows}) == trials
    assert all(r["status"] in ("done", "stopped") and r["epochs"] >= 1 for r in rows), [r["status"] for r in rows]
    assert json.loads((exp_dir / "summary.json").read_text())["placement_groups_left"] == 0


@pytest.mark.timeout(600)
def test_a_64_trial_sweep_at_concurrency_2_accounts_for_every_trial(tmp_path):
    driver = Driver("sweep", str(sweep_file(tmp_path, "many", "num_samples = 64\n")), "--storage", str(tmp_path))
    run_together([driver], timeout=540)
    assert_sweep_accounts_for_every_trial(tmp_path / "many", 64)


@pytest.mark.timeout(600)
def test_two_sweeps_and_a_run_with_private_rays_at_once_do_not_disturb_each_other(tmp_path):
    drivers = [
        Driver("sweep", str(sweep_file(tmp_path, "first", "num_samples = 4\nmax_concurrent = 1\n")), "--storage", str(tmp_path)),
        Driver("sweep", str(sweep_file(tmp_path, "second", "num_samples = 4\nmax_concurrent = 1\n")), "--storage", str(tmp_path)),
        Driver(
            "run",
            "--epochs",
            "3",
            "--dummy-n-samples",
            "256",
            "--ff-hidden-sizes",
            "16",
            "--storage",
            str(tmp_path),
            "--name",
            "beside",
        ),
    ]
    outputs = run_together(drivers, timeout=540)
    for name in ("first", "second"):
        assert_sweep_accounts_for_every_trial(tmp_path / name, 4)
    assert [line.split()[0:2] for line in outputs[2].splitlines() if line.startswith("epoch ")] == [
        ["epoch", "1/3"],
        ["epoch", "2/3"],
        ["epoch", "3/3"],
    ]
    assert json.loads((tmp_path / "beside" / "summary.json").read_text())["placement_groups_left"] == 0
    dashboards = {line.split()[2] for out in outputs for line in out.splitlines() if line.startswith("Ray dashboard:")}
    assert len(dashboards) == 3, dashboards  # each its own Ray, on its own free port
