"""The storage filesystem toolbox gives Ray: files appear whole, and Tune's state files only when they parse."""

from __future__ import annotations

import json
import pickle

import pyarrow.fs
import pytest

from toolbox.distributed.storage import atomic_local_files, delete_deferred


def test_a_file_appears_only_when_closed_and_whole(tmp_path):
    fs = atomic_local_files()
    with fs.open_output_stream(str(tmp_path / "state.pt")) as out:
        out.write(b"x" * 1000)
        assert not (tmp_path / "state.pt").exists()  # a reader sees nothing yet, not a partial file
    assert (tmp_path / "state.pt").read_bytes() == b"x" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


def test_directories_copy_through_it(tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "big.bin").write_bytes(bytes(range(256)) * 9000)
    (source / "meta.json").write_text("{}")
    pyarrow.fs.copy_files(str(source), str(tmp_path / "copy"), pyarrow.fs.LocalFileSystem(), atomic_local_files())
    assert (tmp_path / "copy" / "sub" / "big.bin").read_bytes() == (source / "sub" / "big.bin").read_bytes()
    assert (tmp_path / "copy" / "meta.json").read_text() == "{}"


def test_a_cut_short_experiment_state_keeps_the_previous_one(tmp_path):
    fs = atomic_local_files()
    path = tmp_path / "experiment_state-2026-01-01_00-00-00.json"
    good = json.dumps({"trial_data": [["a", "b"]] * 50}).encode()
    for data in (good, b"", good[: len(good) // 2]):  # whole, then empty and cut short (a copy racing a rewrite)
        with fs.open_output_stream(str(path)) as out:
            out.write(data)
    assert path.read_bytes() == good
    searcher = tmp_path / "searcher-state-2026-01-01_00-00-00.pkl"
    whole = pickle.dumps({"trials": list(range(100))})
    for data in (whole, whole[:-5]):
        with fs.open_output_stream(str(searcher)) as out:
            out.write(data)
    assert searcher.read_bytes() == whole
    error = tmp_path / "error.pkl"  # an empty one, read back as the results are listed, failed the sweep: EOFError
    (error.parent / "empty").write_bytes(b"")
    pyarrow.fs.copy_files(str(error.parent / "empty"), str(error), pyarrow.fs.LocalFileSystem(), fs)
    assert not error.exists()
    other = tmp_path / "result.json"  # any other file is published as written
    with fs.open_output_stream(str(other)) as out:
        out.write(b'{"a": 1}\n{"a"')
    assert other.read_bytes() == b'{"a": 1}\n{"a"'


def test_it_travels_by_pickle():
    fs = atomic_local_files()
    assert pickle.loads(pickle.dumps(fs)) == fs


def test_tunes_checkpoint_deletions_wait_for_two_snapshots_and_trains_happen_at_once(tmp_path):
    """A snapshot being uploaded may still name a checkpoint Tune deletes meanwhile: it goes only once the
    second snapshot after the deletion is out. Train records before it deletes: its go at once."""
    fs = atomic_local_files()
    trial, run = tmp_path / "run_trial_0", tmp_path / "run"
    for checkpoint in (trial / "checkpoint_000001", run / "checkpoint_2026-12-01"):
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.pt").write_bytes(b"x")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    fs.delete_dir(str(run / "checkpoint_2026-12-01"))
    assert not (run / "checkpoint_2026-12-01").exists()

    fs.delete_dir(str(trial / "checkpoint_000001"))
    snapshot = str(tmp_path / "experiment_state-2026-12-01.json")
    for published in range(2):
        assert (trial / "checkpoint_000001" / "state.pt").exists(), f"deleted after {published} snapshot(s)"
        with fs.open_output_stream(snapshot) as out:
            out.write(json.dumps({"published": published}).encode())
    assert not (trial / "checkpoint_000001").exists()

    (trial / "checkpoint_000002").mkdir()
    fs.delete_dir(str(trial / "checkpoint_000002"))
    delete_deferred()  # the sweep's end: nothing can be restored from a snapshot any more
    assert not (trial / "checkpoint_000002").exists()


def test_a_write_to_a_full_disk_leaves_no_temporary_even_unclosed(small_disk):
    """A worker killed after its failed upload never closes the file: the temporary is gone already."""
    out = atomic_local_files().open_output_stream(str(small_disk / "state.pt"))
    with pytest.raises(OSError, match="No space left on device"):
        for _ in range(100):
            out.write(b"x" * (1 << 16))
    assert list(small_disk.iterdir()) == []
    out.close()
    assert list(small_disk.iterdir()) == []


def test_the_sweeps_own_files_on_a_full_disk_say_so_and_keep_the_previous_ones_whole(small_disk):
    """results.parquet/.csv, best.json and the plots: a full disk raises what describe_failure names, and
    leaves each previous file as it was, with no temporary beside it."""
    from toolbox.config.flags import is_disk_full
    from toolbox.config.resolve import resolve
    from toolbox.tuning import results
    from toolbox.tuning.plots import plot
    from toolbox.tuning.sweepfile import Sweep

    sweep = Sweep(name="s", space={}, metric="val_loss", mode="min")
    history = [{"epoch": 1, "lr": 0.1, "val_loss": 0.5, "epoch_s": 1.0, "steps_per_epoch": 4}]
    row = {"trial_id": "a_00000", "status": "done", "retries": 0, "val_loss": 0.5, "best_epoch": 1, "epochs": 1}
    row |= {"time_s": 1.0, "checkpoint": None, "error": None, "trial_dir": None, "config": resolve({}), "history": history}
    out = small_disk / "s"
    results.write([row], sweep, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {p.name for p in before} == {"results.parquet", "results.csv", "best.json", "val_metric.png", "lr_schedule.png"}
    with open(small_disk / "filler", "wb") as filler, pytest.raises(OSError):
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()
    with pytest.raises(OSError) as failed:
        results.write([row | {"val_loss": 0.25}], sweep, out)
    assert is_disk_full(failed.value)
    with pytest.raises(OSError) as failed:  # the plots alone (results.write passes on their full disk too)
        plot([row | {"val_loss": 0.25}], sweep, out)
    assert is_disk_full(failed.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
