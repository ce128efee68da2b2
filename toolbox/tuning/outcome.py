"""How a sweep ended: its last console lines and its exit code (0: the spec is done; 130 or 143: interrupted;
1: trials errored, or the disk is full)."""

from __future__ import annotations

import sys
from pathlib import Path

from toolbox.config.flags import describe_failure
from toolbox.distributed import signals
from toolbox.tuning import results, tune_fixes
from toolbox.tuning.sweepfile import Sweep


def said(rows: list[dict], sweep: Sweep, exp_dir: Path) -> int:
    unfinished = sum(r["status"] in ("interrupted", "paused") for r in rows)
    in_space = sum(r["status"] != "outside" for r in rows)
    if tune_fixes.was_interrupted() or unfinished or in_space < sweep.total_trials:
        finished = sum(r["status"] in ("done", "stopped") for r in rows)
        kept = f"{exp_dir} keeps {finished} finished trials and every trial's checkpoints"
        if tune_fixes.disk_full() is not None:
            signals.say_end(f"toolbox.sweep: failed: {describe_failure(tune_fixes.disk_full())}; {kept}")
            return 1
        how, code = signals.interruption()
        signals.say_end(f"toolbox.sweep: {how}: {kept}; re-run the same command to continue")
        return code
    errored = [r for r in rows if r["status"] == "error"]
    if errored:
        repeating = sum(results.NOT_RETRIED in (r["error"] or "") for r in errored)
        kinds = {
            f"{len(errored) - repeating} crashed on each of {sweep.max_failures + 1} tries": len(errored) > repeating,
            f"{repeating} not retried, as a retry would fail the same way": repeating > 0,
        }
        print(
            f"toolbox.sweep: {len(errored)} of {len(rows)} trials errored ({'; '.join(k for k, said in kinds.items() if said)}); "
            f"their error.txt is in {exp_dir}/<trial>/; the results hold the others",
            file=sys.stderr,
        )
        for row in errored[:5]:
            values = ", ".join(f"{key}={row[key]!r}" for key in results.swept_keys(sweep) if row[key] is not None)
            print(f"  trial {row['trial_id']} ({values}): {row['error'] or 'no error recorded'}", file=sys.stderr)
        if len(errored) > 5:
            print(f"  ... {len(errored) - 5} more in results.csv (its error column)", file=sys.stderr)
        return 1
    return 0
