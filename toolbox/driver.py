"""What the commands on toolbox.run's flags share (``toolbox.run``, ``toolbox.lr_find``): their flags parsed and
checked into a ``Plan`` before Ray starts, and its TorchTrainer fitted on Ray, every end said in one line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.config import user_code
from toolbox.config.flags import Parser, add_config_flags, describe_failure, given_config, parse_before_imports
from toolbox.config.registry import ConfigError, NonNegativeInt, PositiveFloat, PositiveInt
from toolbox.config.resolve import coerce, resolve
from toolbox.data.splits import DatasetSplits
from toolbox.data.tensors import TensorData
from toolbox.distributed import cluster, signals
from toolbox.distributed.dirkind import mark, refuse_unless
from toolbox.distributed.locations import DirLock, Place, check_address, place
from toolbox.distributed.trainer import Workers, torch_trainer
from toolbox.distributed.trainer import fit as fit_interruptibly
from toolbox.training.builders import build_dataset, check_against_data, check_components, check_shards
from toolbox.training.checkpoint import STATE_FILE, load_latest
from toolbox.training.epochlog import LOG_FILE
from toolbox.training.failures import deterministic_cause
from toolbox.training.loop import warn_if_bf16_is_slow

log = logging.getLogger("toolbox")

RESOURCES_FILE, CONFIG_FILE = "resources.json", "config.json"
RESOURCE_DEFAULTS = {"workers": 1, "cpus_per_worker": 1.0, "use_gpu": False}
# The value rules of the Ray flags (the training flags' rules are their components' signatures).
RAY_FLAG_RULES = {"workers": PositiveInt, "cpus_per_worker": PositiveFloat, "max_failures": NonNegativeInt}


@dataclass(frozen=True)
class Command:
    """A command on toolbox.run's flags and preparation (toolbox.run, toolbox.lr_find): what it says and writes."""

    prog: str  # "toolbox.run", as its lines begin
    description: str
    epilog: str
    kind: str  # what its dir is (dirkind)
    name_help: str
    default_name: Callable[[argparse.Namespace], str]  # of the parsed flags
    add_flags: Callable[[argparse.ArgumentParser], None] = lambda parser: None  # its own flags, beside the run's
    check_flags: Callable[[argparse.Namespace], None] = lambda args: None  # raises ConfigError for its flags' bad values


def build_parser(command: Command, add_help: bool = True) -> Parser:
    parser = Parser(
        prog=f"python -m {command.prog}",
        add_help=add_help,
        description=command.description,
        epilog=command.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(parser)
    command.add_flags(parser)
    ray_flags = parser.add_argument_group("ray")
    # Defaults are None so that a same-name re-run can keep the run's own resources (resources.json).
    ray_flags.add_argument("--workers", type=int, help="DDP workers (default: 1)")
    ray_flags.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, help="one GPU per worker")
    ray_flags.add_argument("--cpus-per-worker", type=float, help="CPUs (and torch threads) per worker (default: 1)")
    ray_flags.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="worker-group restarts from the latest checkpoint after a worker dies (default: 3)",
    )
    ray_flags.add_argument("--name", help=command.name_help)
    ray_flags.add_argument("--storage", default="./ray_results", help="where run dirs go (default: ./ray_results)")
    ray_flags.add_argument("--resume", metavar="PATH", help="a checkpoint dir, or a run dir (its latest checkpoint)")
    cluster.add_ray_flags(ray_flags)
    return parser


@dataclass
class Plan:
    """Everything decided before Ray starts."""

    config: dict[str, Any]
    args: argparse.Namespace
    data: TensorData | DatasetSplits
    place: Place  # the run dir, local or under a storage URI
    resume_from: str | None
    state: dict | None  # the checkpoint resumed from


def _saved_resources(run_dir: Path) -> dict:
    try:
        saved = json.loads((run_dir / RESOURCES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def prepare(argv: list[str] | None, command: Command) -> Plan:
    """Parse and check everything, load the data: all the ways to fail happen here, before Ray."""
    early = parse_before_imports(build_parser(command, add_help=False), argv)
    user_code.load(user_code.canonical(getattr(early, "imports", ())))  # their components' flags, in --help too
    args = build_parser(command).parse_args(argv)
    command.check_flags(args)
    args.name = command.default_name(args) if args.name is None else args.name
    args.address = cluster.given_address(args.address)
    where = place(args.storage, args.name)
    refuse_unless(where, command.kind)
    run_dir = where.local
    if where.mirror is not None:
        where.mirror.pull(run_dir, (RESOURCES_FILE, CONFIG_FILE))
    saved = _saved_resources(run_dir)
    for key, default in RESOURCE_DEFAULTS.items():  # a re-run keeps its workers unless told otherwise
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, default))
    for key, rule in RAY_FLAG_RULES.items():
        setattr(args, key, coerce(key, rule, getattr(args, key)))
    resume_path, state, base = None, None, None
    continues = run_dir.is_dir() and any(run_dir.rglob(STATE_FILE))
    if args.resume and (continues or (where.remote and (run_dir / CONFIG_FILE).is_file())):
        raise ConfigError(f"--resume: run {args.name!r} has checkpoints of its own, which it continues from; use a new --name")
    # A run under a URI continues from Ray's own record of its checkpoints, with its saved config.
    if args.resume or (continues and not where.remote):
        resume_path, state = load_latest(args.resume or run_dir)
        resume_path, base = str(resume_path), state["config"]
    elif where.remote and (run_dir / CONFIG_FILE).is_file():
        base = json.loads((run_dir / CONFIG_FILE).read_text())
    config = resolve(given_config(args), base=base)
    data = build_dataset(config)
    model = check_components(config, data.spec)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise ConfigError(f"checkpoint {resume_path} does not match the model's architecture: {detail}") from None
    check_against_data(config, model, data)
    check_shards(data, args.workers, "--workers")
    warn_if_bf16_is_slow(config, args.use_gpu)
    if args.address:
        args.address = check_address(args.address)
    else:
        cluster.check_capacity(args.workers, args.cpus_per_worker, args.use_gpu)
    return Plan(config, args, data, where, resume_path, state)


def follow(path: Path, stop: threading.Event) -> None:
    """Echo lines appended to ``path`` until ``stop`` (the epoch lines, written by the controller)."""
    offset = path.stat().st_size if path.exists() else 0
    while True:
        finished = stop.wait(0.5)
        if path.exists():
            with open(path) as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            for line in chunk.splitlines():
                print(line.split(" ", 2)[-1], flush=True)  # drop the timestamp
        if finished:
            return


def start_ray(plan: Plan, prog: str) -> None:
    """Start the private local Ray (or join --address), say where its dashboard is, and check that it holds the workers."""
    import ray

    args = plan.args
    url = cluster.start(
        args.address,
        job_name=f"{prog} {args.name}",
        verbose=args.verbose,
        dashboard=args.dashboard,
        dashboard_host=args.dashboard_host,
    )
    cluster.announce(url, args.dashboard_host)
    cluster.describe_session(plan.place.local, url)
    if args.address:
        resources = ray.cluster_resources()
        cluster.check_capacity(
            args.workers, args.cpus_per_worker, args.use_gpu, cpus=resources.get("CPU", 0), gpus=resources.get("GPU", 0)
        )


def plan_trainer(plan: Plan, **options):
    """The TorchTrainer of the plan's config, data, workers, dir and checkpoint; ``options`` as ``torch_trainer`` takes them."""
    import ray

    args = plan.args
    return torch_trainer(
        plan.config,
        ray.put(plan.data.to_shared()),
        Workers(args.workers, args.cpus_per_worker, 1.0 if args.use_gpu else 0.0),
        name=args.name,
        storage=plan.place,
        resume_from=plan.resume_from,
        max_failures=args.max_failures,
        ray_ends_with_driver=not args.address,
        **options,
    )


def fit_echoing(trainer, plan: Plan):
    """``trainer.fit()`` (Ctrl-C raising KeyboardInterrupt), echoing the lines the controller adds to the dir's log."""
    stop = threading.Event()
    echo = threading.Thread(target=follow, args=(plan.place.local / LOG_FILE, stop), daemon=True)
    echo.start()
    try:
        return fit_interruptibly(trainer)
    finally:
        stop.set()
        echo.join()


def prepared(argv: list[str] | None, command: Command) -> Plan | int:
    """``prepare``'s plan, or the exit code of a refusal or an interruption (said in one line) before anything started."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    signals.end_on_sigterm_like_ctrl_c()
    try:
        return prepare(argv, command)
    except ConfigError as exc:
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how, code = signals.interruption()
        print(f"{command.prog}: {how}: nothing had started", file=sys.stderr)
        return code


def fitted(
    plan: Plan, command: Command, fit: Callable[[Plan], Any], ended: Callable[[str], str], kept: Callable[[], str]
) -> tuple[Any, int] | int:
    """``fit(plan)`` in the plan's dir, locked and marked as the command's, then Ray stopped: the result and the
    placement groups left. Or the exit code of a refusal, an interruption or a failure, said in one line: an
    interruption's as ``ended(how)``, a failure's with what is ``kept()``."""
    lock = None
    signals.last_words(lambda how: signals.say_end(ended(how)))
    try:
        lock = DirLock(plan.place.local, command.kind)
        mark(plan.place, command.kind)
        result = fit(plan)
    except ConfigError as exc:
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how, code = signals.interruption()
        signals.say_end(ended(how))
        return code
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; show the cause in one line
        deterministic = deterministic_cause(exc)
        why = f"{deterministic}; not retried: a retry would fail the same way" if deterministic else describe_failure(exc)
        print(f"{command.prog}: training failed: {why}; {kept()}", file=sys.stderr)
        return 1
    finally:
        try:
            placement_groups_left = cluster.stop()
        except Exception as exc:  # noqa: BLE001 - a Ray that broke down may not stop cleanly; say so in one line
            placement_groups_left = -1
            print(f"{command.prog}: Ray did not shut down cleanly: {describe_failure(exc)}", file=sys.stderr)
        if lock is not None:
            lock.release()
    return result, placement_groups_left
