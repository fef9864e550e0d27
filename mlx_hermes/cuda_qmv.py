"""A CUDA fast path for decoding: a MoE block's expert work in two kernels
(`mx.fast.cuda_kernel`) instead of ~10 MLX ops.

1. gate_up_swiglu: each chosen expert's gate and up rows against the token,
   SwiGLU applied in registers: h = silu(x W_gate) * (x W_up), bf16 [T*k, F].
2. down_combine: each token's k experts' down rows against their h, weighted
   by the router and summed in registers: y [T, D].

Both read the router's logits and pick each token's top k themselves, so the
routing's ops (softmax, top k, renormalising) do not run on this path.

Each warp takes a few output rows, each lane 16-byte words of 32 four-bit
codes, dequantizing as scale * (q . x) + bias * sum(x) with float sums. MLX's
batch-1 `gather_qmm` streams ~650 GB/s of expert weights on an H100; these
kernels ~2.1 TB/s (benchmarks/moe_decode_kernel.py --sweep). Decode is also
bound by host work per op (benchmarks/decode_overhead.py), which the fusion
cuts: a token is ~800 MLX ops instead of mlx-lm's ~1,600.

`specialize` installs `KernelMoeBlock` on CUDA only, for bf16 activations
and 4-bit affine experts with gate and up fused (moe.Experts.fuse). It runs
these kernels for one token, cuda_grouped.py's (each expert read once for
all its tokens) for steps of up to cuda_grouped.MAX_TOKENS tokens (batched
decode, short prompts), and the portable block beyond. Everywhere else
(Metal, CPU, other formats) MLX's own ops run, and the kernels are tested
against them on the GPU machine (tests/test_fast_paths.py).
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import cuda_grouped
from .moe import SparseMoeBlock

# Output rows per warp of each kernel, threads per block. On an H100
# (benchmarks/moe_decode_kernel.py --sweep) 2/2 and 4/4 were the best of 8
# settings, 2% apart (one run); 8 rows, or 1 for down, were 10-15% slower.
GATE_UP_ROWS, DOWN_ROWS, BLOCK = 2, 2, 128
# These kernels read a chosen expert once per token, as gather_qmm does on
# CUDA: they take steps of this many tokens at most, the grouped kernels
# larger ones.
ONE_TOKEN_MAX = 1

HEADER = r"""
// 32 activations of bf16 (four 16-byte words at word u) into floats; returns their sum
__device__ __forceinline__ float load32(const __nv_bfloat16* x, int u, float* xf) {
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    float xs = 0.f;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        uint4 v = xr[u * 4 + i];
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __bfloat1622float2(p[j]);
            xf[i * 8 + 2 * j] = f.x;
            xf[i * 8 + 2 * j + 1] = f.y;
            xs += f.x + f.y;
        }
    }
    return xs;
}

// sum q_j x_j over the 32 four-bit codes of one 16-byte word and their 32
// activations (xs: their sum). Each code becomes the float 1 + q/16 by placing
// it in the top mantissa bits of 1.0f (a shift and a masked or) instead of an
// int-to-float conversion, which runs at 1/8 of the FMA rate on Hopper; it
// measured 3% faster (2.97 vs 3.07 ms a token): the kernels are bound by
// memory, not arithmetic. sum (1 + q_j/16) x_j = xs + (1/16) sum q_j x_j.
__device__ __forceinline__ float dot32(uint4 q, const float* xf, float xs) {
    const unsigned int qs[4] = {q.x, q.y, q.z, q.w};
    float d = 0.f;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            const unsigned int t = j <= 4 ? qs[i] << (19 - 4 * j) : qs[i] >> (4 * j - 19);
            d += __uint_as_float((t & 0x00780000u) | 0x3F800000u) * xf[i * 8 + j];
        }
    }
    return 16.f * (d - xs);
}

// The KC largest of a token's E router logits, best first (ties to the lower
// index), and their softmax: transformers' softmax over all E followed by
// renormalising the top k gives the same, as the full denominator cancels.
template <int E, int KC, typename T>
__device__ __forceinline__ void top_k(const T* logits, int* idx, float* wt) {
    unsigned long long taken = 0;
    #pragma unroll
    for (int j = 0; j < KC; j++) {
        int best = -1;
        float top = 0.f;
        for (int e = 0; e < E; e++) {
            const float v = static_cast<float>(logits[e]);
            if (!((taken >> e) & 1ull) && (best < 0 || v > top)) {
                best = e;
                top = v;
            }
        }
        taken |= 1ull << best;
        idx[j] = best;
        wt[j] = top;
    }
    const float top = wt[0];
    float sum = 0.f;
    #pragma unroll
    for (int j = 0; j < KC; j++) {
        wt[j] = __expf(wt[j] - top);
        sum += wt[j];
    }
    #pragma unroll
    for (int j = 0; j < KC; j++) wt[j] /= sum;
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
"""

# x [T, K], w [E, 2F, K/8] (gate rows, then up rows), logits [T, E] -> h [T*KC, F]
GATE_UP_SWIGLU = r"""
    constexpr int KU4 = K / 32;  // 16-byte words (32 four-bit codes) per row
    constexpr int G = K / GS;    // scale groups per row
    const int lane = threadIdx.x & 31;
    const long row0 = ((long(blockIdx.x) * blockDim.x + threadIdx.x) >> 5) * R;
    if (row0 >= long(NC) * F) return;
    const int c = int(row0 / F);  // which (token, choice) pair
    const long n0 = row0 % F;
    int idx[KC];
    float wt[KC];
    top_k<E, KC>(logits + long(c / KC) * E, idx, wt);
    const long gate = long(idx[c % KC]) * 2 * F + n0;  // first row of each half
    const long up = gate + F;
    const __nv_bfloat16* xrow = x + long(c / KC) * K;
    float ag[R], au[R];
    #pragma unroll
    for (int r = 0; r < R; r++) ag[r] = au[r] = 0.f;
    for (int u = lane; u < KU4; u += 32) {
        float xf[32];
        const float xs = load32(xrow, u, xf);
        const int g = (u * 32) / GS;
        uint4 qg[R], qu[R];  // every row's word in flight before any arithmetic
        #pragma unroll
        for (int r = 0; r < R; r++) {
            qg[r] = reinterpret_cast<const uint4*>(w)[(gate + r) * KU4 + u];
            qu[r] = reinterpret_cast<const uint4*>(w)[(up + r) * KU4 + u];
        }
        #pragma unroll
        for (int r = 0; r < R; r++) {
            ag[r] += __bfloat162float(scales[(gate + r) * G + g]) * dot32(qg[r], xf, xs)
                   + __bfloat162float(biases[(gate + r) * G + g]) * xs;
            au[r] += __bfloat162float(scales[(up + r) * G + g]) * dot32(qu[r], xf, xs)
                   + __bfloat162float(biases[(up + r) * G + g]) * xs;
        }
    }
    #pragma unroll
    for (int r = 0; r < R; r++) {
        const float vg = warp_sum(ag[r]);
        const float vu = warp_sum(au[r]);
        if (lane == 0) h[row0 + r] = __float2bfloat16(vg / (1.f + __expf(-vg)) * vu);
    }
"""

# h [T*KC, K], w [E, D, K/8], logits [T, E], res [T, D] -> y [T, D]: the weighted sum rounded
# to bf16, plus res as a bf16 add would (RES 0: res is unread)
DOWN_COMBINE = r"""
    constexpr int KU4 = K / 32;
    constexpr int G = K / GS;
    const int lane = threadIdx.x & 31;
    const long row0 = ((long(blockIdx.x) * blockDim.x + threadIdx.x) >> 5) * R;
    if (row0 >= long(NT) * D) return;
    const int t = int(row0 / D);
    const long d0 = row0 % D;
    int idx[KC];
    float wt[KC];
    top_k<E, KC>(logits + long(t) * E, idx, wt);
    float out[R];
    #pragma unroll
    for (int r = 0; r < R; r++) out[r] = 0.f;
    for (int j = 0; j < KC; j++) {
        const int c = t * KC + j;
        const long row = long(idx[j]) * D + d0;
        for (int u = lane; u < KU4; u += 32) {
            float xf[32];
            const float xs = load32(h + long(c) * K, u, xf);
            const int g = (u * 32) / GS;
            uint4 q[R];
            #pragma unroll
            for (int r = 0; r < R; r++) {
                q[r] = reinterpret_cast<const uint4*>(w)[(row + r) * KU4 + u];
            }
            #pragma unroll
            for (int r = 0; r < R; r++) {
                out[r] += wt[j] * (__bfloat162float(scales[(row + r) * G + g]) * dot32(q[r], xf, xs)
                              + __bfloat162float(biases[(row + r) * G + g]) * xs);
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < R; r++) {
        float v = __bfloat162float(__float2bfloat16(warp_sum(out[r])));
        if (RES) v += __bfloat162float(res[row0 + r]);
        if (lane == 0) y[row0 + r] = __float2bfloat16(v);
    }
"""

_kernels: dict = {}


def _kernel(name: str, inputs: list[str], output: str | list[str], source: str,
            extra_header: str = "", contiguous: bool = True, shared_memory: int = 0):
    """The kernel `name`, made on its first call in a process and looked up by
    name after that (every MoE block calls this each token). MLX caches a
    compiled kernel on disk (/tmp/mlx/<version>/ptx) under its name and
    template values only, so the name given to MLX carries a hash of the
    source: an edited kernel is never served from an old compile.
    `contiguous=False`: inputs reach the kernel as they are (views too), and
    the kernel reads their strides. `shared_memory`: bytes of dynamic shared
    memory a block gets (`extern __shared__`; MLX raises the kernel's limit
    past 48 KB when asked for more)."""
    if name not in _kernels:
        header = HEADER + extra_header
        digest = hashlib.sha1((header + source).encode()).hexdigest()[:10]
        _kernels[name] = mx.fast.cuda_kernel(
            name=f"{name}_{digest}", input_names=inputs,
            output_names=[output] if isinstance(output, str) else output, source=source,
            header=header, ensure_row_contiguous=contiguous, shared_memory=shared_memory)
    return _kernels[name]


def applies(block: SparseMoeBlock, dtype: mx.Dtype) -> bool:
    """Whether `block` can decode activations of `dtype` through the kernels
    (decided once, at load, by specialize)."""
    experts = block.switch_mlp
    if "gate_up_proj" not in experts:
        return False
    gate_up, down = experts.gate_up_proj, experts.down_proj
    hidden = down.weight.shape[-2]
    return (dtype == mx.bfloat16 and _four_bit(gate_up) and _four_bit(down)
            and gate_up.weight.shape[0] <= 64  # experts: a bit each in a 64-bit mask
            and gate_up.weight.shape[-2] // 2 % GATE_UP_ROWS == 0
            and hidden % DOWN_ROWS == 0
            and hidden % 32 == 0 and down.weight.shape[-1] * 8 % 32 == 0
            and cuda_grouped.applies(experts))


class KernelMoeBlock(SparseMoeBlock):
    """A MoE block that runs steps of up to cuda_grouped.MAX_TOKENS tokens
    through the kernels (these for one token, the grouped ones for more);
    longer prompts run the portable block."""

    def __call__(self, x: mx.array) -> mx.array:
        return self._run(x, None)

    def plus(self, x: mx.array, residual: mx.array) -> mx.array:
        """residual + self(x), the add done by the kernels' last launch: one
        op less a layer for the host to dispatch and the GPU to launch."""
        return self._run(x, residual)

    def _run(self, x: mx.array, residual: mx.array | None) -> mx.array:
        tokens = x.size // x.shape[-1]
        if tokens <= ONE_TOKEN_MAX:
            return moe(x, self.switch_mlp, self.gate(x), self.top_k, residual)  # [B, L, D]
        if tokens <= cuda_grouped.MAX_TOKENS:
            return cuda_grouped.moe(x, self.switch_mlp, self.gate(x), self.top_k, residual)
        y = super().__call__(x)
        return y if residual is None else residual + y


def with_kernels(block: SparseMoeBlock, on: bool) -> SparseMoeBlock:
    """The same block with (on) or without the kernels: benchmarks and tests
    compare both on one model."""
    block.__class__ = KernelMoeBlock if on else SparseMoeBlock
    return block


def moe(x: mx.array, experts, logits: mx.array, k: int,
        residual: mx.array | None = None) -> mx.array:
    """The MoE block's output for the router's `logits` [..., E]: the sum over
    each token's top k experts, weighted by their renormalised softmax
    (moe.SparseMoeBlock.route), computed inside the kernels: x [..., D] -> [..., D];
    plus `residual` (x's shape), if given, in the same kernel.

    Arrays go to the kernels as they are (each kernel reads them flat): every
    op left out (routing, reshapes) is one less for the host to dispatch."""
    D = x.shape[-1]
    T = x.size // D
    gate_up, down = experts.gate_up_proj, experts.down_proj
    E, F = gate_up.weight.shape[0], gate_up.weight.shape[-2] // 2
    h = _kernel("hermes_gate_up_swiglu", ["x", "w", "scales", "biases", "logits"], "h",
                GATE_UP_SWIGLU)(
        inputs=[x, gate_up.weight, gate_up.scales, gate_up.biases, logits],
        template=[("F", F), ("K", D), ("GS", gate_up.group_size), ("NC", T * k), ("KC", k),
                  ("E", E), ("R", GATE_UP_ROWS)],
        grid=(T * k * F // GATE_UP_ROWS * 32, 1, 1), threadgroup=(BLOCK, 1, 1),
        output_shapes=[(T * k, F)], output_dtypes=[mx.bfloat16])[0]
    return _kernel("hermes_down_combine", ["h", "w", "scales", "biases", "logits", "res"], "y",
                   DOWN_COMBINE)(
        inputs=[h, down.weight, down.scales, down.biases, logits,
                x if residual is None else residual],
        template=[("D", D), ("K", F), ("GS", down.group_size), ("NT", T), ("KC", k),
                  ("E", E), ("R", DOWN_ROWS), ("RES", residual is not None)],
        grid=(T * D // DOWN_ROWS * 32, 1, 1), threadgroup=(BLOCK, 1, 1),
        output_shapes=[x.shape], output_dtypes=[mx.bfloat16])[0]


def _four_bit(layer) -> bool:
    return (isinstance(layer, QuantizedSwitchLinear) and layer.bits == 4
            and getattr(layer, "mode", "affine") == "affine" and layer.group_size in (32, 64, 128)
            and layer.scales.dtype == mx.bfloat16)

