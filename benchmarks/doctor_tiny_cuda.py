"""Why `doctor --model` flags the tiny bf16 model (examples/make_tiny_model.py) on CUDA:
doctor's own trace (prefill, then greedy decode steps with the KV cache) with the default
fast paths and with none, each row's max relative logit difference against the CPU in
float32; and the prefill alone with the experts' pairs sorted and unsorted.

    python benchmarks/doctor_tiny_cuda.py MODEL
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import doctor, moe  # noqa: E402
from mlx_hermes.loader import load  # noqa: E402
from mlx_hermes.specialize import FastPaths  # noqa: E402


def main() -> None:
    path = sys.argv[1]
    tokens = [1] + list(range(100, 100 + doctor.PROMPT_TOKENS - 1))
    with mx.stream(mx.cpu):
        ref_model, _ = load(path, dtype="float32", fast_paths=FastPaths.none())
        greedy = doctor._greedy(ref_model, tokens)
        ref = doctor.trace(ref_model, tokens, greedy)
    scale = np.abs(ref).max()
    for name, paths in (("default fast paths", FastPaths()), ("portable", FastPaths.none())):
        model, _ = load(path, fast_paths=paths)
        got = doctor.trace(model, tokens, greedy)
        rows = np.abs(got - ref).max(axis=1) / scale
        print(f"{name:<20} per row (prefill, then decode steps): "
              + " ".join(f"{r:.1e}" for r in rows), flush=True)
    for name, threshold in (("prefill sorted", moe.MIN_SORTED_PAIRS), ("prefill unsorted", 10**9)):
        moe.MIN_SORTED_PAIRS = threshold
        model, _ = load(path, fast_paths=FastPaths.none())
        got = np.array(model(mx.array([tokens]))[0].astype(mx.float32))
        with mx.stream(mx.cpu):
            want = np.array(ref_model(mx.array([tokens]))[0])
        print(f"{name:<20} all positions: max rel. difference "
              f"{np.abs(got - want).max() / np.abs(want).max():.1e}", flush=True)


if __name__ == "__main__":
    main()
