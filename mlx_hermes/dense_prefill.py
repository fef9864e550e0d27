"""Dense prefill for CUDA: a prompt's quantized experts dequantized, a slice
at a time, and run as float gathered matmuls.

Installed at load by `specialize` on CUDA only (`DensePrefillExperts`, an
`Experts` with the same interface): below DENSE_PREFILL_MIN_TOKENS, and for
decoding, the portable experts run unchanged.

4-bit experts with bf16 scales are dequantized by a kernel of ours
(`DEQUANT_ROWS`, chosen at install): MLX's `dequantize` of one 8x7B
projection's rows (after the slice's copy) took 1.07 ms on an H200 where
this one-pass kernel takes 0.66 ms, with the same values
(benchmarks/dequant_kernel.py). Other formats use MLX's.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import cuda_prefill, cuda_qmv
from .moe import Experts

# Prefill of this many tokens or more dequantizes a layer's experts and runs
# float gathered matmuls. On CUDA, MLX's sorted gather_qmm is the prefill
# bottleneck (48 ms against 5.1 ms for one layer of 512 tokens, measured on
# an H100), so specialize installs this there only; Metal and the CPU keep
# gather_qmm.
DENSE_PREFILL_MIN_TOKENS = 64
# Float experts made at once in a dense prefill: a slice of a projection's
# rows across all experts. 1 GiB holds one 8x7B projection (gate, up or down:
# 0.94 GB) whole: peak 1.049x mlx-lm's (H100, 512 tokens). 256 MiB slices
# give 0.995x but cost 30% of prefill speed in host syncs (910 vs 1276 tok/s).
DENSE_CHUNK_BYTES = 2**30


# w [E, NTOT, K/8] uint32, scales/biases [E, NTOT, K/GS] bf16 -> y [E, NS, K] bf16: rows
# A..A+NS of every expert (no copy of the slice), scale * q + bias rounded once as MLX does
# (bf16 fma; the code made exactly as (128 + code) - 128 from its bits). A thread per 16-byte
# word: 32 codes in, 64 bytes out.
DEQUANT_ROWS = r"""
    constexpr int KU4 = K / 32;
    const long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= long(E) * NS * KU4) return;
    const long out_row = i / KU4;
    const int u = int(i % KU4);
    const long row = (out_row / NS) * NTOT + A + out_row % NS;  // in the whole array
    const uint4 q = reinterpret_cast<const uint4*>(w)[row * KU4 + u];
    const long g = row * (K / GS) + (u * 32) / GS;
    const __nv_bfloat162 s = __bfloat162bfloat162(scales[g]);
    const __nv_bfloat162 b = __bfloat162bfloat162(biases[g]);
    const unsigned int bits = 0x43004300u;  // 128 in each half
    const __nv_bfloat162 base = *reinterpret_cast<const __nv_bfloat162*>(&bits);
    const unsigned int words[4] = {q.x, q.y, q.z, q.w};
    uint4 out[4];
    unsigned int* o = reinterpret_cast<unsigned int*>(out);
    #pragma unroll
    for (int wi = 0; wi < 4; wi++) {
        #pragma unroll
        for (int j = 0; j < 4; j++) {  // codes 2j, 2j+1 of the word (bits 8j, 8j + 4)
            const unsigned int c = words[wi] >> (8 * j);
            unsigned int v = (c & 0xFu) | ((c & 0xF0u) << 12) | bits;
            const __nv_bfloat162 n = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), base);
            const __nv_bfloat162 r = __hfma2(n, s, b);
            o[wi * 4 + j] = *reinterpret_cast<const unsigned int*>(&r);
        }
    }
    uint4* y4 = reinterpret_cast<uint4*>(y + out_row * K + u * 32);
    #pragma unroll
    for (int k = 0; k < 4; k++) y4[k] = out[k];
"""

RowsDequantizer = Callable[[QuantizedSwitchLinear, int, int], mx.array]


def mlx_rows(layer: QuantizedSwitchLinear, a: int, b: int) -> mx.array:
    """Rows a..b of every expert as floats, by MLX's dequantize: [E, b-a, in]."""
    return mx.dequantize(layer.weight[..., a:b, :], layer.scales[..., a:b, :],
                         layer.biases[..., a:b, :], group_size=layer.group_size,
                         bits=layer.bits)


def kernel_rows(layer: QuantizedSwitchLinear, a: int, b: int) -> mx.array:
    """mlx_rows by DEQUANT_ROWS (CUDA; where kernel_applies)."""
    E, N, packed = layer.weight.shape
    K = packed * 8
    kernel = cuda_qmv._kernel("dequant_rows", ["w", "scales", "biases"], "y", DEQUANT_ROWS)
    return kernel(inputs=[layer.weight, layer.scales, layer.biases],
                  template=[("E", E), ("NTOT", N), ("A", a), ("NS", b - a), ("K", K),
                            ("GS", layer.group_size)],
                  grid=(E * (b - a) * (K // 32), 1, 1), threadgroup=(256, 1, 1),
                  output_shapes=[(E, b - a, K)], output_dtypes=[mx.bfloat16])[0]


def kernel_applies(layer: QuantizedSwitchLinear) -> bool:
    """DEQUANT_ROWS takes 4-bit affine experts with bf16 scales, inputs in whole
    32-code words and groups."""
    K = layer.weight.shape[-1] * 8
    return (layer.bits == 4 and getattr(layer, "mode", "affine") == "affine"
            and layer.scales.dtype == mx.bfloat16 and K % 32 == 0
            and layer.group_size % 32 == 0)


def dense_project(layer: QuantizedSwitchLinear, h: mx.array, indices: mx.array,
                  rows: tuple[int, int] | None = None,
                  dequantize: RowsDequantizer = mlx_rows) -> mx.array:
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
        w = dequantize(layer, a, b)  # [E, b-a, in]
        parts.append(mx.gather_mm(h, w.swapaxes(-1, -2), rhs_indices=indices,
                                  sorted_indices=True))
        mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


class DensePrefillExperts(Experts):
    """Experts whose long sorted prefill runs through cuda_prefill's GEMM
    kernel or dense_project.

    `min_pairs` (token-expert pairs: DENSE_PREFILL_MIN_TOKENS times the
    block's k) is set when installed; by `use_kernels`, on CUDA, the
    projections the GEMM kernel takes (`gemm_projections`) and those our
    dequantize kernel takes of the rest (`kernel_projections`); MLX
    dequantizes the others."""

    min_pairs: int
    # frozensets, not dicts: mlx.nn.Module would take a dict for a child module
    gemm_projections: frozenset = frozenset()
    kernel_projections: frozenset = frozenset()

    def use_kernels(self, gemm: bool = True) -> "DensePrefillExperts":
        """Choose the kernels for each projection (gemm=False: the dequantize
        kernel only, as before the GEMM kernel; for comparisons)."""
        children = self.children().items()
        self.gemm_projections = frozenset(
            name for name, layer in children if gemm and cuda_prefill.applies(layer))
        self.kernel_projections = frozenset(
            name for name, layer in children if kernel_applies(layer)) - self.gemm_projections
        return self

    def _project(self, name: str, h: mx.array, indices: mx.array,
                 rows: tuple[int, int] | None = None) -> mx.array:
        if name in self.gemm_projections:
            return cuda_prefill.grouped_matmul(h, self[name], indices, rows)
        dequantize = kernel_rows if name in self.kernel_projections else mlx_rows
        return dense_project(self[name], h, indices, rows, dequantize)

    def sorted_mlp(self, x: mx.array, indices: mx.array) -> mx.array:
        if x.shape[0] < self.min_pairs:
            return super().sorted_mlp(x, indices)
        if "gate_up_proj" in self.gemm_projections:
            gate, up = mx.split(self._project("gate_up_proj", x, indices), 2, axis=-1)
        elif "gate_up_proj" in self:
            # gate and up a half at a time: one projection's float experts at once
            half = self.gate_up_proj.weight.shape[-2] // 2
            gate = self._project("gate_up_proj", x, indices, (0, half))
            up = self._project("gate_up_proj", x, indices, (half, 2 * half))
        else:
            gate = self._project("gate_proj", x, indices)
            up = self._project("up_proj", x, indices)
        return self._project("down_proj", swiglu(gate, up), indices)


def applies(experts: Experts) -> bool:
    """Only quantized experts have anything to dequantize."""
    return all(isinstance(p, QuantizedSwitchLinear) for p in experts.children().values())
