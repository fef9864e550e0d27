"""A CUDA fast path for decoding: the chosen experts' 4-bit matrix-vector
products in one kernel (`mx.fast.cuda_kernel`).

MLX's batch-1 `gather_qmm` streams ~640 GB/s of expert weights on an H100;
this kernel ~1.1 TB/s (benchmarks/moe_decode_kernel.py): each warp takes a
few rows, each lane 16-byte words of 32 four-bit values, dequantizing as
scale * (q . x) + bias * sum(x) with float accumulation. It applies on CUDA
only, to bf16 activations and 4-bit affine weights; everywhere else (Metal,
CPU, other formats) MLX's own ops run, and the kernel is tested against them
on the GPU machine.

It is OFF by default: in the whole decode loop it measured slower, not faster
(H100, 8x7B 4-bit: 70.6 tok/s with it, 85.5 without; benchmarks/RESULTS.md),
although it is 1.7x faster on the experts alone. Not yet explained; a guess
to test first is that a custom kernel breaks up MLX's batching of the other
kernels of the step. Set ENABLED = True to use it on CUDA.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

ENABLED = False  # True: use it on CUDA wherever it applies
ROWS, BLOCK = 2, 128  # rows per warp, threads per block: the fastest measured on an H100

SOURCE = r"""
    constexpr int KU4 = K / 32;       // 16-byte words (32 four-bit values) per row
    constexpr int G = K / GS;         // scale groups per row
    const int lane = threadIdx.x & 31;
    const long warp = (long(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const long row0 = warp * R;
    if (row0 >= long(NC) * N) return;
    const int c = int(row0 / N);
    const long n0 = row0 % N;
    const long e = long(idx[c]);
    const uint4* wrow = reinterpret_cast<const uint4*>(w) + (e * N + n0) * KU4;
    const __nv_bfloat16* srow = scales + (e * N + n0) * G;
    const __nv_bfloat16* brow = biases + (e * N + n0) * G;
    const uint4* xrow = reinterpret_cast<const uint4*>(x + long(c) * K);
    float acc[R];
    #pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    for (int u = lane; u < KU4; u += 32) {
        float xf[32];
        float xs = 0.f;
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            uint4 v = xrow[u * 4 + i];
            const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 f = __bfloat1622float2(p[j]);
                xf[i * 8 + 2 * j] = f.x;
                xf[i * 8 + 2 * j + 1] = f.y;
                xs += f.x + f.y;
            }
        }
        const int g = (u * 32) / GS;
        uint4 qv[R];  // all R rows' words in flight before any arithmetic
        #pragma unroll
        for (int r = 0; r < R; r++) qv[r] = wrow[r * KU4 + u];
        #pragma unroll
        for (int r = 0; r < R; r++) {
            uint4 q = qv[r];
            unsigned int qs[4] = {q.x, q.y, q.z, q.w};
            float d = 0.f;
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                #pragma unroll
                for (int j = 0; j < 8; j++) {
                    d += float((qs[i] >> (4 * j)) & 0xFu) * xf[i * 8 + j];
                }
            }
            acc[r] += __bfloat162float(srow[r * G + g]) * d + __bfloat162float(brow[r * G + g]) * xs;
        }
    }
    #pragma unroll
    for (int r = 0; r < R; r++) {
        float v = acc[r];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) y[row0 + r] = v;
    }
"""

_kernel = None


def usable(layer, x: mx.array) -> bool:
    """Whether `layer` (stacked experts) can take the kernel for input `x`."""
    if not ENABLED or not _on_cuda():
        return False
    return (isinstance(layer, QuantizedSwitchLinear) and layer.bits == 4
            and getattr(layer, "mode", "affine") == "affine" and layer.group_size in (32, 64, 128)
            and x.dtype == mx.bfloat16 and layer.scales.dtype == mx.bfloat16
            and x.shape[-1] % 32 == 0 and layer.weight.shape[-2] % ROWS == 0)


def gather_qmv(x: mx.array, layer, idx: mx.array) -> mx.array:
    """y[c] = dequantize(layer's expert idx[c]) @ x[c]: x [C, K] bf16 -> [C, N] float32."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="hermes_gather_qmv4",
                                      input_names=["x", "w", "scales", "biases", "idx"],
                                      output_names=["y"], source=SOURCE)
    C, K = x.shape
    N = layer.weight.shape[-2]
    return _kernel(inputs=[x, layer.weight, layer.scales, layer.biases, idx.astype(mx.uint32)],
                   template=[("N", N), ("K", K), ("GS", layer.group_size), ("NC", C),
                             ("R", ROWS)],
                   grid=(C * N // ROWS * 32, 1, 1), threadgroup=(BLOCK, 1, 1),
                   output_shapes=[(C, N)], output_dtypes=[mx.float32])[0]


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()
