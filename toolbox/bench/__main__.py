"""``python -m toolbox.bench``: toolbox's speed as ratios against baselines measured in the same run.

Sections (``--only``): data, datapath, overhead, sweep, memory, ddp, fused, scale, and gpu (with ``--gpu``).
datapath times the loop's other data paths (map-style splits through a DataLoader, augmentations)
against its tensors. Sweeps and runs go through the real CLIs in subprocesses; results are read back
from their output files. Prints a markdown table and writes ray_results/bench/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from toolbox.bench.baselines import (
    ORIGINAL_DROPOUT,
    optuna_sweep,
    original_pipeline_epoch_s,
    original_toolbox_epoch_s,
    plain_epoch,
)
from toolbox.config.flags import exit_with
from toolbox.config.resolve import resolve
from toolbox.data.splits import DatasetSplits, tensor_splits
from toolbox.data.tensors import TensorData
from toolbox.training.builders import build_dataset
from toolbox.training.loop import cpu_bf16_units, train
from toolbox.training.session import local_session
from toolbox.tuning.sweepfile import load

SECTIONS = ("data", "datapath", "overhead", "sweep", "memory", "ddp", "fused", "scale")
MNIST_TRAIN_SAMPLES = 60_000
# Each timed figure is the fastest of --run-epochs - 1 tries: toolbox.run's epochs after its first, and as many bare epochs.
RUN_EPOCHS = 5
NEEDS = {"sweep": "optuna", "memory": "psutil"}  # the bench extra: pip install -e '.[bench]'


def _importable() -> set[str]:
    import importlib.util

    return {name for name in set(NEEDS.values()) if importlib.util.find_spec(name)}


def _ratio(value: float) -> str:
    """Three significant digits below 1 (0.401 must not print as 0.40 beside a missed <= 0.4), two decimals above."""
    return f"{value:#.3g}" if abs(value) < 1 else f"{value:.2f}"


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, figure: str, toolbox: float, baseline: float, unit: str, target: str, ok: bool | None, note: str = ""):
        ratio = toolbox / baseline if baseline else float("nan")
        row = {
            "figure": figure,
            "toolbox": toolbox,
            "baseline": baseline,
            "unit": unit,
            "ratio": ratio,
            "target": target,
            "ok": ok,
            "note": note,
        }
        self.rows.append(row)
        print(
            f"  {figure}: toolbox {toolbox:.3g} {unit} vs {baseline:.3g} -> ratio {_ratio(ratio)} (target {target})"
            f"{'' if ok is None else (' ok' if ok else ' MISSED')}",
            flush=True,
        )

    def markdown(self) -> str:
        lines = ["| figure | toolbox | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            met = "-" if r["ok"] is None else ("yes" if r["ok"] else "no")
            lines.append(
                f"| {r['figure']} | {r['toolbox']:.3g} {r['unit']} | {r['baseline']:.3g} {r['unit']}"
                f"{' (' + r['note'] + ')' if r['note'] else ''} | {_ratio(r['ratio'])} | {r['target']} | {met} |"
            )
        return "\n".join(lines)


def cli(module: str, *args: str, watch_memory: bool = False) -> tuple[float, int]:
    """Run ``python -m toolbox.<module> ...``; returns (wall s, peak PSS bytes of its process tree)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"toolbox.{module}", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = [0]
    if watch_memory:
        threading.Thread(target=_watch_pss, args=(proc, peak), daemon=True).start()
    output = proc.communicate()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"toolbox.{module} {' '.join(args)} failed:\n{output[-3000:]}")
    return time.perf_counter() - started, peak[0]


def _watch_pss(proc: subprocess.Popen, peak: list[int]) -> None:
    import psutil

    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            return
        peak[0] = max(peak[0], total)
        time.sleep(0.25)


def sweep_figures(out: Path, name: str, sweep_file: str, *extra: str) -> dict:
    """Run a sweep; returns its wall time, epochs trained, summed epoch compute, best, startups, configs."""
    wall, _ = cli("sweep", sweep_file, "--storage", str(out), "--name", name, "--restart", *extra)
    rows = pq.read_table(out / name / "results.parquet").to_pylist()
    sweep = load(sweep_file)
    compute = sum(
        sum(r["epoch_s"] for r in pq.read_table(Path(t["trial_dir"]) / "epochs.parquet").to_pylist()) for t in rows if t["epochs"]
    )
    return {
        "wall_s": wall,
        "fit_s": json.loads((out / name / "summary.json").read_text())["fit_s"],
        "epochs": sum(r["epochs"] for r in rows),
        "compute_s": compute,
        "best": rows[0][sweep.metric],
        "startup_s": [r["startup_s"] for r in rows if r["startup_s"] == r["startup_s"]],
        "configs": [resolve(json.loads(r["config"])) for r in rows],  # exactly what each trial ran
    }


def _collecting(rows: list[dict], device: str = "cpu"):
    """A Session without Ray that appends every reported row to ``rows``."""
    return local_session(lambda metrics, _checkpoint: rows.append(metrics), device)


def loop_epoch_s(config: dict, data: TensorData | DatasetSplits, device: str = "cpu", warmup: int = 0) -> float:
    """Seconds of the fastest training epoch (after ``warmup`` epochs) of the toolbox loop run in this process."""
    rows: list[dict] = []
    train(config, data, _collecting(rows, device))
    return min(data.size("train") / row["samples_per_s"] for row in rows[warmup:])


def bench_data(table: Table, args, out: Path) -> None:
    config = resolve({"dataset": "MNIST", "mnist_root": args.mnist_root, "mnist_download": True, "epochs": args.run_epochs})
    data = build_dataset(config)
    samples = len(data.train_y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a toolbox worker with --cpus-per-worker 1
    plain_s = min(plain_epoch(config, data) for _ in range(args.run_epochs - 1))
    loop_s = loop_epoch_s(config, data)
    table.add(
        "MNIST epoch (train), toolbox loop in process vs plain PyTorch loop, 1 thread",
        loop_s,
        plain_s,
        "s",
        "<= 1.25",
        loop_s <= 1.25 * plain_s,
    )
    run = _run_epochs(out, args, workers=1)
    run_s = min(samples / row["samples_per_s"] for row in run)
    table.add(
        "MNIST epoch (train), `toolbox.run` (Ray Train worker) vs plain loop",
        run_s,
        plain_s,
        "s",
        "<= 1.25",
        run_s <= 1.25 * plain_s,
    )
    # The original runs with torch's default threads (every core) plus 4 loader processes, so
    # toolbox.run gets every core too: one worker with --cpus-per-worker = the core count. Its FFNN
    # always has dropout, so these rows do too.
    torch.set_num_threads(threads)
    original_model = ("--ff-dropout", str(ORIGINAL_DROPOUT))
    if args.original_toolbox:
        original = original_toolbox_epoch_s(args.original_toolbox, args.mnist_root, config["batch_size"])
        what = "the original toolbox itself, run from --original-toolbox"
    else:
        original = original_pipeline_epoch_s(args.mnist_root, config["batch_size"])
        what = "the original's pipeline rebuilt: per-sample transforms, DataLoader with 4 workers"
    all_cores = _run_epochs(out, args, 1, threads, *original_model)
    run_epoch = min(row["epoch_s"] for row in all_cores)
    # The bare float32 loop, training and validating as toolbox.run's epoch does, at the same threads.
    bare = min(plain_epoch({**config, "ff_dropout": ORIGINAL_DROPOUT}, data, validate=True) for _ in range(args.run_epochs - 1))
    table.add(
        f"MNIST epoch (train + val), `toolbox.run` vs the bare float32 loop (train + val), dropout {ORIGINAL_DROPOUT}, {threads} threads each",
        run_epoch,
        bare,
        "s",
        "<= 1.15",
        run_epoch <= 1.15 * bare,
    )
    table.add(
        f"MNIST epoch (train + val), `toolbox.run` vs the original, its model, {threads} threads each",
        run_epoch,
        original,
        "s",
        "report",
        None,
        what,
    )
    table.add(
        f"MNIST epoch (train + val), the bare float32 loop vs the original, {threads} threads each",
        bare,
        original,
        "s",
        "report",
        None,
    )
    # Lightning's bf16-mixed: a different numeric format, so reported beside the target, not for it.
    mixed = _run_epochs(out, args, 1, threads, *original_model, "--precision", "bf16-mixed")
    top1 = f"val top-1 after {args.run_epochs} epochs: {mixed[-1]['val_top_1_accuracy']:.2f} vs {all_cores[-1]['val_top_1_accuracy']:.2f} at 32-true"
    table.add(
        f"MNIST epoch (train + val), `toolbox.run --precision bf16-mixed` vs the original, its model, {threads} threads each",
        min(row["epoch_s"] for row in mixed),
        original,
        "s",
        "report",
        None,
        f"CPU bfloat16 units: {cpu_bf16_units() or 'none'}; {top1}",
    )


def bench_datapath(table: Table, args, out: Path) -> None:
    """The loop's epoch on MNIST's tensors against the same samples read through a DataLoader, and with augmentations."""
    given = {"dataset": "MNIST", "mnist_root": args.mnist_root, "mnist_download": True, "epochs": args.run_epochs}
    config = resolve(given)
    data = build_dataset(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a toolbox worker with --cpus-per-worker 1
    tensors_s = loop_epoch_s(config, data)
    table.add(
        "MNIST epoch (train), read through a map-style Dataset and a DataLoader vs the same data as tensors, 1 thread",
        loop_epoch_s(config, tensor_splits(data)),
        tensors_s,
        "s",
        "report",
        None,
        "per-sample normalization, read in the training process",
    )
    table.add(
        "MNIST epoch (train), map-style Dataset through a DataLoader with 1 worker process vs tensors, 1 thread",
        loop_epoch_s({**config, "loader_workers": 1}, tensor_splits(data, loader_workers=1)),
        tensors_s,
        "s",
        "report",
        None,
        f"{os.cpu_count()} CPUs shared by the worker and the training thread",
    )
    conv = resolve({**given, "arch": "ConvNet"})
    augmented = resolve({**given, "arch": "ConvNet", "augmentations": ["random_crop", "horizontal_flip"]})
    table.add(
        "MNIST epoch (train), with augmentations random_crop + horizontal_flip vs without, tensors, ConvNet, 1 thread",
        loop_epoch_s(augmented, data),
        loop_epoch_s(conv, data),
        "s",
        "report",
        None,
        f"ConvNet channels {list(conv['cnn_channels'])}",
    )
    torch.set_num_threads(threads)


_run_cache: dict[tuple, list[dict]] = {}


def _run_epochs(out: Path, args, workers: int, cpus: int = 1, *flags: str) -> list[dict]:
    """The epoch rows of a ``--run-epochs``-epoch ``toolbox.run`` on MNIST with --workers, --cpus-per-worker and
    ``flags`` (its first epoch left out)."""
    key = (workers, cpus, *flags)
    if key not in _run_cache:
        name = f"run-{workers}w{cpus}c-{time.time_ns()}"
        cli(
            "run",
            "--dataset",
            "MNIST",
            "--mnist-root",
            args.mnist_root,
            "--mnist-download",
            "--epochs",
            str(args.run_epochs),
            "--workers",
            str(workers),
            "--cpus-per-worker",
            str(cpus),
            "--storage",
            str(out),
            "--name",
            name,
            *flags,
        )
        _run_cache[key] = pq.read_table(out / name / "epochs.parquet").to_pylist()[1:]
    return _run_cache[key]


def bench_fused(table: Table, args, out: Path) -> None:
    """Trials/hour of a fused sweep (K=2, 2 threads) against two 1-thread trial processes, same configs."""
    common = [*args.sweep_args, "--num-samples", "6", "--epochs", "2", "--trial-scheduler", "fifo", "--seed", "0"]
    apart = sweep_figures(out, "fused-off", args.sweep_file, *common, "--max-concurrent", "2", "--cpus-per-worker", "1")
    fused = sweep_figures(out, "fused-k2", args.sweep_file, *common, "--fuse", "2", "--cpus-per-worker", "1")
    per_hour = lambda figures: len(figures["configs"]) * 3600 / figures["fit_s"]  # noqa: E731
    table.add(
        "CPU sweep trials/hour (Tune fit), fused K=2 at 2 threads vs two 1-thread trial processes",
        per_hour(fused),
        per_hour(apart),
        "trials/h",
        "report (fusing is off by default on CPU)",
        None,
        f"{len(fused['configs'])} trials x 2 epochs of {Path(args.sweep_file).stem}",
    )


def bench_overhead(table: Table, args, out: Path) -> None:
    common = [*args.sweep_args, "--num-samples", "4", "--epochs", "1", "--max-concurrent", "2", "--trial-scheduler", "fifo"]
    ours = sweep_figures(out, "overhead-inprocess", args.sweep_file, *common)
    plain = sweep_figures(out, "overhead-train", args.sweep_file, *common, "--no-in-process")
    multi = sweep_figures(out, "overhead-2workers", args.sweep_file, *common, "--workers-per-trial", "2", "--max-concurrent", "1")
    plain_s = statistics.median(plain["startup_s"])
    ours_s = statistics.median(ours["startup_s"])
    table.add(
        "trial start -> first step, 1-worker trial (median)",
        ours_s,
        plain_s,
        "s",
        "<= 3 s",
        ours_s <= 3,
        "baseline: Tune -> TorchTrainer",
    )
    multi_s = statistics.median(multi["startup_s"])
    table.add(
        "trial start -> first step, 2-worker DDP trial (median)",
        multi_s,
        plain_s,
        "s",
        "report",
        None,
        "baseline: Tune -> TorchTrainer, 1 worker",
    )


def bench_sweep(table: Table, args, out: Path) -> None:
    common = [
        *args.sweep_args,
        "--num-samples",
        str(args.num_samples),
        "--epochs",
        str(args.epochs),
        "--max-concurrent",
        "2",
        "--cpus-per-worker",
        "1",
        "--seed",
        "0",
    ]
    asha = sweep_figures(out, "sweep-asha", args.sweep_file, *common)
    ideal = asha["compute_s"] / 2
    table.add(
        "sweep wall (whole command) vs sum of trial compute / concurrency",
        asha["wall_s"],
        ideal,
        "s",
        "<= 1.3",
        asha["wall_s"] <= 1.3 * ideal,
        f"Tune's own fit: {asha['fit_s']:.0f} s",
    )
    sweep = load(args.sweep_file)  # for its metric and mode
    configs = asha["configs"]
    data = build_dataset(configs[0])
    optuna = optuna_sweep(configs, data, sweep.metric, sweep.mode, concurrency=2)
    ours_per_epoch = asha["wall_s"] / asha["epochs"]
    optuna_per_epoch = optuna["wall_s"] / optuna["epochs"]
    table.add(
        "sweep wall s per trained epoch vs in-process Optuna (same configs)",
        ours_per_epoch,
        optuna_per_epoch,
        "s",
        "<= 1.2",
        ours_per_epoch <= 1.2 * optuna_per_epoch,
        f"Optuna best {optuna['best']:.2f}",
    )
    train_pattern = sweep_figures(out, "sweep-train-pattern", args.sweep_file, *common, "--no-in-process")
    pattern_per_epoch = train_pattern["wall_s"] / train_pattern["epochs"]
    table.add(
        "sweep wall s per trained epoch vs Tune -> TorchTrainer",
        ours_per_epoch,
        pattern_per_epoch,
        "s",
        "<= 0.4 (2.5x better)",
        ours_per_epoch <= pattern_per_epoch / 2.5,
    )
    # The same, counting only Tune's fit (both sides leave out Python and Ray start-up).
    ours_fit, pattern_fit = asha["fit_s"] / asha["epochs"], train_pattern["fit_s"] / train_pattern["epochs"]
    table.add(
        "sweep Tune-fit s per trained epoch vs Tune -> TorchTrainer's",
        ours_fit,
        pattern_fit,
        "s",
        "<= 0.4 (2.5x better)",
        ours_fit <= pattern_fit / 2.5,
    )
    grid = sweep_figures(out, "sweep-full-grid", args.sweep_file, *common, "--trial-scheduler", "fifo")
    table.add(
        "ASHA epochs vs full grid epochs",
        asha["epochs"],
        grid["epochs"],
        "epochs",
        "<= 0.5",
        asha["epochs"] <= 0.5 * grid["epochs"],
    )
    table.add(
        f"best {sweep.metric}: ASHA vs full grid",
        asha["best"],
        grid["best"],
        "",
        "within 0.3 points",
        abs(asha["best"] - grid["best"]) <= 0.3,
    )


def bench_memory(table: Table, args, out: Path) -> None:
    common = [
        args.sweep_file,
        "--storage",
        str(out),
        "--restart",
        *args.sweep_args,
        "--num-samples",
        "2",
        "--epochs",
        "2",
        "--trial-scheduler",
        "fifo",
    ]
    _, one = cli("sweep", *common, "--name", "memory-1", "--max-concurrent", "1", watch_memory=True)
    _, two = cli("sweep", *common, "--name", "memory-2", "--max-concurrent", "2", watch_memory=True)
    table.add(
        "peak PSS, 2 concurrent trials vs 1 (whole process tree)", two / 2**20, one / 2**20, "MiB", "<= 1.5", two <= 1.5 * one
    )


def bench_ddp(table: Table, args, out: Path) -> None:
    one, two = (min(MNIST_TRAIN_SAMPLES / row["samples_per_s"] for row in _run_epochs(out, args, workers)) for workers in (1, 2))
    table.add("MNIST epoch (train), 2 CPU DDP workers vs 1", two, one, "s", "report (2 cores: expect little)", None)


SCALE_SWEEP = """\
from ray import tune
base = {"dataset": "DummyDataset", "dummy_n_samples": 64, "dummy_val_n_samples": 32, "dummy_input_shape": (8,),
        "ff_hidden_sizes": (8,), "batch_size": 32}
space = {"lr": tune.loguniform(1e-4, 1e-1), "optimizer": tune.choice(["adamw", "sgd"])}
epochs = 1
trial_scheduler = "fifo"
"""


def bench_scale(table: Table, args, out: Path) -> None:
    """The driver's cost per trial as a random search grows: one-epoch trials of a few steps, 2 at a time."""
    sweep_file = out / "scale.py"
    sweep_file.write_text(SCALE_SWEEP)
    figures = []
    for trials in args.scale_sizes:
        name = f"scale-{trials}"
        cli(
            "sweep",
            str(sweep_file),
            "--storage",
            str(out),
            "--name",
            name,
            "--restart",
            "--num-samples",
            str(trials),
            "--max-concurrent",
            "2",
        )
        summary = json.loads((out / name / "summary.json").read_text())
        figures.append((trials, summary["fit_s"], summary["fit_driver_cpu_s"]))
        print(
            f"  {trials} trials: Tune's fit {summary['fit_s']:.1f} s, driver CPU {summary['fit_driver_cpu_s']:.1f} s", flush=True
        )
    (smallest, wall0, cpu0), *rest = figures
    for trials, wall, cpu in rest:
        table.add(
            f"sweep of {trials} one-epoch trials: wall s per trial vs at {smallest}",
            wall / trials,
            wall0 / smallest,
            "s",
            "report",
            None,
        )
        table.add(
            f"sweep of {trials} one-epoch trials: driver CPU s per trial vs at {smallest}",
            cpu / trials,
            cpu0 / smallest,
            "s",
            "report",
            None,
        )
    # The cost of each added trial, between successive sizes: flat means the last step costs what the first did.
    added = [(c1 - c0) / (n1 - n0) for (n0, _, c0), (n1, _, c1) in zip(figures, figures[1:])]
    if len(added) >= 2:
        first, last = added[0], added[-1]
        table.add(
            f"driver CPU s per added trial, {figures[-2][0]} -> {figures[-1][0]} trials vs {figures[0][0]} -> {figures[1][0]}",
            last,
            first,
            "s",
            "<= 1.5 (flat)",
            last <= 1.5 * first,
        )


def bench_gpu(table: Table, args, out: Path) -> None:
    if not torch.cuda.is_available():
        print("  gpu: no GPU here, skipped", flush=True)
        return
    for batch in (128, 1024):
        config = resolve({"dataset": "MNIST", "mnist_root": args.mnist_root, "epochs": 4, "batch_size": batch})
        data = build_dataset(config)
        plain_epoch(config, data, "cuda")  # warm-up: CUDA context and kernels
        plain_s = min(plain_epoch(config, data, "cuda") for _ in range(3))
        loop_s = loop_epoch_s(config, data, "cuda", warmup=1)  # best epoch after warm-up, as for plain
        table.add(
            f"GPU MNIST epoch (train), toolbox loop vs plain loop, batch {batch}",
            loop_s,
            plain_s,
            "s",
            "<= 1.2",
            loop_s <= 1.2 * plain_s,
        )
    # lr_sched's space, 64 trials x 10 epochs on the one GPU, three ways.
    trials, epochs = 64, 10
    common = [*args.sweep_args, "--num-samples", str(trials), "--epochs", str(epochs), "--trial-scheduler", "fifo"]
    common += ["--cpus-per-worker", "1"]
    whole = sweep_figures(out, "gpu-1-per-trial", args.sweep_file, *common, "--gpus-per-trial", "1")
    per_hour = lambda figures: trials * 3600 / figures["fit_s"]  # noqa: E731
    packed = [
        sweep_figures(out, f"gpu-{fraction:g}-per-trial", args.sweep_file, *common, "--gpus-per-trial", str(fraction))
        for fraction in args.gpu_fractions
    ]
    best_packing = max(packed, key=per_hour)
    started = time.perf_counter()
    fused = sweep_figures(out, "gpu-fused", args.sweep_file, *common, "--gpus-per-trial", "1", "--fuse", str(args.gpu_fuse))
    fused_wall = time.perf_counter() - started
    note = f"{trials} trials x {epochs} epochs, MNIST batch 128, fuse = {args.gpu_fuse}"
    table.add(
        "GPU sweep trials/hour (Tune fit), fused vs 1 GPU per trial",
        per_hour(fused),
        per_hour(whole),
        "trials/h",
        ">= 10",
        per_hour(fused) >= 10 * per_hour(whole),
        note,
    )
    table.add(
        "GPU sweep trials/hour (Tune fit), fused vs the best process packing",
        per_hour(fused),
        per_hour(best_packing),
        "trials/h",
        ">= 3",
        per_hour(fused) >= 3 * per_hour(best_packing),
        f"packing tried: {', '.join(f'{f:g}' for f in args.gpu_fractions)} GPU per trial",
    )
    table.add("GPU fused sweep, whole command", fused_wall, 60.0, "s", "<= 60 s", fused_wall <= 60, note)
    for fraction, figures in zip(args.gpu_fractions, packed):
        table.add(
            f"GPU sweep trials/hour (Tune fit), {fraction:g} GPU per trial vs 1",
            per_hour(figures),
            per_hour(whole),
            "trials/h",
            "report",
            None,
            note.rsplit(",", 1)[0],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolbox.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections (default: {','.join(SECTIONS)})")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU section")
    parser.add_argument("--sweep-file", default="sweeps/lr_sched.py")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--mnist-root", default="./data")
    parser.add_argument(
        "--run-epochs",
        type=int,
        default=RUN_EPOCHS,
        help=f"epochs of each timed run and loop, each figure the fastest after the first (default: {RUN_EPOCHS}; at least 2)",
    )
    parser.add_argument(
        "--gpu-fractions",
        type=lambda text: [float(f) for f in text.split(",")],
        default=[0.125, 0.0625],
        help="GPU shares per trial to pack, each against 1 GPU per trial (default: 0.125,0.0625)",
    )
    parser.add_argument("--gpu-fuse", type=int, default=16, help="trials per fused stack in the GPU section (default: 16)")
    parser.add_argument(
        "--original-toolbox",
        metavar="DIR",
        help="a checkout of the original toolbox (yslcoat/pytorch-training-toolbox@26eadce) to run as the data "
        "section's baseline; without it, its pipeline is rebuilt here",
    )
    parser.add_argument(
        "--scale-sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[16, 128, 512, 2000],
        help="trial counts of the scale section's sweeps (default: 16,128,512,2000)",
    )
    parser.add_argument("--out", default="ray_results/bench")
    args = parser.parse_args(argv)
    if args.run_epochs < 2:
        parser.error("--run-epochs: give at least 2 (each figure leaves the first epoch out)")
    args.sweep_args = ["--mnist-root", args.mnist_root]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sections = [s for s in args.only.split(",") if s] + (["gpu"] if args.gpu else [])
    unknown = set(sections) - set(SECTIONS) - {"gpu"}
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    missing = sorted({NEEDS[section] for section in sections if section in NEEDS} - _importable())
    if missing:
        parser.error(f"needs {' and '.join(missing)}: pip install -e '.[bench]'")
    table = Table()
    machine = f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )
    print(f"toolbox.bench on {machine}", flush=True)
    for section in sections:
        print(f"[{section}]", flush=True)
        globals()[f"bench_{section}"](table, args, out)
    print("\n" + table.markdown())
    (out / "bench.json").write_text(json.dumps({"machine": machine, "rows": table.rows}, indent=2))
    return 0


if __name__ == "__main__":
    exit_with(main())
