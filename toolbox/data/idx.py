"""IDX files (MNIST's format): read with every header field checked, and written (for tiny test data)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from toolbox.config.registry import ConfigError

# The third magic byte names the element type; the fourth, the number of dimensions.
DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
CODES = {np.dtype(t).newbyteorder("="): code for code, t in DTYPES.items()}


def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """The array in an IDX file that must have ``ndim`` dimensions; a bad file is a one-line ConfigError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in DTYPES:
        raise ConfigError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    if data[3] != ndim:
        raise ConfigError(f"{path}: has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"{path}: cut short inside its header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = DTYPES[data[2]]
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        what = "cut short" if len(data) - header < expected else "longer than its header says"
        raise ConfigError(f"{path}: {what}: {len(data) - header} bytes of data for shape {list(dims)}, expected {expected}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | Path, tensor: torch.Tensor) -> None:
    """Write ``tensor`` (uint8 for MNIST) as an IDX file."""
    array = tensor.numpy()
    code = CODES[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(header + array.astype(DTYPES[code]).tobytes())
