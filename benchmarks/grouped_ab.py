"""cuda_grouped.py's kernels against the same file at another git revision,
on the same weights in one process, alternating: is a kernel change faster,
and are its results the same? CUDA only.

    python benchmarks/grouped_ab.py [--base HEAD | --base FILE] [--tokens 8,16,32,64]
        [--rows 8,32] [--rounds 3] [--trials 30] [--json F]

The base revision's module is loaded under another name, its kernels renamed
(MLX caches a compiled kernel by its name). For each step size: the largest
difference between the two versions' outputs (gate_up's h; the block's
output from h: down, then combine or a cast; each dense 4-bit layer of the
8x7B shapes at `--rows`), and us a call (`timed`:
`--trials` calls queued, best of 3), medians of `--rounds` alternating
rounds. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from grouped_kernel import _gpu_name, step_inputs, timed  # noqa: E402
from mlx_hermes import cuda_grouped as new  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402


def base_module(rev: str):
    """mlx_hermes/cuda_grouped.py as of `rev` (a git revision, or a file: the
    GPU machine gets the working tree without its history), its kernels
    renamed."""
    if Path(rev).is_file():
        source = Path(rev).read_text()
    else:
        source = subprocess.run(["git", "show", f"{rev}:mlx_hermes/cuda_grouped.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    source = source.replace('"hermes_grouped_', '"hermes_base_grouped_')
    spec = importlib.util.spec_from_loader("mlx_hermes._grouped_base", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "mlx_hermes"
    exec(compile(source, f"{rev}:cuda_grouped.py", "exec"), module.__dict__)
    return module


def block_end(module, h: mx.array, experts, logits: mx.array, k: int) -> mx.array:
    """A revision's MoE block from h to its bf16 output [T, D]: down, then
    combine (from 2026-11-28; before, down summed into float32 and a cast
    followed)."""
    T, D = h.shape[0] // k, experts.down_proj.weight.shape[-2]
    if hasattr(module, "combine"):
        return module.combine(module.down(h, experts, logits, k), k, (T, D))
    return module.down(h, experts, logits, k).astype(mx.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--tokens", default="8,16,32,64")
    ap.add_argument("--rows", default="8,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not mx.cuda.is_available():
        sys.exit("error: CUDA only")
    old = base_module(a.base)
    model = prof.synthetic_model("8x7b", 2, 4, dtype=mx.bfloat16)
    block = model.layers[0].block_sparse_moe
    experts, k = block.switch_mlp, block.top_k
    att = model.layers[0].self_attn
    D, E = model.args.hidden_size, model.args.num_local_experts
    rows = []

    def compare(part: str, size: int, calls: dict, diff: float) -> None:
        times = {name: [] for name in calls}
        for _ in range(a.rounds):
            for name, fn in calls.items():
                times[name].append(timed(fn, a.trials) * 1e3)
        base, mine = (statistics.median(times[n]) for n in ("base", "new"))
        rows.append({"part": part, "size": size, "base_us": base, "new_us": mine,
                     "ratio": mine / base, "max_diff": diff})
        print(f"{part:<8} {size:>4} {base:>9.1f} {mine:>9.1f} {mine / base:>6.2f} {diff:>9.1e}",
              flush=True)

    print(f"{'part':<8} {'size':>4} {'base us':>9} {'new us':>9} {'ratio':>6} {'max diff':>9}")
    for T in [int(t) for t in a.tokens.split(",") if t]:
        x, logits = step_inputs(block, T, D, E)
        h = old.gate_up(x, experts, logits, k)
        diff = mx.abs(h.astype(mx.float32) - new.gate_up(x, experts, logits, k)
                      .astype(mx.float32)).max().item()
        compare("gate_up", T, {"base": lambda: old.gate_up(x, experts, logits, k),
                               "new": lambda: new.gate_up(x, experts, logits, k)}, diff)
        diff = mx.abs(block_end(old, h, experts, logits, k).astype(mx.float32)
                      - block_end(new, h, experts, logits, k).astype(mx.float32)).max().item()
        compare("down", T, {"base": lambda: block_end(old, h, experts, logits, k),
                            "new": lambda: block_end(new, h, experts, logits, k)}, diff)
    for name, layer in (("qkv", att.qkv_proj), ("o", att.o_proj), ("router", block.gate),
                        ("lm_head", model.lm_head)):
        K = layer.weight.shape[1] * 8
        for n in [int(r) for r in a.rows.split(",") if r]:
            x2 = (mx.random.normal((n, K)) * 0.5).astype(mx.bfloat16)
            diff = mx.abs(old.linear(x2, layer).astype(mx.float32)
                          - new.linear(x2, layer).astype(mx.float32)).max().item()
            compare(name, n, {"base": lambda: old.linear(x2, layer),
                              "new": lambda: new.linear(x2, layer)}, diff)
    out = {"benchmark": "grouped_ab", "base": a.base, "date": datetime.date.today().isoformat(),
           "card": _gpu_name(), "mlx": mx.__version__, "rounds": a.rounds, "rows": rows}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
