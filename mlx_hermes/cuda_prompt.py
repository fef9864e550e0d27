"""On CUDA, a prompt queued a layer at a time: bounded memory for long prompts.

A GPU backend keeps each op's inputs alive until the op has run. MLX's CUDA
build (0.32.4) ends a command batch every 20 ops, whatever they touch, and
lets the host queue many batches ahead of the GPU; a prompt's graph runs far
behind the host, so most layers' temporaries (the experts' products: ~88 MB
a layer at 512 tokens, ~350 MB at 2048 for the 8x7B) were alive at once.
Queuing the prompt a layer at a time (`mx.async_eval` of each layer's
output, then waiting for the layer before, so the GPU always has the next
one) keeps about two layers' worth alive. On an H200 (MLX 0.32.4 CUDA, 8x7B
4-bit, medians of alternating rounds, benchmarks/RESULTS.md):

| prompt | path | peak above the weights | prefill tok/s |
| --- | --- | --- | --- |
| 512 | CUDA paths | 4.48 -> 0.38 GB | 4,293 -> 4,686 |
| 2048 | CUDA paths | 10.55 -> 1.58 GB | 7,518 -> 7,662 |
| 512 | portable, with it (not kept) | 4.76 -> 0.28 GB | 213.3 -> 207.1 (3% slower) |

Metal ends a command buffer after ~40 MB of touched arrays as well as after
a number of ops, and every expert op touches the stacked experts (hundreds
of MB), so a Mac never queues many layers ahead: the portable model (what a
Mac runs) leaves MLX to schedule. `specialize` installs this on CUDA only.
Decode steps (up to cuda_grouped.MAX_TOKENS tokens) run as the portable
model: their temporaries are small, and a wait a layer would cost host time
every token. Uncached calls (training under grad, where async_eval is
refused) do too.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .cuda_grouped import MAX_TOKENS
from .model import MixtralModel, attention_mask


class LayerByLayerModel(MixtralModel):
    """MixtralModel whose cached steps of more than MAX_TOKENS tokens (B * L:
    prompts, not decode steps) are queued a layer at a time."""

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        if cache is None or tokens.size <= MAX_TOKENS:
            return super().__call__(tokens, cache)
        h = self.embed_tokens(tokens)  # [B, L, D]
        mask = attention_mask(h, cache[0])
        previous = None
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
            mx.async_eval(h)
            if previous is not None:
                mx.eval(previous)  # waits for the layer before, while this one stays queued
            previous = h
        return self.norm(h)
