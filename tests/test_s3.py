"""--storage s3://...: a real S3-compatible server on 127.0.0.1 (moto's standalone server, a pure-Python
S3 API that pip installs and a test starts in-process, where MinIO is neither on PyPI nor in Debian).

Trials write their checkpoints, epoch tables and results there; a sweep and a run resume from there."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pyarrow.fs
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, run_cli, start_cli

KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fs = pyarrow.fs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        allow_bucket_creation=True,
    )
    fs.create_dir("toolbox")  # the bucket
    yield fs, f"s3://toolbox/runs?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    server.stop()


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(module, *args, timeout=timeout, env=KEYS)


def files(fs, path: str) -> set[str]:
    return {info.path.removeprefix(path + "/") for info in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))}


@pytest.mark.timeout(400)
def test_a_sweep_writes_everything_to_s3_and_resumes_from_it(s3, tmp_path):
    fs, uri = s3
    sweep_file = tmp_path / "ons3.py"
    sweep_file.write_text(
        (ROOT / "sweeps" / "smoke.py").read_text().replace("num_samples = 4", "num_samples = 3\nmax_concurrent = 1")
    )
    driver = start_cli("sweep", str(sweep_file), "--storage", uri, "--seed", "2", env=KEYS)
    for line in driver.stdout:
        if line.startswith("[1/3]"):
            break
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out[-3000:]

    again = cli("sweep", str(sweep_file), "--storage", uri, "--seed", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing sweep ons3" in again.stdout
    stored = files(fs, "toolbox/runs/ons3")
    assert {"results.parquet", "results.csv", "best.json", "summary.json", "plots/val_metric.png"} <= stored
    assert any(name.startswith("experiment_state-") for name in stored)
    trials = sorted({name.split("/")[0] for name in stored if name.startswith("run_trial_")})
    assert len(trials) == 3
    for trial in trials:
        assert {"epochs.parquet", "training.log"} <= {n.removeprefix(trial + "/") for n in stored if n.startswith(trial + "/")}
        assert any(n.startswith(f"{trial}/checkpoint_") and n.endswith("state.pt") for n in stored), trial
    rows = pq.read_table("toolbox/runs/ons3/results.parquet", filesystem=fs).to_pylist()
    assert len(rows) == 3 and all(r["status"] in ("done", "stopped") for r in rows)
    best = json.loads(fs.open_input_stream("toolbox/runs/ons3/best.json").read())
    assert best["checkpoint"].startswith("toolbox/runs/ons3/run_trial_")


@pytest.mark.timeout(400)
def test_a_run_keeps_its_checkpoints_on_s3_and_a_same_name_rerun_continues(s3):
    fs, uri = s3
    args = ["--dummy-n-samples", "256", "--ff-hidden-sizes", "16", "--storage", uri, "--name", "onS3"]
    first = cli("run", *args, "--epochs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    shutil.rmtree(Path(tempfile.gettempdir()) / "toolbox-staging", ignore_errors=True)  # as on another machine
    second = cli("run", *args, "--epochs", "4")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    epochs = [line.split()[1] for line in second.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs == ["3/4", "4/4"], second.stdout  # continued at epoch 3 from the checkpoint on S3
    rows = pq.read_table("toolbox/runs/onS3/epochs.parquet", filesystem=fs).to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert any(n.endswith("state.pt") for n in files(fs, "toolbox/runs/onS3"))
