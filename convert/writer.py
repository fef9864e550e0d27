"""Safetensors shards written as a stream: header first, then each tensor as
it is produced, so no more than one tensor is ever held for writing."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Optional

import mlx.core as mx
import numpy as np

from mlx_hermes.formats import SAFETENSORS_DTYPES

MAX_SHARD_BYTES = 5 * 10**9

_NAMES = {**{dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}, mx.uint32: "U32"}
# numpy has no bfloat16: its bytes go out through a same-sized integer view
_VIEWS = {mx.bfloat16: mx.uint16}

Spec = tuple[str, mx.Dtype, tuple]  # name, dtype, shape


def nbytes(spec: Spec) -> int:
    _, dtype, shape = spec
    return int(np.prod(shape, dtype=np.int64)) * dtype.size


def split_into_shards(specs: list[Spec], limit: int = MAX_SHARD_BYTES) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + nbytes(spec) > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes(spec)
    return shards


class ShardWriter:
    """Writes the planned shards in order; `write(name, array)` must follow the plan."""

    def __init__(self, folder: Path, shards: list[list[Spec]]):
        self.folder = folder
        self.shards = shards
        self.names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(len(shards))]
        self._queue = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._next = 0
        self._file: Optional[BinaryIO] = None
        self._shard = -1

    def write(self, name: str, array: mx.array) -> None:
        shard, (want, dtype, shape) = self._queue[self._next]
        if (name, dtype, tuple(shape)) != (want, array.dtype, tuple(array.shape)):
            raise AssertionError(f"wrote {name} {array.dtype} {array.shape}, planned "
                                 f"{want} {dtype} {shape}")  # a bug, not a user error
        if shard != self._shard:
            self._open(shard)
        data = np.asarray(array.view(_VIEWS.get(array.dtype, array.dtype)))
        self._file.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def index(self) -> dict:
        weight_map = {name: self.names[i] for i, shard in enumerate(self.shards)
                      for name, _, _ in shard}
        total = sum(nbytes(s) for shard in self.shards for s in shard)
        return {"metadata": {"total_size": total}, "weight_map": weight_map}

    def _open(self, shard: int) -> None:
        self.close()
        self._shard = shard
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for spec in self.shards[shard]:
            name, dtype, shape = spec
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes(spec)]}
            offset += nbytes(spec)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(self.folder / self.names[shard], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
