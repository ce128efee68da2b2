"""What an LR range test writes, for ``toolbox.lr_find`` and a sweep's range tests alike: its curve, its summary
and its plot, and the line that says how the ramp ended."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path, PurePosixPath

from toolbox.training.epochlog import replace_file
from toolbox.training.lr_range import RANGE_RULE, SUGGESTION_RULE, Curve, Ramp, Suggestion

CSV_FILE, JSON_FILE, PNG_FILE = "lr_find.csv", "lr_find.json", "lr_find.png"
OUTPUT_FILES = (CSV_FILE, JSON_FILE, PNG_FILE)


def range_test_settings(ramp: Ramp, curve: Curve) -> dict:
    """The ramp and the curve's settings, as a range test's workers take them."""
    return {"ramp": dataclasses.asdict(ramp), "curve": {"smoothing": curve.smoothing, "diverge_factor": curve.diverge_factor}}


def csv_text(rows: list[dict]) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["step", "lr", "loss", "smoothed_loss"])
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def summary(curves: list[dict], suggestion: Suggestion, settings: dict, config: dict) -> dict:
    """lr_find.json: the suggestion and its range, their rules, and how the test ran (``curves``: one per rank)."""
    rows, ramp, curve = curves[0]["rows"], settings["ramp"], settings["curve"]
    return {
        "suggestion": suggestion.lr,
        "range": None if suggestion.lr is None else [suggestion.low, suggestion.high],
        "rule": {"suggestion": SUGGESTION_RULE, "range": RANGE_RULE},
        "why_none": suggestion.why or None,
        "minimum_lr": suggestion.minimum_lr,
        "stopped_early": curves[0]["diverged"],
        "steps": len(rows),
        "max_steps": ramp["steps"],
        "start_lr": ramp["start_lr"],
        "end_lr": ramp["end_lr"],
        "smoothing": curve["smoothing"],
        "diverge_factor": curve["diverge_factor"],
        "workers": len(curves),
        "workers_agree": all(c == curves[0] for c in curves),
        "config": config,
    }


def write_outputs(
    root: Path, subdir: str, mirror, *, name: str, curves: list[dict], suggestion: Suggestion, settings: dict, config: dict
) -> None:
    """``OUTPUT_FILES`` in ``root``/``subdir`` ("": ``root`` itself), replacing those of an earlier test, and pushed
    to ``mirror`` (a ``Mirror`` of ``root``, or None); ``name`` heads the plot."""
    from toolbox.tuning.plots import plot_lr_range

    directory, rows = root / subdir, curves[0]["rows"]
    directory.mkdir(parents=True, exist_ok=True)
    replace_file(directory / CSV_FILE, csv_text(rows).encode())
    replace_file(directory / JSON_FILE, json.dumps(summary(curves, suggestion, settings, config), indent=2).encode())
    title = f"{name}: {config['arch']}, {config['optimizer']} on {config['dataset']}"
    plot_lr_range(rows, suggestion, title, directory / PNG_FILE)
    if mirror is not None:
        for file in OUTPUT_FILES:
            mirror.push(root, str(PurePosixPath(subdir, file)))


def how_it_stopped(rows: list[dict], diverged: bool, steps: int) -> str:
    last = rows[-1]
    if diverged:
        return f"stopped at step {last['step'] + 1} of {steps} (lr {last['lr']:.2e}): the smoothed loss diverged"
    return f"ran all {steps} steps to lr {last['lr']:.2e} without the loss diverging"
