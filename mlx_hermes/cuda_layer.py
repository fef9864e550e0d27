"""A CUDA fast path for a decoder layer's glue in decode steps: the residual
adds fused into the kernels that produce what is added.

A batched decode step on CUDA is bound by the host: in a 32-stream step of
the 8x7B on an H200 the host took ~6 ms to build the graph and ~7 ms to
encode and launch its ~460 kernels (then waited on reading the tokens), and
the GPU waited ~3 ms a step for it (benchmarks/gpu_timeline.py). Every op
left out is host time saved. Per layer the portable `h = x + attn(norm1(x)); out = h +
moe(norm2(h))` runs two adds and a norm around the big kernels; here

- `add_rms_norm`: h = x + attn and norm2(h) in one kernel (a block a row);
- the MoE block adds h in its last kernel (cuda_qmv.KernelMoeBlock.plus).

Each rounds as the ops it replaces do (bf16 add; MLX's rms_norm: float sums,
w * bf16(h * rsqrt(mean(h^2) + eps))), so only the order of the sum of
squares differs. `KernelDecoderLayer` is installed at load by `specialize`
on CUDA only, where the MoE block takes the kernels; steps of more than
cuda_grouped.MAX_TOKENS tokens (prefill) run the portable layer. Tested
against it on the GPU machine (tests/test_fast_paths.py).
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import cuda_grouped, cuda_qmv
from .model import DecoderLayer

# x, a [NT, D] bf16, w [D] -> h = x + a, n = w * bf16(h * rsqrt(mean(h^2) + eps)) [NT, D]:
# a block a row, 8 values a thread at a time; each thread reads back only the h it wrote.
ADD_RMS_NORM = r"""
    const long base = long(blockIdx.x) * D;
    const int tid = threadIdx.x;
    float ss = 0.f;
    for (int i = tid * 8; i < D; i += blockDim.x * 8) {
        uint4 xv = *reinterpret_cast<const uint4*>(x + base + i);
        const uint4 av = *reinterpret_cast<const uint4*>(a + base + i);
        __nv_bfloat162* xp = reinterpret_cast<__nv_bfloat162*>(&xv);
        const __nv_bfloat162* ap = reinterpret_cast<const __nv_bfloat162*>(&av);
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            xp[j] = __hadd2(xp[j], ap[j]);
            const float2 f = __bfloat1622float2(xp[j]);
            ss += f.x * f.x + f.y * f.y;
        }
        *reinterpret_cast<uint4*>(h + base + i) = xv;
    }
    __shared__ float part[32];
    ss = warp_sum(ss);
    if ((tid & 31) == 0) part[tid >> 5] = ss;
    __syncthreads();
    ss = 0.f;
    for (int w8 = 0; w8 < (int(blockDim.x) + 31) / 32; w8++) ss += part[w8];  // one order for all
    const float scale = rsqrtf(ss / D + __int_as_float(EPS));
    for (int i = tid * 8; i < D; i += blockDim.x * 8) {
        uint4 hv = *reinterpret_cast<const uint4*>(h + base + i);
        const uint4 wv = *reinterpret_cast<const uint4*>(w + i);
        __nv_bfloat16* hp = reinterpret_cast<__nv_bfloat16*>(&hv);
        const __nv_bfloat16* wp = reinterpret_cast<const __nv_bfloat16*>(&wv);
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            hp[j] = __hmul(wp[j], __float2bfloat16(__bfloat162float(hp[j]) * scale));
        }
        *reinterpret_cast<uint4*>(n + base + i) = hv;
    }
"""

THREADS = 256  # a block a row: 8x7B's 4,096 values in two 16-byte loads a thread


@functools.lru_cache(maxsize=None)
def _float_bits(value: float) -> int:
    """A float32's bits as an int: how a template argument carries eps."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def add_rms_norm(x: mx.array, a: mx.array, norm: nn.RMSNorm) -> tuple[mx.array, mx.array]:
    """(x + a, norm(x + a)) for bf16 x and a [..., D]."""
    D = x.shape[-1]
    h, n = cuda_qmv._kernel("hermes_add_rms_norm", ["x", "a", "w"], ["h", "n"], ADD_RMS_NORM)(
        inputs=[x, a, norm.weight],
        template=[("D", D), ("EPS", _float_bits(norm.eps))],
        grid=(x.size // D * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape, x.shape], output_dtypes=[mx.bfloat16, mx.bfloat16])
    return h, n


def applies(layer: DecoderLayer, dtype: mx.Dtype) -> bool:
    """Whether `layer` takes KernelDecoderLayer: its MoE block runs the
    kernels (cuda_qmv.applies, so rows of whole 16-byte words), bf16 norms."""
    norm = layer.post_attention_layernorm
    return (cuda_qmv.applies(layer.block_sparse_moe, dtype)
            and norm.weight.dtype == mx.bfloat16 and norm.weight.shape[-1] % 8 == 0)


class KernelDecoderLayer(DecoderLayer):
    """A decoder layer whose decode steps (up to cuda_grouped.MAX_TOKENS
    tokens) add the residuals inside kernels; its block is a
    cuda_qmv.KernelMoeBlock."""

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if x.size // x.shape[-1] > cuda_grouped.MAX_TOKENS:
            return super().__call__(x, mask, cache)
        a = self.self_attn(self.input_layernorm(x), mask, cache)
        h, normed = add_rms_norm(x, a, self.post_attention_layernorm)
        return self.block_sparse_moe.plus(normed, h)
