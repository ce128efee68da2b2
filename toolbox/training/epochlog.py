"""Per-run outputs written as epochs finish: training.log, epochs.csv and epochs.parquet."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LOG_FILE, CSV_FILE, PARQUET_FILE = "training.log", "epochs.csv", "epochs.parquet"
# Reported keys that are bookkeeping rather than epoch-table columns.
HIDDEN = ("first_step_time", "checkpoint_path")


def format_row(row: dict, epochs: int | None = None) -> str:
    """One console/log line for an epoch."""
    parts = [
        f"epoch {row['epoch']}" + (f"/{epochs}" if epochs else ""),
        f"lr {row['lr']:.3g}",
        f"train_loss {row['train_loss']:.4f}",
        f"val_loss {row['val_loss']:.4f}",
    ]
    parts += [f"{key} {value:.2f}" for key, value in row.items() if key.startswith("val_") and key != "val_loss"]
    parts += [f"{row['epoch_s']:.2f}s", f"{row['samples_per_s']:,.0f} samples/s"]
    return "  ".join(parts)


class EpochLog:
    """Appends one row per epoch to the run dir's log, CSV and Parquet files."""

    def __init__(self, run_dir: str | Path, epochs: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.epochs = epochs
        self.rows = read_rows(self.run_dir)  # a resumed run appends to what is there

    def log(self, message: str) -> None:
        with open(self.run_dir / LOG_FILE, "a") as f:
            f.write(f"{logging.Formatter().formatTime(logging.makeLogRecord({}))} {message}\n")

    def append(self, metrics: dict) -> str:
        row = {k: v for k, v in metrics.items() if k not in HIDDEN and isinstance(v, (int, float))}
        line = format_row(row, self.epochs)
        if row in self.rows:  # a finished run re-reporting its last epoch: nothing new to write
            return line
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]  # a retried epoch replaces
        self.log(line)
        with open(self.run_dir / CSV_FILE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows({k: r.get(k) for k in row} for r in self.rows)
        pq.write_table(pa.Table.from_pylist(self.rows), self.run_dir / PARQUET_FILE)
        return line


def read_rows(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / PARQUET_FILE
    return pq.read_table(path).to_pylist() if path.is_file() else []
