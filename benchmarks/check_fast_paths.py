"""Fast paths against the portable ones at the real 8x7B shapes (tests cover tiny shapes).

    python benchmarks/check_fast_paths.py [--layers 2] [--prompt-tokens 256]

Builds N layers of the synthetic 8x7B (4-bit, bf16 on a GPU, float32 on the
CPU) and prints, for a prefill of --prompt-tokens, the relative difference
of the logits: fused gate+up against separate projections, dense-expert
prefill against sorted gather_qmm, and mlx-hermes against mlx-lm's Mixtral.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import dense_prefill  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402
from mlx_hermes.moe import Experts  # noqa: E402
from mlx_hermes.specialize import FastPaths  # noqa: E402
from mlx_hermes.loader import quantize_like  # noqa: E402
from mlx_hermes.model import Model  # noqa: E402


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    args = ap.parse_args()
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    model = prof.synthetic_model("8x7b", args.layers, 4, dtype=dtype, fast_paths=FastPaths.none())
    plain = Model(model.args)
    weights = dict(tree_flatten(model.checkpoint_parameters()))
    weights = {k: mx.contiguous(v) for k, v in weights.items()}
    quantize_like(plain, weights, {})
    plain.load_weights(list(weights.items()))
    twin = prof.mlx_lm_twin(model, dtype)
    tokens = mx.array([np.random.default_rng(0).integers(3, 32000, args.prompt_tokens).tolist()])

    portable = plain(tokens)
    reference = twin(tokens)
    for layer in model.layers:  # the same experts, dense prefill or not
        experts = layer.block_sparse_moe.switch_mlp
        experts.__class__ = dense_prefill.DensePrefillExperts
        experts.min_pairs = dense_prefill.DENSE_PREFILL_MIN_TOKENS * 2
    dense = model(tokens)
    for layer in model.layers:
        layer.block_sparse_moe.switch_mlp.__class__ = Experts
    fused = model(tokens)
    logits = np.array(portable.astype(mx.float32))
    out = {"device": str(mx.default_device()), "dtype": str(dtype), "layers": args.layers,
           "prompt_tokens": args.prompt_tokens,
           "logits_std": float(logits.std()), "logits_finite": bool(np.isfinite(logits).all()),
           "logits_distinct_rows": int(len({row.tobytes() for row in logits[0]})),
           "fused_vs_separate": rel(fused, portable),
           "dense_prefill_vs_gather_qmm": rel(dense, portable),
           "mlx_hermes_vs_mlx_lm": rel(fused, reference),
           "top1_dense_vs_gather_qmm": float(np.mean(np.array(mx.argmax(dense, -1) ==
                                                              mx.argmax(portable, -1))))}
    for k, v in out.items():
        print(f"{k:<28} {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
