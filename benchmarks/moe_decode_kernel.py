"""The MoE blocks of one decode token, 8x7B shapes, 4-bit: mlx_hermes/cuda_qmv.py's
two fused kernels against MLX's own ops (gather_qmm), on the same random weights.

    python benchmarks/moe_decode_kernel.py [--layers 32] [--trials 20] [--sweep]

Checks the kernels' output against MLX's ops, then times the MoE blocks of
all layers for one token (router, gate+up, SwiGLU, down, weighted sum) both
ways and prints a table, the GB/s of expert weights each reaches, and JSON.
--sweep also times the two kernels alone (queued back to back, so host work
hides behind them) for several rows-per-warp settings, and the previous
int-to-float dequantization as the before. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import cuda_qmv  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402


# The kernels' dequantization before the 1 + q/16 trick: an int-to-float conversion per code.
I2F_DOT = r"""
__device__ __forceinline__ float dot32(uint4 q, const float* xf, float xs) {
    unsigned int qs[4] = {q.x, q.y, q.z, q.w};
    float d = 0.f;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        #pragma unroll
        for (int j = 0; j < 8; j++) d += float((qs[i] >> (4 * j)) & 0xFu) * xf[i * 8 + j];
    }
    return d;
}
"""


def kernels_alone(blocks, x, trials: int) -> float:
    """ms for all blocks' two kernels, `trials` tokens queued before one eval."""
    logits = [b.gate(x) for b in blocks]
    mx.eval(logits)

    def run(n):
        outs = [cuda_qmv.moe(x, b.switch_mlp, g, b.top_k)
                for _ in range(n) for b, g in zip(blocks, logits)]
        mx.eval(outs)

    run(1)
    start = time.perf_counter()
    run(trials)
    return (time.perf_counter() - start) / trials * 1e3


def sweep(blocks, x, trials: int, per_token: int, reference: mx.array) -> list[dict]:
    header = cuda_qmv.HEADER
    i2f = re.sub(r"// sum q_j x_j.*?\n}\n", I2F_DOT.strip() + "\n",
                 header, flags=re.S)
    rows = []
    settings = [("i2f", 2, 2)] + [("1+q/16", g, d) for g, d in
                                   ((2, 2), (4, 2), (4, 4), (8, 2), (8, 4), (2, 1), (4, 1))]
    for dot, gate_up_rows, down_rows in settings:
        cuda_qmv.HEADER = i2f if dot == "i2f" else header
        cuda_qmv._kernels.clear()
        cuda_qmv.GATE_UP_ROWS, cuda_qmv.DOWN_ROWS = gate_up_rows, down_rows
        out = blocks[0](x).astype(mx.float32)
        err = (mx.abs(out - reference).max() / mx.abs(reference).max()).item()
        ms = min(kernels_alone(blocks, x, trials) for _ in range(3))
        rows.append({"dequant": dot, "gate_up_rows": gate_up_rows, "down_rows": down_rows,
                     "ms": ms, "gb_s": per_token / ms / 1e6, "rel_error": err})
        print(f"{dot:<7} {gate_up_rows:>12} {down_rows:>9} {ms:>8.2f} {rows[-1]['gb_s']:>7.0f}"
              f" {err:>9.1e}", flush=True)
    cuda_qmv.HEADER = header
    cuda_qmv._kernels.clear()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args()
    defaults = cuda_qmv.GATE_UP_ROWS, cuda_qmv.DOWN_ROWS
    model = prof.synthetic_model("8x7b", a.layers, 4, dtype=mx.bfloat16)
    blocks = [layer.block_sparse_moe for layer in model.layers]
    D = model.args.hidden_size
    x = (mx.random.normal((1, 1, D)) * 0.5).astype(mx.bfloat16)
    expert_bytes = sum(p.nbytes for b in blocks for _, p in
                       tree_flatten(b.switch_mlp.parameters()))
    per_token = expert_bytes * model.args.num_experts_per_tok // model.args.num_local_experts

    outs = {}
    for enabled in (False, True):
        outs[enabled] = cuda_qmv.with_kernels(blocks[0], enabled)(x).astype(mx.float32)
    err = (mx.abs(outs[True] - outs[False]).max() / mx.abs(outs[False]).max()).item()
    print(f"max rel error vs MLX's ops: {err:.2e}", flush=True)
    swept = []
    if a.sweep:
        print("the two kernels alone, all layers, one token:")
        print(f"{'dequant':<7} {'gate_up rows':>12} {'down rows':>9} {'ms':>8} {'GB/s':>7}"
              f" {'rel error':>9}")
        swept = sweep(blocks, x, a.trials, per_token, outs[False])
        cuda_qmv.GATE_UP_ROWS, cuda_qmv.DOWN_ROWS = defaults

    def token():
        y = x
        for b in blocks:
            y = (b(y) * 0.1).astype(mx.bfloat16)
        mx.eval(y)

    results = {}
    for _ in range(3):
        for name, enabled in (("gather_qmm", False), ("kernels", True)):
            for b in blocks:
                cuda_qmv.with_kernels(b, enabled)
            token()
            start = time.perf_counter()
            for _ in range(a.trials):
                token()
            ms = (time.perf_counter() - start) / a.trials * 1e3
            results[name] = min(ms, results.get(name, 1e9))
    print(f"{'path':<11} {'ms/token (MoE blocks, all layers)':>34} {'GB/s':>7}")
    for path, ms in results.items():
        print(f"{path:<11} {ms:>34.2f} {per_token / ms / 1e6:>7.0f}")
    speedup = results["gather_qmm"] / results["kernels"]
    print(f"kernels speedup: {speedup:.2f}x")
    print(json.dumps({"layers": a.layers, "expert_bytes_per_token": per_token, "ms": results,
                      "speedup": speedup, "rel_error": err, "sweep": swept,
                      "device": mx.device_info().get("device_name")}))


if __name__ == "__main__":
    main()
