"""Prefill of a prompt's quantized experts on CUDA, past gather_qmm.

Installed at load by `specialize` on CUDA only (`DensePrefillExperts`, an
`Experts` with the same interface): below DENSE_PREFILL_MIN_TOKENS, and for
decoding, the portable experts run unchanged.

Experts cuda_prefill's GEMM kernel takes (4-bit affine, bf16 scales; chosen
at install by `use_kernels`) run through it: no float experts are made. The
others (other bits, float32 scales) are dequantized by MLX a slice at a time
and run as float gathered matmuls (`dense_project`). A dequantize kernel of
ours (the tenth session's `DEQUANT_ROWS`: 0.66 ms against MLX's 1.07 for one
8x7B projection on an H200) served the 4-bit experts before the GEMM did and
was removed with it: a layer's experts at 512 tokens took 7.8 ms with it, 2.3
with the GEMM (H200, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import cuda_prefill
from .moe import Experts

# Prefill of this many tokens or more runs a layer's experts through the GEMM
# kernel or float experts. On CUDA, MLX's sorted gather_qmm is the prefill
# bottleneck (48 ms against 5.1 ms with float experts for one layer of 512
# tokens, measured on an H100), so specialize installs this there only;
# Metal and the CPU keep gather_qmm. Fewer tokens are decode steps, which
# cuda_grouped's kernels take up to MAX_TOKENS (64).
DENSE_PREFILL_MIN_TOKENS = 64
# Float experts made at once in a dense prefill: a slice of a projection's
# rows across all experts. 1 GiB holds one 8x7B projection (gate, up or down:
# 0.94 GB) whole: peak 1.049x mlx-lm's (H100, 512 tokens). 256 MiB slices
# give 0.995x but cost 30% of prefill speed in host syncs (910 vs 1276 tok/s).
DENSE_CHUNK_BYTES = 2**30


def mlx_rows(layer: QuantizedSwitchLinear, a: int, b: int) -> mx.array:
    """Rows a..b of every expert as floats, by MLX's dequantize: [E, b-a, in]."""
    return mx.dequantize(layer.weight[..., a:b, :], layer.scales[..., a:b, :],
                         layer.biases[..., a:b, :], group_size=layer.group_size,
                         bits=layer.bits)


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
        w = mlx_rows(layer, a, b)  # [E, b-a, in]
        parts.append(mx.gather_mm(h, w.swapaxes(-1, -2), rhs_indices=indices,
                                  sorted_indices=True))
        mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


class DensePrefillExperts(Experts):
    """Experts whose long sorted prefill runs through cuda_prefill's GEMM
    kernel (the projections in `gemm_projections`, set by `use_kernels` on
    CUDA) or dense_project (the others). `min_pairs` (token-expert pairs:
    DENSE_PREFILL_MIN_TOKENS times the block's k) is set when installed."""

    min_pairs: int
    # a frozenset, not a dict: mlx.nn.Module would take a dict for a child module
    gemm_projections: frozenset = frozenset()

    def use_kernels(self, dtype: mx.Dtype) -> "DensePrefillExperts":
        """The GEMM kernel for each projection it takes, for activations of
        `dtype` (it reads bf16 only)."""
        self.gemm_projections = frozenset(
            name for name, layer in self.children().items()
            if dtype == mx.bfloat16 and cuda_prefill.applies(layer))
        return self

    def _project(self, name: str, h: mx.array, indices: mx.array,
                 rows: tuple[int, int] | None = None) -> mx.array:
        if name in self.gemm_projections:
            return cuda_prefill.grouped_matmul(h, self[name], indices, rows)
        return dense_project(self[name], h, indices, rows)

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
