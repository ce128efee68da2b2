"""Faults injected into real runs and sweeps (SIGKILL of a worker, a trial, the driver; Ctrl-C; a full
disk): the work finishes, every epoch and trial is kept once, and nothing of the killed Ray lingers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_same_weights, latest_state, run_cli, start_cli, train_locally

from toolbox.config.resolve import resolve
from toolbox.training.builders import build_dataset
from toolbox.training.epochlog import read_rows

# Epochs long enough to be killed inside one, and enough of them to have some left after each fault.
EPOCHS = 8
RUN = ["--dummy-n-samples", "6000", "--dummy-val-n-samples", "256", "--ff-hidden-sizes", "32", "--ff-dropout", "0.1"]
RUN += ["--batch-size", "8", "--epochs", str(EPOCHS), "--seed", "1"]


class Cli:
    """``python -m toolbox.<module> ...`` in a session of its own, its output read line by line."""

    def __init__(self, module: str, *args: str, under: tuple[str, ...] = ()):
        self.proc = start_cli(module, *args, under=under)
        self.lines: list[str] = []

    def wait_for(self, text: str, timeout: float = 240) -> str:
        deadline = time.time() + timeout
        for line in self.proc.stdout:
            self.lines.append(line)
            if text in line:
                return line
            if time.time() > deadline:
                break
        raise AssertionError(f"never printed {text!r}:\n{''.join(self.lines)[-3000:]}")

    def processes(self, title: str) -> list[psutil.Process]:
        found = []
        for process in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if title in process.name() or title in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
        return found

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stuck = self.where_stuck()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()  # what was read before the timeout is kept
            raise AssertionError(
                f"still running after {timeout} s\n{stuck}\nprinted:\n{(''.join(self.lines) + out)[-3000:]}"
            ) from None
        return self.proc.returncode, "".join(self.lines) + out

    def where_stuck(self) -> str:
        """The command's live processes and the last lines of Train's controller log, to tell where it hangs."""
        if (code := self.proc.poll()) is not None:
            return f"the command exited {code}, but a process it started still holds its output open"
        names, session_dirs = [], set()
        for process in self.processes(""):
            try:
                names.append(process.name())
                session_dirs |= {arg.split("=", 1)[1] for arg in process.cmdline() if arg.startswith("--session_dir=")}
            except psutil.Error:
                pass
        lines = []
        for path in sorted(p for d in session_dirs for p in Path(d).glob("logs/train/ray-train-sys-controller-*.log")):
            for line in path.read_text(errors="replace").splitlines()[-15:]:
                try:
                    entry = json.loads(line)
                    lines.append(f"{entry['asctime']} {entry['message'][:300]}")
                except (ValueError, KeyError):
                    lines.append(line[:300])
        return f"processes: {sorted(names)}\nTrain controller log, last lines:\n" + "\n".join(lines)


def run(*args: str) -> subprocess.CompletedProcess:
    return run_cli("run", *args)


def logged_epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "training.log").read_text().splitlines()
    return [int(line.split()[3].split("/")[0]) for line in lines if len(line.split()) > 3 and line.split()[2] == "epoch"]


def assert_every_epoch_once(run_dir: Path, epochs: int) -> None:
    assert [int(r["epoch"]) for r in read_rows(run_dir)] == list(range(1, epochs + 1))
    csv_epochs = [int(line.split(",")[0]) for line in (run_dir / "epochs.csv").read_text().splitlines()[1:]]
    assert csv_epochs == list(range(1, epochs + 1))
    assert logged_epochs(run_dir) == list(range(1, epochs + 1)), (run_dir / "training.log").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The final weights of RUN trained without faults, by the same loop on one thread."""
    flags = dict(zip(RUN[::2], RUN[1::2]))
    config = resolve(
        {
            "dummy_n_samples": int(flags["--dummy-n-samples"]),
            "dummy_val_n_samples": int(flags["--dummy-val-n-samples"]),
            "ff_hidden_sizes": (int(flags["--ff-hidden-sizes"]),),
            "ff_dropout": float(flags["--ff-dropout"]),
            "batch_size": int(flags["--batch-size"]),
            "epochs": EPOCHS,
            "seed": int(flags["--seed"]),
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker with one CPU: the same reductions, the same bits
    try:
        path = tmp_path_factory.mktemp("reference")
        train_locally(config, build_dataset(config), checkpoints=path)
    finally:
        torch.set_num_threads(threads)
    return torch.load(path / f"epoch_{EPOCHS}" / "state.pt", weights_only=True)["model"]


def first_epoch(cli: Cli, epochs: int = EPOCHS) -> int:
    """Wait for the first epoch line the command prints; its epoch number."""
    return int(re.search(rf"epoch (\d+)/{epochs} ", cli.wait_for(f"/{epochs}  lr ")).group(1))


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; returns the filler to delete (absent where the disk was full already)."""
    filler = disk / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError:
        pass
    return filler


@pytest.mark.timeout(600)
def test_ctrl_c_a_full_disk_a_killed_worker_and_a_killed_driver_each_leave_a_run_the_same_command_finishes(
    small_disk, uninterrupted
):
    """One run, its faults each in the epoch after a command's first: Ctrl-C; a full disk; a SIGKILLed
    worker, then the driver SIGKILLed. Every epoch is trained once and the weights are the faultless run's."""
    args = [*RUN, "--storage", str(small_disk), "--name", "faults"]
    run_dir = small_disk / "faults"

    cli = Cli("run", *args)  # Ctrl-C: one line saying what is kept, exit 130
    first_epoch(cli)
    os.kill(cli.proc.pid, signal.SIGINT)
    code, out = cli.finish()
    assert code == 130, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("toolbox.run: interrupted: ") and "keeps epochs 1-" in last and "re-run the same command" in last
    assert "Traceback" not in out

    cli = Cli("run", *args)  # a full disk: one line, exit 1, and what is there is whole
    first_epoch(cli)
    filler = fill(small_disk)
    code, out = cli.finish()
    assert code == 1, out[-3000:]
    assert "the disk is full" in out.strip().splitlines()[-1] and "Traceback" not in out, out[-3000:]
    for state in run_dir.rglob("state.pt"):
        torch.load(state, weights_only=True)
    filler.unlink(missing_ok=True)

    cli = Cli("run", *args)  # a worker SIGKILLed mid-epoch: the group restarts from the latest checkpoint
    first_epoch(cli)
    victims = cli.processes("RayTrainWorker")
    assert len(victims) == 1, [p.name() for p in victims]
    victims[0].send_signal(signal.SIGKILL)
    first_epoch(cli)  # the restarted group trains on
    ray_processes = cli.processes("ray")  # then the driver alone, as the OOM killer would: the reaper ends its Ray
    assert ray_processes, "no Ray processes under the driver"
    os.kill(cli.proc.pid, signal.SIGKILL)
    cli.proc.wait()
    _, alive = psutil.wait_procs(ray_processes, timeout=45)
    assert not alive, f"still running after the driver died: {[p.name() for p in alive]}"

    again = run(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from epoch" in again.stdout
    assert_every_epoch_once(run_dir, EPOCHS)
    assert_same_weights(latest_state(run_dir)["model"], uninterrupted)


@pytest.mark.timeout(420)
def test_a_killed_worker_of_two_restarts_the_group_from_the_checkpoint_and_finishes(tmp_path):
    epochs = 4  # RUN's, fewer (the last --epochs given wins): the kill lands in the second, two are left after it
    cli = Cli("run", *RUN, "--epochs", str(epochs), "--workers", "2", "--storage", str(tmp_path), "--name", "killed")
    first_epoch(cli, epochs)
    victims = cli.processes("RayTrainWorker")
    assert len(victims) == 2, [p.name() for p in victims]
    victims[-1].send_signal(signal.SIGKILL)
    code, out = cli.finish()
    assert code == 0, out[-3000:]
    assert_every_epoch_once(tmp_path / "killed", epochs)
    # Said in one line, with the rank, the epoch continued from and the restarts left; Ray's own line is in its log.
    said = re.findall(
        r"^worker ([01]) died \(its process ended: killed, or crashed\); restarting the group from epoch (\d+)'s checkpoint \(1 of 3 restarts\)$",
        out,
        re.MULTILINE,
    )
    assert len(said) == 1 and int(said[0][1]) >= 1, out[-3000:]
    assert "A worker died" not in out and "(raylet)" not in out, out[-3000:]


SWEEP = """\
from ray import tune
base = {"dummy_n_samples": 4000, "dummy_val_n_samples": 256, "ff_hidden_sizes": (32,), "batch_size": 8}
space = {"lr": tune.grid_search([1e-3, 3e-3])}
num_samples = 1
epochs = 4
trial_scheduler = "fifo"
max_concurrent = 2
"""


def write_sweep(tmp_path: Path, extra: str = "", name: str = "faults") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(SWEEP + textwrap.dedent(extra))
    return path


def trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(exp_dir.glob("run_trial_*"))


@pytest.mark.timeout(420)
def test_a_killed_trial_retries_from_its_own_checkpoint_and_the_results_count_it(tmp_path):
    path = write_sweep(tmp_path, 'base["dummy_n_samples"] = 6000\n')
    cli = Cli("sweep", str(path), "--storage", str(tmp_path))
    exp_dir = tmp_path / "faults"

    def epochs_of_both() -> list[list[dict]]:
        return [read_rows(d) for d in trial_dirs(exp_dir)]

    # Both trials' first epoch in their tables (written after its log line), so that whichever is killed retries from it.
    deadline = time.time() + 240
    while time.time() < deadline and not (len(epochs_of_both()) == 2 and all(epochs_of_both())):
        time.sleep(0.2)
    victims = cli.processes("Trainable.train")  # the trial actors: with_resources names their class
    assert victims, "no trial process to kill"
    victims[0].send_signal(signal.SIGKILL)
    code, out = cli.finish()
    assert code == 0, out[-3000:]
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "done" and r["epochs"] == 4 for r in rows), rows
    assert sorted(r["retries"] for r in rows) in ([0, 1], [1, 1]), rows
    assert re.search(r"^trial \w+ died; retrying it from its latest checkpoint, epoch [1-4]'s \(1 of 2 retries\)$", out, re.M), (
        out[-3000:]
    )
    for trial in trial_dirs(exp_dir):
        assert_every_epoch_once(trial, 4)


def sweep(*args: str) -> subprocess.CompletedProcess:
    return run_cli("sweep", *args)


@pytest.mark.timeout(600)
def test_ctrl_c_of_a_sweep_exits_130_the_same_command_finishes_it_and_the_retrain_command_reproduces_the_best(tmp_path):
    """--seed and --batch-size, like every other non-default key, are on the re-train command."""
    extra = 'space = {"lr": tune.grid_search([1e-3, 2e-3, 3e-3])}\nmax_concurrent = 1\nbase["dummy_n_samples"] = 16000\n'
    path = write_sweep(tmp_path, extra)  # batches of 32 from 16000 samples: as long a trial as SWEEP's
    args = [str(path), "--storage", str(tmp_path), "--seed", "3", "--batch-size", "32"]
    cli = Cli("sweep", *args)
    cli.wait_for("[1/3]")
    os.kill(cli.proc.pid, signal.SIGINT)
    code, out = cli.finish()
    assert code == 130, out[-3000:]
    assert "interrupted" in out.strip().splitlines()[-1] and "re-run the same command" in out.strip().splitlines()[-1]
    rows = pq.read_table(tmp_path / "faults" / "results.parquet").to_pylist()
    assert "interrupted" in {r["status"] for r in rows} or len(rows) < 3, rows

    again = sweep(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = pq.read_table(tmp_path / "faults" / "results.parquet").to_pylist()
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows), rows
    for trial in trial_dirs(tmp_path / "faults"):
        assert_every_epoch_once(trial, 4)

    best = json.loads((tmp_path / "faults" / "best.json").read_text())
    command = best["command"].split()
    assert "--seed" in command and "--batch-size" in command and command[:3] == ["python", "-m", "toolbox.run"]
    retrained = run(*command[3:], "--storage", str(tmp_path / "retrained"))
    assert retrained.returncode == 0, retrained.stdout[-3000:] + retrained.stderr[-3000:]
    trial = latest_state(Path(best["checkpoint"]).parent)
    assert trial["epoch"] == 4
    assert_same_weights(latest_state(tmp_path / "retrained")["model"], trial["model"])


@pytest.mark.timeout(300)
def test_a_sweep_whose_trials_error_exits_1_and_says_how_many(tmp_path):
    """Two trials' values come from sample_from (unchecked before Ray), a negative weight decay and a batch size
    given as text: each is refused in its trial, once (not retried, though max_failures is 2), with its reason."""
    path = write_sweep(
        tmp_path,
        """\
        space = {"lr": tune.grid_search([1e-3, 2e-3, 3e-3]),
                 "weight_decay": tune.sample_from(lambda spec: -1.0 if spec.config.lr == 2e-3 else 0.0),
                 "batch_size": tune.sample_from(lambda spec: "32" if spec.config.lr == 3e-3 else 32)}
        max_concurrent = 1
        epochs = 1
        """,
    )
    done = sweep(str(path), "--storage", str(tmp_path))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    summary, *causes = done.stderr.strip().splitlines()[-3:]
    assert "2 of 3 trials errored (2 not retried, as a retry would fail the same way);" in summary, summary
    # why, not only how many; and the values of the trial
    assert any("lr=0.002" in c and "ConfigError: --weight-decay must be >= 0, got -1" in c for c in causes), causes
    assert any("lr=0.003" in c and "ConfigError: --batch-size: expected an integer > 0, got '32'" in c for c in causes), causes
    rows = pq.read_table(tmp_path / "faults" / "results.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["done", "error", "error"]
    assert [r["error"] for r in rows if r["status"] == "done"] == [None]
    assert "plots skipped" not in done.stdout, done.stdout[-3000:]  # a trial that never trained has no LR schedule
    for row in rows:
        if row["status"] == "error":
            assert row["retries"] == 0 and "not retried" in row["error"], row
            assert row["trial_id"] in "".join(causes)
            assert (Path(row["trial_dir"]) / "error.txt").read_text().count("Failure # ") == 1


def assert_no_ray_dump(out: str) -> None:
    assert "SIGTERM received" not in out and "PC: @" not in out and "Traceback" not in out, out[-3000:]


def test_the_errored_sweeps_summary_counts_the_crashed_trials_apart_from_those_not_retried(tmp_path, capsys):
    from toolbox.tuning import outcome, sweepfile
    from toolbox.tuning.results import NOT_RETRIED

    path = tmp_path / "three.py"
    path.write_text(
        'from ray import tune\nbase = {"dummy_input_shape": (8,)}\nspace = {"lr": tune.grid_search([0.1, 0.2, 0.3])}\nnum_samples = 1\n'
    )
    sweep = sweepfile.load(path)
    errors = [None, "RuntimeError: the node went away", f"ConfigError: --lr must be > 0, got -1 {NOT_RETRIED}"]
    rows = [
        {"trial_id": f"t{i}", "status": "done" if error is None else "error", "error": error, "lr": lr}
        for i, (error, lr) in enumerate(zip(errors, (0.1, 0.2, 0.3)))
    ]
    assert outcome.said(rows, sweep, tmp_path) == 1
    summary = capsys.readouterr().err.splitlines()[0]
    assert "2 of 3 trials errored (1 crashed on each of 3 tries; 1 not retried, as a retry would fail the same way);" in summary


@pytest.mark.timeout(300)
def test_sigterm_ends_a_run_like_ctrl_c_with_exit_143(tmp_path):
    """Kubernetes, Slurm and `timeout` send SIGTERM: one line saying what is kept, no Ray C++ dump."""
    cli = Cli("run", *RUN, "--storage", str(tmp_path), "--name", "termed")
    first_epoch(cli)
    os.kill(cli.proc.pid, signal.SIGTERM)
    code, out = cli.finish(timeout=30)
    assert code == 143, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("toolbox.run: terminated (SIGTERM): ") and "keeps epochs 1-" in last, out[-3000:]
    assert "re-run the same command" in last
    assert_no_ray_dump(out)


@pytest.mark.timeout(300)
def test_sigterm_through_timeout_ends_a_sweep_like_ctrl_c_writing_its_results(tmp_path):
    """`timeout` passes the SIGTERM it gets on to the sweep (and its process group): the table,
    results and best.json are written as on Ctrl-C, and the exit code is 143."""
    path = write_sweep(tmp_path, 'base["dummy_n_samples"] = 6000\n')
    cli = Cli("sweep", str(path), "--storage", str(tmp_path), under=("timeout", "-s", "TERM", "600"))
    exp_dir = tmp_path / "faults"
    deadline = time.time() + 240
    while time.time() < deadline and not any(1 in logged_epochs(d) for d in trial_dirs(exp_dir) if (d / "training.log").exists()):
        time.sleep(0.2)
    os.kill(cli.proc.pid, signal.SIGTERM)  # to `timeout`, which sends it on
    code, out = cli.finish(timeout=30)
    assert code == 143, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("toolbox.sweep: terminated (SIGTERM): ") and "re-run the same command" in last, out[-3000:]
    assert_no_ray_dump(out)
    assert re.search(r"^rank +trial ", out, re.MULTILINE), out[-3000:]  # the table
    assert {"results.csv", "results.parquet", "best.json"} <= {p.name for p in exp_dir.iterdir()}
    rows = pq.read_table(exp_dir / "results.parquet").to_pylist()
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"interrupted", "done"}, rows
