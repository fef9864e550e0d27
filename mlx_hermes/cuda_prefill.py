"""A CUDA fast path for long prompts: 4-bit matrix products of many rows on
tensor cores, dequantizing the weights tile by tile in shared memory.

One kernel (`GEMM`, through `mx.fast.cuda_kernel`) computes y = x W^T for
rows of bf16 x grouped by expert (a prefill's sorted token-expert pairs:
each expert's rows are a run of x) and 4-bit affine experts W [E, N, K].
A block takes a tile of 32*MT rows of one expert and 128 output features,
and walks K 64 inputs at a time: the rows of x copied to shared memory with
cp.async two steps ahead, the weights' codes (with their scale and bias)
read into registers one step ahead and dequantized (scale * q + bias,
rounded to bf16 once, as MLX's `dequantize`) into shared memory, the
products on `mma.sync.m16n8k16` (bf16 in, float32 sums). Nothing else is
made: no float experts exist.

The first version kept one step of x in flight and read each step's scale
and bias just before use: a layer's experts at 512 tokens 3.31 ms, 2048
8.48 ms; with x two steps ahead and the scales read with the codes, 2.70
and 7.72 (H200, medians of 5 alternating rounds). Nsight Compute then
showed the L1/shared-memory pipe the busiest unit (75%; issue slots 35%
busy, stalls mostly on shared memory), with each warp's 8-byte code loads
touching 16 rows' lines a step: steps of 64 inputs instead of 32 (16-byte
code loads, half the steps, barriers and scale reads; 80 KB of dynamic
shared memory, still two blocks an SM) took the experts from 2.69 to 2.32
ms at 512 tokens, 7.37 to 6.32 at 2048, and 1.77 to 1.56 at 32-128 tokens,
in one run against the 32-input kernel. Every version's result is
bit-identical to MLX's dequantize and sorted gather_mm (the float32 sums
run in the same order; benchmarks/prefill_gemm.py). Skipping the empty m16
tiles of an expert's last row tile saved 3% at 512 tokens and cost 1-3% at
1024-2048: not kept.

Why: the dense prefill it replaces (dense_prefill.py: each layer's experts
dequantized to bf16 by a kernel, then MLX's sorted `gather_mm`) spent 7.8-8.3
ms a layer on 512 tokens on an H200, 5.6 of them in `gather_mm` (~65
TFLOP/s). A 512-token prompt's prefill went from 1,333 to 3,850-4,140 tok/s
(mlx-lm: 214-215), a 2048-token one from ~2,650 to 6,880 (mlx-lm: 219).

Installed at load by `specialize` (CUDA only, through
`dense_prefill.DensePrefillExperts.use_kernels`) for 4-bit affine experts
with bf16 scales; everywhere else MLX's ops run. Tested against MLX's
dequantize and matmul on the GPU machine (tests/test_fast_paths.py);
compile-checked anywhere with benchmarks/compile_cuda_kernels.py.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import cuda_grouped, cuda_qmv

# Output features of a block, inputs of a step, threads of a block (8 warps:
# 2 over rows, 4 over features, each 16*MT rows x 32 features): GEMM's own
# constants, which its loads and swizzle are written for (BK = 64: a thread's
# 32 codes are one 16-byte load); here for the grid and the shared memory.
BN, BK, THREADS = 128, 64, 256
# m16 tiles of rows per warp: a block takes 32 * ROW_TILES rows of one
# expert. On an H200 (32-input steps, benchmarks/prefill_gemm.py, medians of 5) 128-row
# tiles beat 64-row ones at every size measured, even where an expert's last
# tile is mostly empty: a layer's experts at 512 tokens 2.93 vs 3.61 ms, at
# 2048 8.92 vs 12.52; q/k/v at 512 rows 0.19 vs 0.28.
ROW_TILES = 4
# a block's x (three steps) and dequantized weights (two), bf16
SHARED_MEMORY = (3 * 32 * ROW_TILES + 2 * BN) * BK * 2

HEADER = r"""
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(s), "l"(src));
}

// four 8x8 bf16 matrices from shared memory (lanes 8i..8i+7 give matrix i's rows)
__device__ __forceinline__ void ldsm4(unsigned* r, const void* p) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// first position of sorted idx[0..n) holding a value >= e
__device__ __forceinline__ int lower_bound(const uint32_t* idx, int n, uint32_t e) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (idx[mid] < e) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// element offset of 16-byte chunk c (of 8) of row r in a [rows][64] bf16 tile, XOR-swizzled:
// the 8 rows ldmatrix reads of one chunk fall in distinct banks (rows are 128 bytes, so
// unswizzled they would all share them)
__device__ __forceinline__ int swizzled(int r, int c) {
    return r * 64 + ((c ^ (r & 7)) << 3);
}

// a step's 32 codes of one weight row, and their group's scale and bias
struct StepCodes {
    uint4 q;
    __nv_bfloat16 s, b;
};

// 16 four-bit codes (two words, natural order) -> 16 bf16 scale * q + bias, one rounding
__device__ __forceinline__ void dequant16(uint2 q, __nv_bfloat162 s, __nv_bfloat162 b,
                                          uint4* out) {
    const unsigned int bits = 0x43004300u;  // 128 in each half
    const __nv_bfloat162 base = *reinterpret_cast<const __nv_bfloat162*>(&bits);
    unsigned int* o = reinterpret_cast<unsigned int*>(out);
    const unsigned int words[2] = {q.x, q.y};
    #pragma unroll
    for (int wi = 0; wi < 2; wi++) {
        #pragma unroll
        for (int j = 0; j < 4; j++) {  // codes 2j, 2j+1 of the word: bits 8j and 8j + 4
            const unsigned int c = words[wi] >> (8 * j);
            unsigned int v = (c & 0xFu) | ((c & 0xF0u) << 12) | bits;
            const __nv_bfloat162 n = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), base);
            const __nv_bfloat162 r = __hfma2(n, s, b);
            o[wi * 4 + j] = *reinterpret_cast<const unsigned int*>(&r);
        }
    }
}
"""

# x [P, K] bf16, rows sorted by expert (idx [P], uint32; GROUPED = 0: one matrix, idx
# unused); w [E, NTOT, K/8] uint32, scales/biases [E, NTOT, K/GS] bf16 -> y [P, NS] bf16:
# rows A..A+NS of each row's expert. Grid: (ceil(NS / 128), tiles of rows: at most
# ceil(P / BM) + E - 1), blocks past the last tile return.
GEMM = r"""
    constexpr int BN = 128, BK = 64, BM = 32 * MT;
    constexpr int KU = K / 8, G = K / GS, KT = K / BK;
    // x: three steps in flight; the dequantized weights: two (80 KB: dynamic shared memory)
    extern __shared__ __align__(128) unsigned char smem[];
    auto xs = reinterpret_cast<__nv_bfloat16 (*)[BM * BK]>(smem);
    auto ws = reinterpret_cast<__nv_bfloat16 (*)[BN * BK]>(smem + 3 * BM * BK * 2);

    // this block's expert e and tile of its rows: [start + m0, start + m0 + rows)
    const int P = x_shape[0];
    int tile = blockIdx.y, e = 0, start = 0, count = P;
    if (GROUPED) {
        int lo = 0;
        for (; e < E; e++) {
            const int hi = lower_bound(idx, P, uint32_t(e + 1));
            const int tiles = (hi - lo + BM - 1) / BM;
            if (tile < tiles) break;
            tile -= tiles;
            lo = hi;
        }
        if (e == E) return;
        start = lo;
        count = lower_bound(idx, P, uint32_t(e + 1)) - lo;
    } else if (tile * BM >= P) {
        return;
    }
    const int m0 = tile * BM;
    const int rows = min(BM, count - m0);
    const int n0 = blockIdx.x * BN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;

    // this thread's weight row (of the tile's 128) and its half of a step's 64 inputs
    const int wr = tid >> 1, wh = tid & 1;
    const long wrow = long(e) * NTOT + A + min(n0 + wr, NS - 1);
    const uint4* wp = reinterpret_cast<const uint4*>(w + wrow * KU) + wh;
    const __nv_bfloat16* sp = scales + wrow * G;
    const __nv_bfloat16* bp = biases + wrow * G;

    auto load_x = [&](int kt, int stage) {
        #pragma unroll
        for (int i = tid; i < BM * 8; i += 256) {
            const int r = i >> 3, c = i & 7;
            const long row = start + m0 + min(r, rows - 1);
            cp_async16(&xs[stage][swizzled(r, c)], x + row * K + kt * BK + c * 8);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    // a step's codes with their group's scale and bias, read a step before they are stored
    auto load_w = [&](int kt) {
        const int g = (kt * BK + wh * 32) / GS;
        return StepCodes{__ldg(wp + kt * 2), sp[g], bp[g]};
    };
    auto store_w = [&](const StepCodes& c, int stage) {
        const __nv_bfloat162 s2 = __bfloat162bfloat162(c.s), b2 = __bfloat162bfloat162(c.b);
        uint4 out[4];
        dequant16(make_uint2(c.q.x, c.q.y), s2, b2, out);
        dequant16(make_uint2(c.q.z, c.q.w), s2, b2, out + 2);
        #pragma unroll
        for (int j = 0; j < 4; j++)
            *reinterpret_cast<uint4*>(&ws[stage][swizzled(wr, 4 * wh + j)]) = out[j];
    };

    float acc[MT][4][4];
    #pragma unroll
    for (int i = 0; i < MT; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++)
            #pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.f;

    // steps 0 and 1 of x in flight, step 0 of the weights stored, step 1 in registers
    load_x(0, 0);
    if (KT > 1) load_x(1, 1); else asm volatile("cp.async.commit_group;\n" ::);
    store_w(load_w(0), 0);
    StepCodes next = load_w(min(1, KT - 1));
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();

    int st = 0;  // kt % 3
    for (int kt = 0; kt < KT; kt++) {
        const int ws_st = kt & 1;
        StepCodes after;
        if (kt + 2 < KT) {
            load_x(kt + 2, st == 0 ? 2 : st - 1);
            after = load_w(kt + 2);
        } else {
            asm volatile("cp.async.commit_group;\n" ::);  // keeps wait_group 1 meaning x's step kt+1
        }
        #pragma unroll 2  // fully unrolled, the next kk's fragments would not fit 2 blocks an SM
        for (int kk = 0; kk < BK / 16; kk++) {
            unsigned a[MT][4], b[4][2];
            #pragma unroll
            for (int i = 0; i < MT; i++)
                ldsm4(a[i], &xs[st][swizzled(wm * 16 * MT + i * 16 + (lane & 15),
                                             kk * 2 + (lane >> 4))]);
            #pragma unroll
            for (int jj = 0; jj < 2; jj++) {
                unsigned r[4];
                ldsm4(r, &ws[ws_st][swizzled(wn * 32 + jj * 16 + (lane & 7) + ((lane >> 4) << 3),
                                             kk * 2 + ((lane >> 3) & 1))]);
                b[2 * jj][0] = r[0];
                b[2 * jj][1] = r[1];
                b[2 * jj + 1][0] = r[2];
                b[2 * jj + 1][1] = r[3];
            }
            #pragma unroll
            for (int i = 0; i < MT; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++)
                    mma16816(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b[j][0], b[j][1]);
        }
        if (kt + 1 < KT) store_w(next, ws_st ^ 1);
        next = after;
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
        st = st == 2 ? 0 : st + 1;
    }

    #pragma unroll
    for (int i = 0; i < MT; i++) {
        const int r = wm * 16 * MT + i * 16 + (lane >> 2);
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            const int col = n0 + wn * 32 + j * 8 + (lane & 3) * 2;
            if (col >= NS) continue;
            if (r < rows)
                *reinterpret_cast<__nv_bfloat162*>(y + long(start + m0 + r) * NS + col) =
                    __floats2bfloat162_rn(acc[i][j][0], acc[i][j][1]);
            if (r + 8 < rows)
                *reinterpret_cast<__nv_bfloat162*>(y + long(start + m0 + r + 8) * NS + col) =
                    __floats2bfloat162_rn(acc[i][j][2], acc[i][j][3]);
        }
    }
"""


def grouped_matmul(x: mx.array, layer: QuantizedSwitchLinear, indices: mx.array,
                   rows: tuple[int, int] | None = None) -> mx.array:
    """Rows a..b (default all) of each pair's expert against x, for indices
    sorted: layer(x, indices, sorted_indices=True)[..., a:b], [P, 1, K], [P] -> [P, 1, b-a]."""
    return _gemm(x, layer, indices.astype(mx.uint32), rows)


def matmul(x: mx.array, layer: nn.QuantizedLinear) -> mx.array:
    """layer(x) without its bias: [..., K] -> [..., N]."""
    return _gemm(x, layer, None, None)


def _gemm(x: mx.array, layer: nn.Module, indices: mx.array | None,
          rows: tuple[int, int] | None) -> mx.array:
    """GEMM of x against weights [E, N, K/8] grouped by sorted `indices`, or
    [N, K/8] (indices None): output features a..b of rows (default all)."""
    N = layer.weight.shape[-2]
    E = layer.weight.shape[0] if indices is not None else 1
    a, b = rows or (0, N)
    K = x.shape[-1]
    flat = x.reshape(-1, K)
    P = flat.shape[0]
    bm = 32 * ROW_TILES
    idx = indices if indices is not None else mx.zeros((1,), mx.uint32)  # unread
    kernel = cuda_qmv._kernel("hermes_prefill_gemm", ["x", "idx", "w", "scales", "biases"],
                              "y", GEMM, cuda_grouped.HEADER + HEADER,
                              shared_memory=SHARED_MEMORY)
    y = kernel(inputs=[flat, idx, layer.weight, layer.scales, layer.biases],
               template=[("E", E), ("NTOT", N), ("A", a), ("NS", b - a), ("K", K),
                         ("GS", layer.group_size), ("MT", ROW_TILES),
                         ("GROUPED", indices is not None)],
               grid=(((b - a + BN - 1) // BN) * THREADS, (P + bm - 1) // bm + E - 1, 1),
               threadgroup=(THREADS, 1, 1),
               output_shapes=[(P, b - a)], output_dtypes=[mx.bfloat16])[0]
    return y.reshape(*x.shape[:-1], b - a)


def applies(layer: nn.Module) -> bool:
    """GEMM takes 4-bit affine weights with bf16 scales, inputs in whole steps
    and groups of whole 32-code halves, an even number of outputs."""
    K = layer.weight.shape[-1] * 8
    return (getattr(layer, "bits", None) == 4 and getattr(layer, "mode", "affine") == "affine"
            and layer.scales.dtype == mx.bfloat16 and K % BK == 0
            and layer.group_size % 32 == 0 and layer.weight.shape[-2] % 2 == 0)


def linear_applies(layer: nn.Module, dtype: mx.Dtype) -> bool:
    """Whether PrefillQuantizedLinear takes this layer: cuda_grouped's kernel
    layer that GEMM takes, with at least a block's features (the router's 8
    would leave 15/16 of each block idle: MLX's GEMM keeps it)."""
    return (cuda_grouped.linear_applies(layer, dtype) and applies(layer)
            and layer.weight.shape[0] >= BN)


class PrefillQuantizedLinear(cuda_grouped.KernelQuantizedLinear):
    """A 4-bit linear layer on CUDA (linear_applies) whose steps of more than
    cuda_grouped.MAX_TOKENS rows (a prompt's) run GEMM: attention's q/k/v for
    512 rows 0.19 ms against MLX's quantized_matmul's 0.27, o 0.15 vs 0.17
    (H200, benchmarks/prefill_gemm.py). Fewer rows as KernelQuantizedLinear."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] > cuda_grouped.MAX_TOKENS:
            y = matmul(x, self)
            return y + self["bias"] if "bias" in self else y
        return super().__call__(x)
