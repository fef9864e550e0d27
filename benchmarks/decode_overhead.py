"""Where a decode step's time goes on a GPU: host work (building the graph in
Python, dispatching it in MLX) against the whole step, for mlx-hermes with and
without mlx_hermes/cuda_qmv.py's kernels, and mlx-lm, on the same weights.

    python benchmarks/decode_overhead.py [--layers 32] [--gen-tokens 64] [--trials 2]

Run it under different MLX settings to see how MLX's CUDA graphs interact
with each path, e.g. `MLX_USE_CUDA_GRAPHS=0` or `MLX_MAX_OPS_PER_BUFFER=200`
(read once per process, so one setting per run). Prints a table and JSON;
"ops/step" counts the MLX primitives of one step (on a CPU it includes the
fallbacks of MLX's fast ops, so compare counts on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import cuda_qmv  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402
from mlx_hermes.cache import make_cache  # noqa: E402


def count_ops(y: mx.array) -> int:
    """MLX primitives in the (unevaluated) graph of `y`, from MLX's DOT export."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "graph.dot"
        mx.export_to_dot(str(path), y)
        return path.read_text().count("shape=rectangle")


def ops_per_step(model, prompt: list[int]) -> int:
    """MLX primitives in one decode step's graph (what the host builds and
    dispatches each token)."""
    cache = make_cache(model)
    mx.eval(model(mx.array([prompt]), cache=cache))
    return count_ops(model(mx.array([[7]]), cache=cache))


def step_times(model, prompt: list[int], steps: int = 12) -> dict:
    """Median seconds per decode step to build the graph (Python), to
    dispatch it (returns from async_eval), and in all (evaluated)."""
    cache = make_cache(model)
    y = model(mx.array([prompt]), cache=cache)
    mx.eval(y)
    tok = mx.array([[7]])
    build, dispatch, total = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        y = model(tok, cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        t3 = time.perf_counter()
        build.append(t1 - t0)
        dispatch.append(t2 - t1)
        total.append(t3 - t0)
    med = statistics.median
    return {"build_ms": med(build) * 1e3, "dispatch_ms": med(dispatch) * 1e3,
            "step_ms": med(total) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    a = ap.parse_args()
    settings = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    t = time.perf_counter()
    model = prof.synthetic_model("8x7b", a.layers, 4, dtype=mx.bfloat16)
    twin = prof.mlx_lm_twin(model, mx.bfloat16)
    print(f"built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, 32000, size=a.prompt_tokens - 1).tolist()

    # (model, cuda_qmv kernels); decode tok/s: median of trials
    paths = {"mlx-hermes": (model, True), "mlx-hermes, MLX ops only": (model, False),
             "mlx-lm": (twin, False)}
    rows = {name: {"decode_tps": []} for name in paths}

    def use(name):
        m, kernel = paths[name]
        if m is model:
            for layer in model.layers:
                cuda_qmv.with_kernels(layer.block_sparse_moe, kernel)
        return m

    for name in paths:  # compile, warm
        prof.time_generation(use(name), prompt, 4, make_cache(model))
    for _ in range(a.trials):  # round robin: drifts in the host's speed hit every path alike
        for name in paths:
            m = use(name)
            rows[name]["decode_tps"].append(
                prof.time_generation(m, prompt, a.gen_tokens, make_cache(model))["decode_tps"])
    for name in paths:
        rows[name] = {"decode_tps": statistics.median(rows[name]["decode_tps"]),
                      **step_times(use(name), prompt), "ops": ops_per_step(use(name), prompt)}

    print(f"MLX settings: {settings or 'defaults'}")
    print(f"{'path':<27} {'decode tok/s':>12} {'build ms':>9} {'dispatch ms':>11} {'step ms':>8}"
          f" {'ops/step':>8}")
    for name, r in rows.items():
        print(f"{name:<27} {r['decode_tps']:>12.1f} {r['build_ms']:>9.2f} "
              f"{r['dispatch_ms']:>11.2f} {r['step_ms']:>8.2f} {r['ops']:>8}")
    print(json.dumps({"settings": settings, "layers": a.layers or 32, "rows": rows,
                      "device": mx.device_info().get("device_name")}))


if __name__ == "__main__":
    main()
