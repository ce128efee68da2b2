"""``python -m toolbox.lr_find``: an LR range test (Smith's test) of a toolbox.run config, on Ray Train's workers."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from toolbox.config.flags import describe_failure, exit_with
from toolbox.config.registry import ConfigError, Fraction
from toolbox.config.resolve import TRAINING_OPTIONS, coerce
from toolbox.distributed.dirkind import LR_FIND
from toolbox.distributed.trainer import REPORTS_FILE, range_test_worker
from toolbox.driver import Command, Plan, fit_echoing, fitted, plan_trainer, prepared, start_ray
from toolbox.training.lr_range import RAMP_RULES, RANGE_RULE, SUGGESTION_RULE, Curve, Ramp, describe, suggest
from toolbox.tuning.range_outputs import (
    CSV_FILE,
    JSON_FILE,
    PNG_FILE,
    how_it_stopped,
    range_test_settings,
    write_outputs,
)

log = logging.getLogger("toolbox")

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
    for key, rule in (*RAMP_RULES.items(), ("smoothing", Fraction)):
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


def settings_of(args: argparse.Namespace) -> dict:
    return range_test_settings(ramp_of(args), Curve(smoothing=args.smoothing, diverge_factor=args.diverge_factor))


def fit(plan: Plan):
    """Start Ray and run the range test on the plan's workers; returns Ray Train's Result."""
    start_ray(plan, COMMAND.prog)
    return fit_echoing(plan_trainer(plan, worker=range_test_worker, settings=settings_of(plan.args)), plan)


def ranks_curves(plan: Plan) -> list[dict]:
    """Each rank's curve as it reported it (``rows``, ``diverged``), read from the dir the controller wrote it in."""
    path = plan.place.local / REPORTS_FILE
    reports = json.loads(path.read_text())
    path.unlink()
    return reports


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
        write_outputs(
            plan.place.local,
            "",
            plan.place.mirror,
            name=args.name,
            curves=curves,
            suggestion=suggestion,
            settings=settings_of(args),
            config=plan.config,
        )
    except OSError as exc:
        print(f"{COMMAND.prog}: saving the curve failed: {describe_failure(exc)}", file=sys.stderr)
        return 1
    log.info("%s; outputs in %s", how_it_stopped(rows, diverged, args.steps), plan.place.local)
    log.info(describe(suggestion))
    return 0 if suggestion.lr is not None else 1


if __name__ == "__main__":
    exit_with(main())
