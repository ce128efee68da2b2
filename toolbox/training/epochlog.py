"""Per-run outputs written as epochs finish: training.log, epochs.csv and epochs.parquet.

Each epoch appears once: a retried epoch (a worker or trial restarted from the checkpoint
before it) replaces its row and is not logged again; the tables are replaced whole, never
half-written. A checkpoint carries the rows up to its epoch, so a run continued from it gets
back any row its table lost.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LOG_FILE, CSV_FILE, PARQUET_FILE = "training.log", "epochs.csv", "epochs.parquet"
# Reported keys that are bookkeeping rather than epoch-table columns.
HIDDEN = ("first_step_time", "checkpoint_path")
MEASURES = ("train_loss", "epoch_s", "samples_per_s", "params")  # besides val_*: TensorBoard's HParams columns
_LOGGED_EPOCH = re.compile(r"^\S+ \S+ epoch (\d+)(?:/\d+)?  lr ", re.MULTILINE)

log = logging.getLogger(__name__)


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


def table_row(metrics: dict) -> dict:
    """The epoch-table columns of a reported row."""
    return {k: v for k, v in metrics.items() if k not in HIDDEN and isinstance(v, (int, float))}


def replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then a rename."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class EpochLog:
    """Appends one row per epoch to the run dir's log, CSV and Parquet files, and to TensorBoard.

    TensorBoard gets each number as a scalar per epoch and, once per run dir, ``hparams`` as the
    HParams summary, so its HParams tab lines the runs of a sweep up against their metrics."""

    def __init__(self, run_dir: str | Path, epochs: int | None = None, hparams: dict | None = None, mirror=None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.epochs = epochs
        self.hparams = hparams
        self.mirror = mirror  # a Mirror under the storage URI, when the run's dir is not local
        self._board = None
        if mirror is not None:
            mirror.pull(self.run_dir, (LOG_FILE, CSV_FILE, PARQUET_FILE))
        self.rows = read_rows(self.run_dir)  # a resumed run appends to what is there
        path = self.run_dir / LOG_FILE
        self.logged = {int(e) for e in _LOGGED_EPOCH.findall(path.read_text(errors="replace"))} if path.exists() else set()

    def log(self, message: str) -> None:
        with open(self.run_dir / LOG_FILE, "a") as f:
            f.write(f"{logging.Formatter().formatTime(logging.makeLogRecord({}))} {message}\n")
        self._push(LOG_FILE)

    def _push(self, *names: str) -> None:
        if self.mirror is not None:
            for name in names:
                self.mirror.push(self.run_dir, name)

    def append(self, metrics: dict) -> str:
        row = table_row(metrics)
        line = format_row(row, self.epochs)
        if row in self.rows:  # a finished run re-reporting its last epoch: nothing new to write
            return line
        if row["epoch"] not in self.logged:
            self.log(line)
            self.logged.add(row["epoch"])
        self._write([r for r in self.rows if r["epoch"] < row["epoch"]] + [row])
        self._to_tensorboard(row)
        return line

    def _to_tensorboard(self, row: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is not installed: the tables are enough
            return
        if self._board is None:
            first = not any(self.run_dir.glob("events.out.tfevents.*"))
            self._board = SummaryWriter(str(self.run_dir))
            if first and self.hparams is not None:
                self._write_hparams(row)
        for key, value in row.items():
            if key != "epoch":
                self._board.add_scalar(key, value, global_step=row["epoch"])
        self._board.flush()
        self._push(*(p.name for p in self.run_dir.glob("events.out.tfevents.*")))

    def _write_hparams(self, row: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        shown = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.hparams.items() if v is not None}
        measured = {k: 0.0 for k in row if k.startswith("val_") or k in MEASURES}
        for summary in hparams(shown, measured):
            self._board.file_writer.add_summary(summary)

    def backfill(self, history: list[dict]) -> None:
        """Add the rows of a checkpoint's history that the table lacks (a run killed between the two writes)."""
        missing = _lacking(self.rows, history)
        for row in missing:
            if row["epoch"] not in self.logged:
                self.log(format_row(row, self.epochs))
                self.logged.add(row["epoch"])
        if missing:
            self._write(sorted(self.rows + missing, key=lambda r: r["epoch"]))

    def restart(self, epoch: int, note: str, history: list[dict]) -> None:
        """Continue from another trajectory's checkpoint at ``epoch`` (PBT's exploit): later rows go, and are logged anew.

        Epochs up to ``epoch`` that this run never reached come from the checkpoint's ``history`` (that
        trajectory's rows), so the table has every epoch once; the log keeps this run's own lines."""
        self.log(note)
        self.logged = {e for e in self.logged if e <= epoch}
        kept = [r for r in self.rows if r["epoch"] <= epoch]
        reached = _lacking(kept, [r for r in history if r["epoch"] <= epoch])
        if reached or len(kept) < len(self.rows):
            self._write(sorted(kept + reached, key=lambda r: r["epoch"]))

    def _write(self, rows: list[dict]) -> None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in columns} for r in rows)
        parquet = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), parquet)
        replace_file(self.run_dir / PARQUET_FILE, parquet.getvalue().to_pybytes())
        replace_file(self.run_dir / CSV_FILE, text.getvalue().encode())
        self._push(PARQUET_FILE, CSV_FILE)
        self.rows = rows


def _lacking(rows: list[dict], history: list[dict]) -> list[dict]:
    """The table rows of ``history``'s epochs that ``rows`` lacks."""
    have = {r["epoch"] for r in rows}
    return [table_row(r) for r in history if r["epoch"] not in have]


def read_rows(run_dir: str | Path, fs=None) -> list[dict]:
    """The epoch table; a damaged Parquet file falls back to the CSV beside it, then to nothing.

    ``fs`` (a pyarrow filesystem) reads a run dir through it, and nothing when its table is unreadable."""
    if fs is not None:
        try:
            return pq.read_table(f"{run_dir}/{PARQUET_FILE}", filesystem=fs).to_pylist()
        except (OSError, pa.ArrowException):
            return []
    path = Path(run_dir) / PARQUET_FILE
    if not path.is_file():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s is damaged (%s); reading %s instead", path, exc, CSV_FILE)
    try:
        with open(Path(run_dir) / CSV_FILE, newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, ValueError):
        return []


def _number(text: str) -> int | float | None:
    if text == "":
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
