"""KV caches (mlx-lm's classes), optionally quantized, and keeping them in step
with the tokens they hold."""

from __future__ import annotations

from typing import Optional

from mlx_lm.models.cache import KVCache, QuantizedKVCache

from . import chip
from .errors import HermesError
from .model import Model


def check_kv_bits(kv_bits: Optional[int], on_cuda: Optional[bool] = None) -> None:
    """Refuse a quantized KV cache this machine cannot run. MLX's CUDA build (0.32.4)
    computes its attention wrongly: the batched `quantized_matmul` of the scores is
    ~1.4x the scores off at the 8x7B's shapes and missing at head dim 32
    (benchmarks/mlx_cuda_bugs.md, report 4). Metal and the CPU are right."""
    if kv_bits is None:
        return
    if kv_bits not in (4, 8):
        raise HermesError(f"kv_bits must be 4 or 8, got {kv_bits}")
    if on_cuda is None:
        on_cuda = chip.on_cuda()
    if on_cuda:
        raise HermesError("--kv-bits does not run on CUDA: MLX's CUDA build computes the "
                          "quantized KV cache's attention wrongly (benchmarks/mlx_cuda_bugs.md); "
                          "leave it out there (Macs are not affected)")


def make_cache(model: Model, kv_bits: Optional[int] = None) -> list:
    """One cache per layer. kv_bits (4 or 8) stores keys and values quantized,
    for long contexts: about 3.5x (4-bit) or 1.9x (8-bit) smaller than fp16."""
    layers = len(model.layers)
    if kv_bits is None:
        return [KVCache() for _ in range(layers)]
    check_kv_bits(kv_bits)
    head_dim = model.args.dims_per_head
    group_size = next((g for g in (64, 32) if head_dim % g == 0), None)
    if group_size is None:
        raise HermesError(f"a quantized KV cache needs a head dim divisible by 32, not {head_dim}")
    return [QuantizedKVCache(group_size=group_size, bits=kv_bits) for _ in range(layers)]


def trim_to(cache: list, length: int) -> int:
    """Drop cached tokens past `length` in every layer; returns the length kept.

    Layers can disagree after an interrupted forward pass (some layers saw
    the new tokens, later ones did not): all are cut to the shortest.
    """
    keep = min([length] + [c.offset for c in cache])
    for c in cache:
        if c.offset > keep:
            c.trim(c.offset - keep)
    return keep
