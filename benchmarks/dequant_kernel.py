"""The dense prefill's dequantization on CUDA: MLX's `dequantize` against
our one-pass kernel (dense_prefill.DEQUANT_ROWS), on one layer's 8x7B
experts (4-bit), and one layer's dense prefill with each.

    python benchmarks/dequant_kernel.py [--group-size 64] [--trials 10] [--tokens 512,2048] [--json F]

Why: a 512-token prompt's dense prefill (dense_prefill.py) makes each layer's
float experts with `mx.dequantize`, ~7 ms a layer on an H200 (issue 18),
where reading 0.8 GB of codes and writing 2.8 GB of bf16 takes ~1.2 ms at
3 TB/s. If a kernel that streams at bandwidth gets close, dense_project can
use it (it dequantizes a projection's rows a slice at a time: gate and up
are the two halves of gate_up_proj, so the kernel takes a row range of every
expert without a copy).

For gate (rows 0..F of gate_up), up (F..2F) and down: ms a call (`--trials`
calls queued, best of 3), GB/s of bytes read and written, and how many of
the kernel's values differ from MLX's and by how much. Then for each of
`--tokens` (a prompt's tokens, top-2: twice as many sorted pairs): the
layer's experts (`DensePrefillExperts.sorted_mlp`) with MLX's dequantize and
with the kernel, and the three gathered matmuls alone on float experts made
beforehand (what no dequantizer can save). CUDA only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grouped_kernel import _gpu_name, timed  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402
from mlx_hermes.dense_prefill import DensePrefillExperts, kernel_rows as dequantize_rows, \
    mlx_rows  # noqa: E402
from mlx_hermes.specialize import install  # noqa: E402

def layer_prefill(experts, D: int, token_counts: list[int]) -> list[dict]:
    """One layer's dense prefill (ms, best of 3) with MLX's dequantize and with
    the kernel, and its gathered matmuls alone."""
    install(experts, DensePrefillExperts).min_pairs = 1
    E = experts.gate_up_proj.weight.shape[0]
    F = experts.gate_up_proj.weight.shape[1] // 2
    floats = {name: mlx_rows(layer, 0, layer.weight.shape[1])
              for name, layer in experts.children().items()}
    mx.eval(floats)
    rows = []
    print(f"{'tokens':>6} {'MLX deq ms':>11} {'kernel ms':>10} {'matmuls ms':>11} {'saved':>6}")
    for T in token_counts:
        x = (mx.random.normal((2 * T, 1, D)) * 0.5).astype(mx.bfloat16)
        indices = mx.sort(mx.random.randint(0, E, (2 * T,))).astype(mx.uint32)
        mx.eval(x, indices)

        def run(kernels: bool):
            experts.kernel_projections = frozenset()
            if kernels:
                experts.use_kernels(gemm=False)
            return experts.sorted_mlp(x, indices)

        def matmuls():
            w = floats["gate_up_proj"]
            h = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=True)
            h = nn.silu(h[..., :F]) * h[..., F:]
            return mx.gather_mm(h, floats["down_proj"].swapaxes(-1, -2), rhs_indices=indices,
                                sorted_indices=True)

        same = mx.abs(run(False).astype(mx.float32) - run(True).astype(mx.float32)).max().item()
        t_mlx, t_kernel, t_mm = (timed(lambda: run(False), 1), timed(lambda: run(True), 1),
                                 timed(matmuls, 1))
        rows.append({"tokens": T, "mlx_dequantize_ms": t_mlx, "kernel_ms": t_kernel,
                     "matmuls_only_ms": t_mm, "max_diff": same})
        print(f"{T:6d} {t_mlx:11.2f} {t_kernel:10.2f} {t_mm:11.2f} {1 - t_kernel / t_mlx:6.0%}"
              f"  (max diff {same:.1e})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--tokens", default="512,2048")
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

    prefill = layer_prefill(experts, model.args.hidden_size, [int(t) for t in a.tokens.split(",")])
    out = {"benchmark": "dequant_kernel", "card": _gpu_name(), "mlx": mx.__version__,
           "date": datetime.date.today().isoformat(), "group_size": a.group_size, "rows": rows,
           "prefill": prefill}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
