"""Sparse mixture-of-experts: a float32 router picks k of E experts per token,
and only those experts' weights are read.

Shapes: N tokens (B*L flattened where it matters), D hidden, F expert FFN,
E experts, k experts per token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import SwitchLinear

from . import fusion

# When are a step's (token, expert) pairs sorted by expert? MLX's gathered
# quantized matmul reads an expert's weights once for all of its tokens only
# on Metal, and there only with sorted pairs of one row each, at least 16 of
# them and at least 4 per expert on average (GatherQMM in
# mlx/backend/metal/quantized.cpp takes `gather_qmm_rhs` then); below that it
# runs one matrix-vector product per pair, sorted or not. So pairs are sorted
# from max(16, 4 * experts) up: for 8 experts and top-2, from 16 tokens (a
# batch of 16 decoding sequences, or a prompt of 16 tokens). CUDA's and the
# CPU's kernels re-read an expert per pair at every size, sorted or not.
MIN_SORTED_PAIRS = 16
PAIRS_PER_EXPERT = 4


def sort_threshold(num_experts: int) -> int:
    """The fewest (token, expert) pairs that are sorted by expert."""
    return max(MIN_SORTED_PAIRS, PAIRS_PER_EXPERT * num_experts)


class Experts(nn.Module):
    """E SwiGLU experts stacked as [E, out, in]: down(silu(gate(x)) * up(x)).

    `SwitchLinear` (mlx-lm) dispatches with `mx.gather_mm`, and after
    `nn.quantize` becomes `QuantizedSwitchLinear`, dispatching with
    `mx.gather_qmm`. `fuse()` joins gate and up into one `gate_up_proj`
    after loading (the checkpoint keeps its layout), so the activations are
    read once and one gathered matmul runs instead of two.
    """

    def __init__(self, dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.up_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.down_proj = SwitchLinear(hidden_dims, dims, num_experts, bias=False)

    def fuse(self) -> None:
        """Stack gate over up: [E, 2F, D] (kept apart when stored differently)."""
        if "gate_up_proj" not in self:
            joined = fusion.join([self.gate_proj, self.up_proj])
            if joined is not None:
                self.gate_up_proj = joined
                del self.gate_proj, self.up_proj

    def unfused_parameters(self) -> dict:
        """Parameters in the checkpoint's layout (gate_proj, up_proj, down_proj)."""
        params = dict(self.parameters())
        if "gate_up_proj" in params:
            fused = params.pop("gate_up_proj")
            half = fused["weight"].shape[-2] // 2
            params["gate_proj"], params["up_proj"] = fusion.split(fused, [half, half])
        return params

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x: [..., D], indices: [..., k] -> [..., k, D]
        if indices.size < sort_threshold(self.down_proj.weight.shape[0]):
            return self.decode(x, indices)
        # Group the (token, expert) pairs by expert: each expert's weights are
        # then read once for all its tokens.
        batch_shape, k = indices.shape, indices.shape[-1]
        flat = indices.flatten()  # [N*k]
        order = mx.argsort(flat)
        x = mx.expand_dims(x, (-2, -3)).flatten(0, -3)[order // k]  # [N*k, 1, D]
        y = self.sorted_mlp(x, flat[order])  # [N*k, 1, D]
        return mx.unflatten(y[mx.argsort(order)], 0, batch_shape).squeeze(-2)

    def decode(self, x: mx.array, indices: mx.array) -> mx.array:
        """A few tokens' experts, unsorted: [..., D], [..., k] -> [..., k, D]."""
        return self.mlp(mx.expand_dims(x, (-2, -3)), indices, False).squeeze(-2)

    def sorted_mlp(self, x: mx.array, indices: mx.array) -> mx.array:
        """Token-expert pairs sorted by expert: [P, 1, D], [P] -> [P, 1, D]."""
        return self.mlp(x, indices, True)

    def mlp(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """down(silu(gate(x)) * up(x)) of each token's experts: [..., 1, D] -> [..., 1, D]."""
        if "gate_up_proj" in self:
            gate_up = self.gate_up_proj(x, indices, sorted_indices=sorted_indices)
            gate, up = mx.split(gate_up, 2, axis=-1)  # [..., 1, F] each
        else:
            gate = self.gate_proj(x, indices, sorted_indices=sorted_indices)
            up = self.up_proj(x, indices, sorted_indices=sorted_indices)
        return self.down_proj(swiglu(gate, up), indices, sorted_indices=sorted_indices)


@mx.compile
def _route(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # [..., E]
    # indices have no gradient (training through the model needs it said)
    indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])  # [..., k]
    weights = mx.take_along_axis(probs, indices, axis=-1)
    return indices, weights / weights.sum(axis=-1, keepdims=True)


class SparseMoeBlock(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dims, num_experts, bias=False)  # the router
        self.switch_mlp = Experts(dims, hidden_dims, num_experts)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Each token's k experts and their float32 weights, as transformers
        does: softmax over all E logits in float32, keep the top k, renormalise."""
        return _route(self.gate(x), self.top_k)  # [B, L, k] each

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = self.route(x)  # [B, L, k] each
        y = self.switch_mlp(x, indices)  # [B, L, k, D]
        return (y * weights[..., None].astype(x.dtype)).sum(axis=-2)  # [B, L, D]

    def plus(self, x: mx.array, residual: mx.array) -> mx.array:
        """residual + self(x): a decoder layer's second half. Its own method
        so that a fast path may do the add inside its last kernel
        (cuda_qmv.KernelMoeBlock)."""
        return residual + self(x)
