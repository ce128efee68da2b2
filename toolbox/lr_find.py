"""``python -m toolbox.lr_find``: an LR range test (Smith's test) of a toolbox.run config, on Ray Train's workers."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import sys

from toolbox.config.flags import describe_failure, exit_with
from toolbox.config.registry import ConfigError, Fraction, PositiveFloat, PositiveInt
from toolbox.config.resolve import TRAINING_OPTIONS, coerce
from toolbox.distributed.dirkind import LR_FIND
from toolbox.distributed.trainer import REPORTS_FILE, range_test_worker
from toolbox.driver import Command, Plan, fit_echoing, fitted, plan_trainer, prepared, start_ray
from toolbox.training.epochlog import replace_file
from toolbox.training.lr_range import RANGE_RULE, SUGGESTION_RULE, Curve, Ramp, Suggestion, describe, suggest

log = logging.getLogger("toolbox")

CSV_FILE, JSON_FILE, PNG_FILE = "lr_find.csv", "lr_find.json", "lr_find.png"
EPILOG = f"""\
The lr rises exponentially from --start-lr to --end-lr over at most --steps optimizer steps on the
training data, every param group's lr set at each step, with the run's model, optimizer and loss
(its scheduler is left out) on --workers DDP workers, whose losses are averaged. The test stops once
the smoothed loss (a moving average with bias correction) exceeds --diverge-factor times its minimum.
Its weights are discarded: nothing is written that toolbox.run resumes from. With --resume PATH it
starts from that checkpoint's weights and config, with a fresh optimizer.

suggested lr: the {SUGGESTION_RULE} against log(lr), after the ramp's first tenth and before its minimum.
range: {RANGE_RULE} (a sweep's loguniform bounds).
outputs (in STORAGE/NAME/): {CSV_FILE} (step, lr, loss, smoothed_loss), {JSON_FILE}, {PNG_FILE}.
"""


def add_range_test_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("lr range test")
    group.add_argument("--start-lr", type=float, default=Ramp.start_lr, help="the lr of the first step (default: %(default)g)")
    group.add_argument("--end-lr", type=float, default=Ramp.end_lr, help="the lr of the last step (default: %(default)g)")
    group.add_argument("--steps", type=int, default=Ramp.steps, help="optimizer steps at most (default: %(default)d)")
    group.add_argument(
        "--smoothing", type=float, default=Curve.smoothing, help="beta of the loss's moving average (default: %(default)g)"
    )
    group.add_argument(
        "--diverge-factor",
        type=float,
        default=Curve.diverge_factor,
        help="stop once the smoothed loss exceeds this many times its minimum (default: %(default)g)",
    )


def check_range_test_flags(args: argparse.Namespace) -> None:
    for key, rule in (("start_lr", PositiveFloat), ("end_lr", PositiveFloat), ("steps", PositiveInt), ("smoothing", Fraction)):
        setattr(args, key, coerce(key, rule, getattr(args, key)))
    refusal = ramp_of(args).refusal()
    if refusal:
        raise ConfigError(refusal)
    if not args.diverge_factor > 1:
        raise ConfigError(f"--diverge-factor must be larger than 1, got {args.diverge_factor:g}")


def default_name(args: argparse.Namespace) -> str:
    """lr_find-ARCH-OPTIMIZER, as the flags choose them."""
    chosen = {o.key: vars(args).get(o.key, o.default) for o in TRAINING_OPTIONS if o.key in ("arch", "optimizer")}
    return f"lr_find-{chosen['arch']}-{chosen['optimizer']}"


COMMAND = Command(
    "toolbox.lr_find",
    __doc__.split(":", 1)[1].strip(),
    EPILOG,
    LR_FIND,
    "name of its dir (default: lr_find-<arch>-<optimizer>); a re-run replaces its outputs",
    default_name,
    add_range_test_flags,
    check_range_test_flags,
)


def ramp_of(args: argparse.Namespace) -> Ramp:
    return Ramp(args.start_lr, args.end_lr, args.steps)


def fit(plan: Plan):
    """Start Ray and run the range test on the plan's workers; returns Ray Train's Result."""
    start_ray(plan, COMMAND.prog)
    settings = {
        "ramp": dataclasses.asdict(ramp_of(plan.args)),
        "curve": {"smoothing": plan.args.smoothing, "diverge_factor": plan.args.diverge_factor},
    }
    return fit_echoing(plan_trainer(plan, worker=range_test_worker, settings=settings), plan)


def ranks_curves(plan: Plan) -> list[dict]:
    """Each rank's curve as it reported it (``rows``, ``diverged``), read from the dir the controller wrote it in."""
    path = plan.place.local / REPORTS_FILE
    reports = json.loads(path.read_text())
    path.unlink()
    return reports


def csv_text(rows: list[dict]) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["step", "lr", "loss", "smoothed_loss"])
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def summary(plan: Plan, curves: list[dict], suggestion: Suggestion) -> dict:
    """lr_find.json: the suggestion and its range, their rules, and how the test ran."""
    args, rows = plan.args, curves[0]["rows"]
    return {
        "suggestion": suggestion.lr,
        "range": None if suggestion.lr is None else [suggestion.low, suggestion.high],
        "rule": {"suggestion": SUGGESTION_RULE, "range": RANGE_RULE},
        "why_none": suggestion.why or None,
        "minimum_lr": suggestion.minimum_lr,
        "stopped_early": curves[0]["diverged"],
        "steps": len(rows),
        "max_steps": args.steps,
        "start_lr": args.start_lr,
        "end_lr": args.end_lr,
        "smoothing": args.smoothing,
        "diverge_factor": args.diverge_factor,
        "workers": len(curves),
        "workers_agree": all(curve == curves[0] for curve in curves),
        "config": plan.config,
    }


def write_outputs(plan: Plan, curves: list[dict], suggestion: Suggestion) -> None:
    from toolbox.tuning.plots import plot_lr_range

    directory, rows = plan.place.local, curves[0]["rows"]
    replace_file(directory / CSV_FILE, csv_text(rows).encode())
    replace_file(directory / JSON_FILE, json.dumps(summary(plan, curves, suggestion), indent=2).encode())
    title = f"{plan.args.name}: {plan.config['arch']}, {plan.config['optimizer']} on {plan.config['dataset']}"
    plot_lr_range(rows, suggestion, title, directory / PNG_FILE)
    if plan.place.mirror is not None:
        for name in (CSV_FILE, JSON_FILE, PNG_FILE):
            plan.place.mirror.push(directory, name)


def how_it_stopped(rows: list[dict], diverged: bool, steps: int) -> str:
    last = rows[-1]
    if diverged:
        return f"stopped at step {last['step'] + 1} of {steps} (lr {last['lr']:.2e}): the smoothed loss diverged"
    return f"ran all {steps} steps to lr {last['lr']:.2e} without the loss diverging"


def main(argv: list[str] | None = None) -> int:
    plan = prepared(argv, COMMAND)
    if isinstance(plan, int):
        return plan
    args = plan.args
    log.info(
        "lr range test %s: %s, %s on %s, lr %.0e .. %.0e over at most %d steps, %d worker(s) -> %s",
        args.name,
        plan.config["arch"],
        plan.config["optimizer"],
        plan.config["dataset"],
        args.start_lr,
        args.end_lr,
        args.steps,
        args.workers,
        plan.place.local,
    )
    nothing = "the range test writes its outputs only at its end"
    ended = lambda how: f"{COMMAND.prog}: {how}: {nothing}; re-run the same command to test again"
    outcome = fitted(plan, COMMAND, fit, ended, lambda: nothing)
    if isinstance(outcome, int):
        return outcome
    try:
        curves = ranks_curves(plan)
        rows, diverged = curves[0]["rows"], curves[0]["diverged"]
        suggestion = suggest(rows, args.steps)
        write_outputs(plan, curves, suggestion)
    except OSError as exc:
        print(f"{COMMAND.prog}: saving the curve failed: {describe_failure(exc)}", file=sys.stderr)
        return 1
    log.info("%s; outputs in %s", how_it_stopped(rows, diverged, args.steps), plan.place.local)
    log.info(describe(suggestion))
    return 0 if suggestion.lr is not None else 1


if __name__ == "__main__":
    exit_with(main())
