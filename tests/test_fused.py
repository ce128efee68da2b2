"""Fused training (toolbox.training.fused): K members as one stacked model give each member's unfused numbers.

Every test compares with ``loop.train`` on the same configs and data (``helpers.train_locally``): rows,
final weights and checkpoints, to float rounding. No Ray here.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from helpers import TINY_DUMMY, collecting_session, train_locally

from toolbox.components.models import Dropout, dropout_mask
from toolbox.components.optimizers import OPTIMIZERS
from toolbox.components.schedulers import SCHEDULERS
from toolbox.config.registry import ConfigError, Param
from toolbox.config.resolve import resolve, unwrap
from toolbox.data.tensors import TensorData
from toolbox.training.builders import build_dataset
from toolbox.training.checkpoint import load_state
from toolbox.training.fused import FusedGroup, StopMember, fusable

BASE = {**TINY_DUMMY, "batch_size": 16, "ff_hidden_sizes": (32,), "ff_dropout": 0.1, "epochs": 3}
TIMING = ("epoch_s", "samples_per_s", "first_step_time")
FACTORS = (1.0, 0.5, 0.25)  # member k's float hyperparameters: default * FACTORS[k] (0.5, 0.25 where the default is 0)


def _varied(param: Param, k: int):
    """Member k's value of a component parameter: the default for k=0, others that the parameter's rules allow."""
    base, _ = unwrap(param.annotation)
    default = param.default
    if base is bool:
        return default if k % 2 == 0 else not default
    if base is int:
        return default + k
    if base is float:
        return default * FACTORS[k] if default else (0.0, 0.5, 0.25)[k]
    if typing.get_origin(base) is tuple and all(isinstance(v, float) for v in default):
        return tuple(v * FACTORS[k] for v in default)
    return default


def member_configs(optimizer: str = "adamw", scheduler: str = "none", **given) -> list[dict]:
    """Three configs that differ in seed and in every parameter of their optimizer and scheduler."""
    configs = []
    for k in range(3):
        values = {p.key: _varied(p, k) for component in (OPTIMIZERS[optimizer], SCHEDULERS[scheduler]) for p in component.params}
        values = {key: v for key, v in values.items() if key != "nesterov" or values.get("momentum")}
        try:
            configs.append(
                resolve({**BASE, "optimizer": optimizer, "scheduler": scheduler, "seed": k, **values, **given}, strict=False)
            )
        except ConfigError:  # a rule the variation broke: this member keeps the defaults
            configs.append(resolve({**BASE, "optimizer": optimizer, "scheduler": scheduler, "seed": k, **given}, strict=False))
    return configs


def skip_unless_it_has_a_stacked_step(optimizer: str) -> None:
    """Skip, saying why, where fusing refuses ``optimizer`` (a sweep runs its trials unfused)."""
    reason = fusable([resolve({**BASE, "optimizer": optimizer}, strict=False)])
    if reason:
        pytest.skip(reason)


def stopping_after(session, epochs: int):
    """``session``, whose report raises StopMember once it has reported epoch ``epochs``."""
    report = session.report

    def report_then_stop(metrics: dict, checkpoint_dir: str | None) -> None:
        report(metrics, checkpoint_dir)
        if metrics["epoch"] >= epochs:
            raise StopMember

    session.report = report_then_stop
    return session


def train_fused(
    configs: list[dict], data: TensorData, checkpoints: Path, stop_after: dict[int, int] | None = None
) -> list[list[dict]]:
    """The configs as one fused group; member k's rows, its checkpoints under CHECKPOINTS/k/epoch_N."""
    rows = [[] for _ in configs]
    sessions = [collecting_session(r, checkpoints / str(k)) for k, r in enumerate(rows)]
    for k, epochs in (stop_after or {}).items():
        sessions[k] = stopping_after(sessions[k], epochs)
    FusedGroup(data, zip(configs, sessions)).run()
    return rows


def assert_same_rows(fused: list[dict], unfused: list[dict]) -> None:
    assert [r["epoch"] for r in fused] == [r["epoch"] for r in unfused]
    for f, u in zip(fused, unfused):
        assert f.keys() == u.keys()
        for key in f.keys() - set(TIMING):
            assert f[key] == pytest.approx(u[key], rel=1e-5), (f["epoch"], key)


def assert_same_checkpoint(fused: Path, unfused: Path) -> None:
    """Weights, moments and hyperparameters to float rounding; schedule, RNG and counters exactly."""
    a, b = load_state(fused), load_state(unfused)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in b["optimizer"]["state"].items():
        assert a["optimizer"]["state"][index].keys() == state.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(a["optimizer"]["state"][index][name], tensor, rtol=1e-5, atol=1e-7)
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (a["epoch"], a["global_step"], a["config"]) == (b["epoch"], b["global_step"], b["config"])
    assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], rel=1e-5)
    assert_same_rows(a["history"], b["history"])


@pytest.mark.parametrize("scheduler", SCHEDULERS.names())
@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_a_fused_group_gives_every_members_unfused_numbers(optimizer, scheduler, tmp_path):
    """Three members with their own seeds, lrs, weight decays and scheduler values: rows, weights, checkpoints."""
    skip_unless_it_has_a_stacked_step(optimizer)
    configs = member_configs(optimizer, scheduler)
    assert len({tuple(sorted((k, repr(v)) for k, v in c.items() if k != "seed")) for c in configs}) == 3
    data = build_dataset(configs[0])
    fused = train_fused(configs, data, tmp_path / "fused")
    for k, config in enumerate(configs):
        unfused = train_locally(config, data, checkpoints=tmp_path / f"unfused_{k}")
        assert_same_rows(fused[k], unfused)
        assert_same_checkpoint(tmp_path / "fused" / str(k) / "epoch_3", tmp_path / f"unfused_{k}" / "epoch_3")


def test_dropout_masks_are_the_unfused_dropouts():
    """The generator-driven mask is bit for bit toolbox Dropout's from the global generator in the same state."""
    x = torch.randn(5, 7)  # an odd element count: the last 64-bit draw gives one element
    dropout = Dropout(0.3).train()
    torch.manual_seed(11)
    expected = [dropout(x), dropout(x)]
    generator = torch.Generator().manual_seed(11)
    assert all(torch.equal(e, x * dropout_mask(x.shape, 0.3, generator, x.dtype)) for e in expected)
    assert torch.equal(generator.get_state(), torch.get_rng_state())


def test_a_stopped_member_leaves_and_the_others_train_on_unchanged(tmp_path):
    """Member 1 is stopped after epoch 1 (its report raises StopMember); member 2 (SGD without momentum) ends
    after its own 2 epochs."""
    configs = member_configs("sgd", "cosine_annealing_lr")
    configs[2] = resolve({"epochs": 2, "momentum": 0.0}, base=configs[2])
    data = build_dataset(configs[0])
    fused = train_fused(configs, data, tmp_path / "fused", stop_after={1: 1})
    unfused = [train_locally(config, data, checkpoints=tmp_path / f"unfused_{k}") for k, config in enumerate(configs)]
    assert [[r["epoch"] for r in rows] for rows in fused] == [[1, 2, 3], [1], [1, 2]]
    for k, last in enumerate((3, 1, 2)):
        assert_same_rows(fused[k], unfused[k][:last])
        assert_same_checkpoint(tmp_path / "fused" / str(k) / f"epoch_{last}", tmp_path / f"unfused_{k}" / f"epoch_{last}")


def test_members_join_at_epoch_boundaries_fresh_or_from_a_checkpoint(tmp_path):
    """After the group's first epoch one member joins fresh and one from an unfused run's epoch-1 checkpoint."""
    configs = member_configs("adam", "linear_then_cosine_annealing_lr")
    late = resolve({"seed": 7, "lr": 2e-3}, base=configs[0])
    data = build_dataset(configs[0])
    unfused = [train_locally(config, data, checkpoints=tmp_path / f"unfused_{k}") for k, config in enumerate(configs)]
    unfused_late = train_locally(late, data)

    rows = [[] for _ in range(4)]
    group = FusedGroup(data, [(configs[0], collecting_session(rows[0]))])
    group.train_epoch()
    assert group.add(configs[1], collecting_session(rows[1]))
    assert group.add(configs[2], collecting_session(rows[2]), resume_from=str(tmp_path / "unfused_2" / "epoch_1"))
    group.train_epoch()
    assert len(group.members) == 3
    assert group.add(late, collecting_session(rows[3]))
    group.run()
    assert not group.members
    assert [[r["epoch"] for r in member] for member in rows] == [[1, 2, 3], [1, 2, 3], [2, 3], [1, 2, 3]]
    for member, expected in zip(rows, [unfused[0], unfused[1], unfused[2][1:], unfused_late]):
        assert_same_rows(member, expected)


def test_a_finished_checkpoint_reports_again_and_does_not_join(tmp_path):
    config = member_configs()[0]
    data = build_dataset(config)
    unfused = train_locally(config, data, checkpoints=tmp_path / "unfused")
    rows = []
    group = FusedGroup(data)
    assert not group.add(config, collecting_session(rows), resume_from=str(tmp_path / "unfused" / "epoch_3"))
    assert rows == [unfused[-1]] and not group.joining


@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_a_fused_members_checkpoint_resumes_in_the_unfused_loop(optimizer, tmp_path):
    """Epochs 3-4 of the unfused loop resumed from member 1's epoch-2 checkpoint (then stopped) equal the unfused run's."""
    skip_unless_it_has_a_stacked_step(optimizer)
    configs = member_configs(optimizer, "cosine_annealing_lr", epochs=4)
    data = build_dataset(configs[0])
    train_fused(configs, data, tmp_path / "fused", stop_after={1: 2})
    full = train_locally(configs[1], data, checkpoints=tmp_path / "full")
    assert_same_checkpoint(tmp_path / "fused" / "1" / "epoch_2", tmp_path / "full" / "epoch_2")
    resumed = train_locally(configs[1], data, checkpoints=tmp_path / "resumed", resume_from=tmp_path / "fused" / "1" / "epoch_2")
    assert_same_rows(resumed, full[2:])
    assert_same_checkpoint(tmp_path / "resumed" / "epoch_4", tmp_path / "full" / "epoch_4")


def test_conv_nets_with_their_own_dropout_fuse(tmp_path):
    """ConvNet members (grouped convolution, pooling on the members' channels side by side), each with its own dropout p."""
    given = {"arch": "ConvNet", "dummy_input_shape": (1, 8, 8), "cnn_channels": (3, 4), "cnn_hidden_size": 16, "epochs": 2}
    configs = [
        resolve({"cnn_dropout": p}, base=c) for c, p in zip(member_configs("adamw", "one_cycle_lr", **given), (0.25, 0.5, 0.1))
    ]
    data = build_dataset(configs[0])
    fused = train_fused(configs, data, tmp_path / "fused")
    for k, config in enumerate(configs):
        assert_same_rows(fused[k], train_locally(config, data, checkpoints=tmp_path / f"unfused_{k}"))
        assert_same_checkpoint(tmp_path / "fused" / str(k) / "epoch_2", tmp_path / f"unfused_{k}" / "epoch_2")


def test_fusable_names_what_keeps_configs_apart():
    a = resolve(BASE)
    spec = build_dataset(a).spec
    assert fusable([a, resolve({"lr": 0.1, "seed": 3, "epochs": 5, "scheduler": "step_lr"}, base=a)], spec) is None
    assert fusable([a, resolve({"ff_dropout": 0.3}, base=a)], spec) is None
    cases = {
        "different arch": {"arch": "ConvNet"},
        "different batch_size": {"batch_size": 32},
        "different optimizer": {"optimizer": "sgd"},
        "different ff_hidden_sizes": {"ff_hidden_sizes": (16,)},
        "different dummy_n_samples": {"dummy_n_samples": 128},
        "trials with precision 'bf16-mixed' cannot fuse": {"precision": "bf16-mixed"},
    }
    for reason, given in cases.items():
        assert fusable([a, resolve(given, base=a, strict=False)]).startswith(reason), given
    assert fusable([a, resolve({"ff_dropout": 0.0}, base=a)]) is None  # the keys agree but the layers do not:
    assert fusable([a, resolve({"ff_dropout": 0.0}, base=a)], spec).startswith("their models' layers differ")
    with pytest.raises(ConfigError, match="different batch_size"):
        FusedGroup(build_dataset(a), [(a, collecting_session([])), (resolve({"batch_size": 8}, base=a), collecting_session([]))])


def test_fusable_refuses_optimizers_and_layers_without_a_stacked_form(test_only_components):
    rmsprop = resolve({**BASE, "optimizer": "test_rmsprop"}, strict=False)
    assert (
        fusable([rmsprop, rmsprop])
        == "trials with test_rmsprop cannot fuse (RMSprop has no stacked step; Adam, AdamW and SGD have)"
    )
    normed = resolve({**BASE, "arch": "test_normed"}, strict=False)
    assert fusable([normed, normed], build_dataset(normed).spec) == (
        "trials with test_normed cannot fuse (it has a layer with no stacked form: torch.nn.modules.batchnorm.BatchNorm1d)"
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_adam_adamw_and_sgd_have_a_stacked_step(optimizer):
    """The built-ins fuse, so the tests above that skip optimizers without a stacked step check them."""
    assert fusable([resolve({**BASE, "optimizer": optimizer})]) is None


def test_regression_members_fuse_with_their_unfused_numbers(tmp_path):
    """Members on real-valued targets of 2 values (MSE, mean absolute error, R2) give their unfused rows and checkpoints."""
    given = {"dataset": "Regression", "regression_n_samples": 64, "regression_val_n_samples": 32, "regression_num_values": 2}
    configs = member_configs("adamw", "cosine_annealing_lr", **given)
    assert configs[0]["criterion"] == "mse_loss" and fusable(configs, build_dataset(configs[0]).spec) is None
    data = build_dataset(configs[0])
    fused = train_fused(configs, data, tmp_path / "fused")
    for k, config in enumerate(configs):
        unfused = train_locally(config, data, checkpoints=tmp_path / f"unfused_{k}")
        assert "val_mean_absolute_error" in unfused[-1]
        assert_same_rows(fused[k], unfused)
        assert_same_checkpoint(tmp_path / "fused" / str(k) / "epoch_3", tmp_path / f"unfused_{k}" / "epoch_3")


def test_members_augment_their_own_batches_as_their_unfused_runs_do(tmp_path):
    """Random crops and flips per member, from each member's own generator: rows and checkpoints are the unfused ones."""
    given = {"dummy_input_shape": (1, 8, 8), "augmentations": ("random_crop", "horizontal_flip"), "epochs": 2}
    configs = member_configs("adamw", "none", **given)
    configs[2] = resolve({"augmentations": ("horizontal_flip",), "flip_p": 0.25}, base=configs[2])
    data = build_dataset(configs[0])
    fused = train_fused(configs, data, tmp_path / "fused")
    for k, config in enumerate(configs):
        assert_same_rows(fused[k], train_locally(config, data, checkpoints=tmp_path / f"unfused_{k}"))
        assert_same_checkpoint(tmp_path / "fused" / str(k) / "epoch_2", tmp_path / f"unfused_{k}" / "epoch_2")
        fused_state = load_state(tmp_path / "fused" / str(k) / "epoch_2")["rng"]["augmentation"]
        unfused_state = load_state(tmp_path / f"unfused_{k}" / "epoch_2")["rng"]["augmentation"]
        assert torch.equal(fused_state[0], unfused_state[0])
