"""One rank of the tensor-parallel tests, started by `mlx.launch` (or run alone
for the single-process reference). Writes what it computed to OUT/rank{R}.npz.

usage: tp_worker.py MODEL OUT [check|short|host|die|hang]
(short: no long prompt; host: short, summing over ranks as on CUDA, through host_all_sum)
"""

from __future__ import annotations

import os
import sys
import time

import mlx.core as mx
import mlx.utils
import numpy as np

import mlx_hermes
from mlx_hermes import distributed
from mlx_hermes.cache import make_cache

PROMPT = "The quick brown fox jumps over the lazy dog, and then"
DECODE = [415, 2936, 9060, 285, 1142]
LONG = 4500  # past the ~4k tokens where tensor-parallel corruption has been reported


def compute(model, tokenizer, long_prompt: bool = True) -> dict:
    ids = tokenizer.encode(PROMPT)
    out = {"prefill": np.array(model(mx.array([ids]))[0])}

    cache = make_cache(model)
    steps = [model(mx.array([ids]), cache=cache)[0, -1]]
    for t in DECODE:
        steps.append(model(mx.array([[t]]), cache=cache)[0, -1])
    out["decode"] = np.array(mx.stack(steps))

    greedy = mlx_hermes.stream_generate(model, tokenizer, ids, max_tokens=16, temp=0.0)
    out["greedy"] = np.array([c.token for c in greedy])
    sampled = mlx_hermes.stream_generate(model, tokenizer, ids, max_tokens=16, temp=1.0, seed=3)
    out["sampled"] = np.array([c.token for c in sampled])

    if not long_prompt:
        return out
    long = np.random.default_rng(0).integers(3, 32000, LONG).tolist()
    cache = make_cache(model)
    for start in range(0, LONG, 1500):  # chunked, as generation prefills
        h = model.model(mx.array([long[start : start + 1500]]), cache=cache)
        mx.eval(h)
    out["long"] = np.array(model.lm_head(h[:, -1:])[0, -1])  # the LM head is slow on the CPU
    return out


def main() -> None:
    path, out_dir = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "check"
    group = distributed.world()
    r = group.rank() if group else 0
    if group is None:
        model, tokenizer = mlx_hermes.load(path)
    else:
        watchdog = distributed.start_watchdog(group)
        model, tokenizer = distributed.load_sharded(path, group,
                                                    host_sums=True if mode == "host" else None)
    params = sum(v.nbytes for _, v in mlx.utils.tree_flatten(model.parameters()))
    memory = {"param_bytes": params, "active_bytes": mx.get_active_memory(),
              "peak_bytes": mx.get_peak_memory(),
              "host_summed": [isinstance(model.layers[0].block_sparse_moe,
                                         distributed.HostSummedMoeBlock),
                              isinstance(model.layers[0].self_attn.o_proj,
                                         (distributed.HostSummedLinear,
                                          distributed.HostSummedQuantizedLinear))]}

    if mode in ("die", "hang"):
        ids = tokenizer.encode(PROMPT)
        for i, _ in enumerate(mlx_hermes.stream_generate(model, tokenizer, ids, max_tokens=20_000,
                                                         temp=0.0)):
            if i == 20 and r == 1:
                print(f"rank 1 {mode}s now", flush=True)
                if mode == "die":
                    os.kill(os.getpid(), 9)
                watchdog.paused = True  # stuck, but not by our watchdog's hand
                time.sleep(3600)
        return

    result = compute(model, tokenizer, long_prompt=mode == "check")
    np.savez(os.path.join(out_dir, f"rank{r}.npz"), **result, **memory)
    print(f"rank {r} done", flush=True)

if __name__ == "__main__":
    main()
