"""Full runs of ``toolbox.run`` on a real local Ray (each run pays ~20 s of Ray and worker start-up: keep them few)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
import torch.nn.functional as F
from helpers import assert_same_weights, latest_state, train_locally

from toolbox.config.resolve import resolve
from toolbox.data.tensors import DataSpec
from toolbox.run import main, prepare
from toolbox.training.builders import build_dataset, build_model
from toolbox.training.checkpoint import find_checkpoint

# The epoch table's columns, in this order (others, e.g. global_step, may come in between or after).
COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_top_1_accuracy", "val_top_5_accuracy", "epoch_s", "samples_per_s"]


def toolbox_run(storage: Path, name: str, *argv: str) -> Path:
    """``python -m toolbox.run ARGV --storage STORAGE --name NAME`` in this process; returns the run dir."""
    try:
        assert main([*argv, "--storage", str(storage), "--name", name, "--no-dashboard"]) == 0
    finally:
        if ray.is_initialized():  # main shuts Ray down; a failed assert or a timeout may not get there
            ray.shutdown()
    assert not ray.is_initialized()
    return storage / name


def read_csv(run_dir: Path) -> tuple[list[str], list[dict]]:
    with open(run_dir / "epochs.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: float(v) for k, v in row.items()} for row in reader]
        return list(reader.fieldnames or []), rows


def has_columns(columns: list[str]) -> bool:
    return [c for c in columns if c in COLUMNS] == COLUMNS


def checkpoint_epochs(run_dir: Path) -> dict[int, Path]:
    dirs = [p.parent for p in run_dir.glob("checkpoint_*/state.pt")]
    return {json.loads((d / "meta.json").read_text())["epoch"]: d for d in dirs}


@torch.no_grad()
def evaluate(state: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, top-1 %) of a checkpoint's model on already-normalized inputs."""
    model = build_model(state["config"], DataSpec(tuple(x.shape[1:]), 10))
    model.load_state_dict(state["model"])
    logits = model.eval()(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item() * 100


@pytest.mark.timeout(240)
def test_two_worker_ddp_run_writes_results_and_checkpoints(tmp_path):
    # A big model on 128 samples overfits at once: val loss rises after epoch 1, so best and latest differ.
    argv = [
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--epochs",
        "3",
        "--dummy-n-samples",
        "128",
        "--dummy-val-n-samples",
        "64",
        "--ff-hidden-sizes",
        "64",
        "--batch-size",
        "16",
        "--lr",
        "0.01",
    ]
    run_dir = toolbox_run(tmp_path, "ddp", *argv)

    # Results: one row per epoch in the CSV, the Parquet file and the log.
    columns, rows = read_csv(run_dir)
    assert has_columns(columns), columns
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["lr"] == pytest.approx(0.01) and r["epoch_s"] > 0 and r["samples_per_s"] > 0 for r in rows)
    table = pq.read_table(run_dir / "epochs.parquet")
    assert table.column_names == columns
    assert len(table) == len(rows)
    for parquet_row, csv_row in zip(table.to_pylist(), rows):
        assert parquet_row == pytest.approx(csv_row)
    log_lines = (run_dir / "training.log").read_text().splitlines()
    assert [line.split()[3] for line in log_lines if " epoch " in line] == ["1/3", "2/3", "3/3"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == 3 and config["ff_hidden_sizes"] == [64] and config["ff_input_size"] is None

    # Checkpoints: Ray keeps the latest and the best by val loss.
    val_losses = {int(r["epoch"]): r["val_loss"] for r in rows}
    best = min(val_losses, key=val_losses.get)
    assert best != 3, f"this config should overfit (val loss rising), got {val_losses}: pick one that does"
    kept = checkpoint_epochs(run_dir)
    assert set(kept) == {best, 3}

    # state.pt: a weights_only load of the whole training state.
    state = torch.load(kept[3] / "state.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "global_step", "rng", "best_val_loss", "config"} <= state.keys()
    assert state["epoch"] == 3
    assert state["global_step"] == 3 * (128 // 2) // 16  # 2 ranks, each 64 samples a epoch: 4 steps, not 8
    assert state["scheduler"]["last_epoch"] == state["global_step"]  # "none" steps every batch
    assert state["best_val_loss"] == pytest.approx(val_losses[best], rel=1e-6)
    assert state["config"] == resolve(config)
    assert state["rng"]["torch"].dtype == torch.uint8
    assert not any(key.startswith("module.") for key in state["model"])  # saved unwrapped from DDP

    # The reported val metrics are the whole val set's (both ranks' shards), for the weights saved.
    data = build_dataset(state["config"])
    for epoch, directory in kept.items():
        saved = torch.load(directory / "state.pt", weights_only=True)
        loss, top1 = evaluate(saved, data.normalize(data.val_x), data.val_y)
        assert loss == pytest.approx(val_losses[epoch], rel=1e-5)
        assert top1 == pytest.approx(rows[epoch - 1]["val_top_1_accuracy"])


# Scheduler state that does not depend on the total epochs, and dropout for the RNG state.
RESUMABLE = ["--seed", "3", "--ff-hidden-sizes", "32", "--ff-dropout", "0.1", "--batch-size", "16"]
RESUMABLE += ["--scheduler", "step_lr", "--step-size", "1", "--gamma", "0.5"]


@pytest.fixture(scope="module")
def full_and_part(tiny_mnist, tmp_path_factory) -> tuple[dict, Path]:
    """The same config and seed on the tiny MNIST files, trained for 4 epochs by the same loop in this process on one
    thread ("full": its rows and final weights), and for 2 epochs by toolbox.run on 1 worker ("part": its run dir)."""
    root, _ = tiny_mnist
    flags = [*RESUMABLE, "--dataset", "MNIST", "--mnist-root", str(root)]
    storage = tmp_path_factory.mktemp("runs")
    plan = prepare([*flags, "--epochs", "4", "--storage", str(storage), "--name", "full"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker with one CPU: the same reductions, the same bits
    try:
        checkpoints = storage / "full"
        checkpoints.mkdir()
        rows = train_locally(plan.config, plan.data, checkpoints=checkpoints)
    finally:
        torch.set_num_threads(threads)
    full = {"rows": rows, "model": torch.load(checkpoints / "epoch_4" / "state.pt", weights_only=True)["model"]}
    return full, toolbox_run(storage, "part", *flags, "--epochs", "2")


@pytest.mark.timeout(180)
def test_mnist_run_on_tiny_idx_files(tiny_mnist, full_and_part):
    root, written = tiny_mnist
    _, run_dir = full_and_part

    columns, rows = read_csv(run_dir)
    assert has_columns(columns) and [r["epoch"] for r in rows] == [1, 2], "runs before the same-name test"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "MNIST" and config["mnist_root"] == str(root)
    state = latest_state(run_dir)
    assert state["epoch"] == 2 and state["global_step"] == 2 * 64 // 16

    # Recompute the last epoch's val metrics from the IDX tensors the test wrote (not through toolbox's reader).
    x = (written["val_x"].unsqueeze(1).float() / 255 - 0.1307) / 0.3081
    loss, top1 = evaluate(state, x, written["val_y"].long())
    assert loss == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    assert top1 == pytest.approx(rows[-1]["val_top_1_accuracy"])
    assert math.isclose(top1 * 32 / 100, round(top1 * 32 / 100))  # a whole number of the 32 val images
    session = Path(json.loads((run_dir / "ray_session.json").read_text())["session_dir"])
    assert session.name.startswith("session_") and not session.exists(), "the Ray the run started left its session dir"


@pytest.mark.timeout(300)
def test_resume_flag_continues_to_the_same_weights(full_and_part, tmp_path):
    full, part = full_and_part
    assert json.loads((find_checkpoint(part) / "meta.json").read_text())["epoch"] == 2, "runs before the same-name test"

    resumed = toolbox_run(tmp_path, "resumed", "--resume", str(part), "--epochs", "4")  # the rest from the checkpoint

    assert_same_weights(latest_state(resumed)["model"], full["model"])
    _, resumed_rows = read_csv(resumed)
    assert [r["epoch"] for r in resumed_rows] == [3, 4]
    assert [r["lr"] for r in full["rows"]] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])
    for got, want in zip(resumed_rows, full["rows"][2:]):
        for key in ("lr", "train_loss", "val_loss", "val_top_1_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key


@pytest.mark.timeout(180)
def test_same_name_resumes_by_itself(full_and_part):
    full, part = full_and_part
    _, before = read_csv(part)

    toolbox_run(part.parent, part.name, "--epochs", "4")

    _, rows = read_csv(part)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # continued at epoch 3, not restarted at 1
    assert rows[:2] == before
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in full["rows"]], rel=1e-6)
    state = latest_state(part)
    assert state["epoch"] == 4 and state["config"]["ff_dropout"] == 0.1
    assert_same_weights(state["model"], full["model"])
    epoch_lines = [line.split()[3] for line in (part / "training.log").read_text().splitlines() if " epoch " in line]
    assert epoch_lines == ["1/2", "2/2", "3/4", "4/4"]
