"""This tree against an earlier commit, on the same machine in one process:
decode and prefill tok/s in alternating rounds (medians), and MLX ops per
decoded token. For changes that must not cost speed (refactors).

    git archive OLD mlx_hermes | tar -x -C /tmp/old    # the earlier package
    python benchmarks/compare_trees.py --old /tmp/old/mlx_hermes --synthetic 8x7b [--layers N]
    python benchmarks/compare_trees.py --old /tmp/old/mlx_hermes --model FOLDER   # e.g. on a CPU

The earlier package is imported under another name (mlx_hermes_old), so both
run side by side: decode on a GPU is host-bound and its speed drifts between
processes, which alternating rounds in one process cancel. Prints a table and
JSON.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mlx_hermes  # noqa: E402
from decode_overhead import ops_per_step  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402
from mlx_hermes.cache import make_cache  # noqa: E402


def import_as(folder: Path, name: str):
    """The package in `folder`, imported as `name` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(package, args, dtype):
    if args.model:
        return package.load(args.model)[0]
    profile = importlib.import_module(f"{package.__name__}.profile")
    return profile.synthetic_model(args.synthetic, args.layers, 4, dtype=dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the earlier mlx_hermes folder")
    ap.add_argument("--synthetic", default=None, choices=list(prof.SYNTHETIC))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--model", default=None, help="a model folder instead of --synthetic")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if (args.model is None) == (args.synthetic is None):
        ap.error("give --model or --synthetic")
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    old = import_as(args.old, "mlx_hermes_old")
    models = {"earlier": build(old, args, dtype), "this tree": build(mlx_hermes, args, dtype)}
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, 32000, size=args.prompt_tokens - 1).tolist()

    runs = {name: [] for name in models}
    for model in models.values():  # compile, warm
        prof.time_generation(model, prompt, 4, make_cache(model))
    for r in range(args.rounds):
        for name, model in (models.items() if r % 2 == 0 else reversed(models.items())):
            runs[name].append(prof.time_generation(model, prompt, args.gen_tokens,
                                                   make_cache(model)))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = {}
    for name, model in models.items():
        rows[name] = {k: statistics.median(run[k] for run in runs[name])
                      for k in ("decode_tps", "prompt_tps")}
        rows[name]["decode_tps_rounds"] = [run["decode_tps"] for run in runs[name]]
        rows[name]["ops_per_token"] = ops_per_step(model, prompt)
    new, before = rows["this tree"], rows["earlier"]
    print(f"{'tree':<10} {'decode tok/s':>12} {'prefill tok/s':>13} {'ops/token':>9}")
    for name, row in rows.items():
        print(f"{name:<10} {row['decode_tps']:12.2f} {row['prompt_tps']:13.1f} "
              f"{row['ops_per_token']:9d}")
    ratio = {"decode": new["decode_tps"] / before["decode_tps"],
             "prefill": new["prompt_tps"] / before["prompt_tps"]}
    print(f"this tree / earlier: decode {ratio['decode']:.3f}x, prefill {ratio['prefill']:.3f}x")
    print(json.dumps({"benchmark": "compare_trees", "device": str(mx.default_device()),
                      "machine": platform.platform(), "model": args.model or args.synthetic,
                      "layers": args.layers, "prompt_tokens": args.prompt_tokens,
                      "gen_tokens": args.gen_tokens, "rounds": args.rounds, "rows": rows,
                      "ratio": ratio}))


if __name__ == "__main__":
    main()
