"""The storage filesystem toolbox gives Ray: files appear whole, and Tune's state files only when they parse."""

from __future__ import annotations

import json
import pickle

import pyarrow.fs

from toolbox.distributed.storage import filesystem_for


def test_a_file_appears_only_when_closed_and_whole(tmp_path):
    fs = filesystem_for(str(tmp_path))
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
    pyarrow.fs.copy_files(str(source), str(tmp_path / "copy"), pyarrow.fs.LocalFileSystem(), filesystem_for(str(tmp_path)))
    assert (tmp_path / "copy" / "sub" / "big.bin").read_bytes() == (source / "sub" / "big.bin").read_bytes()
    assert (tmp_path / "copy" / "meta.json").read_text() == "{}"


def test_a_cut_short_experiment_state_keeps_the_previous_one(tmp_path):
    fs = filesystem_for(str(tmp_path))
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
    other = tmp_path / "result.json"  # any other file is published as written
    with fs.open_output_stream(str(other)) as out:
        out.write(b'{"a": 1}\n{"a"')
    assert other.read_bytes() == b'{"a": 1}\n{"a"'


def test_it_travels_by_pickle_and_uris_keep_rays_choice(tmp_path):
    fs = filesystem_for(str(tmp_path))
    assert pickle.loads(pickle.dumps(fs)) == fs
    assert filesystem_for("s3://bucket/sweeps") is None
