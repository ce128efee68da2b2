"""A live sweep seen from outside: the dashboard's jobs, actors and logs APIs, a real Prometheus scraping
Ray's metrics, the shipped Grafana dashboard's queries, and TensorBoard's own reader of the event files."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import ROOT, python_env

from toolbox.distributed.cluster import free_port
from toolbox.training.epochlog import read_rows

GRAFANA = ROOT / "toolbox" / "distributed" / "grafana_dashboard.json"
SLOW = """\
from ray import tune
base = {"dummy_n_samples": 6000, "dummy_val_n_samples": 256, "ff_hidden_sizes": (32,), "batch_size": 8}
space = {"lr": tune.grid_search([1e-3, 2e-3])}
num_samples = 1
epochs = 40
trial_scheduler = "fifo"
max_concurrent = 2
"""


def get(url: str, headers: dict | None = None) -> dict | list | str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
        body = response.read().decode()
    try:
        return json.loads(body)
    except ValueError:
        return body


def token_headers() -> dict:
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def eventually(check, timeout: float = 120, every: float = 1.0):
    """``check()`` until it returns something truthy (then that), or fail with its last exception."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            found = check()
            if found:
                return found
        except Exception as exc:  # noqa: BLE001 - not there yet
            last = exc
        time.sleep(every)
    raise AssertionError(f"not seen within {timeout:.0f} s (last error: {last!r})")


@pytest.fixture
def live_sweep(tmp_path):
    """A two-trial sweep left running (its trials train for minutes); stopped with Ctrl-C at the end."""
    path = tmp_path / "watched.py"
    path.write_text(SLOW)
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolbox.sweep", str(path), "--storage", str(tmp_path)],
        cwd=ROOT,
        env=python_env(RAY_metrics_report_interval_ms="1000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    exp_dir = tmp_path / "watched"
    session = eventually(lambda: json.loads((exp_dir / "ray_session.json").read_text()), timeout=180)
    yield proc, exp_dir, session
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]


@pytest.fixture
def prometheus(tmp_path):
    """Debian's prometheus, scraping the targets a Ray session lists, every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port = free_port()

    def start(targets_file: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: ray\n    file_sd_configs: [{{files: ['{targets_file}'], refresh_interval: 1s}}]\n"
        )
        start.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return f"http://127.0.0.1:{port}"

    yield start
    if hasattr(start, "proc"):
        start.proc.terminate()
        start.proc.wait(timeout=30)


def query(prometheus_url: str, expr: str) -> list:
    answer = get(f"{prometheus_url}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.timeout(600)
def test_a_live_sweep_shows_in_the_dashboard_prometheus_and_grafanas_queries(live_sweep, prometheus):
    proc, exp_dir, session = live_sweep
    url, headers = session["dashboard"], token_headers()

    jobs = get(f"{url}/api/jobs/", headers)
    assert "toolbox.sweep watched" in [job.get("metadata", {}).get("job_name") for job in jobs]

    def trial_actors():
        actors = get(f"{url}/api/v0/actors?detail=1&limit=1000", headers)["data"]["result"]["result"]
        found = [a for a in actors if a.get("repr_name", "").startswith("run_trial[") and a["state"] == "ALIVE"]
        return found if len(found) == 2 else None

    actors = eventually(trial_actors)
    names = {a["repr_name"][len("run_trial[") : -1] for a in actors}
    dirs = [d.name for d in exp_dir.glob("run_trial_*")]
    assert len(dirs) == 2 and all(any(d.startswith(f"{n}_") for d in dirs) for n in names), (names, dirs)  # by trial name

    def epoch_lines_in_the_actors_log():
        text = get(f"{url}/api/v0/logs/file?actor_id={actors[0]['actor_id']}&lines=200", headers)
        return "epoch 1/40" in str(text)

    eventually(epoch_lines_in_the_actors_log)

    prometheus_url = prometheus(session["prometheus_targets"])
    series = eventually(lambda: query(prometheus_url, 'ray_toolbox_val_loss{sweep="watched"}') or None, timeout=180)
    assert {s["metric"]["trial"] for s in series} == names
    for key in ("epoch", "lr", "train_loss", "val_loss", "val_top_1_accuracy", "val_top_5_accuracy", "epoch_s"):
        assert query(prometheus_url, f'ray_toolbox_{key}{{sweep="watched"}}'), key

    # The shipped Grafana dashboard's panels, with its variables set to every value, all find data.
    dashboard = json.loads(GRAFANA.read_text())
    for panel in dashboard["panels"]:
        expr = panel["targets"][0]["expr"].replace("$sweep", ".*").replace("$trial", ".*")
        assert query(prometheus_url, expr), panel["title"]
    assert proc.poll() is None, "the sweep ended before it was watched"


def test_tensorboard_reads_the_scalars_and_hparams_of_every_trial(tmp_path):
    """TensorBoard's own reader on what a sweep's EpochLog writes: a scalar per epoch and the HParams summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    proc = subprocess.run(
        [sys.executable, "-m", "toolbox.sweep", str(ROOT / "sweeps" / "smoke.py"), "--storage", str(tmp_path), "--seed", "1"],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted((tmp_path / "smoke").glob("run_trial_*"))
    configs = {
        Path(r["trial_dir"]).name: json.loads(r["config"])
        for r in pq.read_table(tmp_path / "smoke" / "results.parquet").to_pylist()
    }
    assert len(trials) == 4
    for trial in trials:
        events = EventAccumulator(str(trial), size_guidance={"scalars": 0})
        events.Reload()
        rows = read_rows(trial)
        val_loss = [(e.step, e.value) for e in events.Scalars("val_loss")]
        assert val_loss == [(r["epoch"], pytest.approx(r["val_loss"], rel=1e-6)) for r in rows]
        assert "val_top_1_accuracy" in events.Tags()["scalars"]
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        config = configs[trial.name]
        assert start.hparams["optimizer"].string_value == config["optimizer"]
        assert start.hparams["lr"].number_value == pytest.approx(config["lr"])
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        # Every objective a sweep may rank by has its column: the metrics, the model's size and an epoch's time.
        assert {"val_top_1_accuracy", "val_loss", "train_loss", "params", "epoch_s"} <= {
            m.name.tag for m in experiment.metric_infos
        }
