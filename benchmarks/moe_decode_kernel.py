"""A fused top-k 4-bit gather matrix-vector kernel (CUDA, `mx.fast.cuda_kernel`)
against MLX's `gather_qmm` for one decode token's MoE, 8x7B shapes.

    python benchmarks/moe_decode_kernel.py [--layers 32] [--trials 20]

Checks the kernel against gather_qmm on random weights, then times the expert
work of one token through all layers (gate+up, SwiGLU, down, for the 2 chosen
experts) both ways and prints a table, the GB/s each reaches, and JSON.
CUDA only; the kernel is mlx_hermes/cuda_qmv.py's.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import mlx.core as mx

from mlx_hermes import cuda_qmv


def gather_qmv(x, w, scales, biases, idx, group_size):
    layer = SimpleNamespace(weight=w, scales=scales, biases=biases, group_size=group_size)
    return cuda_qmv.gather_qmv(x, layer, idx)


def random_experts(E: int, N: int, K: int, gs: int) -> tuple:
    w = mx.random.randint(0, 2**31, (E, N, K // 8)).astype(mx.uint32)
    scales = (mx.random.uniform(shape=(E, N, K // gs)) * 0.02).astype(mx.bfloat16)
    biases = (mx.random.uniform(shape=(E, N, K // gs)) * -0.1).astype(mx.bfloat16)
    return w, scales, biases


def reference(x, w, s, b, idx, gs):
    """MLX's own: gather_qmm, as the model's decode path runs it."""
    out = mx.gather_qmm(x[:, None, None, :] if x.shape[0] > 1 else x[None, None, :],
                        w, s, b, rhs_indices=idx[:, None] if x.shape[0] > 1 else idx[None, :],
                        transpose=True, group_size=gs, bits=4)
    return out.reshape(idx.shape[0], -1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--trials", type=int, default=20)
    a = p.parse_args()
    D, F, E, gs = 4096, 14336, 8, 64

    # correctness, one layer
    w1, s1, b1 = random_experts(E, 2 * F, D, gs)
    w2, s2, b2 = random_experts(E, D, F, gs)
    x = (mx.random.normal((1, D)) * 0.5).astype(mx.bfloat16)
    idx = mx.array([3, 6], dtype=mx.uint32)
    ours = gather_qmv(mx.broadcast_to(x, (2, D)), w1, s1, b1, idx, gs)
    theirs = reference(mx.broadcast_to(x, (2, D)), w1, s1, b1, idx, gs).astype(mx.float32)
    err1 = (mx.abs(ours - theirs).max() / mx.abs(theirs).max()).item()
    h = (mx.random.normal((2, F)) * 0.5).astype(mx.bfloat16)
    ours = gather_qmv(h, w2, s2, b2, idx, gs)
    theirs = reference(h, w2, s2, b2, idx, gs).astype(mx.float32)
    err2 = (mx.abs(ours - theirs).max() / mx.abs(theirs).max()).item()
    print(f"max rel error vs gather_qmm: gate_up {err1:.2e}, down {err2:.2e}", flush=True)

    layers = [(random_experts(E, 2 * F, D, gs), random_experts(E, D, F, gs))
              for _ in range(a.layers)]
    mx.eval(layers)
    per_layer = 2 * (2 * F * D + D * F) // 2 + 2 * 2 * 2 * (2 * F * D + D * F) // gs
    total = per_layer * a.layers

    def token(path):
        y = x
        for (gu, dn) in layers:
            xs = mx.broadcast_to(y, (2, D))
            if path == "kernel":
                g = gather_qmv(xs, *gu, idx, gs)
            else:
                g = reference(xs, *gu, idx, gs).astype(mx.float32)
            gate, up = mx.split(g, 2, axis=-1)
            hh = (gate * mx.sigmoid(gate) * up).astype(mx.bfloat16)
            if path == "kernel":
                o = gather_qmv(hh, *dn, idx, gs)
            else:
                o = reference(hh, *dn, idx, gs).astype(mx.float32)
            y = (o.sum(axis=0, keepdims=True) * 0.01).astype(mx.bfloat16)
        mx.eval(y)

    results = {}
    variants = [("gather_qmm", None)] + [(f"kernel R{r} B{b}", (r, b)) for r, b in
                                          ((4, 128), (8, 128), (2, 128), (4, 256), (8, 256))]
    for _ in range(2):
        for name, v in variants:
            if v:
                cuda_qmv.ROWS, cuda_qmv.BLOCK = v
            path = "kernel" if v else "gather_qmm"
            token(path)
            start = time.perf_counter()
            for _ in range(a.trials):
                token(path)
            ms = (time.perf_counter() - start) / a.trials * 1e3
            results[name] = min(ms, results.get(name, 1e9))
    best = min((k for k in results if k != "gather_qmm"), key=results.get)
    results["kernel"] = results[best]
    print("best:", best)
    print(f"{'path':<11} {'ms/token (experts, all layers)':>31} {'GB/s':>7}")
    for path, ms in results.items():
        print(f"{path:<11} {ms:>31.2f} {total / ms / 1e6:>7.0f}")
    speedup = results["gather_qmm"] / results["kernel"]
    print(f"kernel speedup: {speedup:.2f}x")
    print(json.dumps({"layers": a.layers, "bytes_per_token": total, "ms": results,
                      "speedup": speedup, "rel_error": [err1, err2],
                      "device": mx.device_info().get("device_name")}))


if __name__ == "__main__":
    main()
