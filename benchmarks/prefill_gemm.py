"""A prompt's 4-bit matrix products on CUDA: our tensor-core kernel
(cuda_prefill.GEMM) against what runs without it, on one layer of 8x7B
shapes (random 4-bit weights).

    python benchmarks/prefill_gemm.py [--tokens 512,2048] [--rounds 5] [--group-size 64] [--json F]

For each prompt length (top-2: twice as many sorted token-expert pairs):
- experts: one layer's experts (gate/up, SwiGLU, down) through float
  experts (MLX's dequantize, then its sorted gather_mm: what formats the
  kernel does not take run) and by the GEMM kernel;
- linear: attention's q/k/v (fused, 4096 -> 6144) and o (4096 -> 4096) by
  MLX's quantized_matmul and by the kernel (one matrix).
Each is timed as ms a call (10 calls queued), in alternating rounds; the
table gives medians and TFLOP/s, and the largest difference from the
reference (MLX's dequantize + matmul) relative to its largest value. CUDA only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grouped_kernel import _gpu_name, two_layers  # noqa: E402
from mlx_hermes import cuda_prefill  # noqa: E402
from mlx_hermes.dense_prefill import DensePrefillExperts  # noqa: E402
from mlx_hermes.specialize import install  # noqa: E402

CALLS = 10


def once(fn) -> float:
    start = time.perf_counter()
    mx.eval([fn() for _ in range(CALLS)])
    return (time.perf_counter() - start) / CALLS * 1e3


def rel_diff(got: mx.array, want: mx.array) -> float:
    want = want.astype(mx.float32)
    return (mx.abs(got.astype(mx.float32) - want).max() / mx.abs(want).max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    model = two_layers(a.group_size)
    layer = model.layers[0]
    experts = install(layer.block_sparse_moe.switch_mlp, DensePrefillExperts)
    experts.min_pairs = 1
    E = experts.gate_up_proj.weight.shape[0]
    D = model.args.hidden_size
    F = experts.gate_up_proj.weight.shape[1] // 2
    attn = layer.self_attn
    qkv, o = attn.qkv_proj if "qkv_proj" in attn else attn.q_proj, attn.o_proj

    def dequantized(q):
        return mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits)

    results = []
    for T in [int(t) for t in a.tokens.split(",")]:
        P = 2 * T
        x = (mx.random.normal((P, 1, D)) * 0.5).astype(mx.bfloat16)
        indices = mx.sort(mx.random.randint(0, E, (P,))).astype(mx.uint32)
        xt = (mx.random.normal((T, D)) * 0.5).astype(mx.bfloat16)
        mx.eval(x, indices, xt)
        flops_experts = 2 * P * (2 * F * D + F * D)

        def dense():
            experts.gemm_projections = frozenset()
            return experts.sorted_mlp(x, indices)

        def gemm():
            g, u = mx.split(cuda_prefill.grouped_matmul(x, experts.gate_up_proj, indices), 2, -1)
            return cuda_prefill.grouped_matmul(nn.silu(g) * u, experts.down_proj, indices)

        cases = {"experts float (dequantize + gather_mm)": (dense, flops_experts),
                 "experts gemm": (gemm, flops_experts)}
        for name, lin in (("qkv", qkv), ("o", o)):
            flops = 2 * T * lin.weight.shape[0] * D
            cases[f"{name} quantized_matmul"] = (lambda lin=lin: nn.QuantizedLinear.__call__(lin, xt),
                                                 flops)
            cases[f"{name} gemm"] = (lambda lin=lin: cuda_prefill.matmul(xt, lin), flops)

        # references: MLX's dequantize and matmuls
        wgu, wd = dequantized(experts.gate_up_proj), dequantized(experts.down_proj)
        h = mx.gather_mm(x, wgu.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=True)
        want_gu = h
        g, u = mx.split(h, 2, -1)
        want_experts = mx.gather_mm(nn.silu(g) * u, wd.swapaxes(-1, -2), rhs_indices=indices,
                                    sorted_indices=True)
        got_gu = cuda_prefill.grouped_matmul(x, experts.gate_up_proj, indices)
        diffs = {"experts gemm": max(rel_diff(got_gu, want_gu), rel_diff(gemm(), want_experts))}
        for name, lin in (("qkv", qkv), ("o", o)):
            diffs[f"{name} gemm"] = rel_diff(cuda_prefill.matmul(xt, lin), xt @ dequantized(lin).T)
        diffs["experts float (dequantize + gather_mm)"] = rel_diff(dense(), want_experts)
        del wgu, wd, h, want_gu, want_experts
        mx.clear_cache()

        times = {name: [] for name in cases}
        for fn, _ in cases.values():
            mx.eval(fn())
        for _ in range(a.rounds):
            for name, (fn, _) in cases.items():
                times[name].append(once(fn))
        print(f"\n{T} tokens ({P} expert pairs), {a.rounds} alternating rounds, {_gpu_name()}")
        print(f"{'case':<40} {'median ms':>10} {'min':>7} {'max':>7} {'TFLOP/s':>8} {'rel diff':>9}")
        for name, (fn, flops) in cases.items():
            med = statistics.median(times[name])
            d = diffs.get(name)
            print(f"{name:<40} {med:10.3f} {min(times[name]):7.3f} {max(times[name]):7.3f} "
                  f"{flops / med / 1e9:8.1f} {'' if d is None else f'{d:9.1e}'}", flush=True)
            results.append({"tokens": T, "case": name, "median_ms": med, "ms": times[name],
                            "tflops": flops / med / 1e9, "rel_diff": d})
    out = {"benchmark": "prefill_gemm", "card": _gpu_name(), "mlx": mx.__version__,
           "date": datetime.date.today().isoformat(), "group_size": a.group_size,
           "rounds": a.rounds, "results": results}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
