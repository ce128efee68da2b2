"""examples/: user projects outside the package stay true, on tiny data of their own making."""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
from helpers import ROOT, assert_registry_tests_pass, run_cli

FASHION = ROOT / "examples" / "fashion_mnist"


def test_the_fashion_projects_components_pass_the_registry_tests():
    assert_registry_tests_pass(FASHION / "fashion.py")


def test_the_fashion_projects_sweep_trains_with_augmentation(tmp_path):
    sys.path.insert(0, str(FASHION))
    try:
        from fashion import write_tiny_fashion
    finally:
        sys.path.remove(str(FASHION))
    data = write_tiny_fashion(tmp_path / "data")
    args = ["--fashion-root", data["fashion_root"], "--num-samples", "2", "--epochs", "2", "--storage", str(tmp_path)]
    done = run_cli("sweep", str(FASHION / "fashion_sweep.py"), *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = pq.read_table(tmp_path / "fashion_sweep" / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] in ("done", "stopped") for r in rows), rows
    config = json.loads(rows[0]["config"])
    assert config["arch"] == "FashionNet" and config["augmentations"] == ["random_crop", "horizontal_flip"], config
    assert config["imports"] == [str(FASHION / "fashion_sweep.py")], config
