"""A sweep's LR range tests, asked for by ``"lr": "range_test"`` in its space (plain, or per optimizer).

Before the trials start, one range test per optimizer that needs one runs as a Ray task, all of them
started together, each in one process with one trial worker's resources (any node that fits a worker fits it): the
sweep's base with that optimizer, every other space key at its first value, a trial's batch (its workers' batches
together), the ramp of the sweep's ``range_test`` options.
Each test's suggested range becomes its optimizer's ``tune.loguniform(low, high)``. The sweep dir keeps
each test's outputs in ``range_tests/<optimizer>/`` and the bounds in ``range_tests.json``: a re-run or a
grown sweep reuses them; ``--restart``, which empties the dir, tests again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from toolbox.components.optimizers import OPTIMIZERS
from toolbox.config.registry import ConfigError
from toolbox.distributed.locations import Place
from toolbox.distributed.trainer import Workers
from toolbox.training.epochlog import replace_file
from toolbox.training.lr_range import RANGE_RULE, Curve, describe, suggest
from toolbox.tuning.range_outputs import range_test_settings, write_outputs
from toolbox.tuning.sweepfile import Sweep, candidate_params, range_tested

log = logging.getLogger("toolbox")

BOUNDS_FILE, TESTS_DIR = "range_tests.json", "range_tests"


def recorded_bounds(exp: Place) -> dict[str, list[float]]:
    """The lr bounds per optimizer that the sweep dir's ``BOUNDS_FILE`` holds (none without one)."""
    try:
        with exp.fs.open_input_stream(f"{exp.path}/{BOUNDS_FILE}") as source:
            return json.loads(source.read())["bounds"]
    except FileNotFoundError:
        return {}


def lr_bounds(sweep: Sweep, exp: Place, data_ref: Any) -> dict[str, list[float]]:
    """Each range-tested optimizer's [low, high]: recorded in the sweep dir, or from new range tests, recorded then."""
    tested = range_tested(sweep)
    if not tested:
        return {}
    recorded = recorded_bounds(exp)
    missing = [optimizer for optimizer in tested if optimizer not in recorded]
    if missing:
        recorded |= _run_tests(sweep, exp, data_ref, missing)
        _record(exp, recorded)
    else:
        log.info("reusing range-test bounds from %s/%s (--restart tests again)", exp.path, BOUNDS_FILE)
    return {optimizer: recorded[optimizer] for optimizer in tested}


def said(bounds: dict[str, list[float]]) -> str:
    """Where the lr bounds came from, in one line."""
    ranges = ", ".join(f"{optimizer} {low:.2e} .. {high:.2e}" for optimizer, (low, high) in bounds.items())
    return f"lr bounds from LR range tests ({BOUNDS_FILE}, {TESTS_DIR}/<optimizer>/): {ranges}"


def range_test_config(sweep: Sweep, optimizer: str) -> dict[str, Any]:
    """The run config a range test of ``optimizer`` trains: the sweep's base, every other space key at its first value,
    and a trial's whole batch."""
    first = candidate_params(sweep.space, limit=1)[0]
    config = sweep.trial_config({**first, OPTIMIZERS.selector: optimizer})
    # A trial's DDP workers step on the mean gradient of their batches, the one step a process takes on all of them.
    return {**config, "batch_size": config["batch_size"] * sweep.workers_per_trial}


def _run_tests(sweep: Sweep, exp: Place, data_ref: Any, optimizers: list[str]) -> dict[str, list[float]]:
    import ray

    from toolbox.distributed.trainer import range_test_process

    ramp, settings = sweep.ramp, range_test_settings(sweep.ramp, Curve())
    worker = Workers(1, sweep.cpus_per_worker, sweep.gpus_per_trial / sweep.workers_per_trial)
    task = ray.remote(range_test_process).options(num_cpus=worker.cpus, num_gpus=worker.gpus, max_retries=0)
    log.info(
        "lr range tests of %s, started together: lr %.0e .. %.0e over at most %d steps -> %s/%s",
        ", ".join(optimizers),
        ramp.start_lr,
        ramp.end_lr,
        ramp.steps,
        exp.path,
        TESTS_DIR,
    )
    configs = {optimizer: range_test_config(sweep, optimizer) for optimizer in optimizers}
    running = {
        optimizer: task.remote(
            {"config": config, "data": data_ref, "resume_from": None, "threads": worker.threads, "settings": settings},
            worker.gpus > 0,
        )
        for optimizer, config in configs.items()
    }
    bounds = {}
    for optimizer, curve in zip(running, ray.get(list(running.values()))):
        suggestion = suggest(curve["rows"], ramp.steps)
        directory = f"{TESTS_DIR}/{optimizer}"
        write_outputs(
            exp.local,
            directory,
            exp.mirror,
            name=f"{sweep.name} {optimizer}",
            curves=[curve],
            suggestion=suggestion,
            settings=settings,
            config=configs[optimizer],
        )
        log.info("lr range test of %s: %s", optimizer, describe(suggestion))
        if suggestion.lr is None:
            raise ConfigError(
                f"the LR range test of {optimizer} found no lr ({suggestion.why}, in the sweep's range_test options); "
                f"its curve is in {exp.path}/{directory}"
            )
        bounds[optimizer] = [suggestion.low, suggestion.high]
    return bounds


def _record(exp: Place, bounds: dict[str, list[float]]) -> None:
    record = {"bounds": bounds, "rule": RANGE_RULE, "tests": {o: f"{TESTS_DIR}/{o}" for o in bounds}}
    replace_file(exp.local / BOUNDS_FILE, json.dumps(record, indent=2).encode())
    if exp.mirror is not None:
        exp.mirror.push(exp.local, BOUNDS_FILE)
