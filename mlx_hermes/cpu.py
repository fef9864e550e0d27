"""Every CPU core for decoding and prefill.

MLX's CPU backend runs each stream on one thread, so a matrix-vector product
(all of batch-1 decoding) keeps one core busy however many there are.
Independent pieces placed on separate CPU streams run side by side: the LM
head split by rows (measured on 2 cores: 15.7 ms -> 8.5 ms for the 4-bit
32002 x 512 head), the k chosen experts one per stream, and a prompt's
token-expert pairs in one share per stream (1.67x on a 64-token prompt of
two 8x7B layers). Each piece is computed exactly as before, so the results
are identical.

`specialize` installs these modules on a CPU with several cores; on a GPU
(Metal, CUDA) kernels are parallel already and nothing here runs.
"""

from __future__ import annotations

import os
from itertools import cycle

import mlx.core as mx
import mlx.nn as nn

from .moe import Experts

MAX_STREAMS = 8
_streams: list = []


def streams() -> list:
    """One CPU stream per core (up to MAX_STREAMS), made once."""
    if not _streams:
        n = min(os.cpu_count() or 1, MAX_STREAMS)
        # thread-local, as mlx-lm's generation stream: the server generates on a thread of its own
        _streams.extend(mx.new_thread_local_stream(mx.cpu) for _ in range(n))
    return _streams


class RowSplitLinear(nn.Module):
    """A bias-free Linear or QuantizedLinear whose output rows are shared out
    over the CPU streams (installed on the LM head: `streams` set then)."""

    streams: list

    @staticmethod
    def applies(layer: nn.Module, streams: list) -> bool:
        return "bias" not in layer and layer["weight"].shape[0] >= 1024 * len(streams)

    def __call__(self, x: mx.array) -> mx.array:
        rows = self["weight"].shape[0]
        bounds = [rows * i // len(self.streams) for i in range(len(self.streams) + 1)]
        parts = []
        for s, a, b in zip(self.streams, bounds, bounds[1:]):
            with mx.stream(s):
                parts.append(self._rows(x, a, b))
        return mx.concatenate(parts, axis=-1)

    def _rows(self, x: mx.array, a: int, b: int) -> mx.array:
        w = self["weight"][a:b]
        if isinstance(self, nn.QuantizedLinear):
            biases = self["biases"][a:b] if "biases" in self else None
            return mx.quantized_matmul(x, w, scales=self["scales"][a:b], biases=biases,
                                       transpose=True, group_size=self.group_size,
                                       bits=self.bits, mode=self.mode)
        return x @ w.T


class StreamedExperts(Experts):
    """Experts on every core: a decoded token's k experts one per stream, a
    prompt's sorted token-expert pairs in one contiguous share per stream
    (each share stays sorted, so each expert is still read once per share)."""

    streams: list

    def decode(self, x: mx.array, indices: mx.array) -> mx.array:
        k = indices.shape[-1]
        if k == 1:
            return super().decode(x, indices)
        parts = []
        for j, s in zip(range(k), cycle(self.streams)):
            with mx.stream(s):
                parts.append(super().decode(x, indices[..., j : j + 1]))
        return mx.concatenate(parts, axis=-2)

    def sorted_mlp(self, x: mx.array, indices: mx.array) -> mx.array:
        n, ways = x.shape[0], len(self.streams)
        if n < 2 * ways:
            return super().sorted_mlp(x, indices)
        bounds = [n * i // ways for i in range(ways + 1)]
        parts = []
        for s, a, b in zip(self.streams, bounds, bounds[1:]):
            with mx.stream(s):
                parts.append(super().sorted_mlp(x[a:b], indices[a:b]))
        return mx.concatenate(parts, axis=0)
