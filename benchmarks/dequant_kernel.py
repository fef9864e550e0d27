"""The dense prefill's dequantization on CUDA: MLX's `dequantize` against a
one-pass kernel of ours, on one layer's 8x7B experts (4-bit). A prototype
for issue 18's stretch; nothing in mlx_hermes uses this kernel yet.

    python benchmarks/dequant_kernel.py [--group-size 64] [--trials 10] [--json F]

Why: a 512-token prompt's dense prefill (dense_prefill.py) makes each layer's
float experts with `mx.dequantize`, ~7 ms a layer on an H200 (issue 18),
where reading 0.8 GB of codes and writing 2.8 GB of bf16 takes ~1.2 ms at
3 TB/s. If a kernel that streams at bandwidth gets close, dense_project can
use it (it dequantizes a projection's rows a slice at a time: gate and up
are the two halves of gate_up_proj, so the kernel takes a row range of every
expert without a copy).

For gate (rows 0..F of gate_up), up (F..2F) and down: ms a call (`--trials`
calls queued, best of 3), GB/s of bytes read and written, and how many of
the kernel's values differ from MLX's and by how much. CUDA only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grouped_kernel import _gpu_name, timed  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402

# w [E, NTOT, K/8] uint32, scales/biases [E, NTOT, K/GS] bf16 -> y [E, NS, K] bf16: rows A..A+NS
# of every expert, scale * q + bias with one rounding (bf16 fma: n is the code exactly, made
# as (128 + code) - 128 from its bits); a thread per 16-byte word (32 codes, 64 bytes out).
DEQUANT = r"""
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

_kernel = None


def dequantize_rows(layer, a: int, b: int) -> mx.array:
    """mx.dequantize(layer's rows a..b of every expert) for 4-bit experts: [E, b-a, K] bf16."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="bench_dequant_rows", input_names=["w", "scales",
                                      "biases"], output_names=["y"], source=DEQUANT)
    E, N, packed = layer.weight.shape
    K = packed * 8
    return _kernel(inputs=[layer.weight, layer.scales, layer.biases],
                   template=[("E", E), ("NTOT", N), ("A", a), ("NS", b - a), ("K", K),
                             ("GS", layer.group_size)],
                   grid=(E * (b - a) * (K // 32), 1, 1), threadgroup=(256, 1, 1),
                   output_shapes=[(E, b - a, K)], output_dtypes=[mx.bfloat16])[0]


def mlx_rows(layer, a: int, b: int) -> mx.array:
    """dense_prefill.dense_project's call."""
    return mx.dequantize(layer.weight[..., a:b, :], layer.scales[..., a:b, :],
                         layer.biases[..., a:b, :], group_size=layer.group_size, bits=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not mx.cuda.is_available():
        sys.exit("error: CUDA only")
    model = prof.synthetic_model("8x7b", 2, 4, group_size=a.group_size, dtype=mx.bfloat16)
    experts = model.layers[0].block_sparse_moe.switch_mlp
    F = experts.gate_up_proj.weight.shape[1] // 2
    parts = {"gate": (experts.gate_up_proj, 0, F), "up": (experts.gate_up_proj, F, 2 * F),
             "down": (experts.down_proj, 0, experts.down_proj.weight.shape[1])}
    rows = []
    print(f"{'part':<6} {'MLX ms':>8} {'ours ms':>8} {'MLX GB/s':>9} {'ours GB/s':>10} "
          f"{'differ':>8} {'max diff':>9}")
    for name, (layer, lo, hi) in parts.items():
        want, got = mlx_rows(layer, lo, hi), dequantize_rows(layer, lo, hi)
        differ = (want != got).sum().item()
        diff = mx.abs(want.astype(mx.float32) - got.astype(mx.float32)).max().item()
        share = (hi - lo) / layer.weight.shape[1]
        moved = (layer.weight.nbytes + layer.scales.nbytes + layer.biases.nbytes) * share
        moved += want.nbytes
        del want, got
        t_mlx = timed(lambda: mlx_rows(layer, lo, hi), a.trials)
        t_ours = timed(lambda: dequantize_rows(layer, lo, hi), a.trials)
        rows.append({"part": name, "mlx_ms": t_mlx, "ours_ms": t_ours,
                     "mlx_gbs": moved / t_mlx / 1e6, "ours_gbs": moved / t_ours / 1e6,
                     "values_differing": differ, "max_diff": diff})
        print(f"{name:<6} {t_mlx:8.3f} {t_ours:8.3f} {moved / t_mlx / 1e6:9.0f} "
              f"{moved / t_ours / 1e6:10.0f} {differ:8d} {diff:9.2e}", flush=True)
    out = {"benchmark": "dequant_kernel", "card": _gpu_name(), "mlx": mx.__version__,
           "date": datetime.date.today().isoformat(), "group_size": a.group_size, "rows": rows}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
