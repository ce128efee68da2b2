"""What a sweep leaves behind: a ranked table, results.parquet/.csv, best.json and PNG plots."""

from __future__ import annotations

import json
import logging
import math
import shlex
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs
import pyarrow.parquet as pq

from toolbox.config.flags import is_disk_full
from toolbox.config.resolve import all_keys, changed_keys, flag
from toolbox.training.checkpoint import META_FILE, STATE_FILE
from toolbox.training.epochlog import read_rows, replace_file
from toolbox.training.failures import deterministic_cause
from toolbox.tuning.growth import in_space
from toolbox.tuning.pareto import pareto_fronts
from toolbox.tuning.range_tests import BOUNDS_FILE
from toolbox.tuning.sweepfile import Sweep
from toolbox.tuning.trial_dirs import TRIAL_DIR

log = logging.getLogger("toolbox")


def trial_rows(
    result_grid,
    sweep: Sweep,
    startup_s: dict[str, float] | None = None,
    saved: dict | None = None,
    budgets: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per trial, best first: its swept values, best metric, epochs run, budget, retries, time, checkpoint.

    ``saved`` is each trial as Tune saved it (``saved_trials``): its status and failure count, and its
    config where no result carries it; a trial still running or pending when the sweep ended is
    "interrupted", one its scheduler paused (HyperBand) "paused". ``budgets`` holds the epochs of
    trials that a grown sweep left at an earlier budget; the others have the sweep's. A trial that a
    grown space no longer holds is "outside".

    A multi-objective sweep's trial scores, on each objective, its values at its best epoch by the primary one;
    its ``pareto`` is its front among the trials scored on all of them (1: none dominates it), and the rows
    rank by front, then by the primary objective."""
    rows, run_keys = [], set(all_keys())  # a swept key that is no run key (a confirmation's candidate) is its drawn value
    for result in result_grid:
        history = read_rows(result.path, result.filesystem) if result.path else []  # the trial's own epoch table
        best = best_value(history, sweep)
        at_best = next((row for row in history if row.get(sweep.metric) == best), {})
        epochs = int(history[-1]["epoch"]) if history else 0
        # From the dir name: a PBT trial's last metrics may be those of the trial it exploited.
        match = TRIAL_DIR.search(Path(result.path or "").name)
        trial_id = match.group(1) if match else (result.metrics or {}).get("trial_id", "?")
        trial = (saved or {}).get(trial_id)
        status, failures = (trial.status, trial.num_failures) if trial else ("TERMINATED", 0)
        # A restored trial that never reported (it errored at once) has no config in its result.
        params = result.config or (trial.config if trial else {})
        config = sweep.shown_config(params)
        budget = (budgets or {}).get(trial_id, sweep.epochs)
        if status == "PAUSED":
            outcome = "paused"
        elif status in ("RUNNING", "PENDING"):  # also one waiting to retry after an error: it continues
            outcome = "interrupted"
        elif result.error or status == "ERROR":
            outcome = "error"
        elif not in_space(sweep, params):
            outcome = "outside"
        else:
            outcome = "done" if epochs >= budget else "stopped"
        rows.append(
            {
                "trial_id": trial_id,
                "status": outcome,
                "retries": failures - 1 if outcome == "error" else failures,
                # a swept key the trial's components don't take (sgd's momentum in an adamw trial) stays empty
                **{key: _plain(config.get(key) if key in run_keys else params.get(key)) for key in swept_keys(sweep)},
                sweep.metric: best,
                **{metric: _number(at_best.get(metric)) for metric, _ in sweep.objectives[1:]},
                **({"pareto": None} if sweep.multi_objective else {}),
                "best_epoch": int(at_best["epoch"]) if at_best else 0,
                "epochs": epochs,
                "budget": budget,
                "time_s": round(sum(row["epoch_s"] for row in history), 1),
                "startup_s": (startup_s or {}).get(trial_id, math.nan),  # trial start -> first step (this run)
                "checkpoint": _best_checkpoint(result, history, sweep),
                "error": error_line(result.error) if outcome == "error" else None,
                "trial_dir": result.path,
                "config": config,  # the trial's full run config (a JSON column in the results files)
                "history": history,  # for the plots; not a column
            }
        )
    if sweep.multi_objective:
        _rank_fronts(rows, sweep)
    sign = -1 if sweep.mode == "max" else 1
    # Trials outside a grown space rank after the spec's own: best.json is the best of what the spec asks.
    rows.sort(
        key=lambda r: (
            r["status"] == "outside",
            *((r["pareto"] is None, r["pareto"] or 0) if sweep.multi_objective else ()),
            math.isnan(r[sweep.metric]),
            sign * r[sweep.metric] if not math.isnan(r[sweep.metric]) else 0,
        )
    )
    return rows


def _rank_fronts(rows: list[dict], sweep: Sweep) -> None:
    """Each row's ``pareto`` front among the rows inside the space that are scored on every objective."""
    scored = [r for r in rows if r["status"] != "outside" and not any(math.isnan(r[m]) for m, _ in sweep.objectives)]
    fronts = pareto_fronts([[r[m] for m, _ in sweep.objectives] for r in scored], [mode for _, mode in sweep.objectives])
    for row, front in zip(scored, fronts):
        row["pareto"] = front


def _number(value: Any) -> float:
    return math.nan if value is None else value


def best_value(history: list[dict], sweep: Sweep) -> float:
    """The best of a trial's epochs (its whole history, over every run of the sweep) by the sweep's metric; nan if none."""
    values = [row[sweep.metric] for row in history if row.get(sweep.metric) is not None]
    return (max if sweep.mode == "max" else min)(values) if values else math.nan


def saved_trials(exp) -> dict:
    """Each trial as Tune saved it in the sweep dir (a ``Place``), by id: after Ctrl-C, Tune's live
    trials all read TERMINATED, but its last snapshot still has the interrupted ones RUNNING or PENDING."""
    from toolbox.tuning.snapshots import saved_trials as read_saved_trials

    try:
        trials = read_saved_trials(exp.fs, exp.path)
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("no trial states in %s: %s", exp.path, exc)
        return {}
    return {t.trial_id: t for t in trials}


NOT_RETRIED = "(not retried: a retry would fail the same way)"  # ends the error of a trial that failed deterministically


def error_line(error: BaseException | None) -> str | None:
    """What a trial's last failure says, in one line: the traceback's last line (its exception)."""
    if error is None:
        return None
    deterministic = deterministic_cause(error)
    if deterministic is not None:
        return f"{deterministic} {NOT_RETRIED}"[:400]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def swept_keys(sweep: Sweep) -> list[str]:
    """The results columns of the swept keys, in the registry's order, then those that are no run key (a confirmation's candidate)."""
    known = all_keys()
    return [key for key in known if key in sweep.space] + [key for key in sweep.space if key not in known]


def _best_checkpoint(result, history: list[dict], sweep: Sweep) -> str | None:
    """The kept checkpoint (Tune's, or a Train-in-Tune trial's own) whose epoch scored best, the earliest such.

    Only whole ones: a dir with both files, outside the hidden dirs where a copy is staged."""
    if not result.path:
        return None
    score = {row["epoch"]: row.get(sweep.metric) for row in history}
    fs, files = result.filesystem, {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(result.path, recursive=True, allow_not_found=True)):
        directory, _, name = info.path.rpartition("/")
        if not any(part.startswith(".") for part in directory.removeprefix(result.path).split("/")):
            files.setdefault(directory, set()).add(name)
    kept = []
    for directory, names in files.items():
        if {META_FILE, STATE_FILE} <= names:
            try:
                with fs.open_input_stream(f"{directory}/{META_FILE}") as meta:
                    epoch = json.loads(meta.read())["epoch"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if score.get(epoch) is not None:
                value = score[epoch] if sweep.mode == "max" else -score[epoch]
                kept.append((value, -epoch, directory))
    return max(kept)[2] if kept else None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def write(rows: list[dict], sweep: Sweep, out_dir: Path, mirror=None, lr_bounds: dict | None = None) -> dict | None:
    """results.parquet/.csv, best.json and plots; returns best.json's content. ``lr_bounds``: those that the
    sweep's LR range tests set, per optimizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        return None
    # A refused trial's values as drawn (text among numbers) make their column JSON, like lists.
    mixed = {
        k for k in swept_keys(sweep) if len({float if type(r[k]) is int else type(r[k]) for r in rows if r[k] is not None}) > 1
    }
    columns = [
        {
            k: (json.dumps(v) if isinstance(v, (list, dict)) or (k in mixed and v is not None) else v)
            for k, v in r.items()
            if k != "history"
        }
        for r in rows
    ]
    table = pa.Table.from_pylist(columns)
    for name, writer in (("results.parquet", pq.write_table), ("results.csv", pacsv.write_csv)):
        buffer = pa.BufferOutputStream()
        writer(table, buffer)
        replace_file(out_dir / name, buffer.getvalue().to_pybytes())
        if mirror is not None:
            mirror.push(out_dir, name)
    best = rows[0]
    if math.isnan(best[sweep.metric]):  # no trial reported the metric: nothing to re-train
        return None
    config = best["config"]
    earlier = json.loads((out_dir / "best.json").read_text()) if (out_dir / "best.json").exists() else {}
    summary = {
        "trial_id": best["trial_id"],
        "metric": sweep.metric,
        "mode": sweep.mode,
        "value": best[sweep.metric],
        "best_epoch": best["best_epoch"],
        "checkpoint": best["checkpoint"],
        "config": config,
        "command": retrain_command(config, f"{sweep.name}-best"),
        **({"lr_bounds_from_range_tests": lr_bounds, "range_tests": BOUNDS_FILE} if lr_bounds else {}),
        **({"confirmed": earlier["confirmed"]} if "confirmed" in earlier else {}),  # --confirm's, kept when the sweep grows
        **(_front(rows, sweep) if sweep.multi_objective else {}),
    }
    replace_file(out_dir / "best.json", json.dumps(summary, indent=2, default=str).encode())
    if mirror is not None:
        mirror.push(out_dir, "best.json")
    try:
        from toolbox.tuning.plots import plot

        plot(rows, sweep, out_dir)
        if mirror is not None:
            plots = ["plots/val_metric.png", "plots/lr_schedule.png"] + (["plots/pareto.png"] if sweep.multi_objective else [])
            for name in plots:
                mirror.push(out_dir, name)
    except Exception as exc:  # noqa: BLE001 - a plot must never cost the results
        if is_disk_full(exc):
            raise
        log.warning("plots skipped: %s", exc)
    return summary


def _front(rows: list[dict], sweep: Sweep) -> dict:
    """best.json's objectives and Pareto front: each member's values, config and re-train command."""
    return {
        "objectives": [{"metric": metric, "mode": mode} for metric, mode in sweep.objectives],
        "front": [
            {
                "trial_id": r["trial_id"],
                "values": {metric: r[metric] for metric, _ in sweep.objectives},
                "best_epoch": r["best_epoch"],
                "checkpoint": r["checkpoint"],
                "config": r["config"],
                "command": retrain_command(r["config"], f"{sweep.name}-{r['trial_id']}"),
            }
            for r in rows
            if r["pareto"] == 1
        ],
    }


def front_lines(rows: list[dict], sweep: Sweep, limit: int = 10) -> str:
    """What the console says of a multi-objective sweep's Pareto front: a line, then one per member."""
    front = [r for r in rows if r["pareto"] == 1]
    said = ", ".join(f"{metric} {mode}" for metric, mode in sweep.objectives)
    lines = [f"Pareto front ({said}): {len(front)} of {len(rows)} trials"]
    lines += [f"  {r['trial_id']}: " + ", ".join(f"{m} {_cell(r[m])}" for m, _ in sweep.objectives) for r in front[:limit]]
    if len(front) > limit:
        lines.append(f"  ... {len(front) - limit} more in best.json")
    return "\n".join(lines)


def retrain_command(config: dict, name: str) -> str:
    """``python -m toolbox.run ...`` that trains exactly this config: its components, and every key
    whose value differs from what ``toolbox.run`` would use for them."""
    words = ["python", "-m", "toolbox.run"]
    for key, value in changed_keys(config).items():
        if isinstance(value, bool):
            words.append(flag(key) if value else "--no-" + flag(key)[2:])
        else:
            values = value if isinstance(value, (tuple, list)) else [value]
            words += [flag(key), *("none" if v is None else str(v) for v in values)]
    return shlex.join(words + ["--name", name])


def format_table(rows: list[dict], sweep: Sweep, limit: int = 20) -> str:
    """The ranked table printed at the end of a sweep."""
    swept = swept_keys(sweep)
    budgets = len({r["budget"] for r in rows}) > 1  # shown where a grown sweep mixes them
    shown = [metric for metric, _ in sweep.objectives] + (["pareto"] if sweep.multi_objective else [])
    header = ["rank", "trial", *swept, *shown, "epochs", *(["budget"] if budgets else []), "retries", "time_s", "status"]
    lines = [
        [
            str(i + 1),
            str(r["trial_id"]),
            *(_cell(r.get(k)) for k in swept),
            *(_cell(r[k]) for k in shown),
            str(r["epochs"]),
            *([str(r["budget"])] if budgets else []),
            str(r["retries"]),
            f"{r['time_s']:.0f}",
            r["status"],
        ]
        for i, r in enumerate(rows[:limit])
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)] if lines else [len(h) for h in header]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    if len(rows) > limit:
        out.append(f"... {len(rows) - limit} more in results.csv")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)
