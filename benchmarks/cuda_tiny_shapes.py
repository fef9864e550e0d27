"""MLX's quantized and gathered matmuls on the tiny shapes the tests use, against numpy.

    python benchmarks/cuda_tiny_shapes.py

Some model tests fail on MLX's CUDA build and pass on the CPU; this finds
which op, dtype, weight layout and dispatch (sorted or not) is wrong, with
no model code involved: each case is one `mx.gather_mm` / `mx.gather_qmm` /
`mx.quantized_matmul` on random data, its relative max error against a
float64 numpy reference.
Prints the failing cases, a count, and JSON. Run it also with
MLX_ENABLE_TF32=0: the model tests run that way (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import json

import mlx.core as mx
import numpy as np


def case(D, F, E, n, dtype, quant, layout, sort, rng):
    k = 2
    w = mx.array(rng.normal(size=(E, 2 * F, D)).astype(np.float32) * 0.2)
    if quant:
        wq, s, b = mx.quantize(w, group_size=quant, bits=4)
        s, b = s.astype(dtype), b.astype(dtype)
        w = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=quant,
                          bits=4)  # the values computed with
    rows = slice(0, F) if layout != "fused" else slice(None)
    ref_w = np.array(w.astype(mx.float32), dtype=np.float64)[:, rows]

    def weights(a):  # the gate half as a strided view, or copied, or the fused whole
        a = a[:, rows]
        return mx.contiguous(a) if layout == "half copied" else a

    x = rng.normal(size=(n, D)).astype(np.float32)
    idx = rng.integers(0, E, size=(n, k)).astype(np.uint32)
    xd = mx.array(x).astype(dtype)
    ref_x = np.array(xd.astype(mx.float32), dtype=np.float64)
    ref = np.einsum("nd,nkfd->nkf", ref_x, ref_w[idx])  # [n, k, out]
    if sort:
        flat = idx.reshape(-1)
        order = np.argsort(flat, kind="stable")
        lhs = mx.array(np.repeat(x, k, axis=0)[order][:, None, :]).astype(dtype)  # [n*k, 1, D]
        ri = mx.array(flat[order])
    else:
        lhs = mx.expand_dims(xd, (-2, -3))  # [n, 1, 1, D]
        ri = mx.array(idx)
    try:
        if quant:
            out = mx.gather_qmm(lhs, weights(wq), weights(s), weights(b), rhs_indices=ri,
                                transpose=True, group_size=quant, bits=4, sorted_indices=sort)
        else:
            out = mx.gather_mm(lhs, weights(w.astype(dtype)).swapaxes(-1, -2), rhs_indices=ri,
                               sorted_indices=sort)
        out = np.array(out.astype(mx.float32), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - a missing kernel is a result here
        return str(e)[:80]
    if sort:
        got = np.empty_like(ref).reshape(n * k, -1)
        got[order] = out.reshape(n * k, -1)
        out = got.reshape(ref.shape)
    return float(np.abs(out.reshape(ref.shape) - ref).max() / np.abs(ref).max())


def dense_case(K, group, m, dtype, rng):
    """One `quantized_matmul` (a Linear layer's), [m, K] x [128, K]^T."""
    w = mx.array(rng.normal(size=(128, K)).astype(np.float32) * 0.1)
    wq, s, b = mx.quantize(w, group_size=group, bits=4)
    s, b = s.astype(dtype), b.astype(dtype)
    ref_w = np.array(mx.dequantize(wq, s, b, group_size=group, bits=4).astype(mx.float32),
                     dtype=np.float64)
    x = mx.array(rng.normal(size=(m, K)).astype(np.float32)).astype(dtype)
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ ref_w.T
    try:
        out = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group, bits=4)
        out = np.array(out.astype(mx.float32), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - a missing kernel is a result here
        return str(e)[:80]
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    return err if err == err else float("inf")  # NaN: wrong


def main() -> None:
    rng = np.random.default_rng(0)
    results, bad = [], []

    def record(row: dict) -> None:
        # bf16 sums; float32 may run as TF32: both far below a wrong result
        tol = 5e-2 if row["dtype"] == "bfloat16" else 2e-3
        results.append(row)
        if not (isinstance(row["rel_err"], float) and row["rel_err"] < tol):
            print("FAIL " + " ".join(f"{k}={v}" for k, v in row.items()))
            bad.append(row)

    for (D, F, E), n, dtype, quant, layout, sort in itertools.product(
            [(64, 96, 4), (64, 128, 8)], [5, 40], [mx.float32, mx.bfloat16], [None, 32, 64],
            ["fused", "half view", "half copied"], [False, True]):
        if quant and F % quant:
            continue
        record({"D": D, "F": F, "E": E, "tokens": n, "dtype": str(dtype).split(".")[-1],
                "weights": f"q4 g{quant}" if quant else "float", "layout": layout,
                "sorted": sort, "rel_err": case(D, F, E, n, dtype, quant, layout, sort, rng)})
    for K, group, m, dtype in itertools.product([64, 128, 256], [32, 64, 128], [1, 5, 14],
                                                [mx.float32, mx.bfloat16]):
        if K % group:
            continue
        record({"op": "quantized_matmul", "K": K, "group": group, "rows": m,
                "dtype": str(dtype).split(".")[-1], "rel_err": dense_case(K, group, m, dtype, rng)})
    print(f"{len(bad)} of {len(results)} cases wrong or missing")
    print(json.dumps({"device": str(mx.default_device()), "failing": bad}))


if __name__ == "__main__":
    main()
