"""toolbox.bench end to end on tiny MNIST files, and its harness for the original toolbox."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ROOT, python_env

from toolbox.bench.baselines import original_toolbox_epoch_s

# Two epochs per timed run: a figure of one try (the second epoch) is enough to check that every row is made.
BENCH = [sys.executable, "-m", "toolbox.bench", "--run-epochs", "2"]


def test_bench_data_section_prints_every_row_with_its_baseline(tiny_mnist, tmp_path):
    root, _ = tiny_mnist
    out = tmp_path / "bench"
    done = subprocess.run(
        [*BENCH, "--only", "data", "--mnist-root", str(root), "--out", str(out)],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    figures = [row["figure"] for row in rows]
    assert len(figures) == 6, figures
    assert any("plain PyTorch loop" in f and "1 thread" in f for f in figures)
    assert any("`toolbox.run` vs the original" in f for f in figures)
    bare = next(r for r in rows if "vs the bare float32 loop (train + val)" in r["figure"])
    assert bare["target"] == "<= 1.15", bare
    mixed = next(r for r in rows if "--precision bf16-mixed" in r["figure"])
    assert mixed["target"] == "report" and "at 32-true" in mixed["note"] and "CPU bfloat16 units:" in mixed["note"], mixed
    for row in rows:
        assert row["toolbox"] > 0 and row["baseline"] > 0, row
        assert math.isclose(row["ratio"], row["toolbox"] / row["baseline"]), row
        assert f"| {row['figure']} |" in done.stdout  # the markdown table carries every row
    assert "rebuilt" in next(r["note"] for r in rows if "`toolbox.run` vs the original" in r["figure"])


def test_bench_datapath_section_reports_the_dataloader_and_augmentation_rows(tiny_mnist, tmp_path):
    root, _ = tiny_mnist
    out = tmp_path / "bench"
    done = subprocess.run(
        [*BENCH, "--only", "datapath", "--mnist-root", str(root), "--out", str(out)],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    figures = [row["figure"] for row in rows]
    assert len(figures) == 3, figures
    assert any("map-style Dataset and a DataLoader vs the same data as tensors" in f for f in figures)
    assert any("1 worker process" in f for f in figures)
    assert any("random_crop + horizontal_flip vs without" in f and "ConvNet" in f for f in figures)
    for row in rows:
        assert row["target"] == "report" and row["toolbox"] > 0 and row["baseline"] > 0, row
        assert f"| {row['figure']} |" in done.stdout


def test_tensor_splits_read_the_tensors_batches():
    """Sample by sample through a DataLoader, the batches are TensorData's, normalized alike."""
    from toolbox.components.datasets import dummy_dataset
    from toolbox.data.splits import tensor_splits

    data = dummy_dataset(0, n_samples=40, val_n_samples=8, input_shape=(1, 4, 4))
    data.scale, data.mean, data.std = 0.5, 0.1, 2.0
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for (x, y), (sx, sy) in zip(data.batches("train", order, 16), tensor_splits(data).batches("train", order, 16), strict=True):
        assert torch.allclose(x, sx) and torch.equal(y, sy)


def fake_original(checkout: Path, body: str) -> Path:
    """A train.py that behaves like the original toolbox's at its edges: a training.log under ./outputs/<timestamp>/."""
    checkout.mkdir()
    (checkout / "train.py").write_text(
        textwrap.dedent(
            """
            import logging, pathlib, sys, time
            out = pathlib.Path("outputs/2026-01-01_00-00-00")
            out.mkdir(parents=True)
            logging.basicConfig(filename=out / "training.log", level=logging.INFO,
                                format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
            log = logging.getLogger("trainer")
            assert sys.argv[sys.argv.index("--batch-size") + 1] == "128"
            """
        )
        + textwrap.dedent(body)
    )
    return checkout


def test_original_toolbox_epochs_are_timed_between_its_log_lines(tmp_path):
    """Its epochs start at 0.0, 0.6 and 0.9 s by the log's own timestamps: the best epoch took 0.3 s."""
    body = """
        for epoch, stamp in enumerate(["00:00:00,000", "00:00:00,600", "00:00:00,900"]):
            with open(out / "training.log", "a") as f:
                f.write(f"2026-01-01 {stamp} | INFO | trainer | Epoch: {epoch}\\n")
    """
    checkout = fake_original(tmp_path / "original", body)
    assert original_toolbox_epoch_s(str(checkout), str(tmp_path), 128, epochs=3) == pytest.approx(0.3)


def test_original_toolbox_failures_say_what_happened(tmp_path):
    checkout = fake_original(tmp_path / "original", 'sys.exit("no MNIST under --mnist-root")')
    with pytest.raises(RuntimeError, match="no MNIST under --mnist-root"):
        original_toolbox_epoch_s(str(checkout), str(tmp_path), 128)
    with pytest.raises(FileNotFoundError, match="no train.py"):
        original_toolbox_epoch_s(str(tmp_path / "nowhere"), str(tmp_path), 128)
    short = fake_original(tmp_path / "short", 'log.info("Epoch: 0")')
    with pytest.raises(RuntimeError, match="1 epoch lines, expected 3"):
        original_toolbox_epoch_s(str(short), str(tmp_path), 128)
