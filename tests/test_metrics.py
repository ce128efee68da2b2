"""Metrics on inputs whose right answer is known, across batches and across DDP ranks (real torch.distributed)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from toolbox.components.metrics import METRICS, mode_of
from toolbox.config.registry import ConfigError
from toolbox.config.resolve import resolve
from toolbox.distributed.cluster import free_port
from toolbox.training.builders import build_metrics

# 3 classes. Class 0: tp 4, fp 0, fn 1 (F1 8/9); class 1: tp 1, fp 1, fn 1 (F1 1/2); class 2: tp 1, fp 1, fn 0 (F1 2/3).
TARGETS = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
PREDICTED = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])


def value(name: str, logits: torch.Tensor, targets: torch.Tensor, **config) -> float:
    metric = build_metrics(resolve({"metrics": (name,), **config}), logits.shape[1])[f"val_{name}"]
    metric.update(logits, targets)
    return float(metric.compute())


def test_macro_f1_averages_the_classes_with_equal_weight():
    logits = F.one_hot(PREDICTED, 3).float()
    assert value("macro_f1", logits, TARGETS) == pytest.approx(100 * (8 / 9 + 1 / 2 + 2 / 3) / 3)
    # Not the sample-weighted average (76.4) nor the micro one (75.0, the accuracy).
    assert value("top_1_accuracy", logits, TARGETS) == pytest.approx(75.0)


def test_macro_f1_takes_its_parameter():
    """--f1-ignore-index 0 leaves class 0's samples out: classes 1 and 2 are scored on the three others."""
    logits = F.one_hot(PREDICTED, 3).float()
    kept = TARGETS != 0
    both = value("macro_f1", logits, TARGETS, f1_ignore_index=0)
    assert both != pytest.approx(value("macro_f1", logits, TARGETS))
    assert both == pytest.approx(value("macro_f1", logits[kept], TARGETS[kept], f1_ignore_index=0))
    with pytest.raises(ConfigError, match="--f1-ignore-index 3 is not a class of the 3"):
        build_metrics(resolve({"metrics": ("macro_f1",), "f1_ignore_index": 3}), 3)


def test_top_k_accuracy_values():
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4],  # target 0: top-1 and top-5
            [9.0, 8, 7, 6, 5, 4],  # target 4: top-5 only
            [9.0, 8, 7, 6, 5, 4],  # target 5: neither
            [0.0, 0, 0, 1, 0, 0],  # target 3: top-1
        ]
    )
    targets = torch.tensor([0, 4, 5, 3])
    assert value("top_1_accuracy", logits, targets) == pytest.approx(50.0)
    assert value("top_5_accuracy", logits, targets) == pytest.approx(75.0)
    with pytest.raises(ConfigError, match="top_5_accuracy needs at least 5 classes"):
        build_metrics(resolve({"metrics": ("top_5_accuracy",)}), 3)


def _random_batch(name: str, n: int = 60, outputs: int = 7):
    """Outputs and targets of the kind metric ``name`` takes: class indices, or [n, outputs] real values."""
    g = torch.Generator().manual_seed(0)
    if METRICS[name].targets == "real":
        return torch.randn(n, outputs, generator=g), torch.randn(n, outputs, generator=g)
    return torch.randn(n, outputs, generator=g), torch.randint(0, outputs, (n,), generator=g)


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_over_batches_equals_the_whole_set(name):
    logits, targets = _random_batch(name)
    whole = value(name, logits, targets)
    metric = build_metrics(resolve({"metrics": (name,)}), 7)[f"val_{name}"]
    for start in range(0, 60, 16):
        metric.update(logits[start : start + 16], targets[start : start + 16])
    assert float(metric.compute()) == pytest.approx(whole)
    classes = METRICS[name].targets == "classes"
    perfect = value(name, F.one_hot(targets, 7).float() if classes else targets, targets)
    better = max if mode_of(f"val_{name}") == "max" else min
    assert better(perfect, whole) == perfect and perfect != pytest.approx(whole)
    if classes:
        assert perfect == pytest.approx(100.0)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metrics = build_metrics(resolve({"metrics": tuple(METRICS.names())}), 7)
    for name, metric in metrics.items():
        logits, targets = _random_batch(name.removeprefix("val_"))
        metric.update(logits[rank::world].contiguous(), targets[rank::world].contiguous())  # each rank its shard (a model output)
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(values, f)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_metrics_reduce_across_ddp_ranks_to_the_whole_set(tmp_path):
    out = tmp_path / "values.json"
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2)
    reduced = json.loads(out.read_text())
    for name in METRICS.names():
        logits, targets = _random_batch(name)
        assert reduced[f"val_{name}"] == pytest.approx(value(name, logits, targets)), name
