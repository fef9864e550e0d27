"""Projections that read the same input, joined into one matrix after loading
(gpt-fast's `wqkv`): the checkpoint keeps its layout, while the hot path runs
one matmul (one read of the input, one kernel launch) instead of several.

Works for Linear [out, in], SwitchLinear [E, out, in] and their quantized
forms: every tensor is stacked along its output rows (axis -2).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear


def join(layers: list[nn.Module]) -> Optional[nn.Module]:
    """One layer computing the concatenation of `layers`' outputs, or None
    when they are stored differently (float and quantized, or other bits or
    group sizes, as in mixed conversions), where nothing would be gained."""
    first = layers[0]
    quantized = isinstance(first, (nn.QuantizedLinear, QuantizedSwitchLinear))
    for layer in layers[1:]:
        if type(layer) is not type(first):
            return None
        if quantized and (layer.bits, layer.group_size, getattr(layer, "mode", "affine")) != (
                first.bits, first.group_size, getattr(first, "mode", "affine")):
            return None
        if set(layer.parameters()) != set(first.parameters()):
            return None
    for name in first.parameters():
        first[name] = mx.concatenate([layer[name] for layer in layers], axis=-2)
    return first


def split(params: dict, sizes: list[int]) -> list[dict]:
    """The parameters of a joined layer cut back into its parts' ([..., out, in]
    rows of `sizes`). Copies, not views: strided views are not taken by every
    backend's gathered matmuls (CUDA's gather_qmm refuses them)."""
    bounds = [sum(sizes[:i]) for i in range(1, len(sizes))]
    parts: list[dict] = [{} for _ in sizes]
    for name, value in params.items():
        for part, piece in zip(parts, mx.split(value, bounds, axis=-2)):
            part[name] = mx.contiguous(piece)
    return parts
