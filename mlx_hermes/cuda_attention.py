"""A CUDA fast path for batched decoding: one decoded token per sequence
attending over mlx-lm's left-padded batch cache, in one kernel.

Sequences of different lengths share a `BatchKVCache` whose rows are
left-padded; a decode step masks each row's padding. MLX's CUDA attention
kernel for one query takes no array mask, so with the mask MLX falls back to
its unfused ops (scores, mask, softmax, products: ~10 kernels a layer). In a
32-stream step on an H200 those took ~4 ms of ~30 (benchmarks/gpu_timeline.py).
Here one kernel reads each row's keys from its first unpadded position
(`left_padding`) on, so no mask is needed: a block per (sequence, kv head)
takes that head's H / KH query heads (grouped-query attention), each warp a
strided share of the positions with a running (online) softmax in float32,
the warps' parts combined in shared memory. (So 2 rows with 8 kv heads use
16 multiprocessors: few rows over long contexts may run slower than MLX's
ops; measured so far at 32 rows of ~250 positions only: 38 us a layer
against ~130.)

`KernelAttention` (installed at load by `specialize`, CUDA only) runs it for
decode steps of several sequences over a `BatchKVCache`; every other call
(prefill, one sequence, a quantized cache) runs the portable attention,
which is what Metal and the CPU run. Tested against it on the GPU machine
(tests/test_fast_paths.py).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from . import cuda_qmv
from .model import Attention

WARPS = 8  # per block: each takes every WARPS-th cached position

# q [B, H, 1, DH], k and v [B, KH, S, DH] (views of the cache: any strides, unit last),
# lp [B] (each row's first position) -> o [B, H, 1, DH]. exp2 of scores in log2 units.
ATTEND = r"""
    constexpr int G = H / KH, PER = DH / 32;
    const int b = blockIdx.x / KH, kh = blockIdx.x % KH;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int S = k_shape[2];
    const int first = max(int(lp[b]), 0);
    const float scale = rsqrtf(float(DH)) * 1.4426950408889634f;  // log2(e)
    const float NEG_INF = __int_as_float(0xff800000);
    float qv[G][PER], m[G], l[G], acc[G][PER];
    #pragma unroll
    for (int h = 0; h < G; h++) {
        const __nv_bfloat16* qh = q + b * q_strides[0] + (kh * G + h) * q_strides[1] + lane * PER;
        #pragma unroll
        for (int i = 0; i < PER; i++) {
            qv[h][i] = __bfloat162float(qh[i]) * scale;
            acc[h][i] = 0.f;
        }
        m[h] = NEG_INF;
        l[h] = 0.f;
    }
    const __nv_bfloat16* kb = k + b * k_strides[0] + kh * k_strides[1] + lane * PER;
    const __nv_bfloat16* vb = v + b * v_strides[0] + kh * v_strides[1] + lane * PER;
    for (int j = first + warp; j < S; j += NW) {
        float kf[PER], vf[PER];
        #pragma unroll
        for (int i = 0; i < PER; i++) {
            kf[i] = __bfloat162float(kb[j * k_strides[2] + i]);
            vf[i] = __bfloat162float(vb[j * v_strides[2] + i]);
        }
        float s[G];
        #pragma unroll
        for (int h = 0; h < G; h++) {
            s[h] = 0.f;
            #pragma unroll
            for (int i = 0; i < PER; i++) s[h] += qv[h][i] * kf[i];
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            #pragma unroll
            for (int h = 0; h < G; h++) s[h] += __shfl_xor_sync(0xffffffffu, s[h], off);
        }
        #pragma unroll
        for (int h = 0; h < G; h++) {
            const float mn = fmaxf(m[h], s[h]);
            const float c = exp2f(m[h] - mn), p = exp2f(s[h] - mn);
            l[h] = l[h] * c + p;
            #pragma unroll
            for (int i = 0; i < PER; i++) acc[h][i] = acc[h][i] * c + p * vf[i];
            m[h] = mn;
        }
    }
    __shared__ float sm[NW][G], sl[NW][G], sa[NW][G][DH];
    #pragma unroll
    for (int h = 0; h < G; h++) {
        if (lane == 0) {
            sm[warp][h] = m[h];
            sl[warp][h] = l[h];
        }
        #pragma unroll
        for (int i = 0; i < PER; i++) sa[warp][h][lane * PER + i] = acc[h][i];
    }
    __syncthreads();
    for (int h = warp; h < G; h += NW) {
        float M = NEG_INF;
        for (int w = 0; w < NW; w++) M = fmaxf(M, sm[w][h]);
        float L = 0.f, out[PER];
        #pragma unroll
        for (int i = 0; i < PER; i++) out[i] = 0.f;
        for (int w = 0; w < NW; w++) {
            const float c = exp2f(sm[w][h] - M);  // 0 for a warp that saw no position
            L += sl[w][h] * c;
            #pragma unroll
            for (int i = 0; i < PER; i++) out[i] += sa[w][h][lane * PER + i] * c;
        }
        #pragma unroll
        for (int i = 0; i < PER; i++) {
            o[(long(b) * H + kh * G + h) * DH + lane * PER + i] = __float2bfloat16(out[i] / L);
        }
    }
"""


def attend(q: mx.array, k: mx.array, v: mx.array, left_padding: mx.array) -> mx.array:
    """softmax(q k^T / sqrt(Dh)) v over each row's positions from
    left_padding[b] on: q [B, H, 1, Dh], k and v [B, KH, S, Dh] (views of the
    cache are read in place) -> [B, H, 1, Dh] bf16."""
    B, H, _, D = q.shape
    KH = k.shape[1]
    kernel = cuda_qmv._kernel("hermes_batch_attend", ["q", "k", "v", "lp"], "o", ATTEND,
                              contiguous=False)
    return kernel(inputs=[q, k, v, left_padding],
                  template=[("H", H), ("KH", KH), ("DH", D), ("NW", WARPS)],
                  grid=(B * KH * WARPS * 32, 1, 1), threadgroup=(WARPS * 32, 1, 1),
                  output_shapes=[(B, H, 1, D)], output_dtypes=[mx.bfloat16])[0]


def applies(attention: Attention, dtype: mx.Dtype) -> bool:
    """Whether the kernel takes this layer's heads for activations of `dtype`
    (decided once, at load, by specialize)."""
    D = attention.head_dim
    return dtype == mx.bfloat16 and D % 32 == 0 and D <= 256 and attention.scale == D**-0.5


class KernelAttention(Attention):
    """Attention whose decode steps of several sequences over a batch cache
    run `attend`; every other call runs the portable attention."""

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        if q.shape[2] == 1 and q.shape[0] > 1 and type(cache) is BatchKVCache:
            return attend(q, k, v, cache.left_padding)
        return super().attend(q, k, v, mask, cache)
