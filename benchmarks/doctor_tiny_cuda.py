"""Why `doctor --model` flags the tiny bf16 model on CUDA: its logits on the GPU with
the experts' pairs sorted (MLX's sorted gather_mm) and unsorted, against the CPU in
float32.

    python benchmarks/doctor_tiny_cuda.py MODEL
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_hermes  # noqa: E402
from mlx_hermes import moe  # noqa: E402
from mlx_hermes.specialize import FastPaths  # noqa: E402


def main() -> None:
    path = sys.argv[1]
    ids = mx.array([[1] + list(range(100, 139))])  # 40 tokens: 80 pairs, sorted by default
    with mx.stream(mx.cpu):
        ref_model, _ = mlx_hermes.load(path, dtype="float32", fast_paths=FastPaths.none())
        ref = np.array(ref_model(ids)[0, -1])
    model, _ = mlx_hermes.load(path, fast_paths=FastPaths.none())
    rows = {"sorted (default)": np.array(model(ids)[0, -1].astype(mx.float32))}
    moe.MIN_SORTED_PAIRS = 10**9
    rows["unsorted"] = np.array(model(ids)[0, -1].astype(mx.float32))
    for name, got in rows.items():
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"{name:<18} max rel. logit difference {err:.2e}, argmax equal "
              f"{int(got.argmax()) == int(ref.argmax())}")


if __name__ == "__main__":
    main()
