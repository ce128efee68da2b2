"""``python -m toolbox.run``: one training run on Ray Train (TorchTrainer, DDP over --workers)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from toolbox import driver
from toolbox.config.flags import Parser, describe_failure, exit_with
from toolbox.config.resolve import changed_keys
from toolbox.distributed.dirkind import RUN, sweep_holding
from toolbox.driver import (
    CONFIG_FILE,
    RESOURCE_DEFAULTS,
    RESOURCES_FILE,
    Command,
    Plan,
    fit_echoing,
    fitted,
    plan_trainer,
    prepared,
    start_ray,
)
from toolbox.training.epochlog import EpochLog, read_rows, replace_file

log = logging.getLogger("toolbox")

EPILOG = """\
outputs (in STORAGE/NAME/): training.log, epochs.csv, epochs.parquet, config.json and Ray
checkpoints (checkpoint_*/state.pt: model, optimizer, scheduler, epoch, RNG, config), keeping the
latest and the best by val loss. Re-running with the same --name resumes that run from its latest
checkpoint; --resume PATH starts from another run's checkpoint (a checkpoint dir or a run dir).
"""


RUN_COMMAND = Command(
    "toolbox.run",
    __doc__.split(":", 1)[1].strip(),
    EPILOG,
    RUN,
    "run name (default: run-<timestamp>); an existing name resumes",
    lambda args: time.strftime("run-%Y%m%d-%H%M%S"),
)


def build_parser(add_help: bool = True) -> Parser:
    return driver.build_parser(RUN_COMMAND, add_help)


def prepare(argv: list[str] | None) -> Plan:
    """Parse and check everything, load the data: all the ways to fail happen here, before Ray."""
    return driver.prepare(argv, RUN_COMMAND)


def fit(plan: Plan):
    """Start Ray and train; returns Ray Train's Result."""
    args, config = plan.args, plan.config
    start_ray(plan, RUN_COMMAND.prog)
    epoch_log = EpochLog(plan.place.local, config["epochs"], mirror=plan.place.mirror)
    epoch_log.log(f"config {json.dumps(config)}")
    resources = {key: getattr(args, key) for key in RESOURCE_DEFAULTS}
    for name, content in ((CONFIG_FILE, json.dumps(config, indent=2)), (RESOURCES_FILE, json.dumps(resources))):
        replace_file(plan.place.local / name, content.encode())
        if plan.place.mirror is not None:
            plan.place.mirror.push(plan.place.local, name)
    if plan.state is not None:
        log.info("resuming from epoch %d: %s", plan.state["epoch"], plan.resume_from)
        if plan.resume_from.startswith(str(plan.place.local) + os.sep):  # its own rows, from the checkpoint it continues
            epoch_log.backfill(plan.state.get("history", []))
    trainer = plan_trainer(plan, hparams=changed_keys(config), live_tags={"sweep": "toolbox.run", "trial": args.name})
    return fit_echoing(trainer, plan)


def main(argv: list[str] | None = None) -> int:
    plan = prepared(argv, RUN_COMMAND)
    if isinstance(plan, int):
        return plan
    log.info(
        "run %s: %s on %s, %d epochs, %d worker(s) -> %s",
        plan.args.name,
        plan.config["arch"],
        plan.config["dataset"],
        plan.config["epochs"],
        plan.args.workers,
        plan.place.local,
    )
    if plan.resume_from is not None and (sweep_dir := sweep_holding(Path(plan.resume_from))) is not None:
        log.info(
            "--resume: continuing with the config of sweep %s's trial %s (%s); flags given here override it",
            sweep_dir.name,
            Path(plan.resume_from).resolve().relative_to(sweep_dir).parts[0],
            ", ".join(f"{key} {value}" for key, value in changed_keys(plan.state["config"]).items()),
        )
    outcome = fitted(plan, RUN_COMMAND, fit, lambda how: _ended(how, plan.place.local), lambda: _kept(plan.place.local))
    if isinstance(outcome, int):
        return outcome
    result, placement_groups_left = outcome
    best = min(result.best_checkpoints, key=lambda pair: pair[1]["val_loss"], default=None)
    if best:
        log.info("best val_loss %.4f at epoch %d: %s", best[1]["val_loss"], best[1]["epoch"], best[0].path)
    if result.checkpoint:
        log.info("latest checkpoint: %s", result.checkpoint.path)
    try:
        replace_file(plan.place.local / "summary.json", json.dumps({"placement_groups_left": placement_groups_left}).encode())
    except OSError as exc:
        print(f"toolbox.run: writing summary.json failed: {describe_failure(exc)}; {_kept(plan.place.local)}", file=sys.stderr)
        return 1
    return 0


def _ended(how: str, run_dir: Path) -> str:
    """The last line of a run that was interrupted, or lost its Ray."""
    return f"toolbox.run: {how}: {_kept(run_dir)}; re-run the same command to continue"


def _kept(run_dir: Path) -> str:
    """What an ended run keeps, for its last line."""
    epochs = [r["epoch"] for r in read_rows(run_dir)]
    return f"{run_dir} keeps epochs 1-{max(epochs)} and their latest checkpoint" if epochs else f"{run_dir} has no finished epoch"


if __name__ == "__main__":
    exit_with(main())
