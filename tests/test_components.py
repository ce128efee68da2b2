"""Every registered component builds and runs; then checks of real values per kind. No Ray here."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_DUMMY, train_locally

from toolbox.checkpoint import load_state
from toolbox.config import KINDS, check_against_data, check_components, resolve
from toolbox.data import DATASETS, TensorData, build_dataset
from toolbox.losses import CRITERIA
from toolbox.metrics import METRICS
from toolbox.models import MODELS, Dropout, build_model
from toolbox.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler, load_optimizer_and_scheduler, lr_schedule


def registered(*registries):
    """pytest params (registry, name) for every registered component of these kinds."""
    return [pytest.param(r, c.name, id=f"{r.kind}-{c.name}") for r in registries for c in r]


def tiny_config(mnist_root, **given) -> dict:
    """A resolved config on tiny data, 2 epochs of 4 steps, whichever components ``given`` picks."""
    config = resolve({"epochs": 2, "batch_size": 16, **given}, strict=False)
    data_keys = {"DummyDataset": TINY_DUMMY, "MNIST": {"mnist_root": str(mnist_root)}}.get(config["dataset"], {})
    return resolve({"epochs": 2, "batch_size": 16, **data_keys, **given})


@pytest.mark.parametrize(("registry", "name"), registered(*KINDS, METRICS))
def test_every_component_builds_and_trains(registry, name, tiny_mnist, tmp_path):
    """Each component, with its defaults and the others' defaults, passes the checks and trains 2 epochs."""
    config = tiny_config(tiny_mnist[0], **{registry.selector: (name,) if registry is METRICS else name})
    data = build_dataset(config)
    check_against_data(config, check_components(config), data)
    torch.manual_seed(config["seed"])  # the loop's own seeding: the same initial weights
    initial = build_model(config).state_dict()

    rows = train_locally(config, data, checkpoints=tmp_path)

    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[-1]["global_step"] == 2 * math.ceil(len(data.train_y) / config["batch_size"])
    for row in rows:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) and row["lr"] > 0
        for metric in config["metrics"]:
            assert 0.0 <= row[f"val_{metric}"] <= 100.0
    final = load_state(tmp_path / "epoch_2")["model"]
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final), "two epochs of training changed no weight"


# --- models ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("registry", "name"), registered(MODELS))
def test_model_outputs_logits_for_the_default_dataset(registry, name):
    config = resolve({"arch": name})
    model = build_model(config)
    x = torch.randn(3, *config["dummy_input_shape"], requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, config["dummy_num_classes"])
    logits.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def test_feed_forward_layers_follow_the_config():
    config = resolve(
        {"ff_input_size": 12, "ff_hidden_sizes": (7, 5), "ff_output_dim": 3, "ff_dropout": 0.25, "ff_activation": "tanh"}
    )
    model = build_model(config)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 7), (7, 5), (5, 3)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in model) == 2
    assert [m.p for m in model if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25]


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
def test_dataset_is_deterministic_and_well_formed(registry, name, tiny_mnist):
    config = tiny_config(tiny_mnist[0], dataset=name)
    a, b = build_dataset(config), build_dataset(config)
    for key in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert len(a.train_x) == len(a.train_y) > 0 and len(a.val_x) == len(a.val_y) > 0
    assert a.val_x.shape[1:] == a.train_x.shape[1:] == a.sample_shape
    for y in (a.train_y, a.val_y):
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < a.num_classes
    shared = TensorData.from_shared(a.to_shared())
    assert torch.equal(shared.train_x, a.train_x) and shared.num_classes == a.num_classes and shared.std == a.std


def test_dummy_dataset_sizes_and_seed():
    config = resolve({"dummy_n_samples": 50, "dummy_val_n_samples": 20, "dummy_input_shape": (3, 4), "dummy_num_classes": 4})
    data = build_dataset(config)
    assert data.train_x.shape == (50, 3, 4) and data.val_x.shape == (20, 3, 4) and data.num_classes == 4
    other_seed = build_dataset({**config, "seed": 1})
    assert not torch.equal(other_seed.train_x, data.train_x)


def test_mnist_reads_the_idx_files_it_is_given(tiny_mnist):
    root, written = tiny_mnist
    data = build_dataset(resolve({"dataset": "MNIST", "mnist_root": str(root)}))
    assert torch.equal(data.train_x, written["train_x"].flatten(1))
    assert torch.equal(data.val_x, written["val_x"].flatten(1))
    assert torch.equal(data.train_y, written["train_y"].long()) and torch.equal(data.val_y, written["val_y"].long())
    assert data.num_classes == 10
    normalized = data.normalize(data.train_x[:1])
    expected = (written["train_x"][:1].flatten(1).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(normalized, expected)
    index = torch.tensor([3, 0, 3, 1])
    for split in ("train", "val"):
        inputs, targets = data.batch(split, index)
        pixels = written[f"{split}_x"].flatten(1)[index].float()
        assert inputs.dtype == torch.float32 and torch.allclose(inputs, (pixels / 255 - 0.1307) / 0.3081)
        assert torch.equal(targets, written[f"{split}_y"].long()[index])


def test_normalize_never_writes_its_input():
    x = torch.rand(4, 3)
    data = TensorData(x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long), 2, mean=0.5, std=2.0)
    before = x.clone()
    assert torch.allclose(data.normalize(x), (before - 0.5) / 2.0)
    assert torch.equal(x, before)


# --- criteria -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("registry", "name"), registered(CRITERIA))
def test_criterion_is_a_differentiable_scalar_lower_for_right_answers(registry, name):
    criterion = CRITERIA[name].build(config=resolve({"criterion": name}))
    targets = torch.tensor([0, 3, 1, 2])
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = criterion(logits, targets)
    assert loss.shape == () and math.isfinite(loss.item())
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    right = criterion(F.one_hot(targets, 5).float() * 10, targets)
    assert right < loss


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


@pytest.mark.parametrize(("registry", "name"), registered(OPTIMIZERS))
def test_optimizer_state_survives_a_weights_only_checkpoint(registry, name):
    """A resumed optimizer continues exactly like the uninterrupted one."""
    config = resolve({"optimizer": name})

    def steps(model, optimizer, x, y, n):
        for _ in range(n):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()

    model, x, y = _regression()
    optimizer = build_optimizer(config, model.parameters())
    steps(model, optimizer, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    steps(model, optimizer, x, y, 3)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, _, _ = _regression()
    resumed.load_state_dict(state["model"])
    resumed_optimizer = build_optimizer(config, resumed.parameters())
    resumed_optimizer.load_state_dict(state["optimizer"])
    steps(resumed, resumed_optimizer, x, y, 3)
    assert torch.equal(resumed.weight, model.weight) and torch.equal(resumed.bias, model.bias)


@pytest.mark.parametrize(("registry", "name"), registered(OPTIMIZERS))
def test_optimizer_keeps_its_fused_step_when_resumed_from_a_checkpoint_without_one(registry, name):
    """Fused kernels are on for CPU params. Resuming from a run that had them off (an older run, or a
    device without them) turns them back on, and the run continues exactly like an uninterrupted one."""
    config = resolve({"optimizer": name, "scheduler": "none"})
    model, x, y = _regression()
    optimizer = build_optimizer(config, model.parameters())
    assert all(group["fused"] is True for group in optimizer.param_groups)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the live state tensors
    saved_without_fused = {**saved, "param_groups": [{**g, "fused": None} for g in saved["param_groups"]]}
    resumed, _, _ = _regression()
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = build_optimizer(config, resumed.parameters())
    scheduler, _ = build_scheduler(config, resumed_optimizer, steps_per_epoch=1)
    load_optimizer_and_scheduler(resumed_optimizer, scheduler, saved_without_fused, scheduler.state_dict())
    assert all(group["fused"] is True for group in resumed_optimizer.param_groups)
    for m, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        opt.step()
    assert torch.equal(resumed.weight, model.weight) and torch.equal(resumed.bias, model.bias)


# --- schedulers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("registry", "name"), registered(SCHEDULERS))
def test_scheduler_lr_stays_positive_and_at_most_the_peak(registry, name):
    config = resolve({"scheduler": name, "epochs": 3, "lr": 0.01})
    lrs = lr_schedule(config, steps_per_epoch=10)
    assert len(lrs) == 30
    assert all(math.isfinite(lr) and 0 < lr <= 0.01 * (1 + 1e-9) for lr in lrs), lrs


def _resume_cases() -> list:
    cases = []
    for component in SCHEDULERS:
        for more_epochs in (False, True):
            cases.append(
                pytest.param(
                    component.name,
                    more_epochs,
                    id=f"{component.name}-{'more' if more_epochs else 'same'}-epochs",
                )
            )
    return cases


@pytest.mark.parametrize(("name", "more_epochs"), _resume_cases())
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

    optimizer, scheduler, interval = fresh({**config, "epochs": 2} if more_epochs else config)
    head = run(optimizer, scheduler, interval, 2 * steps_per_epoch)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    optimizer, scheduler, interval = fresh(config)
    load_optimizer_and_scheduler(optimizer, scheduler, state["optimizer"], state["scheduler"])
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


# --- metrics --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("registry", "name"), registered(METRICS))
def test_metric_is_a_sum_that_adds_up_over_batches(registry, name):
    """Metrics return the batch's sum, so rank and batch partial results add up to the whole set's."""
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(10, 7, generator=g), torch.randint(0, 7, (10,), generator=g)
    fn = METRICS[name].fn
    whole = fn(logits, targets)
    assert whole.shape == ()
    assert torch.allclose(whole.double(), fn(logits[:4], targets[:4]).double() + fn(logits[4:], targets[4:]).double())
    perfect = fn(F.one_hot(targets, 7).float(), targets)
    assert perfect.item() == pytest.approx(100.0 * len(targets))


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
    assert METRICS["top_1_accuracy"].fn(logits, targets).item() == pytest.approx(200.0)
    assert METRICS["top_5_accuracy"].fn(logits, targets).item() == pytest.approx(300.0)
