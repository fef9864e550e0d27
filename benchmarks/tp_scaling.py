"""Tensor-parallel scaling: the 8x7B shape, random 4-bit weights, one process
against N ranks.

    python benchmarks/tp_scaling.py                              # one GPU
    mlx.launch -n 2 --backend nccl -- python benchmarks/tp_scaling.py   # two

Prints a table and one JSON line (rank 0 only): prefill and decode tokens/s,
weights held per rank, and the time per token in all_sums.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_hermes import distributed
from mlx_hermes.cache import make_cache
from mlx_hermes.profile import bytes_per_token, synthetic_model, time_generation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=None, help="fewer than 32, to save time")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    a = parser.parse_args()

    group = distributed.world()
    n = group.size() if group else 1
    start = time.perf_counter()
    model = synthetic_model("8x7b", a.layers, a.bits)
    if group is not None:
        distributed.shard(model, group)
        for layer in model.layers:
            mx.eval(layer.parameters())
            mx.clear_cache()
    mx.eval(model.parameters())
    built = time.perf_counter() - start

    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, 32000, a.prompt_tokens - 1).tolist()
    time_generation(model, prompt, 8, make_cache(model))  # warm-up
    runs = [time_generation(model, prompt, a.gen_tokens, make_cache(model))
            for _ in range(a.trials)]
    comm = distributed.communication_per_token(model, group) if group else 0.0
    held = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    result = {
        "ranks": n, "layers": len(model.layers), "bits": a.bits,
        "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "trials": a.trials,
        "prompt_tps": float(np.median([r["prompt_tps"] for r in runs])),
        "decode_tps": float(np.median([r["decode_tps"] for r in runs])),
        "weights_gb_per_rank": held / 1e9,
        "bytes_per_token_gb_per_rank": bytes_per_token(model) / 1e9,
        "comm_ms_per_token": comm * 1e3,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "build_s": built,
        "device": mx.device_info().get("device_name", str(mx.default_device())),
    }
    if group is None or group.rank() == 0:
        print(f"{'ranks':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'GB/rank':>8} "
              f"{'comm ms/tok':>12}")
        print(f"{n:>5} {result['prompt_tps']:>14.1f} {result['decode_tps']:>13.1f} "
              f"{result['weights_gb_per_rank']:>8.2f} {result['comm_ms_per_token']:>12.2f}")
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
