"""``--confirm K --seeds S``: re-train a finished sweep's K best configurations on S new seeds each.

The re-trainings are a sweep of their own in SWEEP_DIR/confirm (trials of Tune, resumable, with no
early stopping), whose space is the candidates' trial ids crossed with the seeds: more seeds or more
candidates later grow it like any sweep. Each configuration is then ranked by its mean over seeds.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from toolbox.config.registry import ConfigError
from toolbox.distributed.locations import Place
from toolbox.training.epochlog import replace_file
from toolbox.tuning.growth import drawn
from toolbox.tuning.plots import plot_confirmation
from toolbox.tuning.results import retrain_command
from toolbox.tuning.sweepfile import Sweep

log = logging.getLogger("toolbox")

CONFIRM_DIR = "confirm"
# Student's t at 0.975 for 1..30 degrees of freedom: the half-width of a 95 % interval is t * std / sqrt(n).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
T_975 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass
class Confirmation(Sweep):
    """A sweep whose trials re-train chosen configurations: ``candidate`` (a trial id of the sweep) x ``seed``."""

    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial id -> its drawn values, best first

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:  # Sweep.shown_config goes through it too
        return super().trial_config(self._values(params))

    def _values(self, params: dict[str, Any]) -> dict[str, Any]:
        chosen = self.candidates.get((params or {}).get("candidate"), {})
        return {**chosen, **({"seed": params["seed"]} if "seed" in (params or {}) else {})}


def confirmation(sweep: Sweep, exp: Place, k: int, seeds: int) -> tuple[Confirmation, Place]:
    """The confirmation of ``sweep`` (its results in ``exp``) and where it runs; refuses one that cannot run."""
    from ray import tune

    from toolbox.tuning.snapshots import saved_trials

    if k < 1 or seeds < 2:
        raise ConfigError(f"--confirm {k} --seeds {seeds}: give --confirm >= 1 and --seeds >= 2 (a spread needs two seeds)")
    try:
        with exp.fs.open_input_file(f"{exp.path}/results.parquet") as source:
            rows = pq.read_table(source).to_pylist()
    except FileNotFoundError:
        raise ConfigError(
            f"--confirm: {exp.path} holds no results yet: run the sweep first (the same command without --confirm)"
        ) from None
    ranked = [r for r in rows if r["status"] in ("done", "stopped") and not math.isnan(r[sweep.metric])][:k]
    if len(ranked) < k:
        raise ConfigError(f"--confirm {k}: the sweep has {len(ranked)} finished trials")
    params = {t.trial_id: t.config for t in saved_trials(exp.fs, exp.path)}
    candidates = {r["trial_id"]: drawn(sweep, params[r["trial_id"]]) for r in ranked}
    first = sweep.base.get("seed", 0) + 1  # seeds the search never trained on
    shared = {f.name: getattr(sweep, f.name) for f in fields(Sweep)}
    confirm = Confirmation(
        **shared
        | {
            "name": f"{sweep.name}-confirm",
            "space": {
                "candidate": tune.grid_search(list(candidates)),
                "seed": tune.grid_search(list(range(first, first + seeds))),
            },
            "num_samples": 1,
            "trial_scheduler": "fifo",  # every seed to the full budget
            "scheduler_options": {},
            "search": "random",
            "fuse": 0,
        },
        candidates=candidates,
    )
    return confirm, Place(exp.fs, exp.path, f"{exp.path}/{CONFIRM_DIR}", exp.local / CONFIRM_DIR, exp.remote)


def summarize(rows: list[dict], confirm: Confirmation, sweep: Sweep, exp: Place) -> list[dict]:
    """confirm.parquet/.csv, plots/confirm.png and best.json's ``confirmed`` from the re-trainings' rows; the ranking."""
    sign = -1 if sweep.mode == "max" else 1
    table = []
    for sweep_rank, (trial_id, values) in enumerate(confirm.candidates.items(), start=1):
        runs = sorted((r["seed"], r[sweep.metric]) for r in rows if r["candidate"] == trial_id and r["status"] == "done")
        scores = [score for _, score in runs if not math.isnan(score)]
        mean = statistics.fmean(scores) if scores else math.nan
        std = statistics.stdev(scores) if len(scores) > 1 else math.nan
        half = T_975[min(len(scores), len(T_975)) - 2] * std / math.sqrt(len(scores)) if len(scores) > 1 else math.nan
        table.append(
            {
                "trial_id": trial_id,
                "sweep_rank": sweep_rank,
                **values,
                "mean": mean,
                "std": std,
                "ci95_low": mean - half,
                "ci95_high": mean + half,
            }
            | {"seeds": [seed for seed, _ in runs], "values": [score for _, score in runs]}
        )
    table.sort(key=lambda r: (math.isnan(r["mean"]), sign * r["mean"] if not math.isnan(r["mean"]) else 0))
    for rank, row in enumerate(table, start=1):
        row["rank"] = rank
    _write(table, sweep, exp)
    return table


def _write(table: list[dict], sweep: Sweep, exp: Place) -> None:
    columns = pa.Table.from_pylist([{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in table])
    for name, writer in (("confirm.parquet", pq.write_table), ("confirm.csv", pacsv.write_csv)):
        buffer = pa.BufferOutputStream()
        writer(columns if name.endswith("parquet") else columns.drop_columns(["seeds", "values"]), buffer)
        replace_file(exp.local / name, buffer.getvalue().to_pybytes())
    best_file = exp.local / "best.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else {}
    winner = table[0]
    config = sweep.trial_config({k: v for k, v in winner.items() if k in sweep.space})
    seeds = " ".join(str(s) for s in winner["seeds"])
    best["confirmed"] = {
        "trial_id": winner["trial_id"],
        "mean": winner["mean"],
        "std": winner["std"],
        "ci95": [winner["ci95_low"], winner["ci95_high"]],
        "seeds": winner["seeds"],
        "values": winner["values"],
        # the name is a plain word (check_name), so the shell expands $seed inside it
        "command": f"for seed in {seeds}; do {retrain_command({**config, 'seed': 0}, sweep.name + '-confirmed')}-seed$seed --seed $seed; done",
    }
    replace_file(best_file, json.dumps(best, indent=2, default=str).encode())
    plot_confirmation(table, sweep, exp.local / "plots")
    if exp.mirror is not None:
        for name in ("confirm.parquet", "confirm.csv", "best.json", "plots/confirm.png"):
            exp.mirror.push(exp.local, name)


def report(rows: list[dict], confirm: Confirmation, sweep: Sweep, exp: Place) -> None:
    """The confirmation's files, its table, and whether the sweep's winner held."""
    table = summarize(rows, confirm, sweep, exp)
    print(format_table(table, sweep), flush=True)
    log.info(verdict(table, sweep))


def format_table(table: list[dict], sweep: Sweep) -> str:
    lines = [
        f"{'rank':<5} {'trial':<14} {'sweep rank':<11} {'mean ' + sweep.metric:<{len(sweep.metric) + 6}} {'std':<8} {'95 % CI':<20} seeds"
    ]
    for r in table:
        interval = f"[{r['ci95_low']:.4g}, {r['ci95_high']:.4g}]"
        lines.append(
            f"{r['rank']:<5} {r['trial_id']:<14} {r['sweep_rank']:<11} {r['mean']:<{len(sweep.metric) + 6}.4g} {r['std']:<8.2g} {interval:<20} {len(r['values'])}"
        )
    return "\n".join(lines)


def verdict(table: list[dict], sweep: Sweep) -> str:
    """Whether the sweep's winner held, in one line."""
    winner = next(r for r in table if r["sweep_rank"] == 1)
    top = table[0]
    ordinal = {1: "1st", 2: "2nd", 3: "3rd"}.get(winner["rank"], f"{winner['rank']}th")
    spread = f"{winner['mean']:.4g} ± {winner['std']:.2g}"
    said = f"trial {winner['trial_id']} ranked 1st on one seed, {ordinal} on the mean of {len(winner['values'])} ({spread}"
    if top is winner:
        return f"the sweep's winner held: {said})"
    return f"the sweep's winner did not hold: {said} vs trial {top['trial_id']}'s {top['mean']:.4g} ± {top['std']:.2g})"
