"""A CUDA fast path for batched decoding: each expert's 4-bit weights read
once per step for all the tokens routed to it, on tensor cores.

MLX's `gather_qmm` on CUDA reads an expert once per token routed to it
(one layer's experts for 32 streams: 4.8 ms on an H200, where reading the 8
experts once takes ~0.3 ms; these kernels: 0.42 ms,
benchmarks/grouped_parts.py), and so do cuda_qmv.py's one-token kernels. Here
three kernels (`mx.fast.cuda_kernel`) do a MoE block's expert work for 2 to
MAX_TOKENS tokens:

1. gate_up: a warp takes one expert's 8 gate rows and the matching 8 up rows
   and every token routed to that expert (in tiles of 8, two at a time), SwiGLU applied in
   registers: h [T*k, F], one row per (token, choice).
2. down: a warp takes 16 down rows of one expert and its tokens' h rows,
   and writes each product, weighted by the router, to its (token, choice)
   row of p [T*k, D] (float32; every element written once, so p needs no
   zero fill).
3. combine: each token's k rows of p summed in a fixed order, rounded to
   bf16 and, in a decoder layer, added to the residual stream: the sum, the
   cast and the residual add in one op (they were a fill, two ops and
   atomics; every op costs the host time, and a batched step on an H200 is
   bound by the host: cuda_layer.py).

Each warp finds its expert's tokens itself: lane i picks token i's top k
from the router's logits (cuda_qmv.top_k) and a ballot gives the expert's
tokens as a bit mask, so no routing op, sort or gather runs on the host.

The products run on `mma.sync.m16n8k16` (bf16 in, float32 sums): A is 16
weight rows x 16 inputs, dequantized in registers to bf16 (scale * q + bias,
one rounding, as MLX's `dequantize` to bf16); B is 16 inputs x 8 tokens. A
dot product does not depend on the order of its terms, so each thread feeds
the mma its own 32 consecutive codes in the order that is cheapest to
unpack: codes m and m+4 of a 32-bit word share one bf16 pair
(`(q >> 4m) & 0x000F000F | 0x43004300` is 128 + code in each half), and the
activations are paired the same way with one byte permute.

The same tiles serve the dense 4-bit layers (attention's projections, the
router, the LM head) for steps of 2 to MAX_TOKENS rows (`linear`, in
`KernelQuantizedLinear`): MLX's `quantized_matmul` on CUDA runs one
matrix-vector product per sequence for a decode step's x [B, 1, K], and its
GEMM (x flattened to [B, K]) keeps too few warps busy for so few rows: in a
32-stream decode step on an H200 (benchmarks/gpu_timeline.py, weights not in
L2 as in a real step) q/k/v took 88 us there, 22 us here; the router 67 us
there, 16 us here. A layer of few row tiles splits each tile's inputs over
up to MAX_SPLIT warps (split_for), their sums added in shared memory.
`FlatQuantizedLinear` gives the other quantized layers (other bits) MLX's
GEMM on flattened rows, for any bits.

`cuda_qmv.KernelMoeBlock` (installed at load by `specialize`, CUDA only)
calls `moe` for steps of 2 to MAX_TOKENS tokens, and `specialize` installs
`KernelQuantizedLinear` on the 4-bit linear layers (`FlatQuantizedLinear` on
other quantized ones); Metal (whose quantized_matmul flattens x itself), the
CPU, and `--portable` run MLX's own ops. Tested against them on the GPU machine
(tests/test_fast_paths.py); compile-checked anywhere with
benchmarks/compile_cuda_kernels.py.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

# cuda_qmv imports this module too (its block dispatches here); each uses the
# other's names only when called, so either may be imported first.
from . import cuda_qmv

# Tokens per call: an expert's tokens are a 64-bit mask, in tiles of 8.
MAX_TOKENS = 64
# Steps of 128 inputs whose weights a warp loads before their products
# (grouped_steps), by kernel: on an H200 at 32 tokens two paid for gate_up
# (304 -> 297 us) and cost the split kernels (down 165 -> 212 us).
UNROLL = {"gate_up": 2, "down": 1, "linear": 1}
# Warps a down or linear call aims for (an H100/H200 has 132 multiprocessors):
# a layer of few row tiles splits each tile's steps over up to MAX_SPLIT warps
# (split_for). With one warp per tile, q/k/v for 32 rows (384 row tiles) ran
# at ~0.14 TB/s in a decode step (benchmarks/gpu_timeline.py, H200); 8x7B's
# down projection (2,048 row tiles) took 343 us a layer at 32 streams, 204 us
# split in 4. gate_up (14,336 row tiles) is never split.
WARPS = 8192
MAX_SPLIT = 8  # a block of 8 x 32 threads at <= 80 registers each
BLOCK = 128  # threads of a gate_up block, and of a split one where S <= 4

HEADER = r"""
// the n-th (from 0) set bit of mask, or -1
__device__ __forceinline__ int nth_token(unsigned long long mask, int n) {
    if (n >= __popcll(mask)) return -1;
    for (int i = 0; i < n; i++) mask &= mask - 1;
    return __ffsll(mask) - 1;
}

// The tokens (of nt <= 64) that have expert e among their top KC, as a bit
// mask; every lane of the warp gets the same mask.
template <int E, int KC, typename T>
__device__ __forceinline__ unsigned long long expert_tokens(const T* logits, int nt, int e,
                                                            int lane) {
    unsigned long long mask = 0;
    for (int p = 0; p * 32 < nt; p++) {
        const int tok = p * 32 + lane;
        bool chose = false;
        if (tok < nt) {
            int idx[KC];
            float wt[KC];
            top_k<E, KC>(logits + long(tok) * E, idx, wt);
            #pragma unroll
            for (int j = 0; j < KC; j++) chose |= idx[j] == e;
        }
        mask |= (unsigned long long)__ballot_sync(0xffffffffu, chose) << (32 * p);
    }
    return mask;
}

// Which of token tok's KC choices expert e is, and its router weight.
template <int E, int KC, typename T>
__device__ __forceinline__ int choice_of(const T* logits, int tok, int e, float* weight) {
    int idx[KC];
    float wt[KC];
    top_k<E, KC>(logits + long(tok) * E, idx, wt);
    int c = 0;
    #pragma unroll
    for (int j = 0; j < KC; j++) {
        if (idx[j] == e) {
            c = j;
            *weight = wt[j];
        }
    }
    return c;
}

// (a & mask) | magic in one LOP3: with both constants immediates the compiler emits two.
__device__ __forceinline__ unsigned int and_or(unsigned int a, unsigned int mask,
                                               unsigned int magic) {
    unsigned int d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
    return d;
}

// One 32-bit word of 8 four-bit codes -> 4 bf16 pairs (code m, code m+4),
// each scale * q + bias with one rounding. (128 is written as bits: built with
// __floats2bfloat162_rn, the compiler rebuilt it at every use.)
__device__ __forceinline__ void dequant8(unsigned int q, __nv_bfloat162 s, __nv_bfloat162 b,
                                         unsigned int* out) {
    const unsigned int bits = 0x43004300u;  // 128 in each half
    const __nv_bfloat162 base = *reinterpret_cast<const __nv_bfloat162*>(&bits);
    #pragma unroll
    for (int m = 0; m < 4; m++) {
        unsigned int v = and_or(q >> (4 * m), 0x000F000Fu, bits);  // 128 + code
        const __nv_bfloat162 n = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), base);
        const __nv_bfloat162 w = __hfma2(n, s, b);
        out[m] = *reinterpret_cast<const unsigned int*>(&w);
    }
}

// 8 bf16 activations (16 bytes) -> the 4 pairs (x_m, x_m+4) dequant8's codes meet.
__device__ __forceinline__ void pair8(uint4 v, unsigned int* out) {
    out[0] = __byte_perm(v.x, v.z, 0x5410);
    out[1] = __byte_perm(v.x, v.z, 0x7632);
    out[2] = __byte_perm(v.y, v.w, 0x5410);
    out[3] = __byte_perm(v.y, v.w, 0x7632);
}

// c += A B: A 16x16 (rows g, g+8 of this thread: a0, a1 inputs 2t..2t+1, a2, a3 inputs
// 2t+8..2t+9), B 16x8 (column g), c 16x8 (rows g, g+8; columns 2t, 2t+1).
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 128-input step's weights for this thread: its 32 codes (word u) of rows ra and rb
// (its g and g+8) and their groups' scale and bias; zeros past the row's end.
struct StepWeights {
    uint4 qa, qb;
    __nv_bfloat162 sa, ba, sb, bb;
};

template <int K, int GS>
__device__ __forceinline__ StepWeights load_step(
        const uint32_t* w, const __nv_bfloat16* scales, const __nv_bfloat16* biases,
        long ra, long rb, int u) {
    constexpr int KU4 = K / 32;
    constexpr int G = K / GS;
    StepWeights r;
    if (u < KU4) {
        r.qa = reinterpret_cast<const uint4*>(w)[ra * KU4 + u];
        r.qb = reinterpret_cast<const uint4*>(w)[rb * KU4 + u];
        const int gi = (u * 32) / GS;
        r.sa = __bfloat162bfloat162(scales[ra * G + gi]);
        r.ba = __bfloat162bfloat162(biases[ra * G + gi]);
        r.sb = __bfloat162bfloat162(scales[rb * G + gi]);
        r.bb = __bfloat162bfloat162(biases[rb * G + gi]);
    } else {
        r.qa = r.qb = make_uint4(0u, 0u, 0u, 0u);
        r.sa = r.ba = r.sb = r.bb = __floats2bfloat162_rn(0.f, 0.f);  // dequantizes to 0
    }
    return r;
}

__device__ __forceinline__ unsigned int word(uint4 v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// acc[j] += this step's products for tiles j < N of tokens; xrow[j]: this thread's token row
// of x in tile j. With SKIP, -1 means no token: nothing is loaded and xv[j] keeps what it
// held, for a column that is never written (skipped, not pointed at a row that is there:
// loading in every lane cost gate_up at 8 tokens, a tile mostly empty, 9% on an H200).
// A word (8 codes) of each row at a time, each met by 16 bytes of every tile's activations
// in two mmas: few registers live at once. A step past the row's end (u = K / 32) has zero
// weights and meets x's last word.
template <int K, int N, bool SKIP>
__device__ __forceinline__ void step_products(const StepWeights& r, const __nv_bfloat16* x,
                                              const int* xrow, int u, uint4* xv,
                                              float (*acc)[4]) {
    constexpr int KU4 = K / 32;
    const int ux = min(u, KU4 - 1);
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        unsigned int a[4], b[4];
        dequant8(word(r.qa, i), r.sa, r.ba, a);
        dequant8(word(r.qb, i), r.sb, r.bb, b);
        #pragma unroll
        for (int j = 0; j < N; j++) {
            if (!SKIP || xrow[j] >= 0) {
                xv[j] = reinterpret_cast<const uint4*>(x + long(xrow[j]) * K)[ux * 4 + i];
            }
            unsigned int xp[4];
            pair8(xv[j], xp);
            mma16816(acc[j], a[0], b[0], a[1], b[1], xp[0], xp[1]);
            mma16816(acc[j], a[2], b[2], a[3], b[3], xp[2], xp[3]);
        }
    }
}

// Steps s0 .. s1-1 (of 128 inputs each) of rows ra, rb against the first N tiles of tokens.
// Thread t takes inputs 32u .. 32u+31, u = 4 step + t. U steps' weights are loaded before any
// of their products: more bytes in flight a warp (gate_up at 32 tokens, in passes of 2 tiles:
// 304 -> 297 us on an H200 with U = 2; a prefetch carried over iterations, in registers or
// through shared memory with cp.async, did not pay: benchmarks/RESULTS.md). A step past s1
// (the end of an odd slice) reads and adds nothing.
template <int K, int GS, int N, int U, bool SKIP>
__device__ __forceinline__ void steps_of(
        const uint32_t* w, const __nv_bfloat16* scales, const __nv_bfloat16* biases,
        const __nv_bfloat16* x, long ra, long rb, const int* xrow, int t, int s0, int s1,
        float (*acc)[4]) {
    uint4 xv[N];
    #pragma unroll
    for (int j = 0; j < N; j++) xv[j] = make_uint4(0u, 0u, 0u, 0u);
    for (int s = s0; s < s1; s += U) {
        StepWeights r[U];
        int u[U];
        #pragma unroll
        for (int q = 0; q < U; q++) {
            u[q] = s + q < s1 ? 4 * (s + q) + t : K;  // K: a word past the row's end, zeros
            r[q] = load_step<K, GS>(w, scales, biases, ra, rb, u[q]);
        }
        #pragma unroll
        for (int q = 0; q < U; q++) step_products<K, N, SKIP>(r[q], x, xrow, u[q], xv, acc);
    }
}

// steps_of for `tiles` (<= TILES) tiles, the test on the tile count made once, not per
// tile and word: a pass of one tile in a two-tile kernel (an expert with 8 tokens or fewer)
// runs the one-tile loop. LINEAR's TILES (4 or 8) run whole, SKIP off: a tile past its rows
// reads the last row and is written nowhere. (With the single LOP3 in dequant8, gate_up's
// loop went from 595 to 424 instructions for two steps of two tiles; the kernels are
// bit-identical to before, 8-11% faster at 16-64 tokens on an H200: benchmarks/RESULTS.md.)
template <int K, int GS, int TILES, int U, bool SKIP = true>
__device__ __forceinline__ void grouped_steps(
        const uint32_t* w, const __nv_bfloat16* scales, const __nv_bfloat16* biases,
        const __nv_bfloat16* x, long ra, long rb, const int* xrow, int tiles, int t,
        int s0, int s1, float (*acc)[4]) {
    if (TILES == 2 && tiles == 1) {
        steps_of<K, GS, 1, U, SKIP>(w, scales, biases, x, ra, rb, xrow, t, s0, s1, acc);
    } else {
        steps_of<K, GS, TILES, U, SKIP>(w, scales, biases, x, ra, rb, xrow, t, s0, s1, acc);
    }
}

// A block is RT row tiles x S warps: the S warps of a row tile share its rows and tokens and
// each takes a 1/S slice of the steps, so that a layer of few rows still has enough warps in
// flight to stream its weights. Warp wb of the block: its row tile and its slice of the steps.
struct Slice {
    int rt, part, s0, s1;
};

template <int K, int S>
__device__ __forceinline__ Slice slice_of(int wb) {
    constexpr int STEPS = (K / 32 + 3) / 4;
    constexpr int PER = (STEPS + S - 1) / S;
    Slice at;
    at.rt = wb / S;
    at.part = wb % S;
    at.s0 = at.part * PER;
    at.s1 = min(STEPS, at.s0 + PER);
    return at;
}

// The S slices' sums of each row tile added up in shared memory, in a fixed order (so a
// result does not depend on timing), into the registers of the row tile's slice 0, which
// returns true; the others return false. Every thread of the block must call it, as often
// (once a pass).
template <int TILES, int S, int RT>
__device__ __forceinline__ bool block_sum(float (*acc)[4], const Slice& at, int lane) {
    if (S == 1) return true;
    __shared__ float part[S > 1 ? RT * (S - 1) * TILES * 128 : 1];
    float* mine = part + ((at.rt * (S - 1) + at.part - 1) * TILES) * 128 + lane * 4;
    if (at.part > 0) {
        #pragma unroll
        for (int j = 0; j < TILES; j++) {
            #pragma unroll
            for (int c = 0; c < 4; c++) mine[j * 128 + c] = acc[j][c];
        }
    }
    __syncthreads();
    if (at.part == 0) {
        for (int p = 1; p < S; p++) {
            const float* theirs = part + ((at.rt * (S - 1) + p - 1) * TILES) * 128 + lane * 4;
            #pragma unroll
            for (int j = 0; j < TILES; j++) {
                #pragma unroll
                for (int c = 0; c < 4; c++) acc[j][c] += theirs[j * 128 + c];
            }
        }
    }
    __syncthreads();  // read before the next pass writes
    return at.part == 0;
}

"""

# The number of tokens is read from the logits' shape at run time, so a
# batch that grows or shrinks does not compile a kernel per size. A warp takes
# its expert's tokens in passes of TILES tiles of 8 (1 or 2: tiles_for),
# reading its weights once a pass: registers sized for 2 tiles, not for the
# most an expert might get, keep more warps in flight (at 32 tokens, sized
# for 4 tiles, gate_up took 71 registers and down 79; for 2 they take 72 and
# 64, registers being allocated in eights), and with
# random top-2 of 8 only the busiest experts of a 32-token step have more than
# 2 tiles. On an H200 (benchmarks/RESULTS.md): gate_up 331 -> 304 us at 32
# tokens, 747 -> 461 at 64; down 187 -> 165 and 380 -> 253. (Staging a block's
# x in shared memory, so that its warps read it once, was slower: 368 us at 32
# tokens.)
TOKENS = r"""
    int NT = 1;
    for (int i = 0; i < logits_ndim - 1; i++) NT *= logits_shape[i];
"""

# x [NT, K], w [E, 2F, K/8] (gate rows, then up rows), logits [NT, E] -> h [NT*KC, F]
GATE_UP = TOKENS + r"""
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wid = int((long(blockIdx.x) * blockDim.x + threadIdx.x) >> 5);
    if (wid >= E * (F / 8)) return;
    const int e = wid / (F / 8);
    const int n0 = (wid % (F / 8)) * 8;
    const unsigned long long mine = expert_tokens<E, KC>(logits, NT, e, lane);
    const int all = (__popcll(mine) + 7) / 8;
    const long gate = long(e) * 2 * F + n0 + g;
    for (int p = 0; p < all; p += TILES) {  // passes
        const int tiles = min(TILES, all - p);
        int xrow[TILES];
        #pragma unroll
        for (int j = 0; j < TILES; j++) xrow[j] = nth_token(mine, 8 * (p + j) + g);
        float acc[TILES][4];
        #pragma unroll
        for (int j = 0; j < TILES; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
        grouped_steps<K, GS, TILES, U>(w, scales, biases, x, gate, gate + F, xrow, tiles, t, 0,
                                       (K / 32 + 3) / 4, acc);
        #pragma unroll
        for (int j = 0; j < TILES; j++) {
            #pragma unroll
            for (int half = 0; half < 2; half++) {
                const int tok = j < tiles ? nth_token(mine, 8 * (p + j) + 2 * t + half) : -1;
                if (tok >= 0) {
                    float wt;
                    const int c = choice_of<E, KC>(logits, tok, e, &wt);
                    const float vg = acc[j][half], vu = acc[j][2 + half];
                    h[(long(tok) * KC + c) * F + n0 + g] =
                        __float2bfloat16(vg / (1.f + __expf(-vg)) * vu);
                }
            }
        }
    }
"""

# h [NT*KC, K], w [E, D, K/8], logits [NT, E] -> y [NT*KC, D] float32: each (token, choice)'s
# product weighted by the router, every element written once (combine sums them).
# Every warp of a block has the same expert (a row tile past the end takes the block's
# first one's and writes nothing), so all make the same passes, as block_sum needs. (Its
# `row` would be in range without the test on `real`; with it, down compiles to 64
# registers, without it to 66.)
DOWN = TOKENS + r"""
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const Slice at = slice_of<K, S>(threadIdx.x >> 5);
    const int tile = blockIdx.x * RT + at.rt;  // 16 down rows of one expert
    const bool real = tile < E * (D / 16);
    const int e = (real ? tile : blockIdx.x * RT) / (D / 16);
    const int d0 = (tile % (D / 16)) * 16;
    const unsigned long long mine = expert_tokens<E, KC>(logits, NT, e, lane);
    const int all = (__popcll(mine) + 7) / 8;
    const long row = real ? long(e) * D + d0 + g : long(e) * D + g;
    for (int p = 0; p < all; p += TILES) {  // passes
        const int tiles = min(TILES, all - p);
        int xrow[TILES];
        #pragma unroll
        for (int j = 0; j < TILES; j++) {
            const int tok = nth_token(mine, 8 * (p + j) + g);
            float wt;
            xrow[j] = tok < 0 ? -1 : tok * KC + choice_of<E, KC>(logits, tok, e, &wt);
        }
        float acc[TILES][4];
        #pragma unroll
        for (int j = 0; j < TILES; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
        grouped_steps<K, GS, TILES, U>(w, scales, biases, h, row, row + 8, xrow, tiles, t,
                                       at.s0, at.s1, acc);
        if (!block_sum<TILES, S, RT>(acc, at, lane) || !real) continue;
        #pragma unroll
        for (int j = 0; j < TILES; j++) {
            #pragma unroll
            for (int half = 0; half < 2; half++) {
                const int tok = j < tiles ? nth_token(mine, 8 * (p + j) + 2 * t + half) : -1;
                if (tok >= 0) {
                    float wt = 0.f;
                    const int c = choice_of<E, KC>(logits, tok, e, &wt);
                    float* out = y + (long(tok) * KC + c) * D + d0 + g;
                    out[0] = wt * acc[j][half];
                    out[8] = wt * acc[j][2 + half];
                }
            }
        }
    }
"""

# p [NT*KC, D] float32, res [NT, D] -> y [NT, D]: bf16(res + bf16(p's KC rows summed in order)),
# rounded as the ops it replaces (a sum cast to bf16, then a bf16 add) would; RES 0: no
# residual (res is then p itself, unread). 4 outputs a thread.
COMBINE = r"""
    const long i = (long(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
    if (i >= long(p_shape[0] / KC) * D) return;
    const long t = i / D, d = i % D;
    float4 s = *reinterpret_cast<const float4*>(p + t * KC * D + d);
    #pragma unroll
    for (int c = 1; c < KC; c++) {
        const float4 v = *reinterpret_cast<const float4*>(p + (t * KC + c) * D + d);
        s.x += v.x;
        s.y += v.y;
        s.z += v.z;
        s.w += v.w;
    }
    const float sums[4] = {s.x, s.y, s.z, s.w};
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        float v = __bfloat162float(__float2bfloat16(sums[j]));
        if (RES) v += __bfloat162float(res[i + j]);
        y[i + j] = __float2bfloat16(v);
    }
"""

# x [M, K], w [N, K/8], scales/biases [N, K/GS] -> y [M, N]: all M rows are every tile's
# tokens, in one pass (TILES covers them: linear_tiles)
LINEAR = r"""
    int M = 1;
    for (int i = 0; i < x_ndim - 1; i++) M *= x_shape[i];
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const Slice at = slice_of<K, S>(threadIdx.x >> 5);
    const int tile = blockIdx.x * RT + at.rt;
    const bool real = tile < (N + 15) / 16;
    const int n0 = real ? tile * 16 : 0;  // rows past N (a last partial tile) read row N-1, written nowhere
    const int tiles = real ? (M + 7) / 8 : 0;
    int xrow[TILES];
    #pragma unroll
    for (int j = 0; j < TILES; j++) xrow[j] = min(8 * j + g, M - 1);  // no row skipped
    float acc[TILES][4];
    #pragma unroll
    for (int j = 0; j < TILES; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    if (tiles > 0) {
        grouped_steps<K, GS, TILES, U, false>(w, scales, biases, x, min(n0 + g, N - 1),
                                              min(n0 + g + 8, N - 1), xrow, tiles, t, at.s0,
                                              at.s1, acc);
    }
    if (!block_sum<TILES, S, RT>(acc, at, lane) || tiles == 0) return;
    #pragma unroll
    for (int j = 0; j < TILES; j++) {
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            const int m = 8 * j + 2 * t + half;
            if (j < tiles && m < M) {
                if (n0 + g < N) y[long(m) * N + n0 + g] = __float2bfloat16(acc[j][half]);
                if (n0 + g + 8 < N) y[long(m) * N + n0 + g + 8] = __float2bfloat16(acc[j][2 + half]);
            }
        }
    }
"""


def _kernel(name: str, inputs: list[str], output: str, source: str):
    # cuda_qmv's cache and header (top_k), shared with the one-token kernels
    return cuda_qmv._kernel(name, inputs, output, source, extra_header=HEADER)


def applies(experts) -> bool:
    """Whether the grouped kernels take these (fused, 4-bit: as cuda_qmv
    checks) experts' shapes: 8 gate rows and 16 down rows per warp, inputs
    in whole 32-code words."""
    E, two_f, _ = experts.gate_up_proj.weight.shape
    D = experts.down_proj.weight.shape[-2]
    return E <= 64 and two_f // 2 % 32 == 0 and D % 32 == 0


def split_for(row_tiles: int, k: int) -> tuple[int, int]:
    """(S, RT) for a call of `row_tiles` tiles of rows and `k` inputs: S
    warps share each row tile, each taking 1/S of its 128-input steps (their
    sums added in shared memory), and a block holds RT row tiles (BLOCK
    threads where S <= 4)."""
    steps = (k // 32 + 3) // 4
    s = 1
    while s < MAX_SPLIT and 2 * s <= steps and row_tiles * s < WARPS:
        s *= 2
    return s, max(1, BLOCK // 32 // s)


@functools.lru_cache(maxsize=None)
def _launch(row_tiles: int, k: int, per_expert: int = 0) -> tuple:
    """(template values, grid, threadgroup) for `row_tiles` row tiles of `k`
    inputs; worked out once per layer shape, not on every decode step. With
    `per_expert` row tiles an expert, a block's row tiles are one expert's
    (its warps make the same passes)."""
    s, rt = split_for(row_tiles, k)
    while per_expert and per_expert % rt:
        rt //= 2
    blocks = (row_tiles + rt - 1) // rt
    return (("S", s), ("RT", rt)), (blocks * rt * s * 32, 1, 1), (rt * s * 32, 1, 1)


def tiles_for(tokens: int) -> int:
    """The TILES (tiles of 8 tokens a pass) the expert kernels compile with
    for a step of `tokens`: 1 up to 8 tokens, else 2."""
    return 1 if tokens <= 8 else 2


def linear_tiles(rows: int) -> int:
    """The TILES `linear` compiles with for `rows`: every row in one pass
    (1, 2, 4 or 8 tiles). Its layers are small, and a second pass over the
    weights costs a whole pass's latency: the router (one row tile) took 12
    us a call at 32 rows in one pass, 20 in two (H200)."""
    tiles = (rows + 7) // 8
    return 1 << (tiles - 1).bit_length()


def gate_up(x: mx.array, experts, logits: mx.array, k: int) -> mx.array:
    """silu(gate(x)) * up(x) of each token's k experts: x [..., D] -> h [T*k, F]."""
    layer = experts.gate_up_proj
    D = x.shape[-1]
    T = x.size // D
    E, F = layer.weight.shape[0], layer.weight.shape[-2] // 2
    return _kernel("hermes_grouped_gate_up", ["x", "w", "scales", "biases", "logits"], "h",
                   GATE_UP)(
        inputs=[x, layer.weight, layer.scales, layer.biases, logits],
        template=[("F", F), ("K", D), ("GS", layer.group_size), ("TILES", tiles_for(T)),
                  ("KC", k), ("E", E), ("U", UNROLL["gate_up"])],
        grid=(E * (F // 8) * 32, 1, 1), threadgroup=(BLOCK, 1, 1),
        output_shapes=[(T * k, F)], output_dtypes=[mx.bfloat16])[0]


def down(h: mx.array, experts, logits: mx.array, k: int) -> mx.array:
    """Each token's experts' down projections, weighted by the router:
    h [T*k, F] -> p [T*k, D] float32 (a token's k rows: `combine`)."""
    layer = experts.down_proj
    F, T = h.shape[-1], h.shape[0] // k
    E, D = layer.weight.shape[0], layer.weight.shape[-2]
    split, grid, threadgroup = _launch(E * (D // 16), F, D // 16)
    return _kernel("hermes_grouped_down", ["h", "w", "scales", "biases", "logits"], "y", DOWN)(
        inputs=[h, layer.weight, layer.scales, layer.biases, logits],
        template=[("D", D), ("K", F), ("GS", layer.group_size), ("TILES", tiles_for(T)),
                  ("KC", k), ("E", E), ("U", UNROLL["down"]), *split],
        grid=grid, threadgroup=threadgroup,
        output_shapes=[(T * k, D)], output_dtypes=[mx.float32])[0]


def combine(p: mx.array, k: int, shape: tuple[int, ...],
            residual: mx.array | None = None) -> mx.array:
    """p [T*k, D] float32 -> bf16 `shape` [..., D]: each token's k rows
    summed, plus `residual` (bf16, `shape`) if given."""
    D = p.shape[-1]
    return _kernel("hermes_grouped_combine", ["p", "res"], "y", COMBINE)(
        inputs=[p, p if residual is None else residual],
        template=[("D", D), ("KC", k), ("RES", residual is not None)],
        grid=(p.size // k // 4, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[shape], output_dtypes=[mx.bfloat16])[0]


def moe(x: mx.array, experts, logits: mx.array, k: int,
        residual: mx.array | None = None) -> mx.array:
    """The MoE block's output for 2..MAX_TOKENS tokens and the router's
    `logits` [..., E]: x [..., D] -> [..., D] (see cuda_qmv.moe), plus
    `residual` (a decoder layer's stream, x's shape) if given. The kernels
    take any leading shape (they count tokens from the logits' shape): no
    reshape ops on the decode path."""
    h = gate_up(x, experts, logits, k)
    return combine(down(h, experts, logits, k), k, x.shape, residual)


def linear(x: mx.array, layer: nn.QuantizedLinear) -> mx.array:
    """layer(x) for 1..MAX_TOKENS rows of bf16 x: [..., K] -> [..., N]."""
    N = layer.weight.shape[0]
    K = x.shape[-1]
    split, grid, threadgroup = _launch((N + 15) // 16, K)
    y = _kernel("hermes_grouped_linear", ["x", "w", "scales", "biases"], "y", LINEAR)(
        inputs=[x, layer.weight, layer.scales, layer.biases],
        template=[("N", N), ("K", K), ("GS", layer.group_size),
                  ("TILES", linear_tiles(x.size // K)), ("U", UNROLL["linear"]),
                  *split],
        grid=grid, threadgroup=threadgroup,
        output_shapes=[(*x.shape[:-1], N)], output_dtypes=[mx.bfloat16])[0]
    return y + layer["bias"] if "bias" in layer else y


def linear_applies(layer: nn.Module, dtype: mx.Dtype) -> bool:
    """Whether `linear` takes this layer for activations of `dtype`: 4-bit
    affine, bf16 scales, inputs in whole 32-code words."""
    return (dtype == mx.bfloat16 and isinstance(layer, nn.QuantizedLinear)
            and layer.bits == 4 and getattr(layer, "mode", "affine") == "affine"
            and layer.group_size in (32, 64, 128) and layer.scales.dtype == mx.bfloat16
            and layer.weight.shape[1] * 8 % 32 == 0)


# One row stays with MLX's quantized_matmul: on an H200 it was faster there
# for attention's projections (q/k/v 0.023 against 0.036 ms, o 0.018 against
# 0.035; benchmarks/batch_step_parts.py), the LM head aside (0.081 vs 0.068).
LINEAR_MIN_ROWS = 2
# From this many rows MLX's CUDA quantized_matmul runs one GEMM, reading the
# weights once, but only for a 2-D x [M, K]: a batched decode step's x
# [B, 1, K] runs one product per sequence (32 rows of q/k/v on an H200: 0.362
# ms as [32, 1, K], 0.029 as [32, K]; benchmarks/grouped_parts.py). So such
# steps of layers `linear` does not take run flattened.
GEMM_MIN_ROWS = 8


class FlatQuantizedLinear(nn.QuantizedLinear):
    """A quantized linear layer on CUDA (any bits) whose steps of
    GEMM_MIN_ROWS rows or more run MLX's quantized_matmul on x flattened to
    2-D [rows, K]: one GEMM, not one product per sequence."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.by_rows(x, x.size // x.shape[-1])

    def by_rows(self, x: mx.array, rows: int) -> mx.array:
        if rows >= GEMM_MIN_ROWS and x.ndim > 2:
            return super().__call__(x.reshape(rows, -1)).reshape(*x.shape[:-1], -1)
        return super().__call__(x)


class KernelQuantizedLinear(FlatQuantizedLinear):
    """A 4-bit linear layer on CUDA (linear_applies) whose steps of
    LINEAR_MIN_ROWS to MAX_TOKENS rows run `linear` (weights read once for
    all rows); others as FlatQuantizedLinear."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if LINEAR_MIN_ROWS <= rows <= MAX_TOKENS:
            return linear(x, self)
        return self.by_rows(x, rows)
