"""The training loop in this process (no Ray): resuming from a checkpoint continues the run bit for bit."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.fs
import pytest
import torch
from helpers import TINY_DUMMY, assert_same_weights, collecting_session, register_map_style_dataset, train_locally

from toolbox.components.optimizers import OPTIMIZERS
from toolbox.components.schedulers import SCHEDULERS
from toolbox.config.registry import Fraction, PositiveFloat
from toolbox.config.resolve import resolve
from toolbox.distributed.cluster import free_port
from toolbox.distributed.storage import atomic_local_files
from toolbox.training.builders import build_dataset, lr_schedule
from toolbox.training.checkpoint import load_state, save_state
from toolbox.training.loop import train
from toolbox.training.session import RanksOutOfStep, Session, checkpoint_directory

RESUMABLE = {**TINY_DUMMY, "batch_size": 16, "ff_hidden_sizes": (32,), "ff_dropout": 0.1, "epochs": 4}


def compare_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        for key in ("lr", "train_loss", "val_loss", "global_step"):
            assert x[key] == pytest.approx(y[key], rel=1e-6), (x["epoch"], key)


@pytest.mark.parametrize("scheduler", SCHEDULERS.names())
def test_an_interrupted_run_resumes_exactly(scheduler, tmp_path):
    """Epochs 3-4 resumed from the epoch-2 checkpoint equal those of the uninterrupted run (weights, lr, losses)."""
    config = resolve({**RESUMABLE, "scheduler": scheduler})
    data = build_dataset(config)
    full = train_locally(config, data, checkpoints=tmp_path / "full")
    resumed = train_locally(config, data, checkpoints=tmp_path / "resumed", resume_from=tmp_path / "full" / "epoch_2")
    compare_rows(resumed, full[2:])
    assert_same_weights(load_state(tmp_path / "resumed" / "epoch_4")["model"], load_state(tmp_path / "full" / "epoch_4")["model"])


def test_resume_with_more_epochs_equals_the_longer_run_and_needs_the_rng_state(tmp_path):
    """``--resume RUN --epochs 4`` after 2 epochs (step_lr: its state, not the total, sets the lr), and its controls."""
    config = resolve({**RESUMABLE, "scheduler": "step_lr", "step_size": 1, "gamma": 0.5})
    data = build_dataset(config)
    full = train_locally(config, data, checkpoints=tmp_path / "full")
    train_locally({**config, "epochs": 2}, data, checkpoints=tmp_path / "half")
    state = load_state(tmp_path / "half" / "epoch_2")
    resumed_config = resolve({"epochs": 4}, base=state["config"])
    assert resumed_config == config

    resumed = train_locally(resumed_config, data, checkpoints=tmp_path / "resumed", resume_from=tmp_path / "half" / "epoch_2")
    compare_rows(resumed, full[2:])
    assert [r["lr"] for r in full] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])
    final = load_state(tmp_path / "full" / "epoch_4")["model"]
    assert_same_weights(load_state(tmp_path / "resumed" / "epoch_4")["model"], final)

    # Control: with another RNG state (other dropout masks) the resumed weights differ, so the check above has teeth.
    other = torch.manual_seed(123).get_state()
    state["rng"] = {"torch": other, "per_rank": [other]}
    (tmp_path / "other_rng").mkdir()
    save_state(tmp_path / "other_rng", state)
    train_locally(resumed_config, data, checkpoints=tmp_path / "control", resume_from=tmp_path / "other_rng")
    control = load_state(tmp_path / "control" / "epoch_4")["model"]
    assert any(not torch.equal(control[k], final[k]) for k in final)


def test_bf16_mixed_runs_forward_in_bfloat16_keeps_float32_state_and_resumes_exactly(tmp_path):
    """``--precision bf16-mixed``: losses differ from 32-true's (autocast is really on), the run still
    learns, everything saved stays float32, and a resumed run continues bit for bit."""
    config = resolve({**RESUMABLE, "precision": "bf16-mixed"})
    data = build_dataset(config)
    mixed = train_locally(config, data, checkpoints=tmp_path / "mixed")
    full = train_locally({**config, "precision": "32-true"}, data)
    assert [r["train_loss"] for r in mixed] != pytest.approx([r["train_loss"] for r in full], rel=1e-4)
    assert [r["train_loss"] for r in mixed] == pytest.approx([r["train_loss"] for r in full], rel=0.05)
    assert mixed[-1]["train_loss"] < mixed[0]["train_loss"]
    state = load_state(tmp_path / "mixed" / "epoch_4")
    saved = [*state["model"].values(), *(t for s in state["optimizer"]["state"].values() for t in s.values())]
    assert {t.dtype for t in saved} == {torch.float32}
    resumed = train_locally(config, data, checkpoints=tmp_path / "resumed", resume_from=tmp_path / "mixed" / "epoch_2")
    compare_rows(resumed, mixed[2:])


def test_checkpoint_holds_the_full_training_state(tmp_path):
    config = resolve({**RESUMABLE, "epochs": 2, "scheduler": "step_lr"})
    rows = train_locally(config, build_dataset(config), checkpoints=tmp_path)
    state = torch.load(tmp_path / "epoch_2" / "state.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "global_step", "rng", "best_val_loss", "config"} <= state.keys()
    assert state["epoch"] == 2 and state["global_step"] == 2 * 64 // 16 == rows[-1]["global_step"]
    assert state["config"] == config
    assert state["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows))
    assert state["scheduler"]["last_epoch"] == 2  # step_lr steps once per epoch
    assert state["rng"]["torch"].dtype == torch.uint8
    assert "augmentation" not in state["rng"]  # saved only where a run augments (its generator is the device's kind)
    assert len(state["optimizer"]["state"]) == len(list(state["model"]))


def test_a_checkpoint_of_another_optimizer_and_scheduler_continues_the_weights(tmp_path):
    """PBT may hand a trial the checkpoint of a trial with another optimizer: weights carry over, the rest starts afresh."""
    adamw = resolve({**RESUMABLE, "optimizer": "adamw", "scheduler": "none"})
    data = build_dataset(adamw)
    train_locally({**adamw, "epochs": 2}, data, checkpoints=tmp_path / "adamw")
    sgd = resolve({**RESUMABLE, "optimizer": "sgd", "scheduler": "cosine_annealing_lr", "lr": 0.05})
    rows = train_locally(sgd, data, checkpoints=tmp_path / "sgd", resume_from=tmp_path / "adamw" / "epoch_2")
    assert [r["epoch"] for r in rows] == [3, 4]
    expected_lr = lr_schedule(sgd, rows[0]["steps_per_epoch"])[2 * rows[0]["steps_per_epoch"]]
    assert rows[0]["lr"] == pytest.approx(expected_lr)  # the cosine schedule at epoch 3, not at its start
    assert rows[0]["lr"] < 0.05


def test_training_flushes_subnormals_in_its_thread_and_the_threads_torch_starts_for_it():
    """Adam's moments turn subnormal where gradients are zero, and x86 computes those slowly: train()
    flushes them to zero in its thread, and torch's OpenMP threads, started after, inherit that."""
    config = resolve({**RESUMABLE, "epochs": 1})
    data = build_dataset(config)
    # Subnormal floats made from their bits: converting a float would already flush them.
    subnormals = torch.full((1 << 18,), 1 << 20, dtype=torch.int32).view(torch.float32)
    survivors = []

    def count(x: torch.Tensor) -> int:
        return int(((x * 1.0).view(torch.int32) != 0).sum())

    def a_training_thread() -> None:
        torch.set_flush_denormal(False)  # as a new thread starts (an earlier train() may have set it here)
        torch.set_num_threads(2)
        survivors.append(count(subnormals[:4]))  # too small for a second thread
        train_locally(config, data)
        survivors.append(count(subnormals))  # large enough that both OpenMP threads take a share

    thread = threading.Thread(target=a_training_thread)
    thread.start()
    thread.join()
    assert survivors == [4, 0]


@pytest.fixture
def test_only_components(monkeypatch):
    """An optimizer and a scheduler that exist only in this test, each with a parameter no other component has."""
    for registry in (OPTIMIZERS, SCHEDULERS):
        monkeypatch.setattr(registry, "_components", dict(registry._components))

    @OPTIMIZERS.register("test_rmsprop", prefix="test")
    def rmsprop(params, /, *, lr: PositiveFloat = 1e-3, alpha: Fraction = 0.99):
        """RMSprop.

        Args:
            lr: learning rate.
            alpha: smoothing constant.
        """
        return torch.optim.RMSprop(params, lr=lr, alpha=alpha)

    @SCHEDULERS.register("test_exponential", prefix="test", interval="epoch")
    def exponential(optimizer, steps_per_epoch: int, epochs: int, /, *, decay: PositiveFloat = 0.5):
        """The lr times decay after every epoch.

        Args:
            decay: the factor.
        """
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)

    return {**RESUMABLE, "optimizer": "test_rmsprop", "scheduler": "test_exponential", "test_lr": 1e-3}


def _changed(config: dict, **values) -> dict:
    return resolve({**values, "epochs": 4}, base={**config, "epochs": 2})


def _saved_hyperparameters(checkpoint) -> tuple[float, float]:
    state = load_state(checkpoint)
    return state["optimizer"]["param_groups"][0]["alpha"], state["scheduler"]["gamma"]


def test_a_resumed_run_takes_changed_optimizer_and_scheduler_values_from_the_next_step(test_only_components, tmp_path):
    """``--resume RUN --test-alpha 0.9 --test-decay 0.8 --test-lr 2e-3``: every changed value, of components the
    loop has never heard of, applies from the first resumed step; the lr continues from where the run was."""
    config = resolve({**test_only_components, "epochs": 2})
    data = build_dataset(config)
    first = train_locally(config, data, checkpoints=tmp_path / "first")
    assert [r["lr"] for r in first] == pytest.approx([1e-3, 5e-4])
    assert _saved_hyperparameters(tmp_path / "first" / "epoch_2") == pytest.approx((0.99, 0.5))

    resumed_config = _changed(config, test_alpha=0.9, test_decay=0.8, test_lr=2e-3)
    resumed = train_locally(resumed_config, data, checkpoints=tmp_path / "resumed", resume_from=tmp_path / "first" / "epoch_2")

    # Where the run was (2.5e-4) times the new lr's ratio (2), then the new decay.
    assert [r["lr"] for r in resumed] == pytest.approx([5e-4, 5e-4 * 0.8])
    assert _saved_hyperparameters(tmp_path / "resumed" / "epoch_4") == pytest.approx((0.9, 0.8))
    unchanged = train_locally(_changed(config), data, resume_from=tmp_path / "first" / "epoch_2")
    assert [r["lr"] for r in unchanged] == pytest.approx([2.5e-4, 1.25e-4])  # the control: old values, old decay


def test_an_exploited_checkpoint_continues_with_the_exploiting_trials_values(test_only_components, tmp_path):
    """PBT's exploit: a trial with its own values starts from another trial's checkpoint (Tune hands it over
    as the session's latest checkpoint) and trains on with its own optimizer and scheduler values."""
    from ray.train import Checkpoint

    donor = resolve({**test_only_components, "epochs": 2, "test_alpha": 0.95, "test_decay": 0.5})
    data = build_dataset(donor)
    train_locally(donor, data, checkpoints=tmp_path / "donor")
    exploiting = resolve({**test_only_components, "epochs": 3, "test_alpha": 0.8, "test_decay": 0.9, "test_lr": 5e-4})
    rows: list[dict] = []
    session = collecting_session(rows, tmp_path / "exploiting")
    session.latest_checkpoint = lambda: Checkpoint.from_directory(str(tmp_path / "donor" / "epoch_2"))
    train(exploiting, data, session)

    assert [r["epoch"] for r in rows] == [3]
    assert rows[0]["lr"] == pytest.approx(2.5e-4 * 0.5)  # the donor's lr where it was, at the exploiter's ratio
    assert _saved_hyperparameters(tmp_path / "exploiting" / "epoch_3") == pytest.approx((0.8, 0.9))


def test_bf16_units_are_read_from_cpuinfo(tmp_path):
    """The one-line bf16 warning's test: a CPU listing neither AMX nor AVX512-BF16 has none."""
    from toolbox.training.loop import cpu_bf16_units

    with_units, without = tmp_path / "with", tmp_path / "without"
    with_units.write_text("processor : 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    without.write_text("processor : 0\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_bf16_units(str(with_units)) == "amx_bf16, avx512_bf16"
    assert cpu_bf16_units(str(without)) is None
    assert cpu_bf16_units(str(tmp_path / "missing")) is None


def test_a_damaged_latest_checkpoint_is_skipped_for_the_one_before_and_said(tmp_path, caplog):
    """Auto-resume (a run dir) passes over a cut-short newest state.pt; an explicit damaged one is refused."""
    from toolbox.config.registry import ConfigError
    from toolbox.training.checkpoint import load_latest

    config = resolve({**RESUMABLE, "epochs": 3})
    train_locally(config, build_dataset(config), checkpoints=tmp_path / "run")
    newest = tmp_path / "run" / "epoch_3" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level("WARNING", logger="toolbox"):
        directory, state = load_latest(tmp_path / "run")
    assert directory == tmp_path / "run" / "epoch_2" and state["epoch"] == 2
    assert "skipping damaged checkpoint" in caplog.text and "epoch_3" in caplog.text
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        load_latest(tmp_path / "run" / "epoch_3")


def test_a_retried_group_continues_from_rays_checkpoint_when_the_one_it_resumed_from_is_gone(tmp_path, caplog):
    """A re-run resumes from epoch 2; Ray keeps epoch 3 and removes epoch 2; a worker dies: the restarted
    group continues from Ray's epoch 3. With no checkpoint of Ray's, the missing one is an error."""
    from ray.train import Checkpoint

    from toolbox.config.registry import ConfigError

    config = resolve({**RESUMABLE, "epochs": 4})
    data = build_dataset(config)
    train_locally(config, data, checkpoints=tmp_path / "run")
    full = train_locally(config, data, checkpoints=tmp_path / "full")
    gone = tmp_path / "run" / "epoch_2"
    for file in gone.iterdir():
        file.unlink()
    gone.rmdir()

    rows: list[dict] = []
    session = collecting_session(rows, tmp_path / "retried")
    session.latest_checkpoint = lambda: Checkpoint.from_directory(str(tmp_path / "run" / "epoch_3"))
    with caplog.at_level("WARNING", logger="toolbox"):
        train(config, data, session, str(gone))
    assert [r["epoch"] for r in rows] == [4] and "continuing from Ray's latest checkpoint" in caplog.text
    compare_rows(rows, full[3:])
    with pytest.raises(ConfigError, match="no state.pt in"):
        train(config, data, collecting_session([], tmp_path / "fresh"), str(gone))


FLUSH_ORDER = """\
import sys, threading, torch
from toolbox.config.resolve import resolve
from toolbox.training.builders import build_dataset
from toolbox.training.loop import flush_denormals
from toolbox.data.tensors import TensorData

if not torch.set_flush_denormal(False):
    sys.exit(print("unsupported"))
torch.set_num_threads(2)
made = []  # made on another thread, as the driver's put makes it: this thread has no OpenMP threads yet
threading.Thread(target=lambda: made.append(build_dataset(resolve({"dummy_n_samples": 1 << 17})).to_shared())).start()
while not made:
    threading.Event().wait(0.05)
if sys.argv[1] == "first":
    flush_denormals()
TensorData.from_shared(made[0])  # its label check is a parallel op: OpenMP starts this thread's team here
flush_denormals()
subnormal = torch.full((1 << 22,), 1 << 20, dtype=torch.int32).view(torch.float32)
print(int((subnormal * 1.0).count_nonzero()))
"""


def test_denormals_are_flushed_on_every_openmp_thread_only_when_flushed_before_the_first_parallel_op():
    """Why train_worker and run_trial call flush_denormals first: OpenMP threads keep the mode they started with."""
    import subprocess
    import sys

    from helpers import python_env

    left = {}
    for order in ("first", "late"):
        done = subprocess.run(
            [sys.executable, "-c", FLUSH_ORDER, order], capture_output=True, text=True, env=python_env(), timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        if done.stdout.split()[-1] == "unsupported":
            pytest.skip("this CPU cannot flush denormals")
        left[order] = int(done.stdout.split()[-1])
    assert left["first"] == 0
    assert left["late"] > 0, "a thread started before the flush flushed anyway: the entry points' order no longer matters"


def test_augmented_training_resumes_exactly_and_needs_the_augmentation_rng_state(tmp_path):
    """Random crops and flips drawn from the run's own generator: epochs 3-4 resumed from epoch 2 equal the
    uninterrupted run's; with another saved augmentation state (other crops) the weights differ."""
    config = resolve({**RESUMABLE, "dummy_input_shape": (1, 8, 8), "augmentations": ("random_crop", "horizontal_flip")})
    data = build_dataset(config)
    full = train_locally(config, data, checkpoints=tmp_path / "full")
    plain = train_locally({**config, "augmentations": ()}, data)
    assert [r["train_loss"] for r in full] != pytest.approx([r["train_loss"] for r in plain], rel=1e-4)
    assert [r["val_loss"] for r in full] != pytest.approx([r["val_loss"] for r in plain], rel=1e-4)
    resumed = train_locally(config, data, checkpoints=tmp_path / "resumed", resume_from=tmp_path / "full" / "epoch_2")
    compare_rows(resumed, full[2:])
    final = load_state(tmp_path / "full" / "epoch_4")["model"]
    assert_same_weights(load_state(tmp_path / "resumed" / "epoch_4")["model"], final)

    state = load_state(tmp_path / "full" / "epoch_2")
    state["rng"]["augmentation"] = [torch.Generator().manual_seed(123).get_state()]
    (tmp_path / "other_augmentation_rng").mkdir()
    save_state(tmp_path / "other_augmentation_rng", state)
    train_locally(config, data, checkpoints=tmp_path / "control", resume_from=tmp_path / "other_augmentation_rng")
    control = load_state(tmp_path / "control" / "epoch_4")["model"]
    assert any(not torch.equal(control[k], final[k]) for k in final)


@pytest.fixture
def map_style_dataset(monkeypatch) -> dict:
    return {**RESUMABLE, **register_map_style_dataset(monkeypatch), "loader_workers": 2}


def test_map_style_splits_read_in_the_tensor_paths_order_and_resume_exactly(map_style_dataset, tmp_path):
    """Through a DataLoader with 2 worker processes, per-sample transforms drawn in the workers: without jitter
    the rows are those of the same tensors as TensorData; with it, epochs 3-4 resumed from epoch 2 equal the
    uninterrupted run's, and the jitter (the workers' draws) changed the numbers."""
    from toolbox.components.datasets import dummy_dataset
    from toolbox.data.splits import DatasetSplits

    plain = resolve(map_style_dataset, strict=False)
    plain_data = build_dataset(plain)
    assert isinstance(plain_data, DatasetSplits) and plain_data.loader_workers == 2
    unjittered = train_locally(plain, plain_data)
    as_tensors = resolve({**RESUMABLE, "dummy_input_shape": (16,)})
    compare_rows(unjittered, train_locally(as_tensors, dummy_dataset(0, n_samples=64, val_n_samples=32, input_shape=(16,))))

    config = resolve({**map_style_dataset, "test_jitter": 0.5}, strict=False)
    data = build_dataset(config)
    full = train_locally(config, data, checkpoints=tmp_path / "full")
    assert [r["train_loss"] for r in full] != pytest.approx([r["train_loss"] for r in unjittered], rel=1e-4)
    resumed = train_locally(config, data, checkpoints=tmp_path / "resumed", resume_from=tmp_path / "full" / "epoch_2")
    compare_rows(resumed, full[2:])
    assert_same_weights(load_state(tmp_path / "resumed" / "epoch_4")["model"], load_state(tmp_path / "full" / "epoch_4")["model"])


def _check_in_step(rank: int, world: int, port: int, epochs: list[int], out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    session = Session(rank, world, torch.device("cpu"), lambda metrics, directory: None, lambda: None, lambda model: model)
    try:
        session.check_in_step(epochs[rank], "epochs to continue from")
        said = "in step"
    except RanksOutOfStep as exc:
        said = str(exc)
    Path(out, str(rank)).write_text(said)
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_ranks_that_would_continue_from_different_epochs_each_raise_rather_than_wait_on_each_other(tmp_path):
    for epochs, said in (([3, 3], "in step"), ([0, 1], "the ranks hold different epochs to continue from, from 0 to 1")):
        torch.multiprocessing.spawn(_check_in_step, args=(2, free_port(), epochs, str(tmp_path)), nprocs=2)
        assert [(tmp_path / str(rank)).read_text() for rank in range(2)] == [said, said]


def test_a_checkpoint_on_local_storage_is_read_in_place_and_a_remote_one_in_a_directory_of_this_process(tmp_path):
    """Ray's own download directory is shared by the processes of a machine: a rank could read a file another rewrites."""
    from ray.train import Checkpoint

    directory, state = tmp_path / "checkpoint", {"epoch": 1, "global_step": 2, "val_loss": 0.5, "model": {}}
    directory.mkdir()
    save_state(directory, state)
    with checkpoint_directory(Checkpoint(str(directory), filesystem=atomic_local_files())) as found:
        assert found == str(directory)
    remote = Checkpoint(str(directory), filesystem=pyarrow.fs.SubTreeFileSystem("/", pyarrow.fs.LocalFileSystem()))
    with checkpoint_directory(remote) as found:
        assert found not in (str(directory), remote._get_temporary_checkpoint_dir())
        assert torch.load(Path(found) / "state.pt", weights_only=True) == state
    assert not Path(found).exists()
