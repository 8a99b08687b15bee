"""Minimal safetensors reader/writer on numpy + ml_dtypes.

We do our own (the format is a JSON header and raw little-endian bytes) because the
`safetensors` numpy front end cannot hold bfloat16, and because reading through `mmap`
lets us pull one tensor at a time without loading a whole shard.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazily readable safetensors file: `.keys()`, `.shape(k)`, `.dtype(k)`, `.get(k)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._offset = 8 + n
        self._mm = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        name = self._entries[key]["dtype"]
        if name not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return _DTYPES[name]

    def get(self, key: str) -> np.ndarray:
        """A copy of one tensor (the mmap is not kept alive by the result)."""
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        begin, end = self._entries[key]["data_offsets"]
        buf = self._mm[self._offset + begin:self._offset + end]
        return np.frombuffer(buf, dtype=self.dtype(key)).reshape(self.shape(key)).copy()

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def save_file(tensors: Mapping[str, np.ndarray], path: str | Path,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors in key order, 8-byte aligned header, as transformers expects."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be written to safetensors")
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def dtype_name(dtype: np.dtype) -> str:
    return _NAMES[np.dtype(dtype)]


def open_all(paths: Iterable[Path]) -> dict[str, SafetensorsFile]:
    return {str(p): SafetensorsFile(p) for p in paths}
