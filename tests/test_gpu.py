"""On a CUDA GPU: toolbox.run --use-gpu, checkpoints moving between GPU and CPU, and a fused group.
Marked ``gpu``: skipped where torch sees no CUDA device (conftest.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, TINY_DUMMY, latest_state, python_env

from toolbox.config.resolve import resolve
from toolbox.training.builders import build_dataset
from toolbox.training.fused import FusedGroup
from toolbox.training.loop import train
from toolbox.training.session import local_session

pytestmark = pytest.mark.gpu
RUN = ["--dummy-n-samples", "512", "--ff-hidden-sizes", "32", "--batch-size", "32"]


def run(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "toolbox.run", *args], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.timeout(400)
def test_a_gpu_run_resumes_on_the_cpu_and_a_cpu_run_on_the_gpu(tmp_path):
    run(*RUN, "--use-gpu", "--epochs", "2", "--storage", str(tmp_path), "--name", "gpu")
    assert latest_state(tmp_path / "gpu")["epoch"] == 2
    run("--resume", str(tmp_path / "gpu"), "--no-use-gpu", "--epochs", "3", "--storage", str(tmp_path), "--name", "on-cpu")
    assert latest_state(tmp_path / "on-cpu")["epoch"] == 3
    run("--resume", str(tmp_path / "on-cpu"), "--use-gpu", "--epochs", "4", "--storage", str(tmp_path), "--name", "back-on-gpu")
    state = latest_state(tmp_path / "back-on-gpu")
    assert state["epoch"] == 4 and all(t.device.type == "cpu" for t in state["model"].values())  # saved for any device


def test_a_fused_group_on_the_gpu_trains_like_its_members_alone():
    """Without dropout (the GPU's masks come from per-member device generators), to float tolerance."""
    configs = [resolve({**TINY_DUMMY, "epochs": 2, "batch_size": 16, "ff_hidden_sizes": (32,), "lr": lr}) for lr in (1e-3, 3e-3)]
    data = build_dataset(configs[0])
    fused_rows: list[list[dict]] = [[], []]
    group = FusedGroup(data)
    for config, rows in zip(configs, fused_rows):
        group.add(config, local_session(lambda metrics, _dir, rows=rows: rows.append(metrics), "cuda"))
    group.run()
    for config, rows in zip(configs, fused_rows):
        alone: list[dict] = []
        train(config, data, local_session(lambda metrics, _dir, alone=alone: alone.append(metrics), "cuda"))
        for x, y in zip(rows, alone):
            assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-4)
    assert len(fused_rows[0]) == 2
