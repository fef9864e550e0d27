"""Peak memory while generating: mlx-hermes against mlx-lm, each alone.

    python benchmarks/peak_memory.py [--synthetic 8x7b] [--layers N] [--bits 4]
        [--prompt-tokens 2048] [--gen-tokens 128]

Each runtime runs in its own child process on the same synthetic weights
(seed 0): the model is built; the prompt is prefilled once alone (its peak:
"prefill peak", which tells whether the prompt or the decoding sets the
peak; it also compiles the kernels), then, MLX's peak counter reset, the
prompt is prefilled and decoded ("peak", the figure compared). Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import gc, json, sys
sys.path.insert(0, {root!r})
import mlx.core as mx
from mlx_hermes import profile as prof
from mlx_hermes.cache import make_cache
mx.random.seed(0)
dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
from mlx_hermes.specialize import FastPaths
model = prof.synthetic_model({synthetic!r}, {layers!r}, {bits}, dtype=dtype,
                             fast_paths=FastPaths() if {runtime!r} == "mlx-hermes" else None)
weights = prof.model_bytes(model)
if {runtime!r} == "mlx-lm":
    twin = prof.mlx_lm_twin(model, mx.bfloat16 if dtype == mx.bfloat16 else dtype)
    del model
    gc.collect()
    model = twin
cache_from = twin if {runtime!r} == "mlx-lm" else model
prompt = [1] + list(range(100, 100 + {prompt} - 1))
mx.clear_cache()
mx.reset_peak_memory()
prof.time_generation(model, prompt, 1, make_cache(cache_from))  # the prefill alone; warms up
prefill_peak = mx.get_peak_memory()
mx.clear_cache()
mx.reset_peak_memory()
r = prof.time_generation(model, prompt, {gen}, make_cache(cache_from))
print(json.dumps({{"weights_gb": weights / 1e9, "peak_gb": mx.get_peak_memory() / 1e9,
                  "prefill_peak_gb": prefill_peak / 1e9, **r}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="8x7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()
    results = {}
    for runtime in ("mlx-hermes", "mlx-lm"):
        code = CHILD.format(root=str(ROOT), synthetic=args.synthetic, layers=args.layers,
                            bits=args.bits, runtime=runtime, prompt=args.prompt_tokens,
                            gen=args.gen_tokens)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        results[runtime] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'runtime':<11} {'weights GB':>10} {'peak GB':>8} {'prefill peak GB':>15} "
          f"{'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, r in results.items():
        print(f"{name:<11} {r['weights_gb']:10.2f} {r['peak_gb']:8.2f} "
              f"{r['prefill_peak_gb']:15.2f} {r['prompt_tps']:14.1f} {r['decode_tps']:13.1f}")
    ratio = results["mlx-hermes"]["peak_gb"] / results["mlx-lm"]["peak_gb"]
    print(f"peak memory, mlx-hermes / mlx-lm: {ratio:.3f}")
    print(json.dumps({"benchmark": "peak_memory", **vars(args), "results": results,
                      "ratio": ratio}))


if __name__ == "__main__":
    main()
