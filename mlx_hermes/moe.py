"""Sparse mixture-of-experts: a float32 router picks k of E experts per token,
and only those experts' weights are read.

Shapes: N tokens (B*L flattened where it matters), D hidden, F expert FFN,
E experts, k experts per token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from . import cpu, cuda_qmv, fusion

# Below this many (token, expert) pairs the gathered matmuls read each expert
# once per token anyway; above it, grouping tokens by expert lets each
# expert's weights be read once for all its tokens (mlx-lm uses the same 64).
SORT_THRESHOLD = 64

# Prefill of this many tokens or more dequantizes a layer's experts and runs
# float gathered matmuls. On CUDA, MLX's sorted gather_qmm is the prefill
# bottleneck (48 ms against 5.1 ms for one layer of 512 tokens, measured on
# an H100), so "auto" turns this on there only; Metal and the CPU keep
# gather_qmm. True or False force it (tests, benchmarks).
DENSE_PREFILL = "auto"
DENSE_PREFILL_MIN_TOKENS = 64
# Float experts made at once in a dense prefill: a slice of a projection's
# rows across all experts. 1 GiB holds one 8x7B projection (gate, up or down:
# 0.94 GB) whole: peak 1.049x mlx-lm's (H100, 512 tokens). 256 MiB slices
# give 0.995x but cost 30% of prefill speed in host syncs (910 vs 1276 tok/s).
DENSE_CHUNK_BYTES = 2**30


def dense_prefill_enabled() -> bool:
    if DENSE_PREFILL == "auto":
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    return bool(DENSE_PREFILL)


def dense_project(layer: QuantizedSwitchLinear, h: mx.array, indices: mx.array,
                  rows: tuple[int, int] | None = None) -> mx.array:
    """layer(h, indices) for sorted indices, through float experts made from
    the quantized ones a slice of output rows at a time ([..., 1, in] -> [..., 1, out]).

    Each slice's float experts exist only while used (at most
    DENSE_CHUNK_BYTES, plus the transposed copy gather_mm may make): left
    lazy, MLX would dequantize many layers ahead (measured on an H100: 59 GB
    peak against mlx-lm's 27 GB). Evaluating each slice is a host sync, in
    prefill only.
    """
    start, stop = rows or (0, layer.weight.shape[-2])
    E, _, packed = layer.weight.shape
    inputs = packed * 32 // layer.bits
    step = max(1, DENSE_CHUNK_BYTES // (E * inputs * 2))
    mx.eval(h)
    parts = []
    for a in range(start, stop, step):
        b = min(a + step, stop)
        w = mx.dequantize(layer.weight[..., a:b, :], layer.scales[..., a:b, :],
                          layer.biases[..., a:b, :], group_size=layer.group_size,
                          bits=layer.bits)  # [E, b-a, in]
        parts.append(mx.gather_mm(h, w.swapaxes(-1, -2), rhs_indices=indices,
                                  sorted_indices=True))
        mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


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
        if indices.size < SORT_THRESHOLD:
            # decoding: on a multi-core CPU the k chosen experts run side by side
            def mlp(x, indices):
                return self._mlp(mx.expand_dims(x, (-2, -3)), indices, False).squeeze(-2)
            return cpu.per_choice(mlp, x, indices)
        # Group the (token, expert) pairs by expert: each expert's weights are
        # then read once for all its tokens.
        batch_shape, k = indices.shape, indices.shape[-1]
        flat = indices.flatten()  # [N*k]
        order = mx.argsort(flat)
        x = mx.expand_dims(x, (-2, -3)).flatten(0, -3)[order // k]  # [N*k, 1, D]
        dense = flat.size >= DENSE_PREFILL_MIN_TOKENS * k and dense_prefill_enabled()
        y = cpu.per_rows(lambda x, i: self._mlp(x, i, True, dense), x, flat[order])
        return mx.unflatten(y[mx.argsort(order)], 0, batch_shape).squeeze(-2)

    def _mlp(self, x: mx.array, indices: mx.array, do_sort: bool,
             dense: bool = False) -> mx.array:
        """down(silu(gate(x)) * up(x)) of each token's experts: [..., 1, D] -> [..., 1, D]."""
        def project(layer, h, rows=None):
            if dense and isinstance(layer, QuantizedSwitchLinear):
                return dense_project(layer, h, indices, rows)
            return layer(h, indices, sorted_indices=do_sort)

        if "gate_up_proj" not in self:
            gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        elif dense and isinstance(self.gate_up_proj, QuantizedSwitchLinear):
            half = self.gate_up_proj.weight.shape[-2] // 2
            gate = project(self.gate_up_proj, x, (0, half))
            up = project(self.gate_up_proj, x, (half, 2 * half))
        else:
            gate, up = mx.split(project(self.gate_up_proj, x), 2, axis=-1)  # [..., 1, F] each
        return project(self.down_proj, swiglu(gate, up))  # [..., 1, D]


@mx.compile
def _route(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # [..., E]
    indices = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]  # [..., k]
    weights = mx.take_along_axis(probs, indices, axis=-1)
    return indices, weights / weights.sum(axis=-1, keepdims=True)


class SparseMoeBlock(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dims, num_experts, bias=False)
        self.switch_mlp = Experts(dims, hidden_dims, num_experts)
        self.group = None  # set by distributed.shard: each rank holds a slice of every expert

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Each token's k experts and their float32 weights, as transformers
        does: softmax over all E logits in float32, keep the top k, renormalise."""
        return _route(self.gate(x), self.top_k)  # [B, L, k] each

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] * self.top_k < SORT_THRESHOLD and cuda_qmv.usable(self, x):
            y = cuda_qmv.moe(x, self.switch_mlp, self.gate(x), self.top_k)  # [B, L, D]
        else:
            indices, weights = self.route(x)  # [B, L, k] each
            y = self.switch_mlp(x, indices)  # [B, L, k, D]
            y = (y * weights[..., None].astype(x.dtype)).sum(axis=-2)  # [B, L, D]
        if self.group is not None:
            y = mx.distributed.all_sum(y, group=self.group)
        return y
