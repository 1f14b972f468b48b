"""Lazy, validated access to safetensors files through `np.memmap`.

The `safetensors` library's numpy path cannot slice bfloat16 tensors, and streaming a tensor into a
sharding needs to read just one shard's rows. The format is a u64 header length, a JSON header
{name: {dtype, shape, data_offsets}} and raw little-endian data, so a memory map gives zero-copy
slices of any dtype ml_dtypes knows. Every inconsistency raises CheckpointError naming file and tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match the model; the message says where."""


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: corrupt safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: corrupt safetensors file: header length {header_len} "
                                      f"exceeds the file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {entry}") from None
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            np_dtype = np.dtype(DTYPES[dtype])
            expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
            if not 0 <= begin <= end <= data_size or end - begin != expected:
                raise CheckpointError(
                    f"{self.path}: corrupt tensor {name!r}: data_offsets [{begin}, {end}) for {dtype}{list(shape)} "
                    f"({expected} bytes) do not fit the {data_size} data bytes of the file (truncated?)")
            self._entries[name] = (np_dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def tensor(self, name: str) -> np.ndarray:
        """A read-only, lazily paged view of the tensor (slicing it reads only the touched bytes)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        dtype, shape, begin, end = self._entries[name]
        return self._mmap[begin:end].view(dtype).reshape(shape)
