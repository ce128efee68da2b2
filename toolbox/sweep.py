"""``python -m toolbox.sweep SWEEP_FILE``: Ray Tune over a sweep file's search space.

Re-running the same command continues an interrupted sweep (finished trials are never re-run);
``--restart`` starts it afresh. At the end (and on Ctrl-C) the ranked table is printed and
STORAGE/NAME/ gets results.parquet, results.csv, best.json and plots/*.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from toolbox.config import user_code
from toolbox.config.flags import Parser, add_config_flags, describe_failure, exit_with, given_config, parse_before_imports
from toolbox.config.registry import Component, ConfigError
from toolbox.distributed import cluster, signals
from toolbox.distributed.dirkind import SWEEP, empty, holds_nothing, kind_of, mark, refuse_unless
from toolbox.distributed.locations import DirLock, Place, check_address, place
from toolbox.distributed.storage import delete_deferred
from toolbox.training.builders import build_dataset, check_against_data, check_components, check_shards
from toolbox.training.epochlog import replace_file
from toolbox.training.loop import warn_if_bf16_is_slow
from toolbox.tuning import confirm, growth, outcome, range_tests, results
from toolbox.tuning.fused_trials import FUSED_SLOT, fall_back_unless_fusable, start_workers
from toolbox.tuning.sweepfile import FIELDS, Sweep, candidate_params, check_trials, import_sweep_file, load, with_lr_bounds
from toolbox.tuning.trial import TRAIN_DRIVER_RESOURCE, run_trial, trainable
from toolbox.tuning.trial_dirs import tidy
from toolbox.tuning.trial_schedulers import TRIAL_SCHEDULERS, trial_scheduler

log = logging.getLogger("toolbox")


def build_parser(add_help: bool = True) -> Parser:
    parser = Parser(
        prog="python -m toolbox.sweep",
        add_help=add_help,
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("sweep_file", help="a sweep file, e.g. sweeps/lr_sched.py")
    fields = parser.add_argument_group("sweep fields (override the sweep file)")
    fields.add_argument("--num-samples", type=int)
    fields.add_argument("--epochs", type=int, help="epochs per trial (the most a trial can run)")
    fields.add_argument("--metric")
    fields.add_argument("--mode", choices=["min", "max"])
    fields.add_argument(
        "--trial-scheduler",
        help=f"{', '.join(TRIAL_SCHEDULERS.names())} (default: {FIELDS['trial_scheduler'].default}; see trial schedulers below)",
    )
    fields.add_argument("--search", help="random (grid values are crossed) or optuna")
    fields.add_argument("--workers-per-trial", type=int)
    fields.add_argument("--cpus-per-worker", type=float)
    fields.add_argument("--gpus-per-trial", type=float, help="may be fractional, e.g. 0.25")
    fields.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as fit)")
    fields.add_argument(
        "--max-failures", type=int, help="retries of a trial whose process dies, from its checkpoint (default: 2)"
    )
    fields.add_argument("--fuse", type=int, help="train up to K one-worker trials as one stacked model per device (default: off)")
    fields.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run 1-worker trials in the trial process (default) or via a TorchTrainer",
    )
    parser.add_argument_group(
        "trial schedulers",
        "the sweep file's trial_scheduler, its options in scheduler_options (defaults shown):\n  "
        + "\n  ".join(map(_describe_trial_scheduler, TRIAL_SCHEDULERS)),
    )
    runtime = parser.add_argument_group("ray")
    runtime.add_argument("--name", help="sweep name (default: the sweep file's name)")
    runtime.add_argument("--storage", default="./ray_results", help="default: ./ray_results")
    runtime.add_argument("--seed", type=int, help="seeds the sampled configs and every trial's training")
    runtime.add_argument("--restart", action="store_true", help="delete the sweep's results and start afresh")
    runtime.add_argument(
        "--confirm", type=int, metavar="K", help="after the sweep: re-train its K best configurations over --seeds"
    )
    runtime.add_argument("--seeds", type=int, metavar="S", help="seeds per configuration for --confirm (default: 3)")
    runtime.add_argument(
        "--grow-from", metavar="OLD_SWEEP", help="start this new sweep's searcher from OLD_SWEEP's results (same --storage)"
    )
    cluster.add_ray_flags(runtime)
    add_config_flags(parser, exclude=("epochs", "seed"))  # any run key overrides the base: --mnist-root, ...
    return parser


def _describe_trial_scheduler(scheduler: Component) -> str:
    options = ", ".join(f"{p.name}={p.default}" for p in scheduler.params)
    return f"{scheduler.name}: {scheduler.summary}" + (f" [{options}]" if options else "")


def prepare(argv: list[str] | None) -> tuple[Sweep, argparse.Namespace]:
    early = parse_before_imports(build_parser(add_help=False), argv)
    user_code.load(user_code.canonical(getattr(early, "imports", ())))  # their components' flags, in --help too
    if early is not None and Path(early.sweep_file).is_file():
        import_sweep_file(Path(early.sweep_file))  # likewise for the components it defines or imports
    args = build_parser().parse_args(argv)
    args.address = cluster.given_address(args.address)
    overrides = {name: getattr(args, name, None) for name in FIELDS if name not in ("space", "base", "scheduler_options")}
    base_overrides = given_config(args)
    for own in ("epochs", "seed"):  # the sweep's own flags (None when not given), not base keys
        base_overrides.pop(own, None)
    if args.seed is not None:
        base_overrides["seed"] = args.seed
    sweep = load(args.sweep_file, overrides, base_overrides)
    args.exp = place(args.storage, sweep.name)
    refuse_unless(args.exp, SWEEP)
    if args.restart and kind_of(args.exp) != SWEEP and not holds_nothing(args.exp):
        raise ConfigError(f"--restart: {args.exp.path} holds no sweep (no Tune experiment state), so it is not deleted")
    args.confirming = None
    if args.seeds is not None and args.confirm is None:
        raise ConfigError("--seeds: give it with --confirm K (the K best configurations, each over that many seeds)")
    if args.confirm is not None:  # the sweep as it ran; its re-trainings are a sweep of their own
        growth.refuse_changes(args.exp, sweep, "--confirm")
        args.confirming = (sweep, args.exp)
        sweep, args.exp = confirm.confirmation(sweep, args.exp, args.confirm, 3 if args.seeds is None else args.seeds)
    args.record = growth.plan(args.exp, sweep, ran=not args.restart and kind_of(args.exp) == SWEEP)
    args.start_from = ((), ())
    if args.grow_from and (args.restart or kind_of(args.exp) != SWEEP):  # a new sweep; a re-run continues it
        args.start_from = growth.warm_start(sweep, place(args.storage, args.grow_from), args.grow_from, args.record)
    if args.address:
        args.address = check_address(args.address)
    if not sweep.trials_in_process and not args.address and not (args.dashboard and cluster.dashboard_available()):
        why = "is off (--no-dashboard)" if not args.dashboard else "is not installed (pip install 'ray[default]')"
        raise ConfigError(
            f"trials with a TorchTrainer need Ray's dashboard, which {why}: "
            "without it each trial leaks a worker CPU and the sweep hangs (ray-project/ray#54305)"
        )
    if not args.address:
        cluster.check_capacity(
            sweep.workers_per_trial,
            sweep.cpus_per_worker,
            sweep.gpus_per_trial > 0,
            gpus_per_worker=sweep.gpus_per_trial / sweep.workers_per_trial,
        )
    return sweep, args


def concurrency(sweep: Sweep, cpus: float, gpus: float) -> int:
    if sweep.max_concurrent:
        return sweep.max_concurrent
    fits = [cpus // (sweep.workers_per_trial * sweep.cpus_per_worker)]
    if sweep.gpus_per_trial:
        fits.append(gpus // sweep.gpus_per_trial)
    return max(1, int(min(fits)))


def trial_checkpoints(sweep: Sweep):
    """Keep each trial's two latest; PBT keeps all: any of them may be exploited by another trial."""
    from ray import tune

    if sweep.trial_scheduler == "pbt":
        return tune.CheckpointConfig(num_to_keep=None)
    # By recency: a retried trial continues from its latest (Tune keeps no latest beside a best); each
    # trial keeps its best epoch's checkpoint itself, in best/.
    return tune.CheckpointConfig(num_to_keep=2)


def make_tuner(sweep: Sweep, trainable, exp: Place, cpus: float, gpus: float, progress, start_from):
    from ray import tune

    from toolbox.tuning.search import search_algorithm

    restoring = tune.Tuner.can_restore(exp.path, storage_filesystem=exp.fs)
    tidy(exp, restoring)
    if restoring:
        log.info("continuing sweep %s from %s (--restart starts afresh)", sweep.name, exp.path)
        restore = functools.partial(
            tune.Tuner.restore, exp.path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=exp.fs
        )
        try:  # the space again: Tune saves its sample_from functions as placeholders, which only it resolves
            return restore(param_space=dict(sweep.space))
        except ValueError as exc:  # a space grown by a key, which Tune refuses: the new trials draw from the sweep's own
            if "param_space" not in str(exc):
                raise
            return restore()
    max_concurrent = concurrency(sweep, cpus, gpus)
    return tune.Tuner(
        trainable,
        param_space=dict(sweep.space),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            search_alg=search_algorithm(sweep, max_concurrent, start_from),
            scheduler=trial_scheduler(sweep),
            reuse_actors=sweep.trials_in_process,
        ),
        run_config=tune.RunConfig(
            name=exp.path.rsplit("/", 1)[-1],  # a confirmation runs in its sweep's dir, in confirm/
            storage_path=exp.parent,
            storage_filesystem=exp.fs,
            verbose=0,
            callbacks=[progress],
            checkpoint_config=trial_checkpoints(sweep),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        ),
    )


def run(sweep: Sweep, args: argparse.Namespace) -> int:
    import ray
    from ray import tune

    from toolbox.tuning import tune_fixes
    from toolbox.tuning.progress import Progress
    from toolbox.tuning.search import check_pbt_keeps_shapes

    config = sweep.trial_config({})
    data = build_dataset(config)
    check_trials(sweep, data.spec, args.sweep_file)
    if sweep.trial_scheduler == "pbt":
        check_pbt_keeps_shapes(sweep, data.spec, args.sweep_file)
    check_against_data(config, check_components(config, data.spec), data)
    check_shards(data, sweep.workers_per_trial, "workers_per_trial")
    if any(sweep.trial_config(p)["precision"] == "bf16-mixed" for p in candidate_params(sweep.space)):
        warn_if_bf16_is_slow({"precision": "bf16-mixed"}, sweep.gpus_per_trial > 0)
    if sweep.trials_fused:
        fall_back_unless_fusable(sweep, data, args.address)
    exp = args.exp
    exp_dir = exp.local
    args.lock = DirLock(exp_dir, "sweep")
    if args.restart:
        log.info("--restart: removing what %s holds", exp.path)
        empty(exp)
    mark(exp, SWEEP)
    args.record.write(exp)
    random.seed(sweep.base.get("seed", 0))  # PBT's explore draws from Python's random in this process
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"  # snapshot the sweep at every step: a killed driver loses no finished trial
    tune_fixes.install()
    url = cluster.start(
        args.address,
        job_name=f"toolbox.sweep {sweep.name}",
        verbose=args.verbose,
        dashboard=args.dashboard,
        dashboard_host=args.dashboard_host,
        extra_resources={TRAIN_DRIVER_RESOURCE: 1000, FUSED_SLOT: 1000},
    )
    cluster.announce(url, args.dashboard_host)
    cluster.describe_session(exp_dir, url)
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    data_ref = ray.put(data.to_shared())
    args.lr_bounds = range_tests.lr_bounds(sweep, exp, data_ref)
    sweep.space = with_lr_bounds(sweep, args.lr_bounds)
    if sweep.trials_fused:  # the trial only relays its member's epochs; the worker holds the device
        trial_resources = {FUSED_SLOT: 1}
        args.fused_workers = start_workers(sweep, data_ref, cpus, gpus)
        seats = len(args.fused_workers) * sweep.fuse
        sweep.max_concurrent = min(sweep.max_concurrent or seats, seats)
    elif sweep.trials_in_process:
        trial_resources = {"cpu": sweep.cpus_per_worker, "gpu": sweep.gpus_per_trial}
    elif TRAIN_DRIVER_RESOURCE in resources:  # the trial function only drives its TorchTrainer's workers
        trial_resources = {TRAIN_DRIVER_RESOURCE: 0.01}
    else:  # a cluster started without toolbox's resource: a bundle of (almost) nothing
        trial_resources = {"cpu": 0, "memory": 1}
    trial = tune.with_resources(trainable(run_trial, sweep=sweep, data=[data_ref], exp=exp), trial_resources)
    progress = Progress(sweep)
    tune_fixes.grow_on_restore(growth.Growth(sweep, args.record, exp, progress))
    started = time.time()
    log.info(
        "sweep %s: %d trials x <= %d epochs, %s + %s, metric %s (%s) -> %s",
        sweep.name,
        sweep.total_trials,
        sweep.epochs,
        sweep.search,
        sweep.trial_scheduler,
        sweep.metric,
        sweep.mode,
        exp_dir,
    )
    if sweep.multi_objective:
        log.info("objectives: %s; Tune ranks by the first, the primary", ", ".join(f"{m} ({d})" for m, d in sweep.objectives))
    tuner = make_tuner(sweep, trial, exp, cpus, gpus, progress, args.start_from)
    fit_started, fit_cpu_started = time.time(), time.process_time()
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        grid = tune.Tuner.restore(exp.path, trial, storage_filesystem=exp.fs).get_results()
    fit_s, fit_cpu_s = time.time() - fit_started, time.process_time() - fit_cpu_started
    delete_deferred()  # Tune has written its last snapshot: no record names those checkpoints now
    rows = results.trial_rows(grid, sweep, progress.startup_s, results.saved_trials(exp), args.record.budgets)
    print(results.format_table(rows, sweep), flush=True)
    if args.lr_bounds:
        log.info(range_tests.said(args.lr_bounds))
    if sweep.multi_objective:
        print(results.front_lines(rows, sweep), flush=True)
    if args.confirming:
        confirm.report(rows, sweep, *args.confirming)
    # Ray's shutdown waits for its processes to exit: write the results and plots meanwhile.
    with ThreadPoolExecutor(1) as pool:
        written = pool.submit(results.write, rows, sweep, exp_dir, exp.mirror, args.lr_bounds)
        placement_groups_left = cluster.stop()
        best = written.result()
    summary = {
        "wall_s": time.time() - started,
        "fit_s": fit_s,
        "fit_driver_cpu_s": fit_cpu_s,
        "trials": len(rows),
        "epochs": sum(r["epochs"] for r in rows),
        "placement_groups_left": placement_groups_left,
    }
    replace_file(exp_dir / "summary.json", json.dumps(summary, indent=2).encode())
    if exp.mirror is not None:
        exp.mirror.push(exp_dir, "summary.json")
    log.info(
        "wall time %.0f s (Tune %.0f s); results: %s/results.parquet (.csv), best.json, plots/", summary["wall_s"], fit_s, exp_dir
    )
    if best and not math.isnan(best["value"]):
        log.info(
            "best %s %.4f (trial %s, epoch %d); checkpoint %s",
            sweep.metric,
            best["value"],
            best["trial_id"],
            best["best_epoch"],
            best["checkpoint"],
        )
        log.info("re-train it with:\n  %s", best["command"])
    return outcome.said(rows, sweep, exp_dir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    signals.end_on_sigterm_like_ctrl_c()
    args = None
    try:
        sweep, args = prepare(argv)
        signals.last_words(lambda how: signals.say_end(_ended(how, args)))
        return run(sweep, args)
    except ConfigError as exc:
        print(f"toolbox.sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how, code = signals.interruption()
        signals.say_end(_ended(how, args))
        return code
    except Exception as exc:  # noqa: BLE001 - Ray's and the disk's errors: one line, not a traceback
        kept = f"; {_kept(args)}" if getattr(args, "lock", None) else ""
        print(f"toolbox.sweep: failed: {describe_failure(exc)}{kept}", file=sys.stderr)
        return 1
    finally:
        try:
            cluster.stop()
        except Exception as exc:  # noqa: BLE001 - a Ray that broke down may not stop cleanly; say so in one line
            print(f"toolbox.sweep: Ray did not shut down cleanly: {describe_failure(exc)}", file=sys.stderr)
        if getattr(args, "lock", None) is not None:
            args.lock.release()


def _ended(how: str, args: argparse.Namespace | None) -> str:
    """The last line of a sweep that was interrupted, or lost its Ray, before its table."""
    kept = _kept(args) if getattr(args, "exp", None) else "nothing had started"
    return f"toolbox.sweep: {how}: {kept}; re-run the same command to continue"


def _kept(args: argparse.Namespace) -> str:
    """What the sweep dir keeps when the sweep ends before its table says how many trials finished."""
    return f"{args.exp.path} keeps every finished trial and every trial's checkpoints"


if __name__ == "__main__":
    exit_with(main())
