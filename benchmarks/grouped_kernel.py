"""One layer's experts for a step of T tokens (T streams decoding together),
8x7B shapes, 4-bit: MLX's own ops (gather_qmm, what a Mac runs), cuda_qmv.py's
one-token kernels, and cuda_grouped.py's grouped kernels, on the same random
weights. CUDA only.

    python benchmarks/grouped_kernel.py [--tokens 1,2,4,8,16,32,64] [--trials 50]
        [--group-size 64] [--json F]

For each T: the error of each kernel path against MLX's ops on the same
routing (float32 logits, so no ties), and ms per call (`--trials` calls of
one layer queued before one eval, so host work hides behind the GPU; the
best of 3), with the GB/s of the distinct experts' weights the step has to
read once. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import cuda_grouped, cuda_qmv  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402
from mlx_hermes.moe import _route  # noqa: E402


def step_inputs(block, T: int, D: int, E: int, *lead: int) -> tuple[mx.array, mx.array]:
    """A step of T tokens of width D for `block` of E experts (shape [T, *lead, D]): bf16
    activations and float32 router logits, nudged apart so that no two experts tie; seeded
    by T."""
    mx.random.seed(T)
    x = (mx.random.normal((T, *lead, D)) * 0.5).astype(mx.bfloat16)
    return x, block.gate(x).astype(mx.float32) + 1e-3 * mx.random.normal((T, *lead, E))


def portable(block, x, logits):
    indices, weights = _route(logits, block.top_k)
    y = block.switch_mlp(x, indices)
    return (y * weights[..., None].astype(x.dtype)).sum(axis=-2)


def timed(fn, trials: int) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(trials)])
        best = min(best, (time.perf_counter() - start) / trials * 1e3)
    return best


def two_layers(group_size: int = 64):
    """Two synthetic 8x7B layers (random 4-bit weights, bf16, this machine's
    fast paths), for benchmarks of one layer's parts; exits where there is no CUDA."""
    if not mx.cuda.is_available():
        sys.exit("error: CUDA only")
    return prof.synthetic_model("8x7b", 2, 4, group_size=group_size, dtype=mx.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    model = two_layers(a.group_size)
    block = model.layers[0].block_sparse_moe
    experts = block.switch_mlp
    E, k = model.args.num_local_experts, block.top_k
    expert_bytes = sum(p.nbytes for _, p in tree_flatten(experts.parameters())) / E
    D = model.args.hidden_size
    rows = []
    print(f"{'tokens':>6} {'experts':>7} {'MLX ops ms':>10} {'one-token ms':>12} "
          f"{'grouped ms':>10} {'grouped GB/s':>12} {'err one-token':>13} {'err grouped':>11}",
          flush=True)
    for T in [int(t) for t in a.tokens.split(",")]:
        x, logits = step_inputs(block, T, D, E, 1)
        distinct = len(set(mx.argpartition(-logits, k - 1, axis=-1)[..., :k].flatten().tolist()))
        ref = portable(block, x, logits).astype(mx.float32)
        scale = mx.abs(ref).max().item()

        def err(y):
            return (mx.abs(y.astype(mx.float32) - ref).max() / scale).item()

        row = {"tokens": T, "distinct_experts": distinct,
               "mlx_ops_ms": timed(lambda: portable(block, x, logits), a.trials)}
        row["one_token_ms"] = timed(lambda: cuda_qmv.moe(x, experts, logits, k), a.trials)
        row["one_token_rel_error"] = err(cuda_qmv.moe(x, experts, logits, k))
        if T <= cuda_grouped.MAX_TOKENS:
            row["grouped_ms"] = timed(lambda: cuda_grouped.moe(x, experts, logits, k), a.trials)
            row["grouped_rel_error"] = err(cuda_grouped.moe(x, experts, logits, k))
            row["grouped_gb_s"] = distinct * expert_bytes / row["grouped_ms"] / 1e6
        rows.append(row)
        print(f"{T:>6} {distinct:>7} {row['mlx_ops_ms']:>10.3f} {row['one_token_ms']:>12.3f} "
              f"{row.get('grouped_ms', float('nan')):>10.3f} "
              f"{row.get('grouped_gb_s', float('nan')):>12.0f} "
              f"{row['one_token_rel_error']:>13.1e} "
              f"{row.get('grouped_rel_error', float('nan')):>11.1e}", flush=True)
    out = {"benchmark": "grouped_kernel", "date": datetime.date.today().isoformat(),
           "machine": platform.node(), "card": _gpu_name(),
           "mlx": mx.__version__, "group_size": a.group_size, "trials": a.trials, "rows": rows}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


def _gpu_name() -> str:
    """The NVIDIA card's name, or "" where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else ""


if __name__ == "__main__":
    main()
