"""The batched-decode CUDA kernels against MLX's ops over many seeds: the
grouped MoE kernels, the dense 4-bit linear kernel (split over warps) and
the batch-cache attention kernel, each at random sizes, in one process.

    python benchmarks/batch_kernel_seeds.py [--seeds 50] [--json F]

Per seed: a random step size (2 to MAX_TOKENS tokens or rows), random
routing (float32 router logits, so no ties), random left padding; the 8x7B
widths for the linear layer and attention, a smaller MoE block (the
kernels' code paths are the same). Records each kernel's error relative to
the largest reference value and fails a seed above 2e-2 (the tests'
tolerance). The kernels stay on by default only with every seed clean.
Prints a summary and JSON. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import cuda_attention, cuda_grouped  # noqa: E402
from mlx_hermes.moe import SparseMoeBlock, _route  # noqa: E402

TOLERANCE = 2e-2


def rel_error(got: mx.array, want: mx.array) -> float:
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    return (mx.abs(got - want).max() / mx.maximum(mx.abs(want).max(), 1e-6)).item()


def moe_case(rng: random.Random) -> dict:
    tokens = rng.randint(2, cuda_grouped.MAX_TOKENS)
    block = SparseMoeBlock(512, 1024, 8, 2)  # 4-bit experts, gate and up fused, as loaded
    nn.quantize(block.switch_mlp, group_size=64, bits=4)
    block.set_dtype(mx.bfloat16)
    block.switch_mlp.fuse()
    x = (mx.random.normal((tokens, 1, 512)) * 0.5).astype(mx.bfloat16)
    logits = mx.random.normal((tokens, 1, 8))
    indices, weights = _route(logits, 2)
    want = (block.switch_mlp(x, indices) * weights[..., None].astype(x.dtype)).sum(-2)
    got = cuda_grouped.moe(x, block.switch_mlp, logits, 2)
    return {"tokens": tokens, "error": rel_error(got, want)}


def linear_case(rng: random.Random, layer: nn.QuantizedLinear) -> dict:
    rows = rng.randint(cuda_grouped.LINEAR_MIN_ROWS, cuda_grouped.MAX_TOKENS)
    x = (mx.random.normal((rows, 1, layer.weight.shape[1] * 8)) * 0.5).astype(mx.bfloat16)
    want = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                               group_size=layer.group_size, bits=layer.bits)
    return {"rows": rows, "error": rel_error(cuda_grouped.linear(x, layer), want)}


def attention_case(rng: random.Random) -> dict:
    B, S = rng.randint(2, 32), rng.randint(2, 600)
    padding = [rng.randint(0, S - 1) for _ in range(B)]
    cache = BatchKVCache(padding)
    shape = (B, 8, S - 1, 128)
    cache.update_and_fetch(*(mx.random.normal(shape).astype(mx.bfloat16) for _ in range(2)))
    mask = create_attention_mask(mx.zeros((B, 1, 8)), cache)
    q = mx.random.normal((B, 32, 1, 128)).astype(mx.bfloat16)
    new = (B, 8, 1, 128)
    k, v = cache.update_and_fetch(*(mx.random.normal(new).astype(mx.bfloat16) for _ in range(2)))
    want = mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale=128**-0.5,
        mask=mask)
    got = cuda_attention.attend(q, k, v, cache.left_padding)
    return {"rows": B, "positions": S, "error": rel_error(got, want)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not (mx.cuda.is_available() and mx.default_device() == mx.gpu):
        sys.exit("batch_kernel_seeds.py needs MLX's CUDA build on a GPU")
    layer = nn.QuantizedLinear(4096, 6144, bias=False, group_size=64, bits=4)  # q/k/v
    layer.set_dtype(mx.bfloat16)
    results = []
    for seed in range(a.seeds):
        mx.random.seed(seed)
        rng = random.Random(seed)
        row = {"seed": seed, "moe": moe_case(rng), "linear": linear_case(rng, layer),
               "attention": attention_case(rng)}
        row["clean"] = all(row[k]["error"] <= TOLERANCE for k in ("moe", "linear", "attention"))
        results.append(row)
        print(f"seed {seed}: moe {row['moe']['error']:.2e} ({row['moe']['tokens']} tokens), "
              f"linear {row['linear']['error']:.2e} ({row['linear']['rows']} rows), "
              f"attention {row['attention']['error']:.2e} ({row['attention']['rows']} rows x "
              f"{row['attention']['positions']})" + ("" if row["clean"] else "  FAILED"),
              flush=True)
    worst = {k: max(r[k]["error"] for r in results) for k in ("moe", "linear", "attention")}
    clean = sum(r["clean"] for r in results)
    print(f"{clean} of {len(results)} seeds clean; worst errors: " +
          ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    out = {"seeds": len(results), "clean": clean, "worst": worst, "tolerance": TOLERANCE,
           "results": results}
    print(json.dumps({k: out[k] for k in ("seeds", "clean", "worst", "tolerance")}))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    sys.exit(0 if clean == len(results) else 1)


if __name__ == "__main__":
    main()
