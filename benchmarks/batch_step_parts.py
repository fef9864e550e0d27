"""Where one batched decode step's time goes: the model's parts for N rows
against one row, 8x7B shapes, random 4-bit weights, this machine's fast paths.

    python benchmarks/batch_step_parts.py [--streams 32] [--context 256] [--trials 20]

Times (ms per call; each 4-bit linear layer also through MLX's
quantized_matmul and through cuda_grouped.linear, with the kernel's error; `--trials` calls queued before one eval, best of 3, so
host work hides behind the device): one layer's attention projections and
attention over a left-padded batch cache, its MoE block, the LM head; the
attention in pieces (norm, RoPE, mask, SDPA with and without a mask, the
module, a whole decoder layer); then
a whole model step for N rows evaluated each step, as a decode loop runs
it, the host's time to build that step's graph and to dispatch it (until
async_eval returns), and the MLX ops in it. The whole step against the sum of
its parts shows the host's share.
Prints a table and JSON.

Repeated calls of one layer keep its dense weights in L2 (tens of MB), where a
real step reads every layer's from memory: dense layers time faster here than
in a step. benchmarks/gpu_timeline.py times each kernel of real steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_hermes import cuda_grouped  # noqa: E402
from decode_overhead import count_ops  # noqa: E402
from grouped_kernel import timed  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def ops_per_step(model, tok: mx.array, cache: list) -> float:
    """MLX primitives in one step's graph: what the host builds and
    dispatches each step. The step is undone (trim) afterwards."""
    ops = count_ops(model(tok, cache=cache))
    for c in cache:
        c.trim(1)
    return float(ops)


def attention_parts(model, x: mx.array, cache: list, trials: int) -> dict:
    """One layer's attention in pieces, for rows of `x` [N, 1, D] over `cache`
    (each timed call is undone with trim(1), so the context stays put)."""
    layer = model.layers[0]
    att, c = layer.self_attn, cache[0]
    n = x.shape[0]
    mask = create_attention_mask(x, c)
    q = mx.random.normal((n, att.n_heads, 1, att.head_dim)).astype(x.dtype)
    # the mask covers the cache and the new token
    kv_shape = (n, att.n_kv_heads, c.offset.max().item() + 1, att.head_dim)
    k, v = (mx.random.normal(kv_shape).astype(x.dtype) for _ in range(2))
    mx.eval(q, k, v, mask if isinstance(mask, mx.array) else q)
    additive = None
    if isinstance(mask, mx.array):
        additive = mx.where(mask, mx.array(0, x.dtype), mx.array(-mx.inf, x.dtype))
        mx.eval(additive)

    def sdpa(m):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=att.scale, mask=m)

    def undo(out):
        c.trim(1)  # only layer 0's cache was written
        return out

    part = {
        "rms_norm": timed(lambda: layer.input_layernorm(x), trials),
        "rope_int_offset": timed(lambda: att.rope(q, offset=int(k.shape[2])), trials),
        "rope_cache_offset": timed(lambda: att.rope(q, offset=c.offset), trials),
        "mask_build": timed(lambda: create_attention_mask(x, c), trials)
        if isinstance(mask, mx.array) else 0.0,
        "sdpa_no_mask": timed(lambda: sdpa(None), trials),
        "sdpa_bool_mask": timed(lambda: sdpa(mask), trials) if additive is not None else 0.0,
        "sdpa_additive_mask": timed(lambda: sdpa(additive), trials)
        if additive is not None else 0.0,
        "attention_module": timed(lambda: undo(att(layer.input_layernorm(x), mask, c)), trials),
        "decoder_layer": timed(lambda: undo(layer(x, mask, c)), trials),
    }
    return part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--layers", type=int, default=32)
    a = ap.parse_args()
    model = prof.synthetic_model("8x7b", a.layers, 4, dtype=mx.bfloat16)
    D, L = model.args.hidden_size, len(model.layers)
    layer = model.layers[0]
    rows = {}
    for n in sorted({1, a.streams}):
        x = (mx.random.normal((n, 1, D)) * 0.5).astype(mx.bfloat16)
        cache = [BatchKVCache(left_padding=[0] * n) for _ in model.layers]
        mx.eval(model(mx.random.randint(0, 32000, (n, a.context)), cache=cache))
        att = layer.self_attn
        part = {
            "qkv_proj": timed(lambda: att.qkv_proj(x), a.trials),
            "o_proj": timed(lambda: att.o_proj(x), a.trials),
            "moe_block": timed(lambda: layer.block_sparse_moe(x), a.trials),
            "lm_head": timed(lambda: model.lm_head(x), a.trials),
        }
        for name, lin in (("qkv_proj", att.qkv_proj), ("o_proj", att.o_proj),
                          ("lm_head", model.lm_head)):
            part[f"{name}_mlx_ops"] = timed(lambda: nn.QuantizedLinear.__call__(lin, x), a.trials)
            if mx.cuda.is_available() and n <= cuda_grouped.MAX_TOKENS:
                part[f"{name}_kernel"] = timed(lambda: cuda_grouped.linear(x, lin), a.trials)
                ref = nn.QuantizedLinear.__call__(lin, x).astype(mx.float32)
                got = cuda_grouped.linear(x, lin).astype(mx.float32)
                part[f"{name}_kernel_rel_error"] = (mx.abs(got - ref).max()
                                                    / mx.abs(ref).max()).item()
        part.update(attention_parts(model, x, cache, a.trials))
        steps, builds, dispatches = [], [], []
        tok = mx.random.randint(0, 32000, (n, 1))
        for _ in range(a.trials):
            start = time.perf_counter()
            logits = model(tok, cache=cache)
            tok = mx.argmax(logits[:, -1:], axis=-1)
            built = time.perf_counter()
            mx.async_eval(tok)  # returns once MLX has dispatched the step's kernels
            dispatched = time.perf_counter()
            mx.eval(tok)
            steps.append((time.perf_counter() - start) * 1e3)
            builds.append((built - start) * 1e3)
            dispatches.append((dispatched - built) * 1e3)
        part["model_step_evaluated"] = median(steps)
        part["model_step_host_build"] = median(builds)
        part["model_step_host_dispatch"] = median(dispatches)
        part["model_step_op_count"] = ops_per_step(model, tok, cache)
        part["parts_sum"] = L * (part["qkv_proj"] + part["o_proj"] + part["moe_block"]) + \
            part["lm_head"]
        rows[n] = part
        print(f"{n} rows: " + ", ".join(f"{k} {v:.0f}" if k.endswith("count") else
                                        f"{k} {v:.3f} ms" for k, v in part.items()), flush=True)
    print(json.dumps({"layers": L, "context": a.context, "rows": rows}))


if __name__ == "__main__":
    main()
