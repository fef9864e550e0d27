"""Sparse mixture-of-experts: a float32 router picks k of E experts per token,
and only those experts' weights are read.

Shapes: N tokens (B*L flattened where it matters), D hidden, F expert FFN,
E experts, k experts per token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

# Below this many (token, expert) pairs the gathered matmuls read each expert
# once per token anyway; above it, grouping tokens by expert lets each
# expert's weights be read once for all its tokens (mlx-lm uses the same 64).
SORT_THRESHOLD = 64


class Experts(nn.Module):
    """E SwiGLU experts stacked as [E, out, in]: down(silu(gate(x)) * up(x)).

    `SwitchLinear` (mlx-lm) dispatches with `mx.gather_mm`, and after
    `nn.quantize` becomes `QuantizedSwitchLinear`, dispatching with
    `mx.gather_qmm`.
    """

    def __init__(self, dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.up_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.down_proj = SwitchLinear(hidden_dims, dims, num_experts, bias=False)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x: [..., D], indices: [..., k] -> [..., k, D]
        batch_shape = indices.shape
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        do_sort = indices.size >= SORT_THRESHOLD
        if do_sort:
            k = indices.shape[-1]
            flat = indices.flatten()  # [N*k]
            order = mx.argsort(flat)
            x = x.flatten(0, -3)[order // k]  # [N*k, 1, D], grouped by expert
            indices = flat[order]
        g = self.gate_proj(x, indices, sorted_indices=do_sort)
        u = self.up_proj(x, indices, sorted_indices=do_sort)
        y = self.down_proj(nn.silu(g) * u, indices, sorted_indices=do_sort)  # [..., 1, D]
        if do_sort:
            y = mx.unflatten(y[mx.argsort(order)], 0, batch_shape)
        return y.squeeze(-2)


class SparseMoeBlock(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dims, num_experts, bias=False)
        self.switch_mlp = Experts(dims, hidden_dims, num_experts)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Each token's k experts and their weights, as transformers does:
        softmax over all E logits in float32, keep the top k, renormalise."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)  # [B, L, E]
        k = self.top_k
        indices = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]  # [B, L, k]
        weights = mx.take_along_axis(probs, indices, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return mx.stop_gradient(indices), weights.astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = self.route(x)
        y = self.switch_mlp(x, indices)  # [B, L, k, D]
        return (y * weights[..., None]).sum(axis=-2)  # [B, L, D]
