"""A run dir and a sweep dir each say what they are: neither command writes into, deletes or resumes from the other's."""

from __future__ import annotations

import logging
import shutil

import pytest
from conftest import RayStarted
from helpers import TINY_DUMMY, run_cli
from test_refusals import refused

from toolbox import sweep as sweep_cli
from toolbox.distributed.dirkind import KIND_FILE
from toolbox.run import main as run_main

RUN = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_DUMMY.items()]
RUN += ["--epochs", "1", "--batch-size", "32", "--ff-hidden-sizes", "8"]
SWEEP = 'from ray import tune\nbase = {"dummy_n_samples": 64, "dummy_val_n_samples": 32}\nspace = {"lr": 0.1}\n'


def files(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.timeout(300)
def test_a_sweep_refuses_a_run_dir_and_a_run_refuses_a_sweep_dir_touching_nothing(tmp_path, capsys, ray_never_starts):
    """The three steps that used to destroy a run named like a sweep file: a sweep over the run, --restart of
    that sweep, and the run re-run over a sweep's dir (it resumed from a trial's checkpoint). The run itself
    starts its Ray in a process of its own."""
    done = run_cli("run", *RUN, "--storage", str(tmp_path), "--name", "ok")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "ok"
    assert (run_dir / KIND_FILE).read_text() == "run"
    before = files(run_dir)
    sweep_file = tmp_path / "ok.py"
    sweep_file.write_text(SWEEP)

    line = refused(sweep_cli.main, [str(sweep_file), "--storage", str(tmp_path)], capsys)
    assert f"{run_dir} holds a run (written by toolbox.run), not a sweep" in line, line
    line = refused(sweep_cli.main, [str(sweep_file), "--storage", str(tmp_path), "--restart"], capsys)
    assert "holds a run" in line, line
    (run_dir / KIND_FILE).unlink()  # a run dir written before the marker existed is known by its files
    line = refused(sweep_cli.main, [str(sweep_file), "--storage", str(tmp_path), "--restart"], capsys)
    assert "holds a run" in line, line
    (run_dir / KIND_FILE).write_text("run")
    assert files(run_dir) == before

    # A sweep dir as Tune leaves it (no marker), holding a trial's checkpoint: the run refuses it.
    sweep_dir = tmp_path / "swept"
    trial_checkpoint = sweep_dir / "run_trial_00000" / "checkpoint_000000"
    checkpoint = next(p for p in run_dir.glob("checkpoint_*") if p.is_dir())  # not Train's checkpoint_manager_snapshot.json
    shutil.copytree(checkpoint, trial_checkpoint)
    (sweep_dir / "experiment_state-2026-12-07_01-00-00.json").write_text("{}")
    line = refused(run_main, [*RUN, "--storage", str(tmp_path), "--name", "swept"], capsys)
    assert f"{sweep_dir} holds a sweep (written by toolbox.sweep), not a run" in line, line
    (sweep_dir / KIND_FILE).write_text("sweep")
    line = refused(run_main, [*RUN, "--storage", str(tmp_path), "--name", "swept"], capsys)
    assert "holds a sweep" in line, line
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted(
        [KIND_FILE, "experiment_state-2026-12-07_01-00-00.json", "run_trial_00000"]
    )
    assert files(run_dir) == before


def test_resume_from_a_sweep_trials_checkpoint_says_whose_config_it_continues(tmp_path, caplog, ray_never_starts):
    from helpers import train_locally

    from toolbox.config.resolve import resolve
    from toolbox.training.builders import build_dataset

    sweep_dir = tmp_path / "swept"
    config = resolve({**TINY_DUMMY, "epochs": 1, "batch_size": 32, "ff_hidden_sizes": (8,), "optimizer": "sgd", "lr": 0.0025})
    train_locally(config, build_dataset(config), checkpoints=sweep_dir / "run_trial_00000")
    (sweep_dir / KIND_FILE).write_text("sweep")
    caplog.set_level(logging.INFO, logger="toolbox")
    with pytest.raises(RayStarted):
        run_main(["--resume", str(sweep_dir / "run_trial_00000" / "epoch_1"), "--storage", str(tmp_path), "--name", "again"])
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--resume: continuing")]
    assert len(said) == 1 and "sweep swept's trial run_trial_00000" in said[0] and "lr 0.0025" in said[0], said
    assert (tmp_path / "again" / KIND_FILE).read_text() == "run"
