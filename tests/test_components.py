"""Every registered component builds and runs on every dataset's tiny data; then checks of real values per kind. No Ray here."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import MNIST_FILES, tiny_config, train_locally, write_idx_images, write_idx_labels

from toolbox.components.augmentations import AUGMENTATIONS, horizontal_flip, random_crop
from toolbox.components.datasets import DATASETS
from toolbox.components.losses import CRITERIA
from toolbox.components.metrics import METRICS
from toolbox.components.models import MODELS, Dropout, sample_shape_refusal
from toolbox.components.optimizers import OPTIMIZERS, runs_fused_step
from toolbox.components.schedulers import SCHEDULERS
from toolbox.config.registry import ConfigError
from toolbox.config.resolve import resolve
from toolbox.data.tensors import DataSpec, TensorData
from toolbox.training.builders import (
    build_dataset,
    build_model,
    build_optimizer,
    build_scheduler,
    check_against_data,
    check_components,
    lr_schedule,
)
from toolbox.training.checkpoint import load_state
from toolbox.training.resume import restore_optimization


def registered(*registries):
    """pytest params (registry, name) for every registered component of these kinds."""
    return [pytest.param(r, c.name, id=f"{r.kind}-{c.name}") for r in registries for c in r]


def shape_refusal(arch: str, dataset: str, directory) -> str | None:
    """Why the model does not take the dataset's tiny samples, by the sample dims it declares; or None."""
    spec = build_dataset(tiny_config(directory, arch=arch, dataset=dataset)).spec
    return sample_shape_refusal(MODELS[arch], spec.sample_shape)


def assert_trains(config: dict, checkpoints) -> None:
    """Two epochs run, report sane values, and change the weights."""
    data = build_dataset(config)
    check_against_data(config, check_components(config, data.spec), data)
    torch.manual_seed(config["seed"])  # the loop's own seeding: the same initial weights
    initial = build_model(config, data.spec).state_dict()

    rows = train_locally(config, data, checkpoints=checkpoints)

    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[-1]["global_step"] == 2 * math.ceil(len(data.train_y) / config["batch_size"])
    for row in rows:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) and row["lr"] > 0
        for metric in config["metrics"]:
            assert math.isfinite(row[f"val_{metric}"])
            if METRICS[metric].targets == "classes":  # percentages
                assert 0.0 <= row[f"val_{metric}"] <= 100.0
    final = load_state(checkpoints / "epoch_2")["model"]
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final), "two epochs of training changed no weight"


@pytest.mark.parametrize("dataset", DATASETS.names())
@pytest.mark.parametrize("arch", MODELS.names())
def test_every_model_trains_on_every_dataset_whose_shape_it_accepts(arch, dataset, tmp_path):
    refusal = shape_refusal(arch, dataset, tmp_path / "data")
    if refusal:
        pytest.skip(f"{refusal} (test_every_model_and_dataset_meet_once checks coverage)")
    assert_trains(tiny_config(tmp_path / "data", arch=arch, dataset=dataset), tmp_path / "checkpoints")


def test_every_model_and_dataset_meet_once(tmp_path):
    """No model without a dataset it takes and no dataset without a model: the skips above hide nothing."""
    pairs = {(a, d) for a in MODELS.names() for d in DATASETS.names() if not shape_refusal(a, d, tmp_path / d)}
    assert {a for a, _ in pairs} == set(MODELS.names())
    assert {d for _, d in pairs} == set(DATASETS.names())


def test_a_model_is_refused_data_of_a_rank_it_does_not_declare_and_takes_any_without_a_declaration():
    assert sample_shape_refusal(MODELS["FeedForwardNeuralNetwork"], (784,)) is None
    assert sample_shape_refusal(MODELS["FeedForwardNeuralNetwork"], (1, 28, 28)) is None
    assert sample_shape_refusal(MODELS["ConvNet"], (1, 28, 28)) is None
    assert (
        sample_shape_refusal(MODELS["ConvNet"], (784,))
        == "ConvNet takes samples of shape [channels, height, width], the data has [784]"
    )
    with pytest.raises(ConfigError, match="ConvNet takes samples of shape"):
        check_components(resolve({"arch": "ConvNet", "dummy_input_shape": (784,)}), DataSpec((784,), 10))


@pytest.mark.parametrize(("registry", "name"), registered(CRITERIA, OPTIMIZERS, SCHEDULERS, METRICS, AUGMENTATIONS))
def test_every_component_builds_and_trains(registry, name, tmp_path):
    """Each component, with its defaults and the others' defaults, passes the checks and trains 2 epochs
    (a criterion or metric on the first dataset of the targets it takes)."""
    dataset = next(d.name for d in DATASETS if d.targets == registry[name].targets)
    config = tiny_config(tmp_path / "data", dataset=dataset, **{registry.selector: (name,) if registry.many else name})
    assert_trains(config, tmp_path / "checkpoints")


@pytest.mark.parametrize(
    ("registry", "name"), registered(MODELS, DATASETS, CRITERIA, OPTIMIZERS, SCHEDULERS, METRICS, AUGMENTATIONS)
)
def test_every_parameter_has_a_help_line(registry, name):
    """--help takes each parameter's description from its docstring's Args: section."""
    component = registry[name]
    assert component.summary, f"{name} has no docstring"
    for param in component.params:
        assert param.help, f"{name}: {param.name} has no line under Args: in its docstring"


# --- models ---------------------------------------------------------------------------------------------------


def test_feed_forward_layers_follow_the_config_and_sizes_come_from_the_data():
    config = resolve({"ff_hidden_sizes": (7, 5), "ff_dropout": 0.25, "ff_activation": "tanh"})
    model = build_model(config, DataSpec((3, 4), 3))
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 7), (7, 5), (5, 3)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in model) == 2
    assert [m.p for m in model if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25]
    assert model(torch.randn(2, 3, 4)).shape == (2, 3)  # flattens its input itself
    same = build_model(resolve({"ff_input_size": 12, "ff_output_dim": 3}), DataSpec((3, 4), 3))  # the original's flags
    assert same[1].in_features == 12 and same[-1].out_features == 3


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"ff_input_size": 100}, "--ff-input-size 100 contradicts the data: its samples [3, 4] hold 12"),
        ({"ff_output_dim": 5}, "--ff-output-dim 5 contradicts the data: its outputs per sample (classes or target values) are 3"),
    ],
)
def test_feed_forward_refuses_sizes_that_contradict_the_data(given, expected):
    with pytest.raises(ConfigError) as refused:
        check_components(resolve(given), DataSpec((3, 4), 3))
    assert expected in str(refused.value)


def test_conv_net_takes_images_and_refuses_flat_samples():
    config = resolve({"arch": "ConvNet", "cnn_channels": (4, 8), "cnn_hidden_size": 16})
    model = build_model(config, DataSpec((1, 28, 28), 10))
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 8)]
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ConfigError, match=r"shape \[channels, height, width\], the data has \[784\]"):
        build_model(config, DataSpec((784,), 10))
    with pytest.raises(ConfigError, match="below 1 pixel"):
        build_model(resolve({"arch": "ConvNet", "cnn_channels": (4, 4, 4)}), DataSpec((1, 4, 4), 10))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_1_minus_p_scales_the_kept_and_replays_with_the_seed(p):
    """toolbox's CPU Dropout against nn.Dropout's contract: i.i.d. keep with probability 1 - p,
    kept values times 1 / (1 - p), gradients through the same mask, the identity in eval mode."""
    dropout = Dropout(p)
    x = (torch.rand(1000, 1001) + 0.5).requires_grad_()  # nonzero, and an odd count of elements
    torch.manual_seed(3)
    y = dropout(x)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(y[kept], x[kept] * (1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    # Neighbours drop independently: both halves of one 64-bit draw, and consecutive draws.
    flat = kept.flatten()
    assert abs((flat[:-1] & flat[1:]).double().mean().item() - (1 - p) ** 2) < 0.005
    torch.manual_seed(3)
    assert torch.equal(dropout(x) != 0, kept)
    assert not torch.equal(dropout(x) != 0, kept)  # the next draw differs
    dropout.eval()
    assert torch.equal(dropout(x), x)


# --- datasets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("registry", "name"), registered(DATASETS))
def test_dataset_is_deterministic_and_well_formed(registry, name, tmp_path):
    config = tiny_config(tmp_path, dataset=name)
    a, b = build_dataset(config), build_dataset(config)
    for key in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert len(a.train_x) == len(a.train_y) > 0 and len(a.val_x) == len(a.val_y) > 0
    assert a.val_x.shape[1:] == a.train_x.shape[1:] == a.sample_shape
    assert a.spec == (a.sample_shape, a.target.num_outputs, a.target) and a.target.kind == registry[name].targets
    for y in (a.train_y, a.val_y):
        if a.target.kind == "classes":
            assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < a.num_classes
        else:
            assert y.dtype == torch.float32 and y.shape[1:] == a.target.shape and y.isfinite().all()
    shared = TensorData.from_shared(a.to_shared())
    assert torch.equal(shared.train_x, a.train_x) and shared.target == a.target and shared.std == a.std


def test_dummy_dataset_sizes_and_seed():
    config = resolve({"dummy_n_samples": 50, "dummy_val_n_samples": 20, "dummy_input_shape": (3, 4), "dummy_num_classes": 4})
    data = build_dataset(config)
    assert data.train_x.shape == (50, 3, 4) and data.val_x.shape == (20, 3, 4) and data.num_classes == 4
    other_seed = build_dataset({**config, "seed": 1})
    assert not torch.equal(other_seed.train_x, data.train_x)


def test_mnist_reads_the_idx_files_it_is_given_as_images(tiny_mnist):
    root, written = tiny_mnist
    data = build_dataset(resolve({"dataset": "MNIST", "mnist_root": str(root)}))
    assert data.sample_shape == (1, 28, 28) and data.num_classes == 10
    assert torch.equal(data.train_x, written["train_x"].unsqueeze(1))
    assert torch.equal(data.val_x, written["val_x"].unsqueeze(1))
    assert torch.equal(data.train_y, written["train_y"].long()) and torch.equal(data.val_y, written["val_y"].long())
    index = torch.tensor([3, 0, 3, 1])
    for split in ("train", "val"):
        inputs, targets = data.batch(split, index)
        pixels = written[f"{split}_x"].unsqueeze(1)[index].float()
        assert inputs.dtype == torch.float32 and torch.allclose(inputs, (pixels / 255 - 0.1307) / 0.3081)
        assert torch.equal(targets, written[f"{split}_y"].long()[index])


def _break(raw, how: str) -> None:
    images, labels = raw / MNIST_FILES["train_x"], raw / MNIST_FILES["train_y"]
    if how == "cut short":
        images.write_bytes(images.read_bytes()[:-100])
    elif how == "wrong magic":
        images.write_bytes(b"\x00\x00\x08\x02" + images.read_bytes()[4:])
    elif how == "not idx":
        images.write_bytes(b"<html>rate limited</html>")
    elif how == "counts differ":
        write_idx_labels(labels, torch.zeros(63, dtype=torch.uint8))
    elif how == "label out of range":
        write_idx_labels(labels, torch.full((64,), 10, dtype=torch.uint8))
    elif how == "empty":
        write_idx_images(images, torch.zeros(0, 28, 28, dtype=torch.uint8))
        write_idx_labels(labels, torch.zeros(0, dtype=torch.uint8))
    elif how == "unreadable":
        images.unlink()
        images.mkdir()


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("cut short", "train-images-idx3-ubyte: cut short: 50076 bytes of data for shape [64, 28, 28], expected 50176"),
        ("wrong magic", "train-images-idx3-ubyte: has 2 dimensions, expected 3"),
        ("not idx", "train-images-idx3-ubyte: not an IDX file (magic number 3c68746d)"),
        ("counts differ", "the train split has 64 samples but 63 labels"),
        ("label out of range", "the train labels run from 10 to 10, outside the 10 classes 0..9"),
        ("empty", "the train split has no samples"),
        ("unreadable", "train-images-idx3-ubyte: cannot read it"),
    ],
)
def test_a_bad_mnist_file_is_one_config_error(how, expected, tmp_path):
    from helpers import write_tiny_mnist

    write_tiny_mnist(tmp_path)
    _break(tmp_path / "MNIST" / "raw", how)
    with pytest.raises(ConfigError) as refused:
        build_dataset(resolve({"dataset": "MNIST", "mnist_root": str(tmp_path)}))
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_normalize_never_writes_its_input():
    x = torch.rand(4, 3)
    data = TensorData(x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long), 2, mean=0.5, std=2.0)
    before = x.clone()
    assert torch.allclose(data.normalize(x), (before - 0.5) / 2.0)
    assert torch.equal(x, before)


# --- criteria -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("registry", "name"), registered(CRITERIA))
def test_criterion_is_a_differentiable_scalar_lower_for_right_answers(registry, name):
    criterion = CRITERIA[name].build(config=resolve({"criterion": name}, strict=False))
    g = torch.Generator().manual_seed(0)
    if registry[name].targets == "classes":
        targets = torch.tensor([0, 3, 1, 2])
        right_answers = F.one_hot(targets, 5).float() * 10
    else:
        targets = right_answers = torch.randn(4, 5, generator=g)
    logits = torch.randn(4, 5, generator=g, requires_grad=True)
    loss = criterion(logits, targets)
    assert loss.shape == () and math.isfinite(loss.item())
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert criterion(right_answers, targets) < loss


def test_regression_defaults_to_a_criterion_and_metrics_of_real_targets_and_learns(tmp_path):
    """``--dataset Regression`` alone: MSE, mean absolute error (which falls) and R2 (which rises) over 4 epochs."""
    config = resolve({"dataset": "Regression", "regression_n_samples": 256, "regression_val_n_samples": 64, "epochs": 4})
    assert (config["criterion"], config["metrics"]) == ("mse_loss", ("mean_absolute_error", "r2_score"))
    data = build_dataset(config)
    check_against_data(config, check_components(config, data.spec), data)
    rows = train_locally({**config, "batch_size": 32}, data)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert rows[-1]["val_mean_absolute_error"] < rows[0]["val_mean_absolute_error"]
    assert rows[-1]["val_r2_score"] > rows[0]["val_r2_score"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"criterion": "mse_loss"}, "--criterion mse_loss takes real-valued targets, but dataset DummyDataset has class labels"),
        ({"metrics": ("r2_score",)}, "--metrics r2_score takes real-valued targets, but dataset DummyDataset has class labels"),
        (
            {"dataset": "Regression", "criterion": "cross_entropy_loss"},
            "--criterion cross_entropy_loss takes class labels, but dataset Regression has real-valued targets (shape [1])",
        ),
        (
            {"dataset": "Regression", "metrics": ("mean_absolute_error", "top_1_accuracy")},
            "--metrics top_1_accuracy takes class labels, but dataset Regression has real-valued targets",
        ),
        ({"dummy_num_classes": 3}, "top_5_accuracy needs at least 5 classes; the model outputs 3"),
    ],
)
def test_a_criterion_or_metric_of_other_targets_is_refused_naming_both(given, expected):
    config = resolve({**given, "dummy_n_samples": 16, "regression_n_samples": 16}, strict=False)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_components(config, build_dataset(config).spec)


def test_cross_entropy_matches_torch_with_label_smoothing():
    criterion = CRITERIA["cross_entropy_loss"].build(config=resolve({"label_smoothing": 0.2}))
    logits, targets = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(criterion(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.2))


# --- optimizers -----------------------------------------------------------------------------------------------


def _regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 4, generator=g))
        model.bias.zero_()
    x = torch.randn(32, 4, generator=g)
    return model, x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


@pytest.mark.parametrize(("registry", "name"), registered(OPTIMIZERS))
def test_optimizer_steps_reduce_a_quadratic_loss(registry, name):
    model, x, y = _regression()
    optimizer = build_optimizer(resolve({"optimizer": name}), model.parameters())
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _steps(model, optimizer, x, y, n, scheduler=None):
    for _ in range(n):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize(("registry", "name"), registered(OPTIMIZERS))
def test_optimizer_state_survives_a_weights_only_checkpoint(registry, name):
    """A resumed optimizer continues exactly like the uninterrupted one."""
    config = resolve({"optimizer": name})
    model, x, y = _regression()
    optimizer = build_optimizer(config, model.parameters())
    _steps(model, optimizer, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _steps(model, optimizer, x, y, 3)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, _, _ = _regression()
    resumed.load_state_dict(state["model"])
    resumed_optimizer = build_optimizer(config, resumed.parameters())
    resumed_optimizer.load_state_dict(state["optimizer"])
    _steps(resumed, resumed_optimizer, x, y, 3)
    assert torch.equal(resumed.weight, model.weight) and torch.equal(resumed.bias, model.bias)


def _resumed_with_saved_fused_flag(config: dict, fused: bool | None):
    """One step, a checkpoint whose param groups say ``fused``, and an optimizer restored from it; then one more
    step of both. Returns the uninterrupted model, the resumed one and the resumed optimizer."""
    model, x, y = _regression()
    optimizer = build_optimizer(config, model.parameters())
    scheduler, interval = build_scheduler(config, optimizer, steps_per_epoch=1)
    _steps(model, optimizer, x, y, 1, scheduler)
    saved = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the live state tensors
    saved["param_groups"] = [{**g, "fused": fused} for g in saved["param_groups"]]
    state = {"config": config, "optimizer": saved, "scheduler": scheduler.state_dict(), "global_step": 1, "epoch": 1}
    resumed, _, _ = _regression()
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = build_optimizer(config, resumed.parameters())
    resumed_scheduler, _ = build_scheduler(config, resumed_optimizer, steps_per_epoch=1)
    restore_optimization(state, config, resumed_optimizer, resumed_scheduler, interval, 1)
    _steps(model, optimizer, x, y, 1)
    _steps(resumed, resumed_optimizer, x, y, 1)
    return model, resumed, resumed_optimizer


@pytest.mark.parametrize(("registry", "name"), registered(OPTIMIZERS))
def test_optimizer_keeps_its_fused_step_when_resumed_from_a_checkpoint_without_one(registry, name):
    """Fused kernels are on for CPU params. Resuming from a run that had them off (an older run, or a
    device without them) turns them back on, and the run continues exactly like an uninterrupted one."""
    config = resolve({"optimizer": name, "scheduler": "none"})
    optimizer = build_optimizer(config, _regression()[0].parameters())
    if not runs_fused_step(optimizer):
        pytest.skip(f"{name} ({type(optimizer).__name__}) runs no fused step: torch has none for it, or it does not ask")
    model, resumed, resumed_optimizer = _resumed_with_saved_fused_flag(config, fused=None)
    assert runs_fused_step(resumed_optimizer)
    assert torch.equal(resumed.weight, model.weight) and torch.equal(resumed.bias, model.bias)


def test_an_optimizer_without_a_fused_flag_gets_none_from_a_checkpoint_that_has_one(test_only_components):
    """How a step runs is the resumed optimizer's own: a saved ``fused=True`` does not reach an RMSprop."""
    config = resolve({"optimizer": "test_rmsprop", "scheduler": "none"}, strict=False)
    model, resumed, resumed_optimizer = _resumed_with_saved_fused_flag(config, fused=True)
    assert all("fused" not in group for group in resumed_optimizer.param_groups)
    assert torch.equal(resumed.weight, model.weight) and torch.equal(resumed.bias, model.bias)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_built_in_optimizers_run_torchs_fused_step_on_cpu(name):
    """The built-ins ask for the fused step, so the test above checks them; torch's RMSprop has no fused step."""
    params = list(torch.nn.Linear(4, 1).parameters())
    assert runs_fused_step(build_optimizer(resolve({"optimizer": name}), params))
    assert not runs_fused_step(torch.optim.RMSprop(params))


# --- schedulers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("registry", "name"), registered(SCHEDULERS))
def test_scheduler_lr_stays_positive_and_at_most_the_peak(registry, name):
    config = resolve({"scheduler": name, "epochs": 3, "lr": 0.01})
    lrs = lr_schedule(config, steps_per_epoch=10)
    assert len(lrs) == 30
    assert all(math.isfinite(lr) and 0 < lr <= 0.01 * (1 + 1e-9) for lr in lrs), lrs


@pytest.mark.parametrize("more_epochs", [False, True], ids=["same-epochs", "more-epochs"])
@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_scheduler_resumes_from_a_weights_only_checkpoint(name, more_epochs):
    """Save optimizer + scheduler after 2 of 4 epochs, reload into fresh ones: the lr sequence continues.

    With ``more_epochs`` the first run was configured for 2 epochs and the resumed one for 4
    (``--resume ... --epochs 4``): from the first resumed step on, it follows the 4-epoch schedule.
    """
    steps_per_epoch = 5
    given = {"scheduler": name, "epochs": 4, "lr": 0.01}
    if any(p.key == "warmup_epochs" for p in SCHEDULERS[name].params):
        given["warmup_epochs"] = 1.0
    config = resolve(given)

    def fresh(config):
        optimizer = build_optimizer(config, [torch.nn.Parameter(torch.zeros(1))])
        return (optimizer, *build_scheduler(config, optimizer, steps_per_epoch))

    def run(optimizer, scheduler, interval, steps):
        lrs = []
        for step in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if interval == "step" or (step + 1) % steps_per_epoch == 0:
                scheduler.step()
        return lrs

    first = {**config, "epochs": 2} if more_epochs else config
    optimizer, scheduler, interval = fresh(first)
    head = run(optimizer, scheduler, interval, 2 * steps_per_epoch)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = {**torch.load(buffer, weights_only=True), "config": first, "epoch": 2, "global_step": 2 * steps_per_epoch}

    optimizer, scheduler, interval = fresh(config)
    restore_optimization(state, config, optimizer, scheduler, interval, steps_per_epoch)
    tail = run(optimizer, scheduler, interval, 2 * steps_per_epoch)

    expected = lr_schedule(config, steps_per_epoch)
    assert tail == pytest.approx(expected[2 * steps_per_epoch :])
    if not more_epochs:
        assert head == pytest.approx(expected[: 2 * steps_per_epoch])


def test_step_lr_multiplies_by_gamma_each_step_size_epochs():
    config = resolve({"scheduler": "step_lr", "step_size": 2, "gamma": 0.5, "epochs": 5, "lr": 0.1})
    per_epoch = lr_schedule(config, steps_per_epoch=3)[::3]
    assert per_epoch == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_none_scheduler_is_constant_and_warmups_rise_to_the_peak():
    assert set(lr_schedule(resolve({"lr": 0.02, "epochs": 2}), 4)) == {0.02}
    lrs = lr_schedule(
        resolve(
            {
                "scheduler": "linear_then_cosine_annealing_lr",
                "lr": 0.1,
                "epochs": 4,
                "warmup_epochs": 1.0,
                "warmup_start_factor": 0.1,
            }
        ),
        steps_per_epoch=10,
    )
    assert lrs[0] == pytest.approx(0.01) and max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 10
    assert lrs[10:] == sorted(lrs[10:], reverse=True)
    cosine = lr_schedule(resolve({"scheduler": "cosine_annealing_lr", "lr": 0.1, "epochs": 2, "eta_min_factor": 0.1}), 50)
    assert cosine[0] == pytest.approx(0.1) and cosine[-1] == pytest.approx(0.01, abs=1e-3)


# --- augmentations --------------------------------------------------------------------------------------------


def _images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 2, 5, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("registry", "name"), registered(AUGMENTATIONS))
def test_augmentation_keeps_the_shape_and_draws_only_from_its_generator(registry, name):
    """The same generator state gives the same batch; torch's global generator is left alone; the input is not written."""
    inputs = _images()
    kept = inputs.clone()
    augment = registry[name]
    global_state = torch.get_rng_state()
    first = augment.build(inputs, torch.Generator().manual_seed(3), config={})
    again = augment.build(inputs, torch.Generator().manual_seed(3), config={})
    other = augment.build(inputs, torch.Generator().manual_seed(4), config={})
    assert first.shape == inputs.shape and torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, inputs) and torch.equal(inputs, kept)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_random_crop_is_a_window_of_the_zero_padded_image_at_an_offset_per_sample():
    inputs = _images()
    cropped = random_crop(inputs, torch.Generator().manual_seed(0), padding=2)
    padded = F.pad(inputs, (2, 2, 2, 2))
    offsets = []
    for sample, out in zip(padded, cropped):
        found = [(y, x) for y in range(5) for x in range(5) if torch.equal(sample[:, y : y + 5, x : x + 6], out)]
        assert found, "not a window of the padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 1, "every sample at one offset"


def test_horizontal_flip_mirrors_each_sample_with_probability_p():
    inputs = _images(64)
    assert torch.equal(horizontal_flip(inputs, torch.Generator(), p=0.0), inputs)
    assert torch.equal(horizontal_flip(inputs, torch.Generator(), p=1.0), inputs.flip(-1))
    half = horizontal_flip(inputs, torch.Generator().manual_seed(0), p=0.5)
    flipped = [torch.equal(h, x.flip(-1)) for h, x in zip(half, inputs)]
    assert all(f or torch.equal(h, x) for f, h, x in zip(flipped, half, inputs))
    assert 0 < sum(flipped) < 64


@pytest.mark.parametrize("name", ["random_crop", "horizontal_flip"])
def test_an_augmentation_that_cannot_take_the_samples_is_refused_before_training(name):
    config = resolve({"augmentations": (name,), "dummy_n_samples": 16})
    with pytest.raises(ConfigError, match=re.escape(f"--augmentations {name} does not take DummyDataset samples")) as error:
        check_components(config, build_dataset(config).spec)
    assert "[784]" in str(error.value)
