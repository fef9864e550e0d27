"""The MoE blocks of one decode token, 8x7B shapes, 4-bit: mlx_hermes/cuda_qmv.py's
two fused kernels against MLX's own ops (gather_qmm), on the same random weights.

    python benchmarks/moe_decode_kernel.py [--layers 32] [--trials 20]

Checks the kernels' output against MLX's ops, then times the MoE blocks of
all layers for one token (router, gate+up, SwiGLU, down, weighted sum) both
ways and prints a table, the GB/s of expert weights each reaches, and JSON.
CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import cuda_qmv  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--trials", type=int, default=20)
    a = p.parse_args()
    model = prof.synthetic_model("8x7b", a.layers, 4, dtype=mx.bfloat16)
    blocks = [layer.block_sparse_moe for layer in model.layers]
    D = model.args.hidden_size
    x = (mx.random.normal((1, 1, D)) * 0.5).astype(mx.bfloat16)
    expert_bytes = sum(p.nbytes for b in blocks for _, p in
                       tree_flatten(b.switch_mlp.parameters()))
    per_token = expert_bytes * model.args.num_experts_per_tok // model.args.num_local_experts

    outs = {}
    for enabled in (False, True):
        cuda_qmv.ENABLED = enabled
        outs[enabled] = blocks[0](x).astype(mx.float32)
    err = (mx.abs(outs[True] - outs[False]).max() / mx.abs(outs[False]).max()).item()
    print(f"max rel error vs MLX's ops: {err:.2e}", flush=True)

    def token():
        y = x
        for b in blocks:
            y = (b(y) * 0.1).astype(mx.bfloat16)
        mx.eval(y)

    results = {}
    for _ in range(3):
        for name, enabled in (("gather_qmm", False), ("kernels", True)):
            cuda_qmv.ENABLED = enabled
            token()
            start = time.perf_counter()
            for _ in range(a.trials):
                token()
            ms = (time.perf_counter() - start) / a.trials * 1e3
            results[name] = min(ms, results.get(name, 1e9))
    cuda_qmv.ENABLED = True
    print(f"{'path':<11} {'ms/token (MoE blocks, all layers)':>34} {'GB/s':>7}")
    for path, ms in results.items():
        print(f"{path:<11} {ms:>34.2f} {per_token / ms / 1e6:>7.0f}")
    speedup = results["gather_qmm"] / results["kernels"]
    print(f"kernels speedup: {speedup:.2f}x")
    print(json.dumps({"layers": a.layers, "expert_bytes_per_token": per_token, "ms": results,
                      "speedup": speedup, "rel_error": err,
                      "device": mx.device_info().get("device_name")}))


if __name__ == "__main__":
    main()
