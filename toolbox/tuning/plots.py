"""Plots: a sweep's metric per epoch of every trial, LR schedule of the top trials and Pareto front; an LR range test's curve."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from toolbox.training.builders import lr_schedule
from toolbox.training.epochlog import replace_file
from toolbox.tuning.pareto import pareto_fronts

if TYPE_CHECKING:
    from toolbox.training.lr_range import Suggestion
    from toolbox.tuning.sweepfile import Sweep


def plot(rows: list[dict], sweep: Sweep, out_dir: Path, top: int = 5) -> None:
    """plots/val_metric.png: the metric per epoch of every trial; plots/lr_schedule.png: the top trials' LR;
    plots/pareto.png where the sweep has several objectives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for rank, row in enumerate(rows):
        history = row["history"]
        if history and sweep.metric in history[0]:
            ax.plot(
                [h["epoch"] for h in history],
                [h[sweep.metric] for h in history],
                marker="o",
                markersize=3,
                alpha=1.0 if rank < top else 0.35,
                lw=2 if rank < top else 1,
                label=f"#{rank + 1} {row['trial_id']}" if rank < top else None,
            )
    ax.set(xlabel="epoch", ylabel=sweep.metric, title=f"{sweep.name}: {sweep.metric} per epoch ({len(rows)} trials)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, plots / "val_metric.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    peak = 0.0
    for rank, row in enumerate(rows[:top]):
        history = row["history"]
        if not history:  # it never trained (its drawn values were refused, say): no schedule to show
            continue
        config = row["config"]
        steps = history[0].get("steps_per_epoch") if history else None
        steps = steps or 100
        lrs = lr_schedule(config, steps)
        peak = max(peak, *lrs)
        ax.plot([i / steps for i in range(len(lrs))], lrs, label=f"#{rank + 1} {config['optimizer']}/{config['scheduler']}")
    if peak:
        ax.set_ylim(bottom=peak / 1e4)  # annealing to ~0 would stretch a log axis to 1e-10
    ax.set(
        xlabel="epoch",
        ylabel="learning rate",
        yscale="log",
        title=f"{sweep.name}: LR schedule of the top {min(top, len(rows))} trials",
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, plots / "lr_schedule.png")
    if sweep.multi_objective:
        plot_pareto(rows, sweep, plots)


def plot_pareto(rows: list[dict], sweep: Sweep, plots: Path) -> None:
    """plots/pareto.png: every scored trial by the first two objectives, the front of those two a step line,
    the sweep's front (over all its objectives) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (x, x_mode), (y, y_mode) = sweep.objectives[:2]
    scored = [r for r in rows if r["pareto"] is not None]
    fronts = pareto_fronts([(r[x], r[y]) for r in scored], (x_mode, y_mode))
    line = sorted((r for r, front in zip(scored, fronts) if front == 1), key=lambda r: r[x])
    marked = [r for r in scored if r["pareto"] == 1]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([r[x] for r in scored], [r[y] for r in scored], alpha=0.5, label="a trial")
    # The boundary of what the front dominates: between two members, the one better by x sets y.
    ax.step([r[x] for r in line], [r[y] for r in line], where="pre" if x_mode == "max" else "post", color="tab:red", lw=2)
    ax.scatter([r[x] for r in marked], [r[y] for r in marked], color="tab:red", zorder=3, label=f"Pareto front ({len(marked)})")
    for r in marked:
        ax.annotate(str(r["trial_id"]).rsplit("_", 1)[-1], (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(
        xlabel=f"{x} ({x_mode})",
        ylabel=f"{y} ({y_mode})",
        title=f"{sweep.name}: Pareto front of {len(scored)} trials",
    )
    for values, set_scale in (([r[x] for r in scored], ax.set_xscale), ([r[y] for r in scored], ax.set_yscale)):
        if values and min(values) > 0 and max(values) >= 10 * min(values):
            set_scale("log")  # model sizes and times span orders of magnitude
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, plots / "pareto.png")


def plot_confirmation(table: list[dict], sweep: Sweep, plots: Path) -> None:
    """plots/confirm.png: each configuration's value per seed, and its mean with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(table) + 1.5))
    for y, row in enumerate(table):
        ax.scatter(row["values"], [y] * len(row["values"]), alpha=0.6, label="a seed" if y == 0 else None)
        if not math.isnan(row["ci95_low"]):
            ax.errorbar(
                row["mean"],
                y,
                xerr=[[row["mean"] - row["ci95_low"]], [row["ci95_high"] - row["mean"]]],
                fmt="D",
                color="black",
                capsize=4,
                label="mean, 95 % CI" if y == 0 else None,
            )
    ax.set_yticks(range(len(table)), [f"{r['trial_id']} (sweep #{r['sweep_rank']})" for r in table])
    ax.invert_yaxis()
    ax.set(xlabel=sweep.metric, title=f"{sweep.name}: the top {len(table)} configurations over seeds")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, plots / "confirm.png")


def plot_lr_range(rows: list[dict], suggestion: Suggestion, title: str, path: Path) -> None:
    """The loss and the smoothed loss against the lr (log axis), the suggested lr and its range marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if math.isfinite(r["loss"]) and math.isfinite(r["smoothed_loss"])]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["lr"] for r in shown], [r["loss"] for r in shown], alpha=0.35, lw=1, label="loss")
    ax.plot([r["lr"] for r in shown], [r["smoothed_loss"] for r in shown], lw=2, label="smoothed loss")
    if suggestion.lr is not None:
        ax.axvspan(suggestion.low, suggestion.high, color="tab:green", alpha=0.12, label="range")
        ax.axvline(suggestion.lr, color="tab:red", ls="--", label=f"suggested lr {suggestion.lr:.2e}")
    top = max((r["smoothed_loss"] for r in shown[: len(shown) // 10 + 1]), default=0.0) * 1.5
    lowest = min((min(r["loss"], r["smoothed_loss"]) for r in shown), default=0.0)
    if top > lowest:  # the diverged tail would stretch the loss axis far beyond the curve's start
        ax.set_ylim(bottom=lowest - 0.05 * (top - lowest), top=top)
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title=title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """The PNG whole or not at all (a full disk leaves the previous one)."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    replace_file(path, png.getvalue())
