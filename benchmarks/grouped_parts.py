"""cuda_grouped.py's kernels in parts, at 8x7B shapes, 4-bit g64: the two
expert kernels (gate_up; down with combine) and the whole MoE block for a step of T
tokens, and each dense 4-bit layer (q/k/v, o, the LM head) by the rows in a
step, three ways: MLX's quantized_matmul on x [rows, 1, K] (a batched decode
step as the model holds it), on x [rows, K], and cuda_grouped.linear.
CUDA only.

    python benchmarks/grouped_parts.py [--tokens 8,32] [--rows 2,4,8,16,32,64]
        [--trials 50] [--unroll 1,2] [--json F]

ms per call (`--trials` calls queued before one eval, best of 3, as
grouped_kernel.py), the GB/s of the weights read once, and the error against
MLX's ops (the whole MoE block for the expert kernels). `--unroll` times the
expert kernels with each given number of steps' weights loaded together
(cuda_grouped.UNROLL; default: as shipped). Prints a table and JSON.

Repeated calls of one layer keep its dense weights in L2 (tens of MB), where a
real step reads every layer's from memory: dense layers time faster here than
in a step. benchmarks/gpu_timeline.py times each kernel of real steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grouped_kernel import _gpu_name, portable, step_inputs, timed  # noqa: E402
from mlx_hermes import cuda_grouped as cg  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402


def gigabytes(*layers) -> float:
    return sum(p.nbytes for lay in layers for _, p in tree_flatten(lay.parameters())) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8,32")
    ap.add_argument("--rows", default="2,4,8,16,32,64")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--unroll", default="", help="e.g. 1,2: each value for gate_up and down")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    unrolls = [int(u) for u in a.unroll.split(",") if u] or [None]
    if not mx.cuda.is_available():
        sys.exit("error: CUDA only")
    model = prof.synthetic_model("8x7b", 2, 4, dtype=mx.bfloat16)
    block = model.layers[0].block_sparse_moe
    experts, k = block.switch_mlp, block.top_k
    att = model.layers[0].self_attn
    D, E = model.args.hidden_size, model.args.num_local_experts
    rows = []

    def report(name: str, variant: str, ms: float, gb: float, err: float) -> None:
        rows.append({"part": name, "variant": variant, "ms": ms, "gb_s": gb / ms * 1e3,
                     "rel_error": err})
        print(f"{name:<10} {variant:<22} {ms:>8.4f} ms {gb / ms * 1e3:>7.0f} GB/s "
              f"err {err:.1e}", flush=True)

    for T in [int(t) for t in a.tokens.split(",") if t]:
        x, logits = step_inputs(block, T, D, E)
        distinct = len(set(mx.argpartition(-logits, k - 1, axis=-1)[..., :k].flatten().tolist()))
        ref = portable(block, x, logits).astype(mx.float32)
        h = cg.gate_up(x, experts, logits, k)
        mx.eval(ref, h)
        err = (mx.abs(cg.moe(x, experts, logits, k).astype(mx.float32) - ref).max()
               / mx.abs(ref).max()).item()
        share = distinct / E  # the experts a step reads
        shipped = dict(cg.UNROLL)
        for u in unrolls:
            if u is not None:
                cg.UNROLL.update(gate_up=u, down=u)
            tag = f"{T} tokens" + (f", U {u}" if u is not None else "")
            report("gate_up", tag, timed(lambda: cg.gate_up(x, experts, logits, k), a.trials),
                   gigabytes(experts.gate_up_proj) * share, err)
            report("down", tag, timed(lambda: cg.combine(cg.down(h, experts, logits, k), k,
                                                          (T, D)), a.trials),
                   gigabytes(experts.down_proj) * share, err)
        cg.UNROLL.update(shipped)
        report("moe", f"{T} tokens", timed(lambda: cg.moe(x, experts, logits, k), a.trials),
               gigabytes(experts) * share, err)
    for name, layer in (("qkv_proj", att.qkv_proj), ("o_proj", att.o_proj),
                        ("lm_head", model.lm_head)):
        K = layer.weight.shape[1] * 8
        for n in [int(r) for r in a.rows.split(",")]:
            x3 = (mx.random.normal((n, 1, K)) * 0.5).astype(mx.bfloat16)
            x2 = x3.reshape(n, K)
            want = nn.QuantizedLinear.__call__(layer, x2).astype(mx.float32)
            scale = mx.abs(want).max()

            def err(y) -> float:
                return (mx.abs(y.reshape(want.shape).astype(mx.float32) - want).max()
                        / scale).item()

            for variant, fn in ((f"mlx [{n}, 1, K]", lambda: nn.QuantizedLinear.__call__(layer, x3)),
                                (f"mlx [{n}, K]", lambda: nn.QuantizedLinear.__call__(layer, x2)),
                                (f"kernel {n} rows", lambda: cg.linear(x2, layer))):
                if "kernel" in variant and n > cg.MAX_TOKENS:
                    continue
                report(name, variant, timed(fn, a.trials), gigabytes(layer), err(fn()))
    out = {"benchmark": "grouped_parts", "date": datetime.date.today().isoformat(),
           "machine": platform.node(), "card": _gpu_name(), "mlx": mx.__version__,
           "trials": a.trials, "rows": rows}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
