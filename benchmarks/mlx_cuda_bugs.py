"""One-op reproductions of the MLX CUDA bugs behind our GPU test skips
(benchmarks/mlx_cuda_bugs.md holds the write-ups made from this output).

    python benchmarks/mlx_cuda_bugs.py [--json F]

Each case is one MLX op on random data against a float64 numpy reference,
run on the default device (the GPU there; on a CPU every case is right, which
is the point of comparison). TF32 is switched off first, so float32 errors
above ~1e-5 are real. Prints expected vs actual per case, and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes.dense_prefill import dense_project  # noqa: E402


def quantized_matmul(K: int, group: int, rows: int, bits: int, dtype, rng, N: int = 64,
                     transpose: bool = True) -> dict:
    """x [rows, K] @ dequantize(w [N, K])^T through mx.quantized_matmul; with
    transpose=False, x [rows, N] @ dequantize(w [N, K]) (the quantized KV cache's
    scores @ values)."""
    w = mx.array(rng.normal(size=(N, K)).astype(np.float32) * 0.1)
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    s, b = s.astype(dtype), b.astype(dtype)
    ref_w = np.array(mx.dequantize(wq, s, b, group_size=group, bits=bits).astype(mx.float32),
                     dtype=np.float64)
    x = mx.array(rng.normal(size=(rows, K if transpose else N)).astype(np.float32)).astype(dtype)
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ (ref_w.T if transpose else ref_w)
    case = {"op": "quantized_matmul", "K": K, "N": N, "transpose": transpose,
            "group_size": group, "rows": rows, "bits": bits, "dtype": str(dtype).split(".")[-1]}
    try:
        out = mx.quantized_matmul(x, wq, s, b, transpose=transpose, group_size=group, bits=bits)
        out = np.array(out.astype(mx.float32), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - a missing kernel is the finding
        return {**case, "error": str(e)[:200]}
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    return {**case, "rel_error": err if err == err else float("inf")}


def kv_attention_scores(heads: int, kv_heads: int, L: int, S: int, D: int, bits: int,
                        group: int, rng) -> dict:
    """The quantized KV cache's scores as mlx-lm computes them
    (models/base.py, quantized_scaled_dot_product_attention): queries
    [1, K, H/K, L, D] against keys quantized [1, K, 1, S, D], batched."""
    q = mx.array(rng.normal(size=(1, kv_heads, heads // kv_heads, L, D)).astype(np.float32))
    k = mx.array(rng.normal(size=(1, kv_heads, S, D)).astype(np.float32))
    kq, s, b = mx.quantize(k, group_size=group, bits=bits)
    q, s, b = q.astype(mx.bfloat16), s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    k_ref = np.array(mx.dequantize(kq, s, b, group_size=group, bits=bits).astype(mx.float32),
                     dtype=np.float64)
    ref = np.array(q.astype(mx.float32), dtype=np.float64) @ np.swapaxes(k_ref, -1, -2)[:, :, None]
    case = {"op": "quantized_matmul batched (KV cache scores)", "heads": heads,
            "kv_heads": kv_heads, "L": L, "S": S, "D": D, "bits": bits, "group_size": group,
            "dtype": "bfloat16"}
    try:
        out = mx.quantized_matmul(q, *(mx.expand_dims(t, -3) for t in (kq, s, b)),
                                  transpose=True, group_size=group, bits=bits)
        out = np.array(out.astype(mx.float32), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - a missing kernel is the finding
        return {**case, "error": str(e)[:200]}
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    return {**case, "rel_error": err if err == err else float("inf")}


def sorted_gather_mm(D: int, F: int, E: int, tokens: int, dtype, rng) -> dict:
    """Float experts w [E, F, D] applied to tokens sorted by expert, mx.gather_mm."""
    w = rng.normal(size=(E, F, D)).astype(np.float32) * 0.2
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    idx = np.sort(rng.integers(0, E, size=tokens)).astype(np.uint32)
    xd = mx.array(x).astype(dtype)
    wd = mx.array(w).astype(dtype)
    ref = np.einsum("nd,nfd->nf", np.array(xd.astype(mx.float32), dtype=np.float64),
                    np.array(wd.astype(mx.float32), dtype=np.float64)[idx])
    case = {"op": "gather_mm sorted", "D": D, "F": F, "experts": E, "tokens": tokens,
            "dtype": str(dtype).split(".")[-1]}

    def error(sorted_indices: bool, layer: bool = False, on_device: bool = False) -> float:
        rhs = mx.array(idx)
        if on_device:  # the indices sorted by MLX, as the model sorts them
            rhs = mx.sort(mx.array(rng.permutation(idx)))
        if layer:  # the model's own call: mlx-lm's SwitchLinear on [P, 1, D] rows
            lin = SwitchLinear(D, F, E, bias=False)
            lin.weight = wd
            out = lin(xd[:, None, :], rhs, sorted_indices=sorted_indices)
        else:
            out = mx.gather_mm(xd[:, None, :], wd.swapaxes(-1, -2), rhs_indices=rhs,
                               sorted_indices=sorted_indices)
        out = np.array(out.astype(mx.float32), dtype=np.float64).reshape(tokens, F)
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        return err if err == err else float("inf")

    try:
        # the unsorted call and the model's layer beside it: which of them part from numpy?
        return {**case, "rel_error": error(True), "unsorted_rel_error": error(False),
                "switch_linear_sorted_rel_error": error(True, layer=True),
                "device_sorted_rel_error": error(True, on_device=True)}
    except Exception as e:  # noqa: BLE001 - a missing kernel is the finding
        return {**case, "error": str(e)[:200]}


def dense_prefill_gather(D: int, F: int, E: int, tokens: int, rng) -> dict:
    """Report 3's open question: our dense prefill makes the same sorted
    gather_mm call on experts dequantized from 4 bits (mlx_hermes.dense_prefill),
    and its test passes on the GPU. Here that call and the plain reproduction
    run on the same dequantized weights and inputs, against numpy: if the
    first is right and the second wrong, the difference is in how the
    inputs were made, not in the op's arguments."""
    layer = QuantizedSwitchLinear(D, F, E, bias=False, group_size=32, bits=4)
    layer.set_dtype(mx.float32)
    idx = np.sort(rng.integers(0, E, size=tokens)).astype(np.uint32)
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=4)
    ref = np.einsum("nd,nfd->nf", x.astype(np.float64),
                    np.array(w, dtype=np.float64)[idx])
    case = {"op": "gather_mm sorted, as the dense prefill calls it", "D": D, "F": F,
            "experts": E, "tokens": tokens, "dtype": "float32"}

    def error(out) -> float:
        out = np.array(out, dtype=np.float64).reshape(tokens, F)
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        return err if err == err else float("inf")

    h = mx.array(x)[:, None, :]
    try:
        return {**case, "rel_error": error(dense_project(layer, h, mx.array(idx))),
                "plain_call_same_weights_rel_error": error(mx.gather_mm(
                    h, w.swapaxes(-1, -2), rhs_indices=mx.array(idx), sorted_indices=True)),
                "plain_call_weights_from_numpy_rel_error": error(mx.gather_mm(
                    h, mx.array(np.array(w)).swapaxes(-1, -2), rhs_indices=mx.array(idx),
                    sorted_indices=True)),
                "gather_qmm_sorted_rel_error": error(layer(h, mx.array(idx),
                                                           sorted_indices=True))}
    except Exception as e:  # noqa: BLE001 - a missing kernel is the finding
        return {**case, "error": str(e)[:200]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--kv-only", action="store_true", help="only the quantized KV cache's cases")
    ap.add_argument("--gather-only", action="store_true", help="only report 3's cases")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"MLX {mx.__version__}, device {mx.default_device()}, "
          f"MLX_ENABLE_TF32={os.environ['MLX_ENABLE_TF32']}", flush=True)
    cases = []

    def run(case: dict) -> None:  # printed as it comes: each new shape compiles for seconds
        tol = 1e-1 if case["dtype"] == "bfloat16" else 1e-4  # a wrong result is O(1) off
        case["ok"] = "error" not in case and case["rel_error"] < tol
        what = case.get("error") or f"max rel error {case['rel_error']:.2e} (expected < {tol:g})"
        label = "ok      " if case["ok"] else "MISSING " if "error" in case else "WRONG   "
        print(label + " ".join(f"{k}={v}" for k, v in case.items()
                               if k not in ("error", "rel_error", "ok")) + f": {what}", flush=True)
        cases.append(case)

    # batched, as mlx-lm's quantized attention calls it: the tiny test model (4 heads over
    # 2, head dim 32) and the real one (32 over 8, head dim 128), a 10-token prompt and a
    # decode step, mlx-lm's default --kv-group-size 64 (32 where the head dim is 32)
    for heads, kv_heads, D in ((4, 2, 32), (32, 8, 128)) if not a.gather_only else ():
        for L, S in ((10, 10), (1, 11)):
            for bits in (4, 8):
                run(kv_attention_scores(heads, kv_heads, L, S, D, bits, min(64, D), rng))
    if a.kv_only:
        print(json.dumps({"mlx": mx.__version__, "cases": cases}))
        return
    for K, group in ((64, 64), (128, 128), (64, 32), (128, 64)) if not a.gather_only else ():
        for rows in (1, 5):
            for dtype in (mx.float32, mx.bfloat16):
                run(quantized_matmul(K, group, rows, 4, dtype, rng))
    # the quantized KV cache's attention: 8-bit keys of head dim 32 in groups of 32
    for rows in (1, 11) if not a.gather_only else ():
        run(quantized_matmul(32, 32, rows, 8, mx.float32, rng))
        run(quantized_matmul(64, 32, rows, 8, mx.float32, rng))
    # the same in bf16 (the GPU's dtype), at a tiny head dim (32) and the real one (128):
    # keys (transpose) and values, 4 and 8 bits, mlx-lm's KV groups of 64 and 32
    for K in (32, 128) if not a.gather_only else ():
        for bits in (4, 8):
            for group in (32, 64):
                for transpose in (True, False):
                    if group <= K:
                        run(quantized_matmul(K, group, 10, bits, mx.bfloat16, rng, N=10,
                                             transpose=transpose))
    for dtype in (mx.float32, mx.bfloat16):
        for D, F, E, tokens in ((64, 96, 4, 10), (64, 128, 8, 80), (128, 256, 8, 40),
                                (4096, 14336 // 8, 8, 80)):
            run(sorted_gather_mm(D, F, E, tokens, dtype, rng))
    for D, F, E, tokens in ((64, 96, 4, 10), (64, 128, 8, 80)):
        run(dense_prefill_gather(D, F, E, tokens, rng))
    out = {"mlx": mx.__version__, "device": str(mx.default_device()), "cases": cases}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
